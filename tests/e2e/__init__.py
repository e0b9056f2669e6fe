"""The end-to-end layer: real ``twistd cserver`` processes, real loopback
sockets, real signals.  pytest runs it (its fixtures are in the conftest
files); every test here is marked ``e2e``."""
