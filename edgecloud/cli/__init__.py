"""The ``edgecloud`` command line (see ``edgecloud.cli.main``)."""
