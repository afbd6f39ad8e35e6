"""bench/run [--quick] [--rows ROW,...]: runtimed and containerd side by side, in one run.

Started by bench/run inside a private mount namespace (unshare --mount): a tmpfs goes over /run
there, because ctr and containerd 1.6's shims hard-code /run/containerd (FIFOs, shim sockets, runc
state); the host's /run is never touched, and every mount the daemons make dies with the namespace.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import glob
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from bench import images, report, rows
from bench.daemons import REPO, Containerd, Registry, Runtimed, Workspace
from bench.measure import Row

GROUPS = ("rss", "import", "pull", "list", "run", "concurrent", "shim")
RESULTS = REPO / "bench" / "results"
CACHE = REPO / "bench" / ".cache"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run",
        description="Benchmark runtimed against containerd 1.6 side by side; prints the table and writes "
        "bench/results/latest.md, latest.json and latest.png.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small image, few repetitions (CI smoke test, < 2 min)"
    )
    parser.add_argument(
        "--rows",
        default=",".join(GROUPS),
        metavar="ROW,...",
        help=f"rows to run (default all): {', '.join(GROUPS)}",
    )
    parser.add_argument("--tmpdir", default=None, help="where the temp roots go (default: $TMPDIR or /tmp)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write bench/results/")
    args = parser.parse_args(argv)
    args.groups = [g.strip() for g in args.rows.split(",") if g.strip()]
    unknown = sorted(set(args.groups) - set(GROUPS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(GROUPS)}")
    return args


def _private_mount_namespace() -> bool:
    """bench/run records the mount namespace it started in, then unshares: ours must differ."""
    outer = os.environ.get("RUNTIMED_BENCH_OUTER_MNTNS", "")
    return bool(outer) and os.readlink("/proc/self/ns/mnt") != outer


def _log(text: str) -> None:
    print(text, flush=True)


def _remove_our_cgroups() -> None:
    """rmdir the (empty) cgroups runc made for our namespaces: /<namespace>/<id> under each hierarchy."""
    for pattern in ("/sys/fs/cgroup/*/rtdbench-*", "/sys/fs/cgroup/rtdbench-*"):
        for top in glob.glob(pattern):
            for directory, _subdirs, _files in sorted(os.walk(top), key=lambda e: -e[0].count("/")):
                with contextlib.suppress(OSError):  # not empty: something still runs there
                    os.rmdir(directory)


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workspace: Workspace | None = None
        self.daemons: list[Runtimed | Containerd] = []
        self._closed = False

    def close(self) -> None:
        """Idempotent; from finally, atexit and signal handlers alike."""
        if self._closed:
            return
        self._closed = True
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second ^C must not cut it short
            signal.signal(signum, signal.SIG_IGN)
        for daemon in self.daemons:
            try:
                rows.teardown_containers(daemon)
            except Exception as exc:  # clean-up goes on whatever one step does
                _log(f"warning: removing {daemon.name}'s containers: {exc}")
        if self.workspace is not None:
            for problem in self.workspace.close():
                _log(f"cleanup: {problem}")
        _remove_our_cgroups()

    def execute(self) -> int:
        args, started = self.args, time.monotonic()
        load_start = os.getloadavg()[0]
        quick, groups = args.quick, args.groups
        kind = "small" if quick else "large"
        reps = rows.Reps.for_mode(quick)
        small = images.ensure_image("small", CACHE, _log)
        image = images.ensure_image(kind, CACHE, _log) if {"import", "pull"} & set(groups) else small
        self.workspace = workspace = Workspace.create(args.tmpdir)
        _log(f"workspace {workspace.base}")
        registry = Registry(workspace)
        refs: dict[str, str] = {}
        if "pull" in groups:
            registry.start()
            refs[image.kind] = images.push_image(image, registry.host, f"bench/{image.kind}", "v1")
            _log(f"registry {registry.host}: pushed {refs[image.kind]}")
        runtimed, containerd = Runtimed(workspace), Containerd(workspace)
        self.daemons = [runtimed, containerd]
        for daemon in self.daemons:
            daemon.start()
            _log(f"{daemon.name} up, pid {daemon.pid}, socket {daemon.socket}")
        time.sleep(1.0)  # "at rest": start-up work (plugin init, first GC) is over
        bench = rows.Bench(workspace, runtimed, containerd, registry, image, small, refs, reps, _log)
        results: list[Row] = []
        if "rss" in groups:
            results.append(rows.rss_row(bench, "daemon RSS at rest (after start-up)"))
        plan: list[tuple[str, Callable[[rows.Bench], list[Row]]]] = [
            ("import", rows.row_import),
            ("pull", rows.row_pull),
            ("list", rows.row_list),
            ("run", rows.row_run),
            ("concurrent", rows.row_concurrent),
            ("shim", rows.row_shim),
        ]
        for group, function in plan:
            if group not in groups:
                continue
            _log(f"[{group}]")
            try:
                results.extend(function(bench))
            except Exception as exc:  # one broken row must not lose the others' figures
                bench.note(f"row {group} aborted: {type(exc).__name__}: {exc}")
            if "rss" in groups and group in ("import", "pull"):  # where a daemon's memory grows
                results.append(rows.rss_row(bench, f"daemon RSS after the {group} row"))
            for daemon in bench.daemons:
                if not daemon.alive():
                    bench.note(
                        f"{daemon.name} exited during the {group} row; its log ends:\n{daemon.log_tail(10)}"
                    )
        if "rss" in groups:
            results.append(rows.rss_row(bench, "daemon RSS after all rows"))
        results = _ordered(results)
        elapsed = time.monotonic() - started
        facts = report.machine_facts(workspace.base)
        facts["load average (1 min)"] = f"{load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end"
        if load_start > 0.7:
            bench.note(
                f"the machine was busy when the run started (load {load_start:.2f} on {os.cpu_count()} "
                "cores): timings are noisier than usual"
            )
        table = report.console_table(results)
        _log("\n" + table + "\n")
        for row in results:  # the table clips long reasons
            for daemon, reason in row.na.items():
                if len(reason) > 28:
                    _log(f"n/a: {row.title} [{daemon}]: {reason}")
        for note in bench.notes:
            _log(f"note: {note}")
        status = self._status(results, bench.notes)
        if args.no_write:
            return status
        RESULTS.mkdir(parents=True, exist_ok=True)
        png = RESULTS / "latest.png"
        why_not = report.plot(
            results, png, f"runtimed vs containerd — {report.command_line()} — {facts['date']}"
        )
        if why_not:
            _log(f"plot: {why_not}")
            png.unlink(missing_ok=True)  # a stale plot would contradict latest.md
        described = [
            f"{i.kind}: {i.name}, {report_image(i)}" for i in {small.kind: small, image.kind: image}.values()
        ]
        text = report.markdown(
            results,
            facts,
            bench.notes,
            report.command_line(),
            elapsed,
            described,
            None if why_not else png.name,
        )
        (RESULTS / "latest.md").write_text(text)
        (RESULTS / "latest.json").write_text(
            report.as_json(results, facts, bench.notes, report.command_line())
        )
        _log(
            f"wrote {RESULTS}/latest.{{md,json}}" + ("" if why_not else f" and {png}") + f" ({elapsed:.0f} s)"
        )
        return status

    @staticmethod
    def _status(results: list[Row], notes: list[str]) -> int:
        """1 when the harness itself broke (a row aborted, a daemon died, containerd could not do a
        row it can always do); runtimed's n/a cells and missed targets are results, not errors."""
        errors = [n for n in notes if (n.startswith("row ") and " aborted: " in n) or " exited during " in n]
        errors += [
            f"containerd n/a in {r.title!r}: {r.na['containerd']}"
            for r in results
            if "containerd" in r.na and not r.optional
        ]
        for error in errors:
            _log(f"harness error: {error}")
        return 1 if errors else 0


