"""Facts of the wire contract shared by daemon and clients (cheap to import: no grpc)."""

DEFAULT_SOCKET = "/run/runtimed/runtimed.sock"
DEFAULT_ADDRESS = f"unix://{DEFAULT_SOCKET}"
# gRPC metadata keys, as containerd's clients send them.
NAMESPACE_KEY = "containerd-namespace"
LEASE_KEY = "containerd-lease"
DEFAULT_NAMESPACE = "default"
# containerd's server and Go client both use 16 MiB message limits.
MAX_MESSAGE_SIZE = 16 * 1024 * 1024
ADDRESS_ENV = "RUNTIMED_ADDRESS"
NAMESPACE_ENV = "RUNTIMED_NAMESPACE"
