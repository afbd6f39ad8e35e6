"""runtimed's shim: the common interface of runtime backends and the per-container shim process.

Layout:
    api.py       the contracts: `Shim` (what every runtime backend implements, daemon side) and the
                 shim process's protocol (methods, request/response values, error classes)
    protocol.py  the wire: length-prefixed JSON frames on a unix socket (no grpc, no protobuf)
    server.py    the shim process: a container's supervisor (subreaper, stdio, exit statuses),
                 one thread, one event loop
    loop.py      that event loop (epoll, timers)
    zygote.py    the pre-loaded parent the daemon starts once; it forks one shim per container
    reaper.py    spawning without inheritance; reaping every child as a subreaper
    stdio.py     the client's FIFOs, log files and terminals (console socket, pty copying)
    process.py   one process's life cycle as a backend tracks it (daemon side)

What the shim process loads (server, loop, zygote, reaper, stdio, protocol, api) imports only the
standard library, so a shim costs little memory; see zygote.py and docs/shim.md for the figures.
"""
