"""``kubectl blockcopy``: a client of the Kubernetes API only. It writes BlockCopy specs and
reads status; it imports nothing of the agent or the adapters, and no libvirt."""
