"""End-to-end tests for cserver.client.processes: run_processes with real
child processes (a small Python script standing in for the bench children)
-- the barrier across processes, children that exit early, the parent's
failure.  The bench itself, its phases, errors, open loop and report, are
tested in the unit layer, tests/unit/test_bench.py."""

import errno
import subprocess
import sys

import pytest

from cserver.client.bench import BenchConfig
from cserver.client.processes import CHILD_COMMAND, run_processes

FAKE_CHILD = r"""
import json, os, select, sys, time
mode = sys.argv[1]
data = b""
while b"\n" not in data:
    data += os.read(0, 65536)
config = json.loads(data.partition(b"\n")[0])
if mode == "die":
    sys.exit(3)
os.write(1, b"ready\n")
if mode == "hang":
    time.sleep(60)
readable, _, _ = select.select([0], [], [], 5)
word = os.read(0, 100).decode().strip() if readable else "nothing"
if mode == "quiet":
    time.sleep(1.0)
n = config["connections"]
os.write(1, json.dumps({"requested": n, "opened": n, "authenticated": n,
                        "notes": [word]}).encode() + b"\n")
"""


def fake_children(*modes, spawned=None):
    """A spawn function for run_processes: child i runs FAKE_CHILD in ``modes[i]``."""
    modes = iter(modes)

    def spawn():
        mode = next(modes)
        if mode == "fail":
            raise OSError(errno.EAGAIN, "fork failed")
        child = subprocess.Popen([sys.executable, "-c", FAKE_CHILD, mode],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        if spawned is not None:
            spawned.append(child)
        return child

    return spawn


def test_parent_waits_for_children_that_are_silent_after_go():
    """Once ``go`` is sent the parent does not time children out (they have their own
    watchdog): children silent longer than --timeout plus the slack are not killed."""
    config = BenchConfig(endpoint="e", user="u", connections=2, timeout=0.2)
    results = run_processes(config, 2, spawn=fake_children("quiet", "quiet"), slack=0.2)
    assert [r.notes for r in results] == [["go"], ["go"]]
    assert all(r.errors == {} for r in results)


def test_child_exiting_before_ready_releases_the_others():
    """A child that exits without a report before the barrier makes the parent tell
    the children waiting there to abort, at once."""
    config = BenchConfig(endpoint="e", user="u", connections=2)
    results = run_processes(config, 2, spawn=fake_children("die", "wait"))
    assert results[0].errors == {"process": 1}
    assert results[1].notes == ["abort"]


def test_children_are_killed_when_the_parent_fails():
    """An exception in the parent (here: the second child cannot be started) kills and
    reaps the children already running instead of leaving them behind."""
    spawned = []
    config = BenchConfig(endpoint="e", user="u", connections=2)
    with pytest.raises(OSError):
        run_processes(config, 2, spawn=fake_children("hang", "fail", spawned=spawned))
    assert len(spawned) == 1 and spawned[0].returncode is not None


def test_child_without_a_config_exits_2():
    """The real child entry point (``python -m cserver.client.child``) whose stdin ends
    before a config line exits 2 and writes nothing."""
    done = subprocess.run(CHILD_COMMAND, input=b"", capture_output=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (2, b"", b"")
