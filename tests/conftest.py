"""Fixtures shared by unit and integration tests: a private Redis.

With a Docker engine, Redis runs in a throwaway container (testcontainers); without
one (CI here), a local ``redis-server`` is started on a free port. Either way the
tests never touch a Redis they did not start.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.helpers import cluster_port, port_open, redis_proc, running, wait_until


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


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A 3-node Redis Cluster (three primaries) of local redis-server processes."""
    cli = shutil.which("redis-cli")
    if cli is None:
        pytest.skip("redis-cli is needed to create a Redis Cluster")
    workdir = tmp_path_factory.mktemp("redis-cluster")
    nodes = []
    for _ in range(3):
        port = cluster_port()
        node = redis_proc(
            workdir,
            port,
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            f"nodes-{port}.conf",
            "--cluster-node-timeout",
            "2000",
        )
        if node is None:
            pytest.skip("redis-server is needed for a Redis Cluster")
        nodes.append(node)
    with contextlib.ExitStack() as stack:
        for proc, port in nodes:
            stack.enter_context(running(proc, functools.partial(port_open, port)))
        addresses = [f"127.0.0.1:{port}" for _, port in nodes]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )

        def ready() -> bool:
            for _, port in nodes:
                info = subprocess.run(
                    [cli, "-p", str(port), "cluster", "info"],
                    capture_output=True,
                    text=True,
                    check=False,
                    timeout=5,
                ).stdout
                if "cluster_state:ok" not in info:
                    return False
            return True

        wait_until(ready, 30, "the Redis Cluster to be ready")
        yield f"redis+cluster://{addresses[0]}"


@pytest.fixture(autouse=True, scope="session")
def _journal_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Processes the tests start keep their spend journal out of the home directory."""
    path = tmp_path_factory.mktemp("journal") / "spend.jsonl"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EXTPROC_SPEND_JOURNAL", str(path))
        yield
