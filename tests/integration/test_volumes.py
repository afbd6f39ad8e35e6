"""Volumes service (runtimed.services.volumes.v1) against a real daemon: records, directories, users,
restarts, namespaces, copy-up from real snapshots, and a volume shared by two runc tasks."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from fixtures.tasks import TaskRig, mounts_under, reap_leftovers, unique_namespace
from google.protobuf import any_pb2

from runtimed.api.containerd.services.containers.v1 import containers_pb2, containers_pb2_grpc
from runtimed.api.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from runtimed.api.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from runtimed.api.containerd.types import mount_pb2
from runtimed.api.runtimed.services.volumes.v1 import volumes_pb2 as pb
from runtimed.api.runtimed.services.volumes.v1 import volumes_pb2_grpc as pb_grpc
from runtimed.wire import LEASE_KEY, NAMESPACE_KEY

PLUGIN_DIR = "io.runtimed.volume.v1.local"
SPEC_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
SNAPSHOTTER = "overlayfs"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts, runc)")


class Volumes:
    """The Volumes and Containers stubs of one namespace."""

    def __init__(self, channel: grpc.Channel, namespace: str = "default") -> None:
        self.namespace = namespace
        self.md = [(NAMESPACE_KEY, namespace)]
        self.stub = pb_grpc.VolumesStub(channel)
        self.containers = containers_pb2_grpc.ContainersStub(channel)

    def create(self, name: str = "", **labels: str) -> pb.Volume:
        return self.stub.Create(pb.CreateVolumeRequest(name=name, labels=labels), metadata=self.md).volume

    def get(self, name: str) -> pb.Volume:
        return self.stub.Get(pb.GetVolumeRequest(name=name), metadata=self.md).volume

    def list(self, *filters: str) -> list[pb.Volume]:
        return list(self.stub.List(pb.ListVolumesRequest(filters=list(filters)), metadata=self.md).volumes)

    def names(self, *filters: str) -> list[str]:
        return [v.name for v in self.list(*filters)]

    def remove(self, name: str) -> None:
        self.stub.Remove(pb.RemoveVolumeRequest(name=name), metadata=self.md)

    def prune(self, *filters: str) -> pb.PruneVolumesResponse:
        return self.stub.Prune(pb.PruneVolumesRequest(filters=list(filters)), metadata=self.md)

    def seed(self, name: str, rootfs, path: str) -> bool:
        request = pb.SeedVolumeRequest(name=name, rootfs=list(rootfs), path=path)
        return self.stub.Seed(request, metadata=self.md).copied

    def container_mounting(self, container_id: str, *sources: str) -> None:
        """A container record (no task) whose OCI spec bind-mounts `sources`."""
        spec = {
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/"},
            "root": {"path": "rootfs"},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                *({"destination": f"/v{i}", "type": "bind", "source": s, "options": ["rbind"]}
                  for i, s in enumerate(sources)),
            ],
        }  # fmt: skip
        container = containers_pb2.Container(
            id=container_id,
            runtime=containers_pb2.Container.Runtime(name="io.containerd.runc.v2"),
            spec=any_pb2.Any(type_url=SPEC_URL, value=json.dumps(spec).encode()),
        )
        self.containers.Create(containers_pb2.CreateContainerRequest(container=container), metadata=self.md)

    def delete_container(self, container_id: str) -> None:
        self.containers.Delete(containers_pb2.DeleteContainerRequest(id=container_id), metadata=self.md)


@pytest.fixture
def channel(daemon) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"unix://{daemon.socket_path}") as channel:
        yield channel


@pytest.fixture
def vols(channel) -> Volumes:
    return Volumes(channel)


def error_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def volumes_root(daemon) -> Path:
    return daemon.root / PLUGIN_DIR


# -- records and directories ----------------------------------------------------------------------


def test_create_get_list_remove(daemon, vols):
    created = vols.create("data", app="web", tier="db")
    mountpoint = volumes_root(daemon) / "default" / "data" / "_data"
    assert created.name == "data"
    assert dict(created.labels) == {"app": "web", "tier": "db"}
    assert created.mountpoint == str(mountpoint)
    assert created.created_at.seconds > 0 and not created.used_by
    assert mountpoint.is_dir() and stat.S_IMODE(mountpoint.stat().st_mode) == 0o755
    assert vols.get("data") == created
    assert vols.list() == [created]

    (mountpoint / "file").write_text("kept")
    vols.remove("data")
    assert error_of(lambda: vols.get("data")) == (grpc.StatusCode.NOT_FOUND, 'volume "data": not found')
    assert vols.list() == []
    assert not (volumes_root(daemon) / "default" / "data").exists()
    assert os.listdir(volumes_root(daemon) / ".trash") == []
    code, message = error_of(lambda: vols.remove("data"))
    assert (code, message) == (grpc.StatusCode.NOT_FOUND, 'volume "data": not found')


def test_an_empty_name_gets_a_generated_one(vols):
    first, second = vols.create(), vols.create()
    assert re.fullmatch(r"[0-9a-f]{64}", first.name) and first.name != second.name
    assert sorted(vols.names()) == sorted([first.name, second.name])


@pytest.mark.parametrize("name", ["a", "-data", ".data", "_data", "a/b", "..", "x y", "é1", "v" * 256])
def test_invalid_names_are_refused_and_leave_nothing(daemon, vols, name):
    code, message = error_of(lambda: vols.create(name))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith(f"volume name {json.dumps(name[:64], ensure_ascii=False)}")
    assert message.endswith(": invalid argument")
    assert vols.list() == []
    assert os.listdir(volumes_root(daemon) / ".tmp") == []
    assert not (volumes_root(daemon) / "default").exists()
    # every method checks the name the same way
    assert error_of(lambda: vols.get(name))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert error_of(lambda: vols.remove(name))[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_docker_names_are_accepted(vols):
    for name in ("ab", "my_vol.1-x", "A9", "9-", "x" * 255):
        assert vols.create(name).name == name


def test_bad_labels_are_refused(vols):
    code, message = error_of(lambda: vols.create("data", **{"": "x"}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "label key must not be empty" in message
    assert vols.list() == []


def test_a_taken_name_is_already_exists_and_keeps_the_data(daemon, vols):
    first = vols.create("data", v="1")
    Path(first.mountpoint, "file").write_text("mine")
    code, message = error_of(lambda: vols.create("data", v="2"))
    assert (code, message) == (grpc.StatusCode.ALREADY_EXISTS, 'volume "data": already exists')
    assert vols.get("data") == first
    assert Path(first.mountpoint, "file").read_text() == "mine"
    assert os.listdir(volumes_root(daemon) / ".tmp") == []


def test_list_filters(vols):
    vols.create("web-data", app="web", tier="front")
    vols.create("db-data", app="db")
    vols.create("scratch")
    assert vols.names() == ["db-data", "scratch", "web-data"]
    assert vols.names("labels.app") == ["db-data", "web-data"]
    assert vols.names('labels."app"==web') == ["web-data"]
    assert vols.names("name==scratch") == ["scratch"]
    assert vols.names("name~=-data$,labels.tier==front") == ["web-data"]
    assert vols.names("labels.app==db", "name==scratch") == ["db-data", "scratch"]  # OR
    assert vols.names("name!=scratch") == ["db-data", "web-data"]
    code, message = error_of(lambda: vols.list("name==x,"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith("filters: parse error")


def test_in_use_volumes_cannot_be_removed_until_their_containers_go(vols):
    data = vols.create("data")
    other = vols.create("other")
    vols.container_mounting("web", data.mountpoint)
    vols.container_mounting("backup", data.mountpoint + "/sub/dir", "/tmp")
    vols.container_mounting("unrelated", "/tmp", str(Path(other.mountpoint).parent) + "-not-it")
    assert list(vols.get("data").used_by) == ["backup", "web"]
    assert list(vols.get("other").used_by) == []

    code, message = error_of(lambda: vols.remove("data"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert message == 'volume "data" is in use by containers "backup", "web": failed precondition'
    assert vols.get("data").name == "data" and Path(data.mountpoint).is_dir()

    assert list(vols.prune().removed) == ["other"]  # prune leaves what is in use
    vols.delete_container("web")
    code, message = error_of(lambda: vols.remove("data"))
    assert message == 'volume "data" is in use by container "backup": failed precondition'
    vols.delete_container("backup")
    vols.remove("data")
    assert vols.list() == []
    vols.delete_container("unrelated")


def test_users_are_found_however_the_spec_spells_the_path(vols):
    volume = vols.create("data")
    spelled = volume.mountpoint.replace("/_data", "/./_data").replace("/default/", "/default//")
    vols.container_mounting("odd", spelled)
    assert list(vols.get("data").used_by) == ["odd"]
    # a container made before the volume (as ctr may do) is a user from the start
    vols.container_mounting("early", volume.mountpoint.replace("/data/", "/later/"))
    assert list(vols.create("later").used_by) == ["early"]
    assert error_of(lambda: vols.remove("later"))[0] == grpc.StatusCode.FAILED_PRECONDITION
    vols.delete_container("odd")
    vols.delete_container("early")
    assert list(vols.prune().removed) == ["data", "later"]


def test_prune_removes_unused_matching_volumes_and_counts_bytes(vols):
    keep = vols.create("keep", keep="yes")
    tmp1 = vols.create("tmp1", tmp="1")
    tmp2 = vols.create("tmp2", tmp="1")
    vols.create("tmp3", tmp="2")
    Path(tmp1.mountpoint, "a").write_bytes(b"x" * 1000)
    Path(tmp1.mountpoint, "d").mkdir()
    Path(tmp1.mountpoint, "d", "b").write_bytes(b"y" * 234)
    os.link(Path(tmp1.mountpoint, "a"), Path(tmp1.mountpoint, "d", "a-again"))  # counted once
    Path(tmp1.mountpoint, "link").symlink_to("/etc/passwd")
    vols.container_mounting("user", tmp2.mountpoint)

    pruned = vols.prune("labels.tmp==1")
    assert list(pruned.removed) == ["tmp1"] and pruned.reclaimed_bytes == 1234
    assert Path("/etc/passwd").exists()  # the symlink was removed, not followed
    assert vols.names() == ["keep", "tmp2", "tmp3"]

    pruned = vols.prune()
    assert list(pruned.removed) == ["keep", "tmp3"] and pruned.reclaimed_bytes == 0
    assert vols.names() == ["tmp2"] and not Path(keep.mountpoint).exists()
    vols.delete_container("user")
    assert list(vols.prune().removed) == ["tmp2"]


def test_volume_data_and_records_survive_a_restart_and_a_kill(daemon_factory):
    daemon = daemon_factory().start()
    with grpc.insecure_channel(f"unix://{daemon.socket_path}") as channel:
        vols = Volumes(channel)
        created = vols.create("data", app="web")
        Path(created.mountpoint, "file").write_text("persisted")
    daemon.restart()
    with grpc.insecure_channel(f"unix://{daemon.socket_path}") as channel:
        vols = Volumes(channel)
        assert vols.get("data") == created
        assert Path(created.mountpoint, "file").read_text() == "persisted"
    daemon.kill()
    daemon.start()
    with grpc.insecure_channel(f"unix://{daemon.socket_path}") as channel:
        vols = Volumes(channel)
        assert vols.list() == [created]
        assert Path(created.mountpoint, "file").read_text() == "persisted"


def test_start_up_removes_what_an_interrupted_create_remove_or_seed_left(daemon_factory):
    daemon = daemon_factory().start()
    root = volumes_root(daemon)
    with grpc.insecure_channel(f"unix://{daemon.socket_path}") as channel:
        kept = Volumes(channel).create("kept")
    Path(kept.mountpoint, "file").write_text("kept")
    daemon.kill()
    # what a kill -9 can leave: a create not yet committed, a remove half-done, a copy-up under way
    (root / ".tmp" / "abc" / "_data").mkdir(parents=True)
    (root / ".trash" / "def" / "_data" / "x").mkdir(parents=True)
    (root / "default" / "orphan" / "_data").mkdir(parents=True)
    (root / "default" / "kept" / ".seed-0123" / "partial").mkdir(parents=True)
    daemon.start()
    with grpc.insecure_channel(f"unix://{daemon.socket_path}") as channel:
        assert Volumes(channel).names() == ["kept"]
        assert error_of(lambda: Volumes(channel).get("orphan"))[0] == grpc.StatusCode.NOT_FOUND
        # the name the orphan had is free
        assert Volumes(channel).create("orphan").name == "orphan"
    assert os.listdir(root / ".tmp") == [] and os.listdir(root / ".trash") == []
    assert sorted(os.listdir(root / "default" / "kept")) == ["_data"]
    assert Path(kept.mountpoint, "file").read_text() == "kept"


def test_namespaces_are_isolated_and_a_namespace_with_volumes_cannot_be_deleted(daemon, channel, client):
    a, b = Volumes(channel, "team-a"), Volumes(channel, "team-b")
    in_a = a.create("shared", team="a")
    assert b.list() == []
    assert error_of(lambda: b.get("shared")) == (grpc.StatusCode.NOT_FOUND, 'volume "shared": not found')
    assert error_of(lambda: b.remove("shared"))[0] == grpc.StatusCode.NOT_FOUND
    in_b = b.create("shared", team="b")
    assert in_a.mountpoint != in_b.mountpoint
    assert in_b.mountpoint == str(volumes_root(daemon) / "team-b" / "shared" / "_data")
    # a container of team-b mounting team-a's volume does not make it in use in team-a
    b.container_mounting("sneaky", in_a.mountpoint)
    assert list(a.get("shared").used_by) == [] and list(b.get("shared").used_by) == []
    b.delete_container("sneaky")
    assert list(b.prune().removed) == ["shared"]
    assert [v.labels["team"] for v in a.list()] == ["a"]

    with pytest.raises(grpc.RpcError) as info:
        client.delete_namespace("team-a")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert 'namespace "team-a" must be empty, but it still has volumes' in info.value.details()
    a.remove("shared")
    client.delete_namespace("team-a")
    client.delete_namespace("team-b")


def test_volume_events(daemon, vols):
    from runtimed.api.containerd.services.events.v1 import events_pb2, events_pb2_grpc

    with grpc.insecure_channel(f"unix://{daemon.socket_path}") as channel:
        stream = events_pb2_grpc.EventsStub(channel).Subscribe(
            events_pb2.SubscribeRequest(filters=['topic~="^/volumes/"'])
        )
        received: list = []

        def pump() -> None:
            with contextlib.suppress(grpc.RpcError):
                received.extend(stream)

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        time.sleep(0.3)  # the subscription is in place
        vols.create("evented", k="v")
        vols.remove("evented")
        deadline = time.monotonic() + 10
        while len(received) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        stream.cancel()
        thread.join(5)
    created, deleted = received
    assert (created.topic, created.namespace) == ("/volumes/create", "default")
    assert created.event.type_url == "runtimed.services.volumes.v1.VolumeCreate"
    event = pb.VolumeCreate.FromString(created.event.value)
    assert (event.name, dict(event.labels)) == ("evented", {"k": "v"})
    assert deleted.topic == "/volumes/delete"
    assert pb.VolumeDelete.FromString(deleted.event.value).name == "evented"


HOSTILE = ["", ".", "..", "../../etc/passwd", "/abs/path", "a\x00b", "ünïcödé-名前", "a b", "a" * 256,
           "x" * 70_000, "\n", "'; DROP TABLE volumes; --", "-leading", "data"]  # fmt: skip


def test_hostile_input_gets_a_precise_error_and_changes_nothing(daemon, vols):
    """No request makes the daemon fail (INTERNAL/UNKNOWN) or leaves anything behind."""
    vols.create("data", keep="me")
    before = vols.list()
    calls = []
    for text in HOSTILE:
        calls += [
            lambda t=text: vols.get(t),
            lambda t=text: vols.remove(t) if t != "data" else vols.get(t),
            lambda t=text: vols.create(t) if t not in ("", "data") else vols.get("data"),
            lambda t=text: vols.create("fresh", **{t: "v"}) if t else vols.create("fresh", **{"": t}),
            lambda t=text: vols.list(t),
            lambda t=text: vols.prune(f"{t},name==nothing-matches-this"),
            lambda t=text: vols.seed(
                "data", [mount_pb2.Mount(type="bind", source=t, options=["rbind"])], "/x"
            ),
            lambda t=text: vols.seed("data", [mount_pb2.Mount(type=t, source="/x")], "/x"),
            lambda t=text: vols.seed(
                "data", [mount_pb2.Mount(type="overlay", source="o", options=[t])], "/x"
            ),
            lambda t=text: vols.seed(t, [mount_pb2.Mount(type="bind", source="/nonexistent")], "/" + t),
        ]
    for call in calls:
        try:
            call()
        except grpc.RpcError as exc:
            assert exc.code() in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.ALREADY_EXISTS,
                grpc.StatusCode.FAILED_PRECONDITION,
            ), exc.details()
            assert exc.details() and len(exc.details()) < 4096
        with contextlib.suppress(grpc.RpcError):
            vols.remove("fresh")
    assert vols.list() == before and os.listdir(vols.get("data").mountpoint) == []
    assert os.listdir(volumes_root(daemon) / ".tmp") == [] and mounts_under(daemon.state) == []
    assert daemon.process.poll() is None


# -- seed (copy-up) from real snapshots -------------------------------------------------------------


class SnapshotRig:
    """Committed overlayfs snapshots written through their own mounts, under a lease."""

    def __init__(self, channel: grpc.Channel, namespace: str = "default") -> None:
        self.md = [(NAMESPACE_KEY, namespace)]
        self.snapshots = snapshots_pb2_grpc.SnapshotsStub(channel)
        self.leases = leases_pb2_grpc.LeasesStub(channel)
        self.lease = self.leases.Create(leases_pb2.CreateRequest(), metadata=self.md).lease.id
        self.leased = [*self.md, (LEASE_KEY, self.lease)]

    def close(self) -> None:
        with contextlib.suppress(grpc.RpcError):
            self.leases.Delete(leases_pb2.DeleteRequest(id=self.lease), metadata=self.md)

    @contextlib.contextmanager
    def writable(self, key: str, parent: str = "") -> Iterator[Path]:
        request = snapshots_pb2.PrepareSnapshotRequest(snapshotter=SNAPSHOTTER, key=key, parent=parent)
        mounts = self.snapshots.Prepare(request, metadata=self.leased).mounts
        target = Path(tempfile.mkdtemp(prefix="rtd-vol-"))
        try:
            for mount in mounts:
                subprocess.run(
                    ["mount", "-t", mount.type, "-o", ",".join(mount.options), mount.source, str(target)],
                    check=True,
                )
            try:
                yield target
            finally:
                subprocess.run(["umount", str(target)], check=True)
        finally:
            target.rmdir()

    def commit(self, name: str, key: str) -> None:
        request = snapshots_pb2.CommitSnapshotRequest(snapshotter=SNAPSHOTTER, name=name, key=key)
        self.snapshots.Commit(request, metadata=self.leased)

    def prepare(self, key: str, parent: str) -> list:
        request = snapshots_pb2.PrepareSnapshotRequest(snapshotter=SNAPSHOTTER, key=key, parent=parent)
        return list(self.snapshots.Prepare(request, metadata=self.leased).mounts)

    def view(self, key: str, parent: str) -> list:
        request = snapshots_pb2.ViewSnapshotRequest(snapshotter=SNAPSHOTTER, key=key, parent=parent)
        return list(self.snapshots.View(request, metadata=self.leased).mounts)


@pytest.fixture
def image_layers(daemon, channel) -> Iterator[SnapshotRig]:
    """Two committed layers: "layer1" (an image's /data and friends) and "layer2" on top of it."""
    rig = SnapshotRig(channel)
    with rig.writable("l1") as root:
        data = root / "data"
        (data / "sub").mkdir(parents=True)
        (data / "config").write_text("from layer 1")
        (data / "secret").write_text("s3cret")
        os.chown(data / "secret", 123, 456)
        os.chmod(data / "secret", 0o640)
        os.setxattr(data / "secret", "user.origin", b"image")
        (data / "sub" / "deep").write_text("deep")
        os.utime(data / "sub" / "deep", ns=(1_000_000_000, 1_234_567_890_123_456_789 // 1000))
        (data / "link").symlink_to("config")
        os.lchown(data / "link", 7, 8)
        (data / "abs-link").symlink_to("/etc/passwd")
        os.link(data / "config", data / "config-hardlink")
        os.mkfifo(data / "fifo", 0o600)
        os.chmod(data / "sub", 0o711)
        os.chown(data, 1000, 1001)
        os.chmod(data, 0o750)
        os.utime(data, ns=(2_000_000_000, 2_000_000_000))
        (root / "etc").mkdir()
        (root / "etc" / "passwd").write_text("root:x:0:0:image:/root:/bin/sh\n")
        (root / "escape").symlink_to("../../../../../data")  # resolves inside the image, to /data
        (root / "abs").symlink_to("/data/sub")
        (root / "file").write_text("not a directory")
        (root / "empty").mkdir()
    rig.commit("layer1", "l1")
    with rig.writable("l2", parent="layer1") as root:
        (root / "data" / "config").write_text("from layer 2")
    rig.commit("layer2", "l2")
    yield rig
    rig.close()


def assert_no_seed_mounts(daemon) -> None:
    assert mounts_under(daemon.state) == []
    assert not list((daemon.state / PLUGIN_DIR).glob("seed-*"))


@needs_root
@pytest.mark.root
def test_seed_copies_the_image_directory_with_its_attributes(daemon, vols, image_layers):
    volume = vols.create("seeded")
    rootfs = image_layers.prepare("c1-rootfs", "layer2")  # overlay: upperdir + two lowerdirs
    assert vols.seed("seeded", rootfs, "/data") is True
    data = Path(volume.mountpoint)
    assert sorted(os.listdir(data)) == [
        "abs-link",
        "config",
        "config-hardlink",
        "fifo",
        "link",
        "secret",
        "sub",
    ]
    assert (data / "config").read_text() == "from layer 2"  # the upper layer wins
    assert (data / "config-hardlink").read_text() == "from layer 1"
    secret = (data / "secret").stat()
    assert (secret.st_uid, secret.st_gid, stat.S_IMODE(secret.st_mode)) == (123, 456, 0o640)
    assert os.getxattr(data / "secret", "user.origin") == b"image"
    assert (data / "sub" / "deep").stat().st_mtime_ns == 1_234_567_890_123_456_789 // 1000
    assert stat.S_IMODE((data / "sub").stat().st_mode) == 0o711
    assert os.readlink(data / "link") == "config" and os.lstat(data / "link").st_uid == 7
    assert os.readlink(data / "abs-link") == "/etc/passwd"
    assert stat.S_ISFIFO(os.lstat(data / "fifo").st_mode)
    top = data.stat()  # the volume's own directory takes the image directory's attributes
    assert (top.st_uid, top.st_gid, stat.S_IMODE(top.st_mode)) == (1000, 1001, 0o750)
    assert top.st_mtime_ns == 2_000_000_000
    assert not [n for n in os.listdir(data.parent) if n != "_data"]  # no staging left
    assert_no_seed_mounts(daemon)

    # not empty any more: a second seed copies nothing and changes nothing
    (data / "secret").write_text("changed by a container")
    os.unlink(data / "config")
    assert vols.seed("seeded", rootfs, "/data") is False
    assert (data / "secret").read_text() == "changed by a container"
    assert not (data / "config").exists()
    assert_no_seed_mounts(daemon)


@needs_root
@pytest.mark.root
def test_seed_resolves_paths_inside_the_image(daemon, vols, image_layers):
    rootfs = image_layers.view("view1", "layer1")
    vols.create("through-link")
    assert vols.seed("through-link", rootfs, "/escape") is True  # ../../.. stops at the image's root
    assert Path(vols.get("through-link").mountpoint, "config").read_text() == "from layer 1"
    vols.create("absolute")
    assert vols.seed("absolute", rootfs, "/abs/../sub/.") is True
    assert os.listdir(vols.get("absolute").mountpoint) == ["deep"]
    vols.create("empty")
    assert vols.seed("empty", rootfs, "/empty") is True
    assert os.listdir(vols.get("empty").mountpoint) == []
    assert_no_seed_mounts(daemon)


@needs_root
@pytest.mark.root
def test_seed_of_a_missing_path_copies_nothing(daemon, vols, image_layers):
    volume = vols.create("nothing")
    rootfs = image_layers.view("view2", "layer2")
    assert vols.seed("nothing", rootfs, "/no/such/dir") is False
    assert vols.seed("nothing", rootfs, "/file/below-a-file") is False
    assert os.listdir(volume.mountpoint) == []
    assert_no_seed_mounts(daemon)


@needs_root
@pytest.mark.root
def test_seed_errors_name_the_problem_and_leave_no_mount(daemon, vols, image_layers):
    volume = vols.create("target")
    rootfs = image_layers.view("view3", "layer2")
    code, message = error_of(lambda: vols.seed("target", rootfs, "/file"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert message == 'path "/file" in the image is not a directory: failed precondition'
    assert_no_seed_mounts(daemon)

    broken = [
        mount_pb2.Mount(type="overlay", source="overlay", options=["lowerdir=/nonexistent/a:/nonexistent/b"])
    ]
    code, message = error_of(lambda: vols.seed("target", broken, "/data"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and message.startswith("mounting the rootfs: mount ")
    assert_no_seed_mounts(daemon)
    # what is not an image's root filesystem is refused, before or right after mounting it
    for bad, expected in [
        (
            [mount_pb2.Mount(type="proc", source="proc")],
            'rootfs mount type "proc" is not an image filesystem',
        ),
        ([mount_pb2.Mount(type="bind", source="/proc", options=["rbind"])], 'rootfs is a "proc" filesystem'),
        ([mount_pb2.Mount(type="none", source="/srv")], 'rootfs mount of type "none" must be a bind mount'),
        ([mount_pb2.Mount(type="bind", source="/", options=["remount"])], 'option "remount" is not allowed'),
        ([mount_pb2.Mount(type="bind", source="", options=["rbind"])], 'rootfs mount source "" is not'),
    ]:
        code, message = error_of(lambda bad=bad: vols.seed("target", bad, "/self"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and expected in message, message
        assert_no_seed_mounts(daemon)

    code, message = error_of(lambda: vols.seed("target", rootfs, "data"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and 'path "data" must be an absolute path' in message
    code, message = error_of(lambda: vols.seed("target", [], "/data"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "rootfs must have at least one mount" in message
    code, message = error_of(lambda: vols.seed("missing", rootfs, "/data"))
    assert (code, message) == (grpc.StatusCode.NOT_FOUND, 'volume "missing": not found')
    assert os.listdir(volume.mountpoint) == [] and sorted(os.listdir(Path(volume.mountpoint).parent)) == [
        "_data"
    ]
    assert_no_seed_mounts(daemon)
    # and it still works afterwards
    assert vols.seed("target", rootfs, "/data") is True


@needs_root
@pytest.mark.root
def test_seed_of_a_volume_in_use_keeps_its_directory(daemon, vols, image_layers):
    """A container may have _data mounted already: the copy goes into that very directory."""
    volume = vols.create("used")
    vols.container_mounting("holder", volume.mountpoint)
    before = os.stat(volume.mountpoint).st_ino
    assert vols.seed("used", image_layers.view("view4", "layer2"), "/data") is True
    assert os.stat(volume.mountpoint).st_ino == before
    assert Path(volume.mountpoint, "config").read_text() == "from layer 2"
    assert stat.S_IMODE(os.stat(volume.mountpoint).st_mode) == 0o750
    assert sorted(os.listdir(Path(volume.mountpoint).parent)) == ["_data"]
    assert_no_seed_mounts(daemon)
    vols.delete_container("holder")


@needs_root
@pytest.mark.root
def test_kill_9_during_creates_seeds_and_removes_leaves_a_consistent_store(daemon_factory):
    """Every volume after a restart is whole: recorded and on disk, empty or completely seeded."""
    rng = random.Random(20261128)
    daemon = daemon_factory().start()
    files = 300
    with grpc.insecure_channel(f"unix://{daemon.socket_path}") as channel:
        rig = SnapshotRig(channel)
        with rig.writable("big") as root:
            (root / "data").mkdir()
            for i in range(files):
                (root / "data" / f"f{i:04}").write_bytes(b"%d" % i * 200)
        rig.commit("big-layer", "big")
        rootfs = rig.view("big-view", "big-layer")
    root = volumes_root(daemon)
    counter = iter(range(10_000))

    def work(stop: threading.Event) -> None:
        with grpc.insecure_channel(f"unix://{daemon.socket_path}") as channel:
            vols = Volumes(channel)
            with contextlib.suppress(grpc.RpcError):
                while not stop.is_set():
                    name = f"v{next(counter)}"
                    vols.create(name)
                    vols.seed(name, rootfs, "/data")
                    if rng.random() < 0.5:
                        vols.remove(name)

    for _ in range(6):
        stop = threading.Event()
        worker = threading.Thread(target=work, args=(stop,), daemon=True)
        worker.start()
        time.sleep(rng.uniform(0.1, 0.8))
        daemon.kill()
        stop.set()
        worker.join(30)
        daemon.start()
        with grpc.insecure_channel(f"unix://{daemon.socket_path}") as channel:
            names = Volumes(channel).names()
        on_disk = sorted(os.listdir(root / "default")) if (root / "default").exists() else []
        assert sorted(names) == on_disk
        for name in names:
            assert os.listdir(root / "default" / name) == ["_data"], name
            assert len(os.listdir(root / "default" / name / "_data")) in (0, files), name
        assert os.listdir(root / ".tmp") == [] and os.listdir(root / ".trash") == []
        assert_no_seed_mounts(daemon)

    with grpc.insecure_channel(f"unix://{daemon.socket_path}") as channel:
        vols = Volumes(channel)
        seeded = [n for n in vols.names() if os.listdir(vols.get(n).mountpoint)]
        assert vols.seed(seeded[0], rootfs, "/data") is False if seeded else True
        vols.prune()
        assert vols.names() == []
        SnapshotRig(channel).leases.Delete(leases_pb2.DeleteRequest(id=rig.lease), metadata=rig.md)


@needs_root
@pytest.mark.root
def test_remove_refuses_a_volume_with_a_mount_inside(daemon, vols, tmp_path):
    volume = vols.create("mounted")
    inside = Path(volume.mountpoint, "m")
    inside.mkdir()
    (tmp_path / "precious").write_text("host data")
    subprocess.run(["mount", "--bind", str(tmp_path), str(inside)], check=True)
    try:
        code, message = error_of(lambda: vols.remove("mounted"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "has mounts inside it" in message
        assert vols.get("mounted").name == "mounted"
    finally:
        subprocess.run(["umount", str(inside)], check=True)
    assert (tmp_path / "precious").read_text() == "host data"
    vols.remove("mounted")
    assert (tmp_path / "precious").read_text() == "host data"


# -- end to end: two runc tasks share a volume -----------------------------------------------------


@pytest.fixture
def rig(daemon, tmp_path) -> Iterator[TaskRig]:
    namespace = unique_namespace("vol")
    rig = TaskRig(daemon.address, namespace, tmp_path)
    yield rig
    rig.close()
    leftovers = reap_leftovers(daemon.state, [namespace])
    assert not leftovers, f"test left {leftovers}"


@needs_root
@pytest.mark.root
def test_a_volume_outlives_the_task_that_wrote_it(daemon, channel, rig):
    vols = Volumes(channel, rig.namespace)
    volume = vols.create("shared")

    def run_with_volume(container_id: str, script: str) -> tuple[int, str]:
        spec = rig.spec(container_id, ["sh", "-c", script])
        spec["mounts"].append(
            {"destination": "/data", "type": "bind", "source": volume.mountpoint, "options": ["rbind", "rw"]}
        )
        rig.container(container_id, [], spec=spec)
        io = rig.fifos(container_id)
        rig.create_task(container_id, io)
        rig.start(container_id)
        status = rig.wait(container_id)
        output = io.output()
        rig.delete_task(container_id)
        return status, output

    assert run_with_volume("writer", "echo hello from writer > /data/greeting && echo done") == (0, "done\n")
    assert list(vols.get("shared").used_by) == ["writer"]
    code, message = error_of(lambda: vols.remove("shared"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and '"writer"' in message
    rig.remove_container("writer")
    assert Path(volume.mountpoint, "greeting").read_text() == "hello from writer\n"

    assert run_with_volume("reader", "cat /data/greeting") == (0, "hello from writer\n")
    rig.remove_container("reader")
    vols.remove("shared")
    assert not Path(volume.mountpoint).exists()
