"""runtimectl: runtimed's admin command line (docker-like, speaking only the wire API).

Each command group is a module here with `register(subparsers)`; main.COMMAND_MODULES lists them.
"""
