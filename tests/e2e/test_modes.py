"""Private files: everything the server creates -- the journal, the files a
reopen starts, torn-tail side files, the lock -- is mode 0600 whatever the
umask (they hold every message and peer address).

End-to-end layer: a real ``twistd cserver`` started under umask 022."""

import os
import signal
import stat

from ..server_process import ServerProcess


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_real_server_under_umask_022_writes_private_files(tmp_path):
    """``twistd cserver`` started under umask 022 creates its journal, its lock file and,
    after a SIGHUP rotation, the new journal file, all 0600."""

    process = ServerProcess(tmp_path, "--users", "alice", umask=0o022).start()
    try:
        assert mode(process.journal) == 0o600
        assert mode(process.journal + ".lock") == 0o600
        os.rename(process.journal, process.journal + ".1")
        process.process.send_signal(signal.SIGHUP)
        assert process.wait_for("reopened at seq") is not None
        assert mode(process.journal) == 0o600
    finally:
        assert process.stop() == 0
