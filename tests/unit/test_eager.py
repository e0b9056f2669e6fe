"""Unit tests for cserver.eager's EagerServer without a socket: what write()
refuses.  The writes over real loopback TCP are tested in the end-to-end
layer, tests/e2e/test_eager.py."""

from twisted.trial.unittest import SynchronousTestCase

from cserver.eager import EagerServer


class EagerWriteTests(SynchronousTestCase):
    """What EagerServer.write() takes, checked without a connection."""

    def test_text_is_refused_as_by_twisted(self):
        """A str is refused with Twisted's TypeError, not sent."""
        transport = EagerServer.__new__(EagerServer)
        transport.connected = 1
        transport._tempDataBuffer, transport._tempDataLen = [], 0
        with self.assertRaises(TypeError):
            transport.write("OK 1\r\n")
