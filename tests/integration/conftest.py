from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.stack import Stack, start_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with start_stack(tmp_path_factory.mktemp("stack")) as s:
        yield s
        log = s.server_log()
    # Rule: no request, however bad, makes the server log an error or a traceback.
    assert "Traceback" not in log, log
    assert " ERROR " not in log, log


@pytest.fixture(scope="module")
def authz_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with start_stack(tmp_path_factory.mktemp("authz"), mode="ext_authz") as s:
        yield s
        log = s.server_log()
    assert "Traceback" not in log, log
    assert " ERROR " not in log, log
