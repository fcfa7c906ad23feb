"""Memory of the embedded store under many short sessions: RSS before, after, swept.

    python bench/memory_store_rss.py [--sessions 100000] [--ttl 1] [--waves 3] [--no-sweep]

Each wave counts one call of each of ``--sessions`` distinct session ids (the
session-cap counter, ``EXTPROC_MAX_ITERATIONS_TTL`` = ``--ttl`` seconds), then waits
without reading any of them until the background sweep has evicted them all, printing
the process's RSS and the store's entry count at each step, and how long the sweep's
callbacks held the event loop (the longest one: what a request waiting on the loop
could feel; and all of them together).
``--no-sweep`` shows the store without its sweeper (what was there before): entries
and RSS only grow.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from extproc.core.sessions import counter_key  # noqa: E402
from extproc.store import MemoryStore  # noqa: E402


def rss_mib() -> float:
    """Resident set size of this process (Linux /proc)."""
    with Path("/proc/self/statm").open() as statm:
        pages = int(statm.read().split()[1])
    import os  # noqa: PLC0415

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


async def main(args: argparse.Namespace) -> int:
    store = MemoryStore(sweep_interval_s=1e9 if args.no_sweep else 1.0)
    callbacks: list[float] = []
    sweep = store._sweep  # timing the sweeper's own callbacks

    def timed_sweep() -> None:
        began = time.perf_counter()
        sweep()
        callbacks.append(time.perf_counter() - began)

    store._sweep = timed_sweep  # type: ignore[method-assign]
    print(
        f"{'step':<28} {'RSS MiB':>9} {'entries':>9} {'seconds':>8} "
        f"{'longest sweep ms':>17} {'all sweeps ms':>14}"
    )

    def row(step: str, seconds: float | None = None) -> None:
        took = "" if seconds is None else f"{seconds:8.2f}"
        held = ""
        if seconds is not None and callbacks:
            held = f"{max(callbacks) * 1000:17.2f} {sum(callbacks) * 1000:14.1f}"
        line = f"{step:<28} {rss_mib():9.1f} {store.entry_count():9d} {took:>8} {held}"
        print(line, flush=True)
        callbacks.clear()

    row("start")
    for wave in range(1, args.waves + 1):
        started = time.monotonic()
        for n in range(args.sessions):
            await store.incr_window(counter_key(("key", "bench"), f"w{wave}-s{n}"), 1, args.ttl)
        row(f"wave {wave}: {args.sessions} sessions", time.monotonic() - started)
        started = time.monotonic()
        deadline = started + args.ttl + 10
        # Rule: nothing here reads a session key; only the sweeper can empty the store.
        while store.entry_count() and time.monotonic() < deadline:  # noqa: ASYNC110 - a poll
            await asyncio.sleep(0.05)
        row(f"wave {wave}: after the sweep", time.monotonic() - started)
    await store.close()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--ttl", type=float, default=1.0)
    parser.add_argument("--waves", type=int, default=3)
    parser.add_argument("--no-sweep", action="store_true", help="the store without its sweeper")
    sys.exit(asyncio.run(main(parser.parse_args())))
