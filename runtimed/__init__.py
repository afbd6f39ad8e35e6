"""runtimed: a container runtime daemon speaking containerd's v1 gRPC API."""

__version__ = "0.1.0"
