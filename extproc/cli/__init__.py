"""The ``extproc`` command line (``main``) and ``extproc up`` (``up``)."""
