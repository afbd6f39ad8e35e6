"""The gRPC edge: the namespace from metadata, errors to status codes, request logging.

Every servicer method is wrapped once, when its service is registered (`EdgeRegistrar`), so
servicers only convert messages and call the core; any exception they let through becomes a
status here, through runtimed.errors.status_of. Wrapping at registration rather than in a
grpc.aio ServerInterceptor keeps the per-call cost to the wrapper itself: an interceptor runs
a coroutine and builds a new method handler for every call.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc
import structlog

from runtimed import identifiers
from runtimed.errors import RuntimedError, status_of
from runtimed.wire import DEFAULT_NAMESPACE, LEASE_KEY, NAMESPACE_KEY

log = structlog.get_logger("runtimed.grpc")


_namespace: contextvars.ContextVar[str] = contextvars.ContextVar("namespace", default=DEFAULT_NAMESPACE)
_lease: contextvars.ContextVar[str] = contextvars.ContextVar("lease", default="")

# Namespaces seen valid: validation is a regex per call otherwise. Bounded; cleared when full.
_VALID_CACHE_SIZE = 1024
_valid_namespaces: set[str] = set()


def current_namespace() -> str:
    """The validated namespace of the call being served."""
    namespace = _namespace.get()
    if namespace in _valid_namespaces:
        return namespace
    identifiers.validate(namespace, "namespace")
    if len(_valid_namespaces) >= _VALID_CACHE_SIZE:
        _valid_namespaces.clear()
    _valid_namespaces.add(namespace)
    return namespace


def current_lease() -> str:
    """The lease of the call being served, or "" outside a lease."""
    lease = _lease.get()
    return identifiers.validate_lease_id(lease, "lease") if lease else ""


def _text(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode()


def _enter(context: grpc.aio.ServicerContext, method: str) -> float:
    """Set the call's namespace and lease (first value of each header) and its log context."""
    namespace = lease = None
    for key, value in context.invocation_metadata() or ():
        if key == NAMESPACE_KEY:
            if namespace is None:
                namespace = _text(value)
        elif key == LEASE_KEY and lease is None:
            lease = _text(value)
    namespace = namespace or DEFAULT_NAMESPACE
    _namespace.set(namespace)
    _lease.set(lease or "")
    structlog.contextvars.bind_contextvars(namespace=namespace, method=method)
    return time.perf_counter()


async def _fail(context: grpc.aio.ServicerContext, exc: Exception, started: float) -> None:
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


def _done(started: float) -> None:
    log.debug("request", duration_ms=round((time.perf_counter() - started) * 1000, 2))


def _single(method: str, inner: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a method with one response (unary-unary or stream-unary)."""

    async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = _enter(context, method)
        try:
            response = await inner(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _fail(context, exc, started)
        _done(started)
        return response

    return behavior


def _streaming(method: str, inner: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a method with a stream of responses (unary-stream or stream-stream)."""

    async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = _enter(context, method)
        try:
            async for item in inner(request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _fail(context, exc, started)
        _done(started)

    return behavior


def wrap_handler(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` of the full method name `method` ("/package.Service/Method") behind the edge."""
    codec = (handler.request_deserializer, handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(_single(method, handler.unary_unary), *codec)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(_single(method, handler.stream_unary), *codec)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(_streaming(method, handler.unary_stream), *codec)
    return grpc.stream_stream_rpc_method_handler(_streaming(method, handler.stream_stream), *codec)


class _EdgeGenericHandler(grpc.GenericRpcHandler):
    """A generic handler whose method handlers are wrapped (once per method) by the edge."""

    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner
        self._wrapped: dict[str, grpc.RpcMethodHandler | None] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method not in self._wrapped:
            handler = self._inner.service(handler_call_details)
            self._wrapped[method] = None if handler is None else wrap_handler(method, handler)
        return self._wrapped[method]


class EdgeRegistrar:
    """Stands for the server in generated `add_*Servicer_to_server` calls: every method handler
    registered through it runs behind the edge."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_EdgeGenericHandler(h) for h in handlers))

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        self._server.add_registered_method_handlers(
            service_name,
            {name: wrap_handler(f"/{service_name}/{name}", h) for name, h in method_handlers.items()},
        )
