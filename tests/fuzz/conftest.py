"""Fuzz fixtures: one seeded daemon per test module (`fuzz`, a harness.Fuzz)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator

import pytest
from harness import Daemon, Fuzz, make_base


@pytest.fixture(scope="module")
def fuzz() -> Iterator[Fuzz]:
    daemon = Daemon(base=make_base())
    daemon.start()
    harness = Fuzz(daemon)
    try:
        harness.seed()
        yield harness
    finally:
        harness.close()
        with contextlib.suppress(Exception):
            daemon.stop(timeout=15)
        daemon.kill()
        shutil.rmtree(daemon.base, ignore_errors=True)
