"""Running the agent: its command line, kopf's handlers (one line each) and the start-up and
shut-down that wire the adapters into the agent."""
