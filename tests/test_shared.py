"""Tests for cserver.shared: the memory the parent and its workers share."""

import os

import pytest

from cserver.shared import SLOT_FIELDS, Shared


@pytest.fixture
def shared():
    segment = Shared.create(3)
    yield segment
    segment.close()
    os.close(segment.fd)


def test_a_worker_sees_what_the_parent_wrote(shared):
    """A second mapping of the same memfd sees the header and slots written through the first."""
    shared.header.last_seq = 41
    shared.slot(2).connections = 7
    other = Shared.attach(shared.fd, 3)
    try:
        assert other.header.last_seq == 41
        assert other.slot(2).connections == 7
        other.slot(0).add("served", 5)
        assert shared.slot(0).served == 5
    finally:
        other.close()


def test_totals_sum_every_slot(shared):
    """totals() sums each counter over the workers and leaves out the pids."""
    for index in range(3):
        slot = shared.slot(index)
        slot.pid = 1000 + index
        slot.connections = index + 1
        slot.add("served", 10)
    totals = shared.totals()
    assert totals["connections"] == 6
    assert totals["served"] == 30
    assert "pid" not in totals
    assert set(totals) == set(SLOT_FIELDS) - {"pid"}


def test_slots_do_not_overlap(shared):
    """Each worker's slot and the header are separate memory."""
    for index in range(3):
        for name in SLOT_FIELDS:
            setattr(shared.slot(index), name, index * 100 + SLOT_FIELDS.index(name))
    shared.header.end = -1
    for index in range(3):
        assert [getattr(shared.slot(index), n) for n in SLOT_FIELDS] == [
            index * 100 + i for i in range(len(SLOT_FIELDS))
        ]


def test_bad_names_and_indexes_are_refused(shared):
    """Unknown fields and slots out of range raise instead of touching memory."""
    with pytest.raises(AttributeError):
        shared.header.nonsense = 1
    with pytest.raises(AttributeError):
        shared.slot(0).nonsense  # noqa: B018
    with pytest.raises(IndexError):
        shared.slot(3)


def test_attach_refuses_foreign_memory():
    """Attaching to memory that was not made by Shared.create is refused."""
    fd = os.memfd_create("not-cserver", 0)
    os.ftruncate(fd, 4096)
    try:
        with pytest.raises(ValueError, match="not a cserver shared memory"):
            Shared.attach(fd, 1)
    finally:
        os.close(fd)
