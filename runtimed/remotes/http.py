"""HTTP failures mapped onto runtimed.errors, with messages naming the registry and the request."""

from __future__ import annotations

import json
import ssl

import httpx

from runtimed.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    RuntimedError,
    Unavailable,
    q,
)

# Error bodies are read only this far: enough for the registry's error JSON, not a stray blob.
MAX_ERROR_BODY = 64 * 1024


def authority(url: httpx.URL) -> str:
    """host:port of a URL, the port made explicit, for messages ("127.0.0.1:5000", "[::1]:443")."""
    host = url.host
    if ":" in host:
        host = f"[{host}]"
    port = url.port or (443 if url.scheme == "https" else 80)
    return f"{host}:{port}"


async def read_error_body(response: httpx.Response) -> bytes:
    """Read at most MAX_ERROR_BODY bytes of a (possibly streamed) error response, then close it."""
    body = bytearray()
    try:
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) >= MAX_ERROR_BODY:
                break
    except httpx.HTTPError:
        pass  # a body cut short still has a status worth reporting
    finally:
        await response.aclose()
    return bytes(body[:MAX_ERROR_BODY])


def registry_message(body: bytes) -> str:
    """The registry's error JSON ({"errors": [{"code", "message", "detail"}]}) as one line."""
    try:
        document = json.loads(body)
        errors = document["errors"]
        parts: list[str] = []
        for error in errors:
            part = ": ".join(str(error[k]) for k in ("code", "message") if error.get(k))
            detail = error.get("detail")
            if isinstance(detail, str | int) and detail != "":
                part += f" ({detail})"  # e.g. the digest of MANIFEST_BLOB_UNKNOWN
            if part and part not in parts:
                parts.append(part)
        if parts:
            return "; ".join(parts)
    except (ValueError, KeyError, TypeError):
        pass
    text = body.decode("utf-8", "replace").strip()
    return " ".join(text.split())[:200]


def status_error(
    response: httpx.Response, body: bytes, *, host: str, what: str, auth_hint: str = ""
) -> RuntimedError:
    """The error for a registry answer that was not one of the statuses the operation expects.

    auth_hint says which credentials were tried, for a 401.
    """
    status = response.status_code
    request = response.request
    operation = f"{request.method} {request.url.path}"
    answered = f"{status} {response.reason_phrase}".strip()
    detail = registry_message(body)
    detail_suffix = f": {detail}" if detail else ""
    if status == 401:
        hint = f": {auth_hint}" if auth_hint else ""
        return PermissionDenied(f"authentication failed for {host} (accessing {what}){hint}{detail_suffix}")
    if status == 403:
        return PermissionDenied(f"access to {what} denied by {host} ({answered}){detail_suffix}")
    if status == 404:
        return NotFound(f"{what}{detail_suffix}")
    if status == 416:
        return OutOfRange(f"{what}: registry {host} refused the requested range ({answered}){detail_suffix}")
    if status == 429 or status >= 500:
        retry_after = response.headers.get("Retry-After")
        later = f" (retry after {retry_after})" if retry_after else ""
        return Unavailable(f"registry {host} answered {answered} to {operation}{later}{detail_suffix}")
    if status == 400:
        return InvalidArgument(f"registry {host} rejected {operation} for {what} ({answered}){detail_suffix}")
    if 400 <= status < 500:
        return FailedPrecondition(
            f"registry {host} refused {operation} for {what} ({answered}){detail_suffix}"
        )
    return Unavailable(
        f"registry {host} gave an unexpected {answered} to {operation} for {what}{detail_suffix}"
    )


def transport_error(
    exc: httpx.HTTPError, *, connect_timeout: float, read_timeout: float, during: str = ""
) -> RuntimedError:
    """A connection-level failure: refused, timed out, reset, TLS. `during` adds to the operation."""
    try:
        request = exc.request
    except RuntimeError:  # an error raised before any request existed
        return Unavailable(f"registry request failed: {exc}")
    where = authority(request.url)
    operation = f"{request.method} {request.url.path}{during}"
    if isinstance(exc, httpx.ConnectTimeout):
        return Unavailable(f"connecting to registry {where} timed out after {connect_timeout:g}s")
    if isinstance(exc, httpx.ReadTimeout):
        return Unavailable(
            f"registry {where} sent nothing for {read_timeout:g}s (read timeout) during {operation}: "
            "timed out"
        )
    if isinstance(exc, httpx.WriteTimeout):
        return Unavailable(
            f"registry {where} accepted no data for {read_timeout:g}s (write timeout) during {operation}: "
            "timed out"
        )
    if isinstance(exc, httpx.PoolTimeout):
        return Unavailable(f"no free connection to registry {where} for {operation}: timed out")
    if isinstance(exc, httpx.ConnectError):
        return Unavailable(f"cannot connect to registry {where}: {_reason(exc)}")
    if isinstance(exc, httpx.TooManyRedirects):
        return Unavailable(f"registry {where}: too many redirects for {operation}")
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return InvalidArgument(f"registry URL {q(str(request.url))} cannot be used: {exc}")
    return Unavailable(f"connection to registry {where} broken during {operation}: {_reason(exc)}")


def _reason(exc: BaseException) -> str:
    """The innermost OS or TLS reason ("connection refused"), which httpx wraps twice."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, ssl.SSLError):
            return f"TLS failed ({cause}); a plain-HTTP registry needs plain_http"
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror.lower()
        cause = cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__
