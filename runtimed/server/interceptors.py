"""The gRPC edge: the namespace from metadata, errors to status codes, request logging.

Every servicer method runs inside `EdgeInterceptor`'s wrapper, so servicers only
convert messages and call the core; any exception they let through becomes a
status here, through runtimed.errors.status_of.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable
from typing import Any

import grpc
import structlog

from runtimed import identifiers
from runtimed.errors import RuntimedError, status_of
from runtimed.wire import DEFAULT_NAMESPACE, LEASE_KEY, NAMESPACE_KEY

log = structlog.get_logger("runtimed.grpc")


_namespace: contextvars.ContextVar[str] = contextvars.ContextVar("namespace", default=DEFAULT_NAMESPACE)
_lease: contextvars.ContextVar[str] = contextvars.ContextVar("lease", default="")


def current_namespace() -> str:
    """The validated namespace of the call being served."""
    return identifiers.validate(_namespace.get(), "namespace")


def current_lease() -> str:
    """The lease of the call being served, or "" outside a lease."""
    lease = _lease.get()
    return identifiers.validate_lease_id(lease, "lease") if lease else ""


def _metadata_value(details: grpc.HandlerCallDetails, key: str) -> str | None:
    for item_key, value in details.invocation_metadata or ():
        if item_key == key:
            return value if isinstance(value, str) else value.decode()
    return None


class EdgeInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        namespace = _metadata_value(details, NAMESPACE_KEY) or DEFAULT_NAMESPACE
        lease = _metadata_value(details, LEASE_KEY) or ""
        method = details.method

        def enter() -> float:
            _namespace.set(namespace)
            _lease.set(lease)
            structlog.contextvars.bind_contextvars(namespace=namespace, method=method)
            return time.perf_counter()

        async def fail(context: grpc.aio.ServicerContext, exc: Exception, started: float) -> None:
            code, message = status_of(exc)
            level = "warning" if not isinstance(exc, RuntimedError) else "debug"
            getattr(log, level)(
                "request failed",
                code=code.name,
                error=message,
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
                exc_info=not isinstance(exc, RuntimedError),
            )
            await context.abort(code, message)

        def done(started: float) -> None:
            log.debug("request", duration_ms=round((time.perf_counter() - started) * 1000, 2))

        def single(inner: Callable[..., Any]) -> Callable[..., Any]:
            """Wrap a method with one response (unary-unary or stream-unary)."""

            async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started = enter()
                try:
                    response = await inner(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await fail(context, exc, started)
                done(started)
                return response

            return behavior

        def streaming(inner: Callable[..., Any]) -> Callable[..., Any]:
            """Wrap a method with a stream of responses (unary-stream or stream-stream)."""

            async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started = enter()
                try:
                    async for item in inner(request, context):
                        yield item
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await fail(context, exc, started)
                done(started)

            return behavior

        codec = (handler.request_deserializer, handler.response_serializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(single(handler.unary_unary), *codec)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(single(handler.stream_unary), *codec)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), *codec)
        return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), *codec)
