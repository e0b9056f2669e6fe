"""``python -m cserver.client``: the ``cserver-client`` command
(:func:`cserver.client.cli.main`)."""

from cserver.client.cli import main

if __name__ == "__main__":
    main()
