"""The runtime: what reads the store, commits the core's plans and settles.

Rule: this is the side that holds the clock, the process's ids, the policy snapshot, the
store and the metrics, and passes them into the pure core (``extproc.core``).
"""
