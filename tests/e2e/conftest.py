"""Every test of the end-to-end layer is marked ``e2e``: ``pytest -m e2e``
runs this layer alone, ``pytest -m 'not e2e'`` the rest."""

import pathlib

import pytest

_HERE = pathlib.Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _HERE in pathlib.Path(item.fspath).parents:
            item.add_marker(pytest.mark.e2e)
