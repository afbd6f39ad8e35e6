"""Backends behind runtimed's core interfaces (snapshotters, later runtimes), each a plugin."""
