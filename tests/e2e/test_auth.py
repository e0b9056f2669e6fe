"""End-to-end tests for cserver.auth: a real ``twistd -n cserver`` on loopback
with several --auth checkers.  The checkers through a Portal are tested in the
unit layer, tests/unit/test_auth.py."""


def test_twistd_with_two_auth_options_accepts_both_and_logs_how(tmp_path):
    """A real twistd with --auth given twice lets the users of both in; its log says at
    start how AUTH is checked (never a password) and shows each failed AUTH."""
    from ..server_process import ServerProcess

    process = ServerProcess(tmp_path, "--auth", "memory:alice:s3cret",
                            "--auth", "memory:bob:hunter2").start()
    try:
        client = process.connect()
        assert client.request("AUTH bob hunter2") == "OK bob"
        client.close()
        client = process.connect()
        assert client.request("AUTH alice s3cret") == "OK alice"
        assert client.request("AUTH carol guess") == "ERR state already authenticated"
        client.close()
        client = process.connect()
        assert client.request("AUTH carol guess") == "ERR auth wrong user or password"
        assert process.wait_for("AUTH failed for user 'carol' from 127.0.0.1:") is not None
        client.close()
    finally:
        assert process.stop() == 0
    log = "".join(process.output)
    assert ("AUTH <user> <password>, accepted when any of these accepts: memory (users "
            "alice); memory (users bob)") in log
    assert "s3cret" not in log and "hunter2" not in log
