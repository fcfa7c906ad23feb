"""Fixtures shared by unit and integration tests: a private Redis.

With a Docker engine, Redis runs in a throwaway container (testcontainers); without
one (CI here), a local ``redis-server`` is started on a free port. Either way the
tests never touch a Redis they did not start.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.helpers import port_open, redis_proc, running


def _docker_engine() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        result = subprocess.run(
            [docker, "info"],
            capture_output=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis of our own: a container when Docker runs, else a local redis-server."""
    if _docker_engine():
        from testcontainers.community.redis import RedisContainer  # noqa: PLC0415

        with RedisContainer("redis:7-alpine") as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(6379)
            yield f"redis://{host}:{port}/0"
        return
    local = redis_proc(tmp_path_factory.mktemp("redis"))
    if local is None:
        pytest.skip("neither a Docker engine nor redis-server is available")
    proc, port = local
    with running(proc, lambda: port_open(port)):
        yield f"redis://127.0.0.1:{port}/0"
