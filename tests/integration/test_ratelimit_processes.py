"""rpm shared exactly by two server processes (each behind its own Envoy) on one Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from pathlib import Path

from tests.integration.stack import POLICIES, post, start_stack

BODY = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}]}).encode()


async def test_rpm_exact_across_processes(tmp_path: Path, redis_url: str) -> None:
    env = {"EXTPROC_STORE_URL": redis_url}
    policy = POLICIES / "budgets.yaml"
    with contextlib.ExitStack() as stacks:
        urls = []
        for name in ("one", "two"):
            (tmp_path / name).mkdir()
            stack = start_stack(tmp_path / name, policy=policy, server_env=env)
            urls.append(stacks.enter_context(stack).url)
        headers = {"authorization": "Bearer sk-uma-rpm"}

        async def one(i: int) -> tuple[int, str | None]:
            status, resp_headers, _ = await asyncio.to_thread(
                post, f"{urls[i % 2]}/v1/chat/completions", BODY, headers
            )
            return status, resp_headers.get("retry-after")

        results = await asyncio.gather(*(one(i) for i in range(40)))
    counts = Counter(status for status, _ in results)
    assert counts == {200: 10, 429: 30}
    assert all(ra is not None and 1 <= int(ra) <= 60 for s, ra in results if s == 429)
