"""The vocabulary every other package shares: the BlockCopy API (names, phases, the parsed
spec), what the agent observed of a disk, and the interfaces (``ports``) in front of every
external client. Plain data and Protocols: no I/O, no framework."""
