"""Tests for cserver.journal.header: the memory the parent and its workers share.

Unit layer: memfd segments mapped twice in this process."""

import os

from twisted.trial.unittest import SynchronousTestCase

from cserver.journal.header import SLOT_FIELDS, Shared


class SegmentTests(SynchronousTestCase):
    """A segment made by Shared.create(3): its header, its slots, a second mapping of it."""

    def setUp(self):
        self.shared = Shared.create(3)
        self.addCleanup(os.close, self.shared.fd)
        self.addCleanup(self.shared.close)

    def test_a_worker_sees_what_the_parent_wrote(self):
        """A second mapping of the same memfd sees the header and slots written through the
        first."""
        shared = self.shared
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

    def test_totals_sum_every_slot(self):
        """totals() sums each counter over the workers and leaves out the pids."""
        shared = self.shared
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

    def test_slots_do_not_overlap(self):
        """Each worker's slot and the header are separate memory."""
        shared = self.shared
        for index in range(3):
            for name in SLOT_FIELDS:
                setattr(shared.slot(index), name, index * 100 + SLOT_FIELDS.index(name))
        shared.header.end = -1
        for index in range(3):
            assert [getattr(shared.slot(index), n) for n in SLOT_FIELDS] == [
                index * 100 + i for i in range(len(SLOT_FIELDS))
            ]

    def test_bad_names_and_indexes_are_refused(self):
        """Unknown fields and slots out of range raise instead of touching memory."""
        shared = self.shared
        with self.assertRaises(AttributeError):
            shared.header.nonsense = 1
        with self.assertRaises(AttributeError):
            shared.slot(0).nonsense  # noqa: B018
        with self.assertRaises(IndexError):
            shared.slot(3)


class ForeignMemoryTests(SynchronousTestCase):
    """Memory that Shared.create did not make."""

    def test_attach_refuses_foreign_memory(self):
        """Attaching to memory that was not made by Shared.create is refused."""
        fd = os.memfd_create("not-cserver", 0)
        os.ftruncate(fd, 4096)
        try:
            with self.assertRaises(ValueError) as caught:
                Shared.attach(fd, 1)
            self.assertRegex(str(caught.exception), "not a cserver shared memory")
        finally:
            os.close(fd)
