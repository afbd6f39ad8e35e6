"""Runtime backends behind the common shim interface (shim.api.Shim), each a plugin of type
io.runtimed.runtime.v1 (see runtimed.tasks.runtime): runc now; native, gVisor and kata later.

A backend runs in the daemon and drives its runtime (runc's command line, a VM's agent, ...);
what must outlive the daemon, the processes themselves, their stdio and exit statuses, belongs
to the task's shim process (shim.server), which the backend asks to spawn its commands.
"""
