"""Packaging tests: the wheel carries the twistd plugin, and an editable
install in a fresh virtualenv runs ``twistd -n cserver``.

End-to-end layer: pip, a new virtualenv, a real twistd."""

import subprocess
import sys
import zipfile
from pathlib import Path

from ..server_process import ServerProcess

ROOT = Path(__file__).resolve().parent.parent.parent


def test_wheel_carries_the_plugin(tmp_path):
    """The wheel holds twisted/plugins/cserver_plugin.py and no twisted/plugins/__init__.py,
    every subpackage of cserver (listed by hand in setup.cfg),
    and installs the README, the licence and the units under share/doc/cserver (where the
    systemd units' Documentation= points)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path), str(ROOT)],
        check=True,
        cwd=tmp_path,
    )
    [wheel] = tmp_path.glob("cserver-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/cserver_plugin.py" in names
    assert "twisted/plugins/__init__.py" not in names
    assert "twisted/__init__.py" not in names
    assert "cserver/tap.py" in names
    # Every subpackage: setup.cfg lists them by hand.
    for module in ("cserver/journal/record.py", "cserver/client/protocol.py",
                   "cserver/workers/worker.py"):
        assert module in names, module
    doc = "cserver-{}.data/data/share/doc/cserver/".format(wheel.name.split("-")[1])
    for name in ("README.rst", "LICENSE", "protocol.rst", "cserver.service"):
        assert doc + name in names, name


def test_editable_install_runs_twistd_cserver(tmp_path):
    """After `pip install -e .` in a fresh virtualenv, `twistd -n cserver` starts and greets."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
           "--disable-pip-version-check"]
    subprocess.run(pip + ["-e", str(ROOT)], check=True, cwd=tmp_path)
    twistd = venv / "bin" / "twistd"
    process = ServerProcess(tmp_path, "--users", "alice", twistd=[str(twistd)])
    process.start(timeout=60)
    try:
        client = process.connect()
        assert client.greeting.startswith("HELLO cserver ")
        assert client.request("AUTH alice") == "OK alice"
        client.close()
    finally:
        assert process.stop() == 0
    pth = "".join(path.read_text() for path in venv.glob("lib/python*/site-packages/*.pth"))
    assert str(ROOT) in pth, "the editable install should be a plain path entry"
