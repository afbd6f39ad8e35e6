"""runtimectl's docker-style option parsing, names, templates and exit codes (no daemon needed)."""

from __future__ import annotations

import random

import pytest

from runtimed.cli.common import CLIError
from runtimed.cli.names import generate_name, validate_name
from runtimed.cli.run import MountRequest, host_env, invoke_status, parse_bytes, parse_volume
from runtimed.cli.template import render


def test_sizes_in_docker_units():
    assert parse_bytes("100") == 100
    assert parse_bytes("2g") == 2 * 1024**3
    assert parse_bytes("512M") == 512 * 1024**2
    assert parse_bytes("1.5GB") == int(1.5 * 1024**3)
    assert parse_bytes("64kb") == 64 * 1024
    for bad in ("", "lots", "1x", "-1m"):
        with pytest.raises(CLIError):
            parse_bytes(bad)


def test_volumes():
    assert parse_volume("/srv/x:/data") == MountRequest("bind", "/srv/x", "/data", False)
    assert parse_volume("/srv/x/:/data/:ro") == MountRequest("bind", "/srv/x", "/data", True)
    assert parse_volume("cache:/var/cache:rw") == MountRequest("volume", "cache", "/var/cache", False)
    for bad, why in (
        ("/a", "SRC:DST"),
        ("/a:", "SRC:DST"),
        (":/b", "SRC:DST"),
        ("/a:/b:rx", "mode"),
        ("/a:b", "absolute"),
        ("/a:/", "cannot be /"),
        ("rel/path:/b", "neither"),
        ("./x:/b", "neither"),
        ("/a:/b:ro:extra", "SRC:DST"),
    ):
        with pytest.raises(CLIError, match=why):
            parse_volume(bad)


def test_names():
    assert validate_name("web-1.a_b") == "web-1.a_b"
    assert validate_name("/web") == "web"
    for bad in ("a", "_x", "-x", "a b", "a/b", "x" * 77, ""):
        with pytest.raises(CLIError, match="invalid container name"):
            validate_name(bad)
    names = {generate_name(random.Random(seed)) for seed in range(50)}
    assert len(names) > 40
    assert all(validate_name(name) == name and name.count("_") == 1 for name in names)


def test_host_env(monkeypatch):
    monkeypatch.setenv("FROM_HERE", "v=1")
    monkeypatch.delenv("NOT_HERE", raising=False)
    assert host_env(["A=1", "FROM_HERE", "NOT_HERE", "B="]) == ["A=1", "FROM_HERE=v=1", "B="]
    with pytest.raises(CLIError):
        host_env(["=x"])


def test_exit_codes_of_failed_starts():
    assert invoke_status('exec: "nope": executable file not found in $PATH') == 127
    assert invoke_status('exec: "/x/y": stat /x/y: no such file or directory') == 127
    assert invoke_status('exec: "/etc": permission denied') == 126
    assert invoke_status('runtime "kata": not found') == 125


def test_templates():
    data = {"Name": "web", "State": {"Pid": 42, "Running": True}, "Labels": {"a": "1"}, "Cmd": ["sh", "-c"]}
    assert render("{{.Name}}", data) == "web"
    assert render("{{ .State.Pid }}\\t{{.State.Running}}", data) == "42\ttrue"
    assert render("{{json .State}}", data) == '{"Pid": 42, "Running": true}'
    assert render("{{upper .Name}} {{len .Cmd}} {{.Labels}} {{.Cmd}}", data) == "WEB 2 map[a:1] [sh -c]"
    with pytest.raises(CLIError, match="can't evaluate field Nope"):
        render("{{.Nope}}", data)
    with pytest.raises(CLIError, match="unsupported"):
        render("{{range .Cmd}}", data)
