"""Test-wide settings. Under CI (the CI environment variable) hypothesis is derandomized,
so a CI run tries the same examples every time; locally each run explores new ones.

The Ctrl-C tests need SIGINT to do what it does in a terminal: a shell that starts the
tests in the background (`... &` without job control) makes them ignore it, and that
disposition passes to every process they start. Python's own handler is put back, so
this process raises KeyboardInterrupt and its children get the default again."""

import os
import signal

import pytest
from hypothesis import settings

from wse_sim import threads

signal.signal(signal.SIGINT, signal.default_int_handler)

settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def all_workers(monkeypatch):
    """Every stripe its own thread in every chunk, however little work a cycle holds."""
    monkeypatch.setattr(threads, "workers_for", lambda wk, visits: len(wk.stripe))
    monkeypatch.setattr(threads.ChunkPlan, "timed", False)
