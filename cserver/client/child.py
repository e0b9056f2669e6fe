"""The entry point of a ``bench --processes`` child: ``python -m cserver.client.child``.

One job: run :func:`cserver.client.processes.child_main` as a program.  Nothing
imports this module, so that running it with ``-m`` does not load it twice.
"""

import sys

from cserver.client.processes import child_main

if __name__ == "__main__":
    sys.exit(child_main())
