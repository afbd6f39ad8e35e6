"""The garbage collector: graph rules (roots, labels, expiry, flat leases, ingests), the collector
over real stores (metadata, content, a snapshotter), and the scheduler's timing."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time

import pytest

from plugins.snapshotters.native import NativeSnapshotter
from runtimed.content import ContentInfo, ContentStore
from runtimed.content.ingest import STATUS
from runtimed.errors import ConfigError, FailedPrecondition, NotFound
from runtimed.events.exchange import Exchange
from runtimed.gc import graph
from runtimed.gc.collector import Collector, Stats
from runtimed.gc.graph import (
    Holder,
    IngestRecord,
    LeaseRecord,
    Node,
    Resources,
    SnapshotRecord,
)
from runtimed.gc.scheduler import Scheduler, SchedulerConfig, parse_duration
from runtimed.metadata.plugin import open_metadata
from runtimed.types import AnyValue, Container, Descriptor, Image, LeaseResource, Namespace, RuntimeInfo

NS = "default"
HOUR = 3600 * 10**9
NOW = 1_800_000_000 * 10**9  # 2027-01-15


def d(name: str) -> str:
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


def content(*names: str, ns: str = NS) -> list[Node]:
    return [Node.content(ns, d(name)) for name in names]


def snap(key: str, ns: str = NS, snapshotter: str = "overlayfs") -> Node:
    return Node.snapshot(ns, snapshotter, key)


def image_graph(ns: str = NS) -> Resources:
    """index -> manifest -> config (-> snapshot chain c3 -> c2 -> c1) + two layers."""
    res = Resources()
    res.content[Node.content(ns, d("index"))] = {"containerd.io/gc.ref.content.m.0": d("manifest")}
    res.content[Node.content(ns, d("manifest"))] = {
        "containerd.io/gc.ref.content.config": d("config"),
        "containerd.io/gc.ref.content.l.0": d("layer0"),
        "containerd.io/gc.ref.content.l.1": d("layer1"),
    }
    res.content[Node.content(ns, d("config"))] = {"containerd.io/gc.ref.snapshot.overlayfs": "c3"}
    res.content[Node.content(ns, d("layer0"))] = {"containerd.io/uncompressed": d("diff0")}
    res.content[Node.content(ns, d("layer1"))] = {}
    res.snapshots[snap("c1", ns)] = SnapshotRecord()
    res.snapshots[snap("c2", ns)] = SnapshotRecord(parent="c1")
    res.snapshots[snap("c3", ns)] = SnapshotRecord(parent="c2")
    return res


def image_holder(ns: str = NS, target: str = "index", **labels: str) -> Holder:
    return Holder(ns, (Node.content(ns, d(target)),), dict(labels))


def sweep(res: Resources, now: int = NOW) -> graph.Garbage:
    return graph.garbage(res, graph.mark(res, now))


# -- graph: roots and references


def test_nothing_is_a_root_by_itself():
    res = image_graph()
    found = sweep(res)
    assert set(found.content) == set(res.content)
    assert set(found.snapshots) == set(res.snapshots)


def test_an_image_keeps_its_target_and_everything_labels_reach():
    res = image_graph()
    res.content[Node.content(NS, d("stray"))] = {}
    res.snapshots[snap("stray")] = SnapshotRecord(parent="c1")
    res.holders.append(image_holder())
    found = sweep(res)
    assert found.content == content("stray")
    assert found.snapshots == [snap("stray")]


def test_label_key_forms():
    res = Resources()
    names = ["bare", "dotted", "slashed", "not-a-ref", "empty-name"]
    for name in names:
        res.content[Node.content(NS, d(name))] = {}
    res.snapshots[snap("s1", snapshotter="native")] = SnapshotRecord()
    res.snapshots[snap("s2", snapshotter="native")] = SnapshotRecord()
    res.snapshots[snap("s3", snapshotter="overlayfs")] = SnapshotRecord()
    res.content[Node.content(NS, d("root"))] = {
        "containerd.io/gc.root": "2026-01-01T00:00:00Z",
        "containerd.io/gc.ref.content": d("bare"),
        "containerd.io/gc.ref.content.any.thing": d("dotted"),
        "containerd.io/gc.ref.content/other": d("slashed"),
        "containerd.io/gc.ref.contentious": d("not-a-ref"),  # not `.` or `/` after the prefix
        "containerd.io/gc.ref.snapshot.native": "s1",
        "containerd.io/gc.ref.snapshot.native/second": "s2",  # named: the snapshotter is before `/`
        "containerd.io/gc.ref.snapshot.": "s3",  # no snapshotter: nothing
    }
    found = sweep(res)
    assert found.content == sorted(content("empty-name", "not-a-ref"))
    assert found.snapshots == [snap("s3")]


def test_gc_root_labels_on_content_and_snapshots():
    res = image_graph()
    res.content[Node.content(NS, d("config"))]["containerd.io/gc.root"] = "x"
    res.snapshots[snap("other")] = SnapshotRecord(
        parent="c1", labels={"containerd.io/gc.root": "x", "containerd.io/gc.ref.content.l": d("layer1")}
    )
    found = sweep(res)
    # config -> c3 -> c2 -> c1; the rooted snapshot keeps its parent and its labelled blob.
    assert found.content == sorted(content("index", "manifest", "layer0"))
    assert found.snapshots == []


def test_a_container_keeps_its_snapshot_and_labels_but_not_its_image():
    res = image_graph()
    res.snapshots[snap("ctr-1")] = SnapshotRecord(parent="c3")
    res.content[Node.content(NS, d("spec-extra"))] = {}
    res.holders.append(Holder(NS, (snap("ctr-1"),), {"containerd.io/gc.ref.content.extra": d("spec-extra")}))
    found = sweep(res)
    # The snapshot chain lives on; the image's blobs (no image record) do not.
    assert found.snapshots == []
    assert found.content == sorted(content("config", "index", "layer0", "layer1", "manifest"))


def test_image_labels_reference_too():
    res = image_graph()
    res.content[Node.content(NS, d("sbom"))] = {}
    res.holders.append(
        image_holder(
            target="layer1",
            **{
                "containerd.io/gc.ref.content.sbom": d("sbom"),
                "containerd.io/gc.ref.snapshot.overlayfs": "c1",
            },
        )
    )
    found = sweep(res)
    assert found.snapshots == [snap("c2"), snap("c3")]
    assert found.content == sorted(content("config", "index", "layer0", "manifest"))


def test_leases_protect_their_resources_until_they_expire():
    res = image_graph()
    res.ingests[Node.ingest(NS, "layer-x")] = IngestRecord(updated_at=NOW - 48 * HOUR)
    resources = [("content", d("layer0")), ("snapshots/overlayfs", "c2"), ("ingests", "layer-x")]
    res.leases[Node.lease(NS, "live")] = LeaseRecord(
        {"containerd.io/gc.expire": "2027-01-16T00:00:00Z"}, list(resources)
    )
    found = sweep(res)
    assert found.content == sorted(content("config", "index", "layer1", "manifest"))
    assert found.snapshots == [snap("c3")] and found.ingests == [] and found.leases == []

    res.leases[Node.lease(NS, "live")].labels["containerd.io/gc.expire"] = "2027-01-14T00:00:00Z"
    found = sweep(res)
    assert found.leases == [Node.lease(NS, "live")]
    assert set(found.content) == set(res.content) and set(found.snapshots) == set(res.snapshots)
    assert found.ingests == [Node.ingest(NS, "layer-x")]


def test_a_lease_without_or_with_a_bad_expiry_never_expires():
    res = Resources()
    res.leases[Node.lease(NS, "forever")] = LeaseRecord()
    res.leases[Node.lease(NS, "bad")] = LeaseRecord({"containerd.io/gc.expire": "tomorrow"})
    assert sweep(res).leases == []


def test_flat_leases_keep_only_what_they_name_and_snapshot_parents():
    res = image_graph()
    res.snapshots[snap("c3")].labels = {"containerd.io/gc.ref.content.x": d("layer1")}
    res.leases[Node.lease(NS, "flat")] = LeaseRecord(
        {"containerd.io/gc.flat": "true"}, [("content", d("manifest")), ("snapshots/overlayfs", "c3")]
    )
    found = sweep(res)
    assert found.snapshots == []  # c3's parents are kept...
    # ...but neither its labels (layer1) nor the manifest's (config, layers) are followed.
    assert found.content == sorted(content("config", "index", "layer0", "layer1"))
    # Reached by a non-flat path too, the labels count.
    res.holders.append(image_holder(target="manifest"))
    assert sweep(res).content == content("index")


def test_ingests_expire_and_reference_their_expected_blob():
    res = Resources()
    res.content[Node.content(NS, d("adopted"))] = {}
    res.ingests[Node.ingest(NS, "fresh")] = IngestRecord(expected=d("adopted"), updated_at=NOW - HOUR)
    res.ingests[Node.ingest(NS, "stale")] = IngestRecord(updated_at=NOW - 25 * HOUR)
    found = sweep(res)
    assert found.content == [] and found.ingests == [Node.ingest(NS, "stale")]


def test_references_never_cross_namespaces():
    res = image_graph("a")
    other = image_graph("b")
    res.content.update(other.content)
    res.snapshots.update(other.snapshots)
    res.holders.append(image_holder("a"))
    found = sweep(res)
    assert {n.namespace for n in found.content} == {"b"} and len(found.content) == 5
    assert {n.namespace for n in found.snapshots} == {"b"} and len(found.snapshots) == 3


def test_dead_edges_are_harmless():
    res = Resources()
    res.holders.append(Holder(NS, (Node.content(NS, d("gone")), snap("gone")), {}))
    res.content[Node.content(NS, d("x"))] = {"containerd.io/gc.ref.snapshot.overlayfs": "missing"}
    assert sweep(res).content == content("x")


def test_removal_order_is_children_first():
    snapshots = {
        snap("a"): SnapshotRecord(),
        snap("b"): SnapshotRecord(parent="a"),
        snap("c"): SnapshotRecord(parent="b"),
        snap("d"): SnapshotRecord(parent="a"),
    }
    order = graph.removal_order(list(snapshots), snapshots)
    assert order.index(snap("c")) < order.index(snap("b")) < order.index(snap("a"))
    assert order.index(snap("d")) < order.index(snap("a"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2027-01-15T08:00:00Z", 1_800_000_000 * 10**9 - 0),
        ("2027-01-15T10:00:00+02:00", 1_800_000_000 * 10**9),
        ("2027-01-15T08:00:00.123456789Z", 1_800_000_000 * 10**9 + 123_456_789),
        ("2027-01-15t08:00:00z", 1_800_000_000 * 10**9),
        ("2027-01-15", None),
        ("2027-01-15T08:00:00", None),  # RFC3339 requires the offset
        ("soon", None),
    ],
)
def test_parse_rfc3339(value, expected):
    assert graph.parse_rfc3339(value) == expected


# -- the collector over real stores


@pytest.fixture
async def stores(tmp_path):
    events = Exchange()
    meta = await open_metadata(tmp_path / "meta.db", events)
    cs = ContentStore(tmp_path / "content", meta.db, events)
    await cs.open()
    sn = await NativeSnapshotter.open(tmp_path / "native")
    collector = Collector(meta.db, cs, {"native": sn}, events)
    yield meta, cs, sn, collector, events
    await cs.close()
    await sn.close()
    await meta.close()


async def put(cs: ContentStore, data: bytes, ns: str = NS, lease: str = "", **labels: str) -> str:
    ref = f"ref-{hashlib.sha1(data).hexdigest()}"
    return (await cs.ingest_bytes(ns, ref, data, labels=labels, lease=lease)).digest


def blobs(cs: ContentStore) -> set[str]:
    return {"sha256:" + name for name in os.listdir(cs.root / "blobs" / "sha256")}


async def test_collector_sweeps_records_blobs_and_snapshots_children_first(stores):
    meta, cs, sn, collector, events = stores
    layer = await put(cs, b"layer")
    config = await put(cs, b"config", **{"containerd.io/gc.ref.snapshot.native": "top"})
    manifest = await put(
        cs,
        b"manifest",
        **{"containerd.io/gc.ref.content.config": config, "containerd.io/gc.ref.content.l.0": layer},
    )
    stray = await put(cs, b"stray")
    await sn.prepare(NS, "k1")
    await sn.commit(NS, "base", "k1")
    await sn.prepare(NS, "k2", "base")
    await sn.commit(NS, "top", "k2")
    await sn.prepare(NS, "orphan-child", "top")  # active, unreferenced: goes, top stays
    await meta.images.create(NS, Image("img", Descriptor("application/json", manifest, 8)))
    subscription = events.subscribe(['topic~="^/(content|snapshot)/"'])

    stats = await collector.collect()
    assert (stats.content, stats.blobs, stats.snapshots) == (1, 1, 1)
    assert stray not in blobs(cs) and {layer, config, manifest} <= blobs(cs)
    assert [i.name for i in await sn.list(NS)] == ["base", "top"]
    seen = []
    async for envelope in subscription:
        seen.append(envelope.topic)
        assert collector.claim(envelope)  # the scheduler does not take them for new deletions
        if len(seen) == 2:
            break
    assert sorted(seen) == ["/content/delete", "/snapshot/remove"]

    # Without the image, everything goes: children before parents.
    await meta.images.delete(NS, "img")
    stats = await collector.collect()
    assert (stats.content, stats.blobs, stats.snapshots) == (3, 3, 2)
    assert blobs(cs) == set() and await sn.list(NS) == [] and await cs.list(NS) == []


async def test_a_blob_another_namespace_records_keeps_its_file(stores):
    _meta, cs, _sn, collector, _events = stores
    shared = await put(cs, b"shared", ns="a")
    await put(cs, b"shared", ns="b")
    await cs.update("a", ContentInfo(digest=shared, size=6, labels={"containerd.io/gc.root": "1"}))
    stats = await collector.collect()
    assert stats.content == 1 and stats.blobs == 0
    assert shared in blobs(cs)
    assert [i.digest for i in await cs.list("a")] == [shared] and await cs.list("b") == []


async def test_leases_and_containers_protect(stores):
    meta, cs, sn, collector, _events = stores
    await meta.leases.create(NS, "l1", {})
    leased = await put(cs, b"leased", lease="l1")
    await sn.prepare(NS, "leased-snap")
    await meta.leases.add_resource(NS, "l1", LeaseResource(id="leased-snap", type="snapshots/native"))
    await sn.prepare(NS, "ctr-snap")
    await meta.containers.create(
        NS,
        Container(
            id="c1",
            runtime=RuntimeInfo("io.containerd.runc.v2"),
            spec=AnyValue("types.containerd.io/opencontainers/runtime-spec/1/Spec", b"{}"),
            snapshotter="native",
            snapshot_key="ctr-snap",
        ),
    )
    await meta.leases.create(NS, "old", {"containerd.io/gc.expire": "2000-01-01T00:00:00Z"})
    expired = await put(cs, b"expired", lease="old")

    stats = await collector.collect()
    assert (stats.content, stats.leases, stats.snapshots) == (1, 1, 0)
    assert [lease.id for lease in await meta.leases.list(NS)] == ["l1"]
    assert leased in blobs(cs) and expired not in blobs(cs)

    await meta.leases.delete(NS, "l1")
    await meta.containers.delete(NS, "c1")
    stats = await collector.collect()
    assert (stats.content, stats.snapshots) == (1, 2)
    assert blobs(cs) == set() and await sn.list(NS) == []


async def test_orphan_blob_files_are_reclaimed(stores):
    _meta, cs, _sn, collector, _events = stores
    kept = await put(cs, b"kept", **{"containerd.io/gc.root": "yes"})
    orphan = cs.blob_file(d("orphan"))
    orphan.write_bytes(b"orphan")  # as a commit interrupted between rename and row would leave
    (orphan.parent / "not-a-digest").write_bytes(b"?")
    stats = await collector.collect()
    assert stats.blobs == 1 and stats.content == 0
    assert not orphan.exists() and kept in blobs(cs)
    assert (orphan.parent / "not-a-digest").exists()


async def test_stale_ingests_are_aborted_fresh_and_locked_ones_kept(stores):
    _meta, cs, _sn, collector, _events = stores
    for ref in ("stale", "fresh", "locked"):
        async with cs.writer(NS, ref, total=10) as writer:
            await writer.write(b"12345")
    for ref in ("stale", "locked"):
        status_file = cs._ingest_dir(NS, ref) / STATUS
        record = json.loads(status_file.read_text())
        record["updated_at"] = record["started_at"] = time.time_ns() - 25 * HOUR
        status_file.write_text(json.dumps(record))
    async with cs.writer(NS, "locked", total=10):
        stats = await collector.collect()
    assert stats.ingests == 1
    assert sorted(s.ref for s in await cs.list_statuses(NS)) == ["fresh", "locked"]


async def test_snapshot_that_gains_a_child_after_the_mark_stays(stores, monkeypatch):
    meta, _cs, sn, collector, _events = stores
    await meta.namespaces.create(Namespace(NS))
    await sn.prepare(NS, "k")
    await sn.commit(NS, "parent", "k")
    real_remove = sn.remove

    async def racing_remove(namespace: str, key: str) -> None:
        if key == "parent":
            await sn.prepare(namespace, "late-child", "parent")  # a Prepare wins the race
        await real_remove(namespace, key)

    monkeypatch.setattr(sn, "remove", racing_remove)
    stats = await collector.collect()
    assert stats.snapshots == 0
    assert sorted(i.name for i in await sn.list(NS)) == ["late-child", "parent"]


async def test_namespace_in_use_checks(stores):
    meta, _cs, sn, _collector, _events = stores
    await meta.namespaces.create(Namespace("x"))
    await sn.prepare("x", "k")

    async def check(namespace: str) -> list[str]:
        return ['snapshots on "native" snapshotter'] if await sn.has_snapshots(namespace) else []

    meta.namespaces.add_in_use_check(check)
    with pytest.raises(FailedPrecondition, match='still has snapshots on "native" snapshotter'):
        await meta.namespaces.delete("x")
    with pytest.raises(NotFound):
        await meta.namespaces.delete("nope")
    await sn.remove("x", "k")
    await meta.namespaces.delete("x")


# -- the scheduler


class FakeCollector:
    def __init__(self, pause: float = 0.0, fail: bool = False) -> None:
        self.runs: list[float] = []
        self.pause = pause
        self.fail = fail
        self.gate: asyncio.Event | None = None

    async def collect(self) -> Stats:
        self.runs.append(time.monotonic())
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise FailedPrecondition("broken")
        return Stats(content=len(self.runs), pause=self.pause)

    def claim(self, envelope) -> bool:
        return False


async def started(collector: FakeCollector, **config) -> Scheduler:
    scheduler = Scheduler(collector, SchedulerConfig.parse(config))  # type: ignore[arg-type]
    await scheduler.start()
    return scheduler


async def test_startup_collection_runs_during_start_by_default():
    collector = FakeCollector()
    scheduler = await started(collector)
    assert len(collector.runs) == 1
    await scheduler.close()


async def test_startup_delay_runs_it_in_the_background():
    collector = FakeCollector()
    scheduler = await started(collector, startup_delay="50ms")
    assert collector.runs == []
    await asyncio.sleep(0.2)
    assert len(collector.runs) == 1
    await scheduler.close()


async def test_deletions_are_debounced_into_one_collection():
    collector = FakeCollector()
    scheduler = await started(collector, schedule_delay="100ms", pause_threshold=0)
    begin = time.monotonic()
    for _ in range(5):
        scheduler.notify_deletion()
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)
    assert len(collector.runs) == 2  # start-up + one for the burst
    assert collector.runs[1] - begin >= 0.09
    await asyncio.sleep(0.2)
    assert len(collector.runs) == 2  # nothing more without deletions
    await scheduler.close()


async def test_pause_threshold_spaces_collections_unless_deletion_threshold():
    collector = FakeCollector(pause=0.05)
    # 50 ms pauses at 10%: at least 450 ms between collections.
    scheduler = await started(collector, schedule_delay="0s", pause_threshold=0.1)
    scheduler.notify_deletion()
    await asyncio.sleep(0.2)
    assert len(collector.runs) == 1
    await asyncio.sleep(0.6)
    assert len(collector.runs) == 2
    await scheduler.close()

    collector = FakeCollector(pause=0.05)
    scheduler = await started(collector, schedule_delay="0s", pause_threshold=0.1, deletion_threshold=2)
    scheduler.notify_deletion(2)
    await asyncio.sleep(0.1)
    assert len(collector.runs) == 2
    await scheduler.close()


async def test_collect_waits_for_a_collection_that_starts_after_the_call():
    collector = FakeCollector()
    scheduler = await started(collector, pause_threshold=0.5)
    collector.gate = asyncio.Event()
    scheduler.notify_deletion()
    first = asyncio.create_task(scheduler.collect())
    await asyncio.sleep(0.05)
    assert len(collector.runs) == 2  # running, held by the gate
    second = asyncio.create_task(scheduler.collect())  # must not be answered by the running one
    await asyncio.sleep(0.05)
    collector.gate.set()
    assert (await first).content == 2
    assert (await second).content == 3
    await scheduler.close()


async def test_a_failed_collection_fails_its_waiters_and_is_retried():
    collector = FakeCollector(fail=True)
    scheduler = await started(collector)  # start-up fails: logged, the daemon goes on
    with pytest.raises(FailedPrecondition, match="broken"):
        await scheduler.collect()
    collector.fail = False
    assert (await scheduler.collect()).content == len(collector.runs)
    await scheduler.close()
    with pytest.raises(Exception, match="stopped"):
        await scheduler.collect()


def test_config_parsing():
    assert parse_duration("100ms", "x") == pytest.approx(0.1)
    assert parse_duration("1m30s", "x") == 90
    assert parse_duration("0", "x") == 0 and parse_duration(2, "x") == 2
    for bad in ("fast", "-1s", "10", True, [1]):
        with pytest.raises(ConfigError):
            parse_duration(bad, "x")
    config = SchedulerConfig.parse({"pause_threshold": 0.9, "deletion_threshold": 3})
    assert config.pause_threshold == 0.5 and config.deletion_threshold == 3
    assert config.schedule_delay == pytest.approx(0.1) and config.startup_delay == 0
    with pytest.raises(ConfigError):
        SchedulerConfig.parse({"deletion_threshold": -1})
