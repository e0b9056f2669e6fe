"""Every test of the end-to-end layer is marked ``e2e``: ``pytest -m e2e``
runs this layer alone, ``pytest -m 'not e2e'`` the rest.  ``shim``: the
LD_PRELOAD fsync shim (tests/e2e/fsync_fault.c) built once a session."""

import os
import pathlib
import shutil
import subprocess

import pytest

_HERE = pathlib.Path(__file__).parent
SHIM_SOURCE = os.path.join(os.path.dirname(__file__), "fsync_fault.c")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _HERE in pathlib.Path(item.fspath).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def shim(tmp_path_factory):
    """
    tests/e2e/fsync_fault.c built as a shared library; the test is skipped
    without a C compiler.
    """
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler (cc or gcc) to build the LD_PRELOAD fsync shim")
    library = str(tmp_path_factory.mktemp("fsync_fault") / "fsync_fault.so")
    result = subprocess.run(
        [compiler, "-shared", "-fPIC", "-Wall", "-o", library, SHIM_SOURCE, "-ldl"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, f"cannot build the fsync shim:\n{result.stderr}"
    return library
