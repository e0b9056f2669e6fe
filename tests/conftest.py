"""Fixtures shared by the test modules: a task.Clock, a journal path, file
journals on that clock, real ``twistd -n cserver`` servers, and the
interpreter settings put back after makeService tuned them."""

import contextlib
import gc
import os
import subprocess
import sys

import pytest
from twisted.internet.task import Clock

from cserver.journal import FileJournal

from .server_process import ServerProcess, kill_quietly, worker_pids


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "journal.jsonl")


@pytest.fixture
def open_journal(path, clock):
    """
    Open FileJournals (at ``path`` by default) and close them after the test.
    """
    opened = []

    def open_(fsync="always", at=None, **kwargs):
        journal = FileJournal.open(at or path, clock, fsync=fsync, **kwargs)
        opened.append(journal)
        return journal

    yield open_
    for journal in opened:
        journal.close()


@pytest.fixture
def server(tmp_path):
    """
    Start real servers (users alice and bob) in ``tmp_path``: ``server(*options,
    journal=None)``; every one still running is killed after the test, with its
    workers.
    """
    servers = []

    def start(*args, journal=None):
        process = ServerProcess(tmp_path, "--users", "alice,bob", *args, journal=journal)
        servers.append(process)
        return process.start()

    yield start
    for process in servers:
        pids = worker_pids(process)
        if process.process.poll() is None and os.environ.get("COVERAGE_PROCESS_START"):
            # Under coverage a clean exit saves the server's coverage data.
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.stop(timeout=5)
        if process.process.poll() is None:
            process.kill()
        for pid in pids.values():
            kill_quietly(pid)


@pytest.fixture
def restore_interpreter():
    """
    makeService tunes the interpreter for serving (gc.freeze, thresholds, the
    switch interval): put the test process back afterwards.
    """
    threshold, interval = gc.get_threshold(), sys.getswitchinterval()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)
    sys.setswitchinterval(interval)
