"""Progress of a pull or push as the Transfer service streams it, drawn for people.

On a terminal: one line per blob, redrawn in place as docker does
("sha256:0123456789ab: Downloading [=====>     ] 12.3MB/45.6MB"). Otherwise: one line per step
(a blob's repeated byte counts are not repeated). Quiet: nothing; the command prints its result.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO

from runtimed.cli.common import CLIError
from runtimed.cli.output import human_size

BAR_WIDTH = 50
# Per event: the words shown for a blob (pull and push differ only in these).
PULL_WORDS = {
    "fetching": "Downloading",
    "fetched": "Download complete",
    "exists": "Already exists",
    "unpacking": "Extracting",
    "unpacked": "Pull complete",
}
PUSH_WORDS = {
    "pushing": "Pushing",
    "pushed": "Pushed",
    "exists": "Layer already exists",
}
# Events that carry a byte count worth a bar.
MOVING = {"fetching", "pushing"}


def short(digest: str) -> str:
    """ "sha256:" and the first 12 hex digits, docker's short form of a digest."""
    algorithm, _, hexdigits = digest.partition(":")
    return f"{algorithm}:{hexdigits[:12]}" if hexdigits else digest


def bar(offset: int, total: int) -> str:
    if total <= 0:
        return human_size(offset)
    done = min(BAR_WIDTH, BAR_WIDTH * offset // total)
    arrow = "=" * max(done - 1, 0) + (">" if done else "")
    return f"[{arrow.ljust(BAR_WIDTH)}] {human_size(offset)}/{human_size(total)}"


class ProgressView:
    """Feed it the Progress messages of one stream (update), then call finish()."""

    def __init__(
        self,
        words: dict[str, str],
        *,
        out: TextIO | None = None,
        tty: bool | None = None,
        quiet: bool = False,
    ) -> None:
        self.words = words
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self.quiet = quiet
        self._order: list[str] = []  # blob digests, in the order their lines appeared
        self._last: dict[str, str] = {}  # digest -> last event shown (plain output)

    def update(self, progress: Any) -> None:
        if self.quiet:
            return
        event = progress.event
        if event == "resolving":
            self._line(f"Resolving {progress.name}")
        elif event == "resolved":
            self._line(f"{progress.name}: resolved to {progress.message}")
        elif event in self.words and progress.name:
            self._blob(progress)
        self.out.flush()

    def _line(self, text: str) -> None:
        self.out.write(text + "\n")

    def _blob(self, progress: Any) -> None:
        key, event = progress.name, progress.event
        text = self.words[event]
        if event == "unpacked" and progress.message:
            text = progress.message[:1].upper() + progress.message[1:]  # "Already unpacked"
        elif event == "exists" and progress.message == "mounted":
            text = "Mounted from another repository"
        if self.tty:
            if event in MOVING:
                text = f"{text} {bar(progress.offset, progress.total)}"
            self._draw(key, f"{short(key)}: {text}")
        elif self._last.get(key) != event:  # one line per step, not per byte count
            self._last[key] = event
            size = f" ({human_size(progress.total)})" if event in MOVING and progress.total else ""
            self._line(f"{short(key)}: {text}{size}")

    def _draw(self, key: str, text: str) -> None:
        if key not in self._order:
            self._order.append(key)
            self._line(text)
            return
        up = len(self._order) - self._order.index(key)
        # Up to the blob's line, clear it, write, back down: the other lines stay as they are.
        self.out.write(f"\x1b[{up}A\r\x1b[2K{text}\x1b[{up}B\r")

    def finish(self) -> None:
        self.out.flush()

    def follow(self, stream: Iterable[Any], what: str) -> Any:
        """Show a Transfer progress stream; return its final "done" message."""
        done = None
        for progress in stream:
            self.update(progress)
            if progress.event == "done":
                done = progress
        self.finish()
        if done is None:
            raise CLIError(f"{what} ended without a result")
        return done
