"""The node agent: who claims which object, one follower per object (observe, decide, act,
record), the recorder that writes status and Events, disk groups, copy slots and the
collaborators that act (starting a copy, copying a chain's lower layers, the convergence
assist). Knows its clients only by their interfaces (the Protocols of ``model``)."""
