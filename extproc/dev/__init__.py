"""Development helpers: the mock upstream the tests, the bench and ``extproc mock`` use."""
