"""The twistd plugin: ``twistd cserver`` runs :func:`cserver.tap.makeService`."""
from twisted.application.service import ServiceMaker

cserver = ServiceMaker(
    "cserver", "cserver.tap", "Authenticated append-only message server", "cserver"
)
