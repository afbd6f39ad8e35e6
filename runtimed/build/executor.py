"""Running a parsed Dockerfile against the daemon: one stage at a time, one step at a time.

A stage's state is its base image's layers (diff_ids, blobs, hence its chainID), the image config
document built so far, and its cache key (runtimed.build.cache). Steps:

- FROM: a local image (found as `runtimectl` finds images), pulled through the Transfer service
  when missing, unpacked client-side (Snapshots.Prepare + Diff.Apply + Commit, as ctr does) when its
  snapshots are missing; `scratch`; or an earlier stage (`FROM x AS y` ... `FROM y`).
- Filesystem steps (RUN, COPY, ADD, WORKDIR when it creates the directory): Snapshots.Prepare on
  the parent chainID; apply (mount locally and copy for COPY/ADD/WORKDIR, a container through the
  Tasks API for RUN); Diff.Diff against a View of the parent, which writes the gzip layer into the
  content store; Snapshots.Commit under the new chainID. Each is cached.
- Config steps (ENV, CMD, ENTRYPOINT, USER, LABEL, EXPOSE, VOLUME, SHELL, STOPSIGNAL, HEALTHCHECK,
  MAINTAINER, ONBUILD, ARG) change the config and add an `empty_layer` history entry.

Everything is created under one lease. A failing step removes what it prepared (the active
snapshot, its view, the container and task) before the error propagates; the lease is then
deleted, so nothing the build made survives except committed steps that a cache record holds.
History timestamps are the layer's creation time (from the cache on a hit); config-only steps take
the time of the step before them, so a fully cached rebuild produces the same image digest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import secrets
import select
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from runtimed import mediatypes
from runtimed.build import dockerfile as df
from runtimed.build.api import Daemon, already_exists
from runtimed.build.cache import BuildCache, Record, now, step_key
from runtimed.build.context import BuildContext, Entry, Source, entries_digest
from runtimed.build.rootfs import RootFS, archive_kind
from runtimed.build.shell import process_word, process_words, split_words
from runtimed.client import fifo_parent
from runtimed.diff.mounts import temp_mount
from runtimed.errors import InvalidArgument, NotFound
from runtimed.images.manifest import chain_ids
from runtimed.tasks import spec as specs
from runtimed.types import Descriptor, Mount

DEFAULT_SHELL = ["/bin/sh", "-c"]
DEFAULT_RUNTIME = "io.containerd.runc.v2"
LAYER_MEDIA_TYPE = mediatypes.OCI_LAYER_GZIP
EPOCH = "1970-01-01T00:00:00Z"
# Build arguments docker accepts without an ARG line; kept out of history and cache keys.
_PROXIES = ("HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "NO_PROXY", "ALL_PROXY")
PROXY_ARGS = frozenset(_PROXIES) | frozenset(name.lower() for name in _PROXIES)
# Directories runc creates in a rootfs as mount points; a RUN layer does not keep them if it made them.
MOUNT_POINTS = ("/proc", "/sys", "/dev", "/run")
OCI_LAYER_TYPES = {
    mediatypes.DOCKER_LAYER_GZIP: mediatypes.OCI_LAYER_GZIP,
    mediatypes.DOCKER_LAYER: mediatypes.OCI_LAYER,
}
_URL = re.compile(r"^(https?://|git@|git://)")


class RunFailed(Exception):
    """A RUN whose process exited non-zero (runtimectl exits 1, as docker build does)."""

    def __init__(self, command: str, status: int) -> None:
        super().__init__(f"The command '{command}' returned a non-zero code: {status}")
        self.status = status


class StepFailed(Exception):
    """A step that failed as written (a missing COPY source, an unknown user): exit 1."""


@dataclass
class Options:
    context: Path
    dockerfile_text: str
    tags: list[str] = field(default_factory=list)
    build_args: dict[str, str] = field(default_factory=dict)
    no_cache: bool = False
    runtime: str = DEFAULT_RUNTIME
    snapshotter: str = "overlayfs"
    network: str = "host"
    target: str = ""
    quiet: bool = False


@dataclass
class Stage:
    name: str
    image: dict[str, Any]  # the image config document
    layers: list[Descriptor]
    key: str
    created: str
    args: dict[str, str] = field(default_factory=dict)
    shell: list[str] = field(default_factory=lambda: list(DEFAULT_SHELL))
    cmd_set: bool = False

    @property
    def diff_ids(self) -> list[str]:
        return self.image["rootfs"]["diff_ids"]

    @property
    def chain(self) -> str:
        return chain_ids(self.diff_ids)[-1] if self.diff_ids else ""

    @property
    def config(self) -> dict[str, Any]:
        return self.image.setdefault("config", {})

    def env(self) -> dict[str, str]:
        """What variable substitution sees: the declared args, then ENV (which wins)."""
        values = dict(self.args)
        for entry in self.config.get("Env") or []:
            name, _, value = entry.partition("=")
            values[name] = value
        return values

    def set_env(self, name: str, value: str) -> None:
        env = [e for e in self.config.get("Env") or [] if e.partition("=")[0] != name]
        self.config["Env"] = [*env, f"{name}={value}"]

    def copy(self) -> Stage:
        return Stage(self.name, json.loads(json.dumps(self.image)), list(self.layers), self.key, self.created,
                     dict(self.args), list(self.shell), self.cmd_set)  # fmt: skip


def canonical(document: Any) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def short_id(digest: str) -> str:
    return digest.partition(":")[2][:12]


class Output:
    def __init__(self, out: TextIO, quiet: bool) -> None:
        self.out = out
        self.quiet = quiet
        self.lock = threading.Lock()

    def line(self, text: str) -> None:
        if not self.quiet:
            with self.lock:
                self.out.write(text + "\n")
                self.out.flush()

    def raw(self, data: bytes) -> None:
        if not self.quiet:
            with self.lock:
                self.out.flush()
                with contextlib.suppress(OSError):
                    os.write(self.out.fileno(), data)


@dataclass
class Result:
    config_digest: str
    manifest: Descriptor
    tags: list[str]
    warnings: list[str]


class Builder:
    def __init__(
        self,
        daemon: Daemon,
        options: Options,
        *,
        out: TextIO | None = None,
        find_image: Callable[[str], Any] | None = None,
        pull: Callable[[str], Any] | None = None,
    ) -> None:
        self.daemon = daemon
        self.options = options
        self.out = Output(out or sys.stdout, options.quiet)
        self.find_image = find_image or (lambda name: daemon.image(name))
        self.pull = pull
        self.cache = BuildCache(daemon, options.snapshotter)
        self.context = BuildContext(options.context)
        self.dockerfile = df.parse(options.dockerfile_text)
        self.escape = self.dockerfile.escape
        self.stages: list[Stage] = []
        self.aliases: dict[str, Stage] = {}
        self.meta_args: dict[str, str] = {}
        self.used_args: set[str] = set()
        self.validate()

    # -- validation before anything is built ----------------------------------------------------

    def validate(self) -> None:
        names: list[str] = []
        for instruction in self.dockerfile.instructions:
            flags = instruction.flags
            if instruction.keyword == "FROM":
                words = split_words(instruction.rest, self.escape)
                if len(words) == 3:
                    names.append(words[2].lower())
            if instruction.keyword == "RUN" and set(flags) - {"network"}:
                flag = sorted(set(flags) - {"network"})[0]
                raise instruction.error(f"RUN --{flag} is not supported by runtimectl build")
            if instruction.keyword == "RUN" and flags.get("network", "default") not in (
                "default",
                "host",
                "none",
            ):
                raise instruction.error(f"RUN --network={flags['network']}: expected default, host or none")
            if instruction.keyword == "ADD" and "checksum" in flags:
                raise instruction.error("ADD --checksum is not supported by runtimectl build")
            if instruction.keyword in ("ADD", "COPY"):
                words = (
                    instruction.json
                    if instruction.json is not None
                    else split_words(instruction.rest, self.escape)
                )
                for source in words[:-1]:
                    if _URL.match(source):
                        raise instruction.error(
                            f"{instruction.keyword} from a URL ({source}) is not supported: download it into "
                            "the build context, or fetch it in a RUN step"
                        )
                if "chmod" in flags and not re.fullmatch(r"[0-7]{3,4}", flags["chmod"]):
                    raise instruction.error(f"invalid --chmod={flags['chmod']}: expected octal permissions")
        if self.options.target and self.options.target.lower() not in names:
            raise InvalidArgument(f"failed to reach build target {self.options.target} in Dockerfile")

    # -- the build ----------------------------------------------------------------------------------

    def build(self) -> Result:
        instructions = self.dockerfile.instructions
        total = len(instructions)
        self.daemon.create_lease()
        failed = True
        try:
            stage: Stage | None = None
            for number, instruction in enumerate(instructions, start=1):
                if instruction.keyword == "FROM" and stage is not None and self._is_target(stage):
                    break
                self.out.line(f"Step {number}/{total} : {instruction.text}")
                if instruction.keyword == "ARG" and stage is None:
                    self._meta_arg(instruction)
                    continue
                if instruction.keyword == "FROM":
                    stage = self._from(instruction)
                    continue
                assert stage is not None
                self._step(stage, instruction)
                self.out.line(f" ---> {short_id(sha256(canonical(self._document(stage))))}")
            assert stage is not None
            result = self._finish(stage)
            failed = False
            return result
        finally:
            with contextlib.suppress(Exception):
                self.daemon.delete_lease(sync=failed)

    def _is_target(self, stage: Stage) -> bool:
        return bool(self.options.target) and stage.name.lower() == self.options.target.lower()

    def _meta_arg(self, instruction: df.Instruction) -> None:
        for word in split_words(instruction.rest, self.escape):
            name, has_default, default = word.partition("=")
            if name in self.options.build_args:
                self.meta_args[name] = self.options.build_args[name]
                self.used_args.add(name)
            elif has_default:
                self.meta_args[name] = process_word(default, self.meta_args, self.escape)

    # -- FROM ---------------------------------------------------------------------------------------

    def _from(self, instruction: df.Instruction) -> Stage:
        words = split_words(instruction.rest, self.escape)
        name = process_word(words[0], self.meta_args, self.escape)
        alias = words[2] if len(words) == 3 else str(len(self.stages))
        if name.lower() in self.aliases:
            stage = self.aliases[name.lower()].copy()
            stage.name = alias
            stage.args = {}
            self.out.line(f" ---> {short_id(sha256(canonical(self._document(stage))))}")
        elif name == "scratch":
            image = {
                "architecture": _host_architecture(),
                "os": "linux",
                "config": {},
                "rootfs": {"type": "layers", "diff_ids": []},
                "history": [],
            }
            stage = Stage(alias, image, [], step_key("scratch"), EPOCH)
            self.out.line(" ---> ")
        else:
            stage = self._base_image(name)
        stage.name = alias
        self.aliases[alias.lower()] = stage
        self.aliases[str(len(self.stages))] = stage  # COPY --from=0 works for named stages too
        self.stages.append(stage)
        return stage

    def _base_image(self, name: str) -> Stage:
        from runtimed.images import manifest as manifests
        from runtimed.platforms import Platform

        record = self.find_image(name)
        if record is None:
            if self.pull is None:
                raise StepFailed(f"pull access denied for {name}: the image is not in this namespace")
            record = self.pull(name)
        data = self.daemon.read(record.target.digest)
        manifest_digest = record.target.digest
        if manifests.media_type_of(data, "image target") in manifests.INDEX_TYPES:
            chosen = manifests.select_manifest(manifests.parse_index(data), Platform.host(), f"image {name}")
            manifest_digest = chosen.digest
            data = self.daemon.read(chosen.digest)
        manifest = manifests.parse_manifest(data)
        config_data = self.daemon.read(manifest.config.digest)
        config = manifests.parse_config(config_data)
        for blob in (manifest_digest, manifest.config.digest, *(layer.digest for layer in manifest.layers)):
            self.daemon.lease_content(blob)  # the base image may be removed while this build runs
        self._unpack(manifest.layers, config.diff_ids, manifest.config.digest)
        image = dict(config.raw)
        image.setdefault("config", {})
        image["rootfs"] = {"type": "layers", "diff_ids": list(config.diff_ids)}
        image.setdefault("history", [])
        key = step_key("image", self.options.snapshotter, manifest_digest)
        stage = Stage("", image, list(manifest.layers), key, str(image.get("created") or EPOCH))
        if image["config"].get("Shell"):
            stage.shell = list(image["config"]["Shell"])
        self.out.line(f" ---> {short_id(manifest.config.digest)}")
        return stage

    def _unpack(self, layers: Sequence[Descriptor], diff_ids: Sequence[str], config_digest: str) -> None:
        """Make sure every layer's chainID snapshot exists (ctr's client-side unpack)."""
        snapshotter = self.options.snapshotter
        chains = chain_ids(diff_ids)
        parent = ""
        for layer, diff_id, chain in zip(layers, diff_ids, chains, strict=True):
            self.daemon.lease_snapshot(snapshotter, chain)
            if not self.daemon.snapshot_exists(snapshotter, chain):
                key = f"extract-{secrets.token_hex(6)} {chain}"
                mounts = self.daemon.prepare(snapshotter, key, parent)
                committed = False
                try:
                    applied = self.daemon.apply(layer, mounts)
                    if applied != diff_id:
                        raise StepFailed(f"layer {layer.digest}: unpacked to {applied}, expected {diff_id}")
                    try:
                        self.daemon.commit(snapshotter, chain, key)
                        committed = True
                    except Exception as exc:
                        if not already_exists(exc):
                            raise
                finally:
                    if not committed:
                        self.daemon.remove_snapshot(snapshotter, key)
            parent = chain
        if chains:
            self.daemon.set_labels(
                config_digest, {f"containerd.io/gc.ref.snapshot.{snapshotter}": chains[-1]}
            )

    # -- steps --------------------------------------------------------------------------------------

    def _history(self, stage: Stage, created_by: str, *, empty: bool, created: str | None = None) -> None:
        entry: dict[str, Any] = {"created": created or stage.created, "created_by": created_by}
        if empty:
            entry["empty_layer"] = True
        stage.image.setdefault("history", []).append(entry)

    def _words(self, stage: Stage, text: str) -> list[str]:
        return process_words(text, stage.env(), self.escape)

    def _word(self, stage: Stage, text: str) -> str:
        return process_word(text, stage.env(), self.escape)

    def _config_step(self, stage: Stage, text: str) -> None:
        stage.key = step_key(stage.key, text)
        self._history(stage, text, empty=True)

    def _step(self, stage: Stage, instruction: df.Instruction) -> None:
        keyword = instruction.keyword
        config = stage.config
        if keyword == "ARG":
            for word in split_words(instruction.rest, self.escape):
                name, has_default, default = word.partition("=")
                if name in self.options.build_args:
                    stage.args[name] = self.options.build_args[name]
                    self.used_args.add(name)
                elif has_default:
                    stage.args[name] = self._word(stage, default)
                elif name in self.meta_args:
                    stage.args[name] = self.meta_args[name]
                shown = f"{name}={stage.args[name]}" if name in stage.args else name
                stage.key = step_key(stage.key, f"ARG {shown}")
            return
        if keyword == "ENV":
            env = stage.env()
            pairs = [(process_word(n, env, self.escape), process_word(v, env, self.escape))
                     for n, v in df.name_values(instruction, self.escape)]  # fmt: skip
            for name, value in pairs:
                stage.set_env(name, value)
            self._config_step(stage, "ENV " + " ".join(f"{n}={v}" for n, v in pairs))
        elif keyword == "LABEL":
            env = stage.env()
            pairs = [(process_word(n, env, self.escape), process_word(v, env, self.escape))
                     for n, v in df.name_values(instruction, self.escape)]  # fmt: skip
            config["Labels"] = {**(config.get("Labels") or {}), **dict(pairs)}
            self._config_step(stage, "LABEL " + " ".join(f"{n}={v}" for n, v in pairs))
        elif keyword == "WORKDIR":
            path = self._word(stage, instruction.rest)
            if not path.startswith("/"):
                path = posixpath.join(config.get("WorkingDir") or "/", path)
            path = posixpath.normpath(path)
            config["WorkingDir"] = path
            self._fs_step(stage, f"WORKDIR {path}", "", lambda rootfs: rootfs.mkdirs(path), allow_empty=True)
        elif keyword == "USER":
            config["User"] = self._word(stage, instruction.rest)
            self._config_step(stage, f"USER {config['User']}")
        elif keyword in ("CMD", "ENTRYPOINT"):
            command = instruction.json if instruction.json is not None else [*stage.shell, instruction.rest]
            name = "Cmd" if keyword == "CMD" else "Entrypoint"
            config[name] = command
            if keyword == "CMD":
                stage.cmd_set = True
            elif not stage.cmd_set:
                config["Cmd"] = None
            self._config_step(stage, f"{keyword} {json.dumps(command)}")
        elif keyword == "EXPOSE":
            ports = dict(config.get("ExposedPorts") or {})
            for word in self._words(stage, instruction.rest):
                for port in _ports(word, instruction):
                    ports[port] = {}
            config["ExposedPorts"] = ports
            self._config_step(stage, "EXPOSE " + " ".join(sorted(ports)))
        elif keyword == "VOLUME":
            volumes = (
                instruction.json if instruction.json is not None else self._words(stage, instruction.rest)
            )
            if not all(volumes):
                raise instruction.error("VOLUME specified can not be an empty string")
            config["Volumes"] = {**(config.get("Volumes") or {}), **{v: {} for v in volumes}}
            self._config_step(stage, f"VOLUME {json.dumps(volumes)}")
        elif keyword == "STOPSIGNAL":
            config["StopSignal"] = self._word(stage, instruction.rest)
            self._config_step(stage, f"STOPSIGNAL {config['StopSignal']}")
        elif keyword == "SHELL":
            assert instruction.json is not None
            stage.shell = list(instruction.json)
            config["Shell"] = list(instruction.json)
            self._config_step(stage, f"SHELL {json.dumps(instruction.json)}")
        elif keyword == "MAINTAINER":
            stage.image["author"] = instruction.rest
            self._config_step(stage, f"MAINTAINER {instruction.rest}")
        elif keyword == "ONBUILD":
            config["OnBuild"] = [*(config.get("OnBuild") or []), instruction.rest]
            self._config_step(stage, f"ONBUILD {instruction.rest}")
        elif keyword == "HEALTHCHECK":
            config["Healthcheck"] = _healthcheck(instruction, stage.shell)
            self._config_step(stage, f"HEALTHCHECK {json.dumps(config['Healthcheck'], sort_keys=True)}")
        elif keyword in ("COPY", "ADD"):
            self._copy(stage, instruction)
        elif keyword == "RUN":
            self._run(stage, instruction)
        else:  # pragma: no cover - the parser knows no other
            raise instruction.error(f"{keyword} is not supported here")

    # -- filesystem steps ---------------------------------------------------------------------------

    def _fs_step(
        self,
        stage: Stage,
        text: str,
        digest: str,
        apply: Callable[[RootFS], bool | None] | None,
        *,
        run: Callable[[str, list[Mount]], None] | None = None,
        allow_empty: bool = False,
    ) -> None:
        """A step that may change the filesystem: from cache, or prepare/apply/diff/commit."""
        key = step_key(stage.key, text, digest)
        record = None if self.options.no_cache else self.cache.lookup(key)
        if record is not None:
            self.out.line(" ---> Using cache")
        else:
            record = self._make_layer(stage, key, apply, run, allow_empty)
            self.cache.store(record)
        stage.key = key
        if record.descriptor is None:
            self._history(stage, text, empty=True)
            return
        # Leased as well as cached: a `builder prune` meanwhile cannot take what this image needs.
        self.daemon.lease_snapshot(self.options.snapshotter, record.chain_id)
        self.daemon.lease_content(record.descriptor.digest)
        stage.layers.append(record.descriptor)
        stage.diff_ids.append(record.diff_id)
        stage.created = record.created
        self._history(stage, text, empty=False, created=record.created)

    def _make_layer(
        self,
        stage: Stage,
        key: str,
        apply: Callable[[RootFS], bool | None] | None,
        run: Callable[[str, list[Mount]], None] | None,
        allow_empty: bool,
    ) -> Record:
        daemon, snapshotter = self.daemon, self.options.snapshotter
        parent = stage.chain
        active = f"build-{secrets.token_hex(6)}"
        view = ""
        committed = False
        mounts = daemon.prepare(snapshotter, active, parent)
        try:
            changed: bool | None = True
            if apply is not None:
                with temp_mount(mounts) as root:
                    changed = apply(RootFS(root))
            if run is not None:
                run(active, mounts)
            if changed is False and allow_empty:
                return Record(key=key, created=now(), snapshotter=snapshotter)
            lower: list[Mount] = []
            if parent:
                view = f"build-view-{secrets.token_hex(6)}"
                lower = daemon.view(snapshotter, view, parent)
            layer = daemon.diff(lower, mounts, LAYER_MEDIA_TYPE)
            info = daemon.info(layer.digest)
            diff_id = info.labels.get("containerd.io/uncompressed", "") if info is not None else ""
            if not diff_id:
                raise StepFailed(f"the diff service gave layer {layer.digest} no uncompressed digest")
            chain = chain_ids([*stage.diff_ids, diff_id])[-1]
            daemon.lease_snapshot(snapshotter, chain)
            try:
                daemon.commit(snapshotter, chain, active)
                committed = True
            except Exception as exc:
                if not already_exists(exc):
                    raise
            layer_json = {"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}
            return Record(key=key, created=now(), snapshotter=snapshotter, layer=layer_json,
                          diff_id=diff_id, chain_id=chain)  # fmt: skip
        finally:
            if view:
                with contextlib.suppress(Exception):
                    daemon.remove_snapshot(snapshotter, view)
            if not committed:
                with contextlib.suppress(Exception):
                    daemon.remove_snapshot(snapshotter, active)

    # -- COPY and ADD -------------------------------------------------------------------------------

    def _copy(self, stage: Stage, instruction: df.Instruction) -> None:
        keyword, flags = instruction.keyword, instruction.flags
        env = stage.env()
        if instruction.json is not None:
            words = [process_word(w, env, self.escape) for w in instruction.json]
        else:
            words = [process_word(w, env, self.escape) for w in split_words(instruction.rest, self.escape)]
        *sources_text, dest = words
        chown = process_word(flags["chown"], env, self.escape) if flags.get("chown") else ""
        chmod = int(flags["chmod"], 8) if flags.get("chmod") else None
        source_from = flags.get("from", "")
        trailing = dest.endswith("/") or dest in (".", "..") or dest.endswith(("/.", "/.."))
        dest = posixpath.normpath(posixpath.join(stage.config.get("WorkingDir") or "/", dest))
        if trailing and dest != "/":
            dest += "/"
        with self._source_context(source_from) as context:
            groups: list[tuple[Source, list[Entry]]] = []
            try:
                for text in sources_text:
                    for source in context.sources(text):
                        groups.append((source, list(context.entries(source))))
            except (NotFound, InvalidArgument) as exc:
                raise StepFailed(f"{keyword} failed: {exc.reason}") from None
            multiple = len(groups) > 1 or len(sources_text) > 1
            if multiple and not dest.endswith("/"):
                raise StepFailed(
                    f"When using {keyword} with more than one source file, the destination must be a "
                    "directory and end with a /"
                )
            archives = {}
            if keyword == "ADD":
                for source, _ in groups:
                    if not source.is_dir:
                        kind = archive_kind(source.path)
                        if kind is not None:
                            archives[source.rel] = kind
            digest = entries_digest(groups)
            flag_text = "".join(f"--{k}={v} " for k, v in sorted(flags.items()) if k != "from")
            if source_from:
                flag_text += f"--from={source_from} "
            text = f"{keyword} {flag_text}{' '.join(sources_text)} {dest}"

            def apply(rootfs: RootFS) -> bool:
                owner = rootfs.chown_owner(chown) if chown else None
                for source, entries in groups:
                    if source.rel in archives:
                        with open(source.path, "rb") as archive:
                            skipped = rootfs.extract(archive, dest)
                        for name in skipped:
                            self.out.line(f"[Warning] {keyword}: device node {name} in {source.rel} skipped")
                        continue
                    target = dest
                    if not source.is_dir and (dest.endswith("/") or rootfs.is_dir(dest)):
                        target = posixpath.join(dest, posixpath.basename(source.rel))
                    rootfs.copy(entries, target.rstrip("/") or "/", owner=owner, chmod=chmod)
                return True

            self._fs_step(stage, text, digest, apply)

    @contextlib.contextmanager
    def _source_context(self, source_from: str):
        if not source_from:
            yield self.context
            return
        stage = self.aliases.get(source_from.lower())
        if stage is None:
            stage = self._base_image(source_from)  # COPY --from=IMAGE
        view = f"build-from-{secrets.token_hex(6)}"
        mounts = self.daemon.view(self.options.snapshotter, view, stage.chain) if stage.chain else []
        try:
            if not mounts:
                empty = Path(tempfile.mkdtemp(prefix="runtimed-build-empty-"))
                try:
                    yield BuildContext(empty, ignore=False)
                finally:
                    shutil.rmtree(empty, ignore_errors=True)
            else:
                with temp_mount(mounts, readonly=True) as root:
                    yield BuildContext(root, ignore=False)
        finally:
            if mounts:
                self.daemon.remove_snapshot(self.options.snapshotter, view)

    # -- RUN ----------------------------------------------------------------------------------------

    def _run(self, stage: Stage, instruction: df.Instruction) -> None:
        command = list(instruction.json) if instruction.json is not None else [*stage.shell, instruction.rest]
        config = stage.config
        args = {k: v for k, v in stage.args.items() if k not in PROXY_ARGS}
        env_names = {e.partition("=")[0] for e in config.get("Env") or []}
        run_env = list(config.get("Env") or [])
        run_env += [f"{k}={v}" for k, v in sorted(stage.args.items()) if k not in env_names]
        prefix = (
            f"|{len(args)} " + " ".join(f"{k}={v}" for k, v in sorted(args.items())) + " " if args else ""
        )
        network = instruction.flags.get("network", "default")
        if network == "default":
            network = self.options.network
        text = f"RUN {prefix}{' '.join(command)}"
        key_text = text + (f" --network={network}" if network != "host" else "")
        shown = " ".join(command)
        user = config.get("User") or ""
        cwd = config.get("WorkingDir") or "/"
        state: dict[str, Any] = {}

        def inspect(rootfs: RootFS) -> None:
            state["user"] = rootfs.user(user) if user else (0, 0, [])
            state["missing"] = [p for p in MOUNT_POINTS if rootfs.lstat(p) is None]
            return None

        def run(active: str, mounts: list[Mount]) -> None:
            spec = specs.default_spec(self.daemon.namespace, active)
            uid, gid, extra = state["user"]
            process = spec["process"]
            process["args"] = command
            process["env"] = merge_env(process["env"], run_env)
            process["cwd"] = cwd
            process["user"] = {"uid": uid, "gid": gid, **({"additionalGids": extra} if extra else {})}
            if network == "host":
                spec["linux"]["namespaces"] = [
                    n for n in spec["linux"]["namespaces"] if n["type"] != "network"
                ]
            status = self._run_container(active, spec, mounts)
            with temp_mount(mounts) as root:
                rootfs = RootFS(root)
                for path in state["missing"]:
                    rootfs.remove_empty_dir(path)
            if status != 0:
                raise RunFailed(shown, status)

        self._fs_step(stage, key_text, "", inspect, run=run)
        stage.image["history"][-1]["created_by"] = text

    def _run_container(self, container_id: str, spec: dict[str, Any], mounts: list[Mount]) -> int:
        daemon = self.daemon
        self.out.line(f" ---> Running in {container_id.removeprefix('build-')}")
        fifos = Fifos(container_id, self.out)
        created = task = False
        try:
            daemon.create_container(container_id, spec, self.options.runtime, self.options.snapshotter)
            created = True
            daemon.create_task(container_id, mounts, fifos.stdout, fifos.stderr)
            task = True
            waiter = daemon.wait_future(container_id)
            daemon.start_task(container_id)
            status = _wait(waiter)
            fifos.drain()
            return status
        except BaseException:
            if task:
                daemon.kill_task(container_id, int(signal.SIGKILL))
                with contextlib.suppress(Exception):
                    _wait(daemon.wait_future(container_id), timeout=30)
            raise
        finally:
            if task:
                daemon.delete_task(container_id)
            if created:
                daemon.delete_container(container_id)
            fifos.close()
            self.out.line(f"Removing intermediate container {container_id.removeprefix('build-')}")

    # -- the image ----------------------------------------------------------------------------------

    def _document(self, stage: Stage) -> dict[str, Any]:
        document = json.loads(json.dumps(stage.image))
        document["created"] = stage.created
        config = document.get("config") or {}
        document["config"] = {k: v for k, v in config.items() if v is not None}
        return document

    def _finish(self, stage: Stage) -> Result:
        snapshotter = self.options.snapshotter
        document = self._document(stage)
        config_data = canonical(document)
        config_digest = sha256(config_data)
        config_labels = {}
        if stage.chain:
            config_labels[f"containerd.io/gc.ref.snapshot.{snapshotter}"] = stage.chain
        self.daemon.write(config_data, config_digest, config_labels)
        layers = [
            {"mediaType": OCI_LAYER_TYPES.get(layer.media_type, layer.media_type), "digest": layer.digest,
             "size": layer.size}
            for layer in stage.layers
        ]  # fmt: skip
        manifest = {
            "schemaVersion": 2,
            "mediaType": mediatypes.OCI_MANIFEST,
            "config": {"mediaType": mediatypes.OCI_CONFIG, "digest": config_digest, "size": len(config_data)},
            "layers": layers,
        }
        manifest_data = canonical(manifest)
        manifest_digest = sha256(manifest_data)
        manifest_labels = {"containerd.io/gc.ref.content.config": config_digest}
        for index, layer in enumerate(stage.layers):
            manifest_labels[f"containerd.io/gc.ref.content.l.{index}"] = layer.digest
        self.daemon.write(manifest_data, manifest_digest, manifest_labels)
        target = Descriptor(mediatypes.OCI_MANIFEST, manifest_digest, len(manifest_data))
        tags = []
        for tag in self.options.tags:
            self.daemon.put_image(normalised(tag), target)
            tags.append(tag)
        warnings = []
        unused = sorted(set(self.options.build_args) - self.used_args - PROXY_ARGS)
        if unused:
            warnings.append(f"[Warning] One or more build-args [{' '.join(unused)}] were not consumed")
        return Result(config_digest, target, tags, warnings)


def merge_env(base: Sequence[str], extra: Sequence[str]) -> list[str]:
    """Later NAME=VALUE entries replace earlier ones of the same name (containerd's rule)."""
    merged = {entry.partition("=")[0]: entry for entry in base}
    for entry in extra:
        name = entry.partition("=")[0]
        merged.pop(name, None)
        merged[name] = entry
    return list(merged.values())


def normalised(name: str) -> str:
    """The canonical form of an image name ("app:v1" -> "docker.io/library/app:v1")."""
    from runtimed.reference import parse

    return str(parse(name))


def _host_architecture() -> str:
    from runtimed.platforms import Platform

    return Platform.host().architecture


def _ports(word: str, instruction: df.Instruction) -> list[str]:
    port, _, protocol = word.partition("/")
    protocol = (protocol or "tcp").lower()
    low, _, high = port.partition("-")
    if not low.isdigit() or (high and not high.isdigit()):
        raise instruction.error(f"invalid containerPort: {word}")
    if not high:
        return [f"{int(low)}/{protocol}"]
    return [f"{p}/{protocol}" for p in range(int(low), int(high) + 1)]


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}


