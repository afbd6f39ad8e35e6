"""Choosing a backend by runtime name, runc's options, and the OCI specs runtimectl builds."""

from __future__ import annotations

from pathlib import Path

import pytest

from plugins.runtimes.runc import RuncRuntime
from runtimed.api.containerd.runc.options import oci_pb2
from runtimed.errors import FailedPrecondition, InvalidArgument, NotFound, PluginSkipped
from runtimed.plugin import Plugin, PluginType, Registration
from runtimed.tasks import spec as specs
from runtimed.tasks.runtime import Runtimes
from runtimed.types import AnyValue


def plugin(id_: str, instance=None, error=None) -> Plugin:
    registration = Registration(type=PluginType.RUNTIME, id=id_, init=lambda ctx: None)
    return Plugin(registration, instance=instance, error=error)


def test_runtime_names_select_backends_and_failures_are_explained():
    runc = RuncRuntime("/usr/sbin/runc", Path("/run/x"), False)
    runtimes = Runtimes(
        [
            plugin("runc", runc),
            plugin("kata", error=PluginSkipped("no /dev/kvm: enable nested virtualisation")),
        ],
        default="io.containerd.runc.v2",
    )
    assert runtimes.resolve("io.containerd.runc.v2") == ("io.containerd.runc.v2", runc)
    assert runtimes.resolve("runc")[1] is runc
    assert runtimes.resolve("") == ("io.containerd.runc.v2", runc)  # the configured default
    with pytest.raises(FailedPrecondition, match=r'"io.containerd.kata.v2" is not available: .*no /dev/kvm'):
        runtimes.resolve("io.containerd.kata.v2")
    with pytest.raises(NotFound, match=r'"gvisor": no io.runtimed.runtime.v1.gvisor plugin is installed'):
        runtimes.resolve("gvisor")
    with pytest.raises(NotFound, match=r'"io.example.x.v1" is not known to runtimed \(available: .*runc'):
        runtimes.resolve("io.example.x.v1")


def test_runc_options_are_decoded_from_containerd_s_message():
    runc = RuncRuntime("runc", Path("/run/x"), False)
    assert runc.decode_options(None) == {}
    assert runc.decode_options(AnyValue("containerd.runc.v1.Options", b"")) == {}
    options = oci_pb2.Options(binary_name="crun", systemd_cgroup=True, no_pivot_root=True)
    decoded = runc.decode_options(AnyValue("containerd.runc.v1.Options", options.SerializeToString()))
    assert decoded == {"binary_name": "crun", "systemd_cgroup": True, "no_pivot_root": True}
    with pytest.raises(InvalidArgument, match="not runc's"):
        runc.decode_options(AnyValue("io.example.Options", b"x"))


def test_default_spec_is_containerd_s_plus_seccomp():
    spec = specs.default_spec("team-a", "web")
    assert spec["linux"]["cgroupsPath"] == "/team-a/web"
    assert spec["process"]["noNewPrivileges"] is True
    assert "CAP_SYS_ADMIN" not in spec["process"]["capabilities"]["bounding"]
    assert "/proc/kcore" in spec["linux"]["maskedPaths"] and "/proc/sys" in spec["linux"]["readonlyPaths"]
    assert {n["type"] for n in spec["linux"]["namespaces"]} == {"pid", "ipc", "uts", "mount", "network"}
    seccomp = spec["linux"]["seccomp"]
    assert seccomp["defaultAction"] == "SCMP_ACT_ALLOW"
    assert {"mount", "kexec_load", "bpf", "ptrace"} <= set(seccomp["syscalls"][0]["names"])
    assert "seccomp" not in specs.default_spec("team-a", "web", seccomp=False)["linux"]


def test_image_config_is_applied_like_ctr():
    config = {
        "Entrypoint": ["/bin/app"],
        "Cmd": ["--serve"],
        "Env": ["PATH=/app/bin", "MODE=prod"],
        "WorkingDir": "/srv",
        "User": "1000:1000",
    }
    spec = specs.with_image_config(specs.default_spec("ns", "c"), config)
    process = spec["process"]
    assert process["args"] == ["/bin/app", "--serve"]
    assert process["env"] == ["PATH=/app/bin", "MODE=prod"]  # the image's PATH replaces the default
    assert (process["cwd"], process["user"]) == ("/srv", {"uid": 1000, "gid": 1000})
    spec = specs.with_image_config(
        specs.default_spec("ns", "c"),
        config,
        ["--once"],
        env=["MODE=dev"],
        cwd="/tmp",
        user="7",
        terminal=True,
    )
    process = spec["process"]
    assert process["args"] == ["/bin/app", "--once"]
    assert (
        "MODE=dev" in process["env"] and "MODE=prod" not in process["env"] and "TERM=xterm" in process["env"]
    )
    assert (process["cwd"], process["user"], process["terminal"]) == ("/tmp", {"uid": 7, "gid": 7}, True)
    with pytest.raises(InvalidArgument, match="no command"):
        specs.with_image_config(specs.default_spec("ns", "c"), {})
    with pytest.raises(InvalidArgument, match="numeric"):
        specs.with_image_config(specs.default_spec("ns", "c"), {"Cmd": ["sh"], "User": "nobody"})
