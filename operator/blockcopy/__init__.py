"""blockcopy-operator: live VM disk mirrors (libvirt block copy) as Kubernetes resources."""

__version__ = "0.2.0"
