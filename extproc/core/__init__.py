"""The pure core: request parsing, access rules, budgets, limits, selection and charges.

Rule: nothing here does I/O, reads a clock, draws randomness or imports the runtime
(``extproc.state``), the adapters, the CLI, the Envoy config, grpc, redis or aiohttp; the
state side passes the time, the ids and what the store holds in as arguments
(``tests/unit/test_layout.py`` checks the imports).
"""
