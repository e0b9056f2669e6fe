"""The unit layer: trial TestCases that use no socket and start no process
(StringTransport, iosim, task.Clock, MemoryReactorClock, files in temporary
directories).  ``python -m twisted.trial tests.unit`` runs them, and so does
pytest (``python -m pytest tests/unit``)."""