def _duration(text: str, instruction: df.Instruction) -> int:
    if not text or _DURATION.sub("", text):
        raise instruction.error(f"invalid duration {text!r}")
    return int(sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(text)))


def _healthcheck(instruction: df.Instruction, shell: list[str]) -> dict[str, Any]:
    rest = instruction.rest.strip()
    if rest.upper() == "NONE":
        return {"Test": ["NONE"]}
    word, _, command = rest.partition(" ")
    if word.upper() != "CMD":
        raise instruction.error("HEALTHCHECK must be NONE or CMD followed by a command")
    array = df._json_array(command)
    test = ["CMD", *array] if array is not None else ["CMD-SHELL", command.strip()]
    check: dict[str, Any] = {"Test": test}
    names = {"interval": "Interval", "timeout": "Timeout", "start-period": "StartPeriod",
             "start-interval": "StartInterval"}  # fmt: skip
    for flag, value in instruction.flags.items():
        if flag == "retries":
            check["Retries"] = int(value)
        else:
            check[names[flag]] = _duration(value, instruction)
    return check


def _wait(waiter: Any, timeout: float | None = None) -> int:
    """The exit status; polls so Ctrl-C gets through."""
    import time

    import grpc

    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            return int(waiter.result(timeout=0.2).exit_status)
        except grpc.FutureTimeoutError:
            if deadline is not None and time.monotonic() > deadline:
                raise
            continue


def fifo_dir() -> str:
    directory = fifo_parent()
    if directory is None:
        raise StepFailed("no writable directory for the RUN step's FIFOs")
    return directory


class Fifos:
    """stdout and stderr FIFOs of a RUN's process, copied to the build output as they come."""

    def __init__(self, name: str, out: Output) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="rtbuild-", dir=fifo_dir()))
        self.out = out
        self.stdout = str(self.directory / "stdout")
        self.stderr = str(self.directory / "stderr")
        self.threads = []
        self._stop = threading.Event()
        for path in (self.stdout, self.stderr):
            os.mkfifo(path, 0o600)
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # before the process exists, like ctr
            thread = threading.Thread(target=self._pump, args=(fd,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _pump(self, fd: int) -> None:
        try:
            while True:
                ready, _, _ = select.select([fd], [], [], 0.5)
                if not ready:
                    if self._stop.is_set():
                        return
                    continue
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not data:
                    return
                self.out.raw(data)
        finally:
            os.close(fd)

    def drain(self, timeout: float = 10) -> None:
        for thread in self.threads:
            thread.join(timeout)

    def close(self) -> None:
        self._stop.set()
        for thread in self.threads:
            thread.join(2)
        shutil.rmtree(self.directory, ignore_errors=True)
