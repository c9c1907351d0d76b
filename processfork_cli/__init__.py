"""The ``pf`` command line."""
