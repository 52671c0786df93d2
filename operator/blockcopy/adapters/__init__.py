"""The real clients behind ``model.ports``: libvirt (the only package that imports it), the
Kubernetes API, qemu-img, the node's file system, the liveness probe and Prometheus metrics.
They translate; they do not decide."""
