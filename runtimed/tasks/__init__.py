"""Tasks: running containers through runtime backends and their shim processes (daemon side).

manager.py    TaskManager: tasks per (namespace, container), events, re-adoption at start-up
runtime.py    what a runtime backend plugin (io.runtimed.runtime.v1) gives the manager
launcher.py   the shim zygote: starts one shim process per task
client.py     ShimClient: the shim process's protocol, over asyncio
bundle.py     the task's directory under the state dir; rootfs mounts
spec.py       OCI runtime specs as containerd's client builds them (runtimectl run)
"""
