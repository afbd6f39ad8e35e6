"""One process's life cycle, as a backend tracks it (daemon side; the shim process keeps pids and
exit statuses, the backend knows what the runtime did with them).

    created --start--> running --exit--> stopped --delete--> (gone)
                       running --pause--> paused --resume--> running
    created --kill/delete------------------> stopped (runc kills a created container)

Each operation checks the status first and refuses with the error containerd's clients expect:
a second start is FailedPrecondition ("cannot start a running process"), a signal to an exited
process NotFound ("process already finished"), deleting a running one FailedPrecondition.
"""

from __future__ import annotations

import asyncio
from typing import Any

from shim.api import (
    FailedPrecondition,
    NotFound,
    ProcessState,
    Status,
    Stdio,
)


class Process:
    def __init__(
        self, container_id: str, exec_id: str, stdio: Stdio, spec: dict[str, Any] | None = None
    ) -> None:
        self.container_id = container_id
        self.exec_id = exec_id
        self.stdio = stdio
        self.spec = spec  # an exec'd process's OCI Process, until it is started
        self.pid = 0
        self.status = Status.CREATED
        self.exit_status = 0
        self.exited_at = 0
        self.exit_reported = False  # its /tasks/exit is published (once per process)
        # Held across start (and the event it publishes) so an exit is never reported first.
        self.lifecycle = asyncio.Lock()
        # Set once the shim process holds it (or its start failed): a wait may come first.
        self.spawned = asyncio.Event()

    @property
    def name(self) -> str:
        return self.exec_id or self.container_id

    @property
    def kind(self) -> str:
        return "process" if self.exec_id else "container"

    def state(self) -> ProcessState:
        return ProcessState(
            container_id=self.container_id,
            exec_id=self.exec_id,
            pid=self.pid,
            status=self.status,
            stdin=self.stdio.stdin,
            stdout=self.stdio.stdout,
            stderr=self.stdio.stderr,
            terminal=self.stdio.terminal,
            exit_status=self.exit_status,
            exited_at=self.exited_at,
        )

    def set_exited(self, exit_status: int, exited_at: int) -> None:
        self.status = Status.STOPPED
        self.exit_status = exit_status
        self.exited_at = exited_at

    @property
    def exited(self) -> bool:
        return self.status == Status.STOPPED

    # -- guards -------------------------------------------------------------------------------

    def require_startable(self) -> None:
        if self.status != Status.CREATED:
            raise FailedPrecondition(f"cannot start a {self.status} {self.kind}")

    def require_signalable(self) -> None:
        if self.status == Status.STOPPED:
            raise NotFound("process already finished")

    def require_deletable(self) -> None:
        if self.status in (Status.RUNNING, Status.PAUSED, Status.PAUSING):
            raise FailedPrecondition(f"cannot delete a {self.status} {self.kind}")

    def require(self, *allowed: str, action: str) -> None:
        if self.status not in allowed:
            raise FailedPrecondition(f"cannot {action} a {self.status} {self.kind}")