def report_image(image: images.BenchImage) -> str:
    return (
        f"{image.layers} layer(s), {image.compressed / 1e6:.1f} MB compressed, {image.unpacked / 1e6:.1f} MB "
        f"of file content, {image.files:,} regular files, manifest {image.manifest_digest[:19]}…"
    )


def _ordered(results: list[Row]) -> list[Row]:
    """Table order: timings by group, then memory (the rss group) last."""
    order = {
        g: i for i, g in enumerate(("import", "pull", "cpu", "list", "run", "concurrent", "shim", "rss"))
    }
    return sorted(results, key=lambda row: order.get(row.group, 99))


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if os.geteuid() != 0:
        print("bench/run: needs root (daemons, mounts, containers)", file=sys.stderr)
        return 2
    if not _private_mount_namespace():
        # Never put a tmpfs over the host's /run: only inside the namespace bench/run made.
        print("bench/run: run me through bench/run (it enters a private mount namespace)", file=sys.stderr)
        return 2
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "bench-run", "/run"], check=True)
    run = Run(args)
    atexit.register(run.close)

    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through the finally below

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
    try:
        return run.execute()
    except KeyboardInterrupt:
        _log("interrupted: cleaning up")
        return 130
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:  # set-up failed: say what, plainly
        _log(f"bench/run: {exc}")
        return 1
    finally:
        run.close()


if __name__ == "__main__":
    sys.exit(main())
