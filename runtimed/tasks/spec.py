"""OCI runtime specs for new containers, the way containerd's client builds them (ctr run).

`default_spec(namespace, id)` is containerd's default Linux spec (oci.populateDefaultUnixSpec):
the default capability set, masked and read-only /proc and /sys paths, no_new_privileges, an
RLIMIT_NOFILE of 1024, new pid/ipc/uts/mount/network namespaces, cgroup /<namespace>/<id>.
runtimed adds a default seccomp profile (containerd leaves it to `ctr run --seccomp`): allow
everything but a deny list of system calls a container has no business making (kernel
modules, kexec, mount, reboot, keyrings, bpf, ptrace of other processes, clock setting, ...).

`with_image_config` applies an image's config as ctr does (oci.WithImageConfig): Entrypoint and
Cmd (or the given arguments), Env, WorkingDir, User (numeric, or root).
"""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping, Sequence
from typing import Any

from runtimed.errors import InvalidArgument, q

SPEC_VERSION = "1.0.2-dev"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_CAPABILITIES = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
]
MASKED_PATHS = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
DENIED_SYSCALLS = [
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "move_mount",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "query_module",
    "quotactl",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "stime",
    "swapoff",
    "swapon",
    "_sysctl",
    "sysfs",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vm86",
    "vm86old",
]
_SECCOMP_ARCHES = {
    "x86_64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "aarch64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
    "ppc64le": ["SCMP_ARCH_PPC64LE"],
    "s390x": ["SCMP_ARCH_S390X", "SCMP_ARCH_S390"],
}
EPERM = 1


def default_seccomp() -> dict[str, Any]:
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": _SECCOMP_ARCHES.get(platform.machine(), []),
        "syscalls": [{"names": DENIED_SYSCALLS, "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM}],
    }


def default_spec(namespace: str, container_id: str, *, seccomp: bool = True) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "ociVersion": SPEC_VERSION,
        "root": {"path": "rootfs"},
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": [],
            "env": [DEFAULT_PATH],
            "cwd": "/",
            "capabilities": {k: list(DEFAULT_CAPABILITIES) for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "mounts": [
            {
                "destination": "/proc",
                "type": "proc",
                "source": "proc",
                "options": ["nosuid", "noexec", "nodev"],
            },
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            },
            {
                "destination": "/dev/mqueue",
                "type": "mqueue",
                "source": "mqueue",
                "options": ["nosuid", "noexec", "nodev"],
            },
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            },
            {
                "destination": "/run",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
        ],
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "cgroupsPath": f"/{namespace}/{container_id}",
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }
    if seccomp:
        spec["linux"]["seccomp"] = default_seccomp()
    return spec


def _merge_env(base: Sequence[str], extra: Sequence[str]) -> list[str]:
    """containerd's replaceOrAppendEnvValues: later values win, by variable name."""
    merged = list(base)
    for entry in extra:
        name = entry.split("=", 1)[0]
        merged = [e for e in merged if e.split("=", 1)[0] != name]
        merged.append(entry)
    return merged


def _user(user: str) -> dict[str, int]:
    if not user or user in ("root", "0", "root:root", "0:0"):
        return {"uid": 0, "gid": 0}
    uid, _, gid = user.partition(":")
    if not uid.isdigit() or (gid and not gid.isdigit()):
        raise InvalidArgument(f"user {q(user)}: only numeric uid[:gid] (or root) is supported")
    return {"uid": int(uid), "gid": int(gid or uid)}


def with_image_config(
    spec: dict[str, Any],
    image_config: Mapping[str, Any],
    args: Sequence[str] = (),
    *,
    terminal: bool = False,
    env: Sequence[str] = (),
    cwd: str = "",
    user: str = "",
) -> dict[str, Any]:
    """Apply an image's config ("config" of the image config document) and overrides."""
    process = spec["process"]
    process["env"] = _merge_env(process["env"], [*(image_config.get("Env") or []), *env])
    entrypoint = list(image_config.get("Entrypoint") or [])
    command = list(args) if args else list(image_config.get("Cmd") or [])
    process["args"] = entrypoint + command
    if not process["args"]:
        raise InvalidArgument("no command: the image has no Entrypoint or Cmd and none was given")
    process["cwd"] = cwd or image_config.get("WorkingDir") or "/"
    process["user"] = _user(user or image_config.get("User") or "")
    process["terminal"] = terminal
    if terminal:
        process["env"] = _merge_env(process["env"], ["TERM=xterm"])
    return spec


def encode(spec: Mapping[str, Any]) -> bytes:
    return json.dumps(spec, separators=(",", ":")).encode()
