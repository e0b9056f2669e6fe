"""The cred plugin for ``--auth hashfile:PATH``: scrypt-hashed passwords
(:mod:`cserver.hashfile`), written by ``cserver-passwd``."""

import sys

from twisted.cred.credentials import IUsernamePassword
from twisted.cred.strcred import ICheckerFactory
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(ICheckerFactory, IPlugin)
class HashFileCheckerFactory:
    """
    Make :class:`cserver.hashfile.HashFileChecker` instances.
    """

    authType = "hashfile"
    authHelp = (
        "A file of 'user:hash' lines with scrypt hashes, as cserver-passwd "
        "writes it. The file is re-read when it changes; hashes are checked "
        "in a thread, off the reactor."
    )
    argStringFormat = "The path of a hash file (cserver-passwd PATH USER makes one)."
    credentialInterfaces = (IUsernamePassword,)
    errorOutput = sys.stderr

    def generateChecker(self, argstring):
        import os

        from cserver.hashfile import HashFileChecker

        if not argstring.strip():
            raise ValueError(f"{self.authType!r} requires a filename")
        if not os.path.isfile(argstring):
            self.errorOutput.write(f"Warning: not a valid file: {argstring}\n")
        return HashFileChecker(argstring)


hashfile_checker_factory = HashFileCheckerFactory()
