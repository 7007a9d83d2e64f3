"""apiproxy: a narrow, audited door into a Kubernetes API server for remote Istio control planes."""

__version__ = "0.1.0"
