"""The cluster-wide controller of BlockCopyPlans: it knows the Kubernetes API only through
``blockcopy.model.kubeapi.PlanKube``."""
