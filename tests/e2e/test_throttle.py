"""End to end, what an unauthenticated client can make the server write: a
real ``twistd -n cserver`` on loopback throttles an address, says so in its
log and journals one auth_throttled record.  The AUTH throttle, clipped user
names, the records and the rate-limited log are tested in the unit layer,
tests/unit/test_throttle.py."""


def test_a_real_server_throttles_says_how_long_and_logs_it(tmp_path):
    """End to end: five failed AUTHs from 127.0.0.1 throttle it; the next AUTH, even the
    right user's, is told how long to wait; the twistd log says the address is throttled;
    the stop journals one auth_throttled record, and no refused AUTH was journaled on its
    own."""
    from ..server_process import ServerProcess, read_journal

    process = ServerProcess(tmp_path, "--users", "alice").start()
    try:
        for _ in range(5):
            client = process.connect()
            assert client.request("AUTH mallory").startswith("ERR auth wrong")
            client.close()
        client = process.connect()
        reply = client.request("AUTH alice")
        assert reply.startswith("ERR auth throttled: too many failed AUTHs from your address; "
                                "retry in ")
        assert 50 <= int(reply.split()[-2]) <= 60
        client.close()
        assert process.wait_for("AUTH from 127.0.0.1 throttled for 60 s after 5 failed "
                                "AUTHs") is not None
    finally:
        assert process.stop() == 0
    events = [r["event"] for r in read_journal(process.journal)]
    assert events == ["start"] + ["auth_failed"] * 5 + ["auth_throttled", "stop"]
