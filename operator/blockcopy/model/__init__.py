"""The vocabulary every other package shares: the BlockCopy API (names, phases, the parsed
spec), what the agent observed of a disk, and the interfaces in front of every external
client (``ports``, ``images``, ``kubeapi``, ``metrics``). Plain data and Protocols: no I/O,
no framework."""
