"""Registry client (OCI distribution spec): resolve, verified fetch with resume, push, auth.

Runs inside the daemon behind the transfer service, so clients need no registry code.
"""

from __future__ import annotations

from runtimed.remotes.auth import (
    CredentialProvider,
    Credentials,
    DockerConfig,
    parse_challenges,
    static_credentials,
)
from runtimed.remotes.client import (
    BlobData,
    BlobStream,
    Digester,
    PushResult,
    RegistryClient,
    file_source,
    is_loopback,
    new_digester,
)

__all__ = [
    "BlobData",
    "BlobStream",
    "CredentialProvider",
    "Credentials",
    "Digester",
    "DockerConfig",
    "PushResult",
    "RegistryClient",
    "file_source",
    "is_loopback",
    "new_digester",
    "parse_challenges",
    "static_credentials",
]
