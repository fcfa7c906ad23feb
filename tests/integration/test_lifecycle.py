"""Process lifecycle: `extproc up`, graceful shutdown, early stream close."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import BinaryIO

import grpc
import openai
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from tests.helpers import (
    PYTHON,
    ROOT,
    body_msg,
    free_port,
    free_port_block,
    headers_msg,
    port_open,
    post_headers,
    wait_until,
)
from tests.integration.stack import start_server


def test_up_serves_and_stops_every_child(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("port", "grpc", "admin", "envoy_admin")}
    mock_base = free_port_block(4)
    argv = [
        PYTHON,
        "-m",
        "extproc",
        "up",
        "--port",
        str(ports["port"]),
        "--grpc-port",
        str(ports["grpc"]),
        "--admin-port",
        str(ports["admin"]),
        "--envoy-admin-port",
        str(ports["envoy_admin"]),
        "--mock-base-port",
        str(mock_base),
    ]
    with (tmp_path / "up.log").open("w+b") as log:
        code = _run_up(argv, log, ports["port"], tmp_path)
    assert code == 0
    # every child is gone: nothing listens on any of the ports any more
    all_ports = [*ports.values(), mock_base, mock_base + 1, mock_base + 2]
    wait_until(lambda: not any(port_open(p) for p in all_ports), 10, "children to exit")


def _run_up(argv: list[str], log: BinaryIO, port: int, tmp_path: Path) -> int:
    env = {**os.environ, "EXTPROC_SPEND_JOURNAL": str(tmp_path / "spend.jsonl")}
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            log.seek(0)
            return f"ready at {url}".encode() in log.read()

        wait_until(lambda: ready() or proc.poll() is not None, 60, "extproc up")
        assert proc.poll() is None, (tmp_path / "up.log").read_text()
        seen = set()
        with openai.OpenAI(base_url=f"{url}/v1", api_key="anything") as client:
            for _ in range(20):
                raw = client.chat.completions.with_raw_response.create(
                    model="auto", messages=[{"role": "user", "content": "hi"}]
                )
                seen.add(raw.headers["x-mock-upstream"])
        assert seen
        assert seen <= {"mock_a", "mock_b"}
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    return code


async def test_sigterm_lets_in_flight_stream_finish(tmp_path: Path) -> None:
    with start_server(tmp_path, extra_env={"EXTPROC_SHUTDOWN_GRACE_S": "10"}) as (
        server,
        grpc_port,
        _,
    ):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.ExternalProcessorStub(channel)
            call = stub.Process()
            await call.write(headers_msg(post_headers()))
            first = await call.read()
            assert first.WhichOneof("response") == "request_headers"
            assert server.popen is not None
            server.popen.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)  # the server is now draining, this stream still open
            await call.write(body_msg(json.dumps({"model": "only-a"}).encode()))
            second: pb.ProcessingResponse = await call.read()
            await call.done_writing()
            assert second.request_body.response.clear_route_cache
        await asyncio.to_thread(server.popen.wait, 15)
        assert server.popen.returncode == 0
        log = server.log()
        assert "Traceback" not in log
        assert "stopped" in log


async def test_client_cancel_is_not_an_error(tmp_path: Path) -> None:
    with start_server(tmp_path) as (server, grpc_port, admin_port):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.ExternalProcessorStub(channel)
            for _ in range(20):
                call = stub.Process()
                await call.write(headers_msg(post_headers()))
                await call.read()
                call.cancel()
        import urllib.request  # noqa: PLC0415

        def counted() -> bool:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{admin_port}/metrics", timeout=2
            ) as resp:
                text = resp.read().decode()
            return "extproc_streams_cancelled_total 20.0" in text

        wait_until(counted, 10, "cancelled streams to be counted")
        log = server.log()
    assert "Traceback" not in log
    assert " ERROR " not in log
