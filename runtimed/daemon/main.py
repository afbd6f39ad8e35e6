"""`runtimed`: the daemon's command line, start-up and shutdown.

runtimed [--address unix:///PATH] [--root DIR] [--state DIR] [--config FILE] [--log-level LEVEL]
runtimed config default
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import fcntl
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import structlog

from runtimed import __version__, config, log
from runtimed.builtins import default_registry
from runtimed.errors import RuntimedError, StartupError
from runtimed.plugin import close_all, initialise
from runtimed.server import grpc_server
from runtimed.wire import DEFAULT_SOCKET

logger = structlog.get_logger("runtimed")

LOCK_NAME = "runtimed.lock"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runtimed", description="container runtime daemon")
    parser.add_argument("--version", action="version", version=f"runtimed {__version__}")
    parser.add_argument("--address", "-a", help=f"unix socket to serve on (default unix://{DEFAULT_SOCKET})")
    parser.add_argument("--root", help=f"persistent data directory (default {config.DEFAULT_ROOT})")
    parser.add_argument("--state", help=f"volatile state directory (default {config.DEFAULT_STATE})")
    parser.add_argument("--config", "-c", help=f"TOML config file (default {config.DEFAULT_CONFIG_PATH})")
    parser.add_argument("--log-level", "-l", choices=config.LOG_LEVELS, help="log level (default info)")
    commands = parser.add_subparsers(dest="command")
    config_cmd = commands.add_parser("config", help="configuration helpers")
    config_sub = config_cmd.add_subparsers(dest="config_command", required=True)
    config_sub.add_parser("default", help="print the default configuration")
    return parser


@contextlib.contextmanager
def exclusive_lock(directory: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `directory` for the daemon's life; refuse when held."""
    directory.mkdir(mode=0o711, parents=True, exist_ok=True)
    lock_path = directory / LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise StartupError(
                f"{what} {directory} is in use by another runtimed (pid {holder}); "
                f"give each daemon its own --{what}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


async def serve(cfg: config.DaemonConfig) -> None:
    root, state = Path(cfg.root), Path(cfg.state)
    with exclusive_lock(root, "root"), exclusive_lock(state, "state"):
        os.chmod(root, 0o711)
        os.chmod(state, 0o711)
        registry = default_registry()
        plugins = await initialise(
            registry,
            root=root,
            state=state,
            address=cfg.grpc.address,
            plugin_config=cfg.plugins,
            disabled=cfg.disabled_plugins,
            required=cfg.required_plugins,
        )
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping.set)
        try:
            server = await grpc_server.start(cfg.grpc, plugins)
        except BaseException:
            await close_all(plugins)
            raise
        logger.info("runtimed started", version=__version__, root=str(root), state=str(state))
        try:
            await stopping.wait()
            logger.info("stopping")
        finally:
            await grpc_server.stop(server, cfg.grpc.address)
            await close_all(plugins)
        logger.info("runtimed stopped")


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's per-thread malloc arenas before any worker thread starts.

    Each executor thread otherwise gets its own arena that keeps freed memory: measured
    after large pulls, RSS settled at 84-126 MiB with the default and ~58 MiB with 2.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_arena_max = -8
    libc.mallopt(m_arena_max, arenas)


def load_config(args: argparse.Namespace) -> config.DaemonConfig:
    cfg = config.load(args.config or config.DEFAULT_CONFIG_PATH, missing_ok=args.config is None)
    if args.address:
        cfg.grpc.address = args.address
    if args.root:
        cfg.root = os.path.abspath(args.root)
    if args.state:
        cfg.state = os.path.abspath(args.state)
    if args.log_level:
        cfg.log_level = args.log_level
    for name, value in (("root", cfg.root), ("state", cfg.state)):
        if not os.path.isabs(value):
            raise StartupError(f"{name} {value!r} must be an absolute path")
    grpc_server.parse_address(cfg.grpc.address)
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "config":
        registry = default_registry()
        sys.stdout.write(config.render_default(registry))
        return 0
    try:
        cfg = load_config(args)
        log.configure(cfg.log_level, cfg.log_format)
        limit_malloc_arenas()
        asyncio.run(serve(cfg))
    except RuntimedError as exc:
        print(f"runtimed: {exc.reason}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
