"""A secured, shared Chroma: the daemon against Chroma's own server with token
authentication (and HTTPS with a private CA), in a database of its own.

`chroma run` 1.5 has no authentication (Chroma's docs put 1.x servers behind a proxy),
so the server here is the chromadb package's Python app with Chroma's
TokenAuthenticationServerProvider: the same HTTP API with the token check Chroma ships.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import chromadb
import pytest
from conftest import TECHLEAD, DaemonProcess, Kafka, memory_collections, wait_for

from ings_daemon.dev.chroma_server import ChromaServer

pytestmark = pytest.mark.integration
TOKEN = "chroma-s3cret-7f2a9c"


@pytest.fixture
def tls(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key."""
    cert, key = tmp_path / "chroma.pem", tmp_path / "chroma.key"
    request = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1"]
    subprocess.run(
        ["openssl", *request, "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
def secured(tmp_path: Path, tls: tuple[Path, Path]) -> Iterator[ChromaServer]:
    server = ChromaServer(tmp_path / "secured", tmp_path / "secured.log", token=TOKEN, tls=tls).start()
    yield server
    server.stop()


def chroma_env(daemon_env: dict[str, str], server: ChromaServer, cert: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in daemon_env.items() if k != "CHROMADB_PATH"}
    where = {"CHROMADB_HOST": "127.0.0.1", "CHROMADB_PORT": str(server.port), "CHROMADB_SSL": "true"}
    return {**env, **where, "CHROMADB_SSL_CA_FILE": str(cert), "INGS_BASE_MODEL": "", **extra}


async def test_the_daemon_uses_a_token_server_over_https_in_a_database_of_its_own(
    kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any, secured: ChromaServer, tls: tuple[Path, Path]
) -> None:
    env = chroma_env(daemon_env, secured, tls[0], CHROMADB_AUTH_TOKEN=TOKEN, CHROMADB_DATABASE="ings_team_a")
    daemon = await start_daemon(env)
    t = kafka.topics
    await kafka.produce(
        t.interaction,
        [{"event_id": f"s-{i}", "persona_id": TECHLEAD, "input": f"q{i}", "output": f"a{i}"} for i in range(3)],
    )
    await wait_for(lambda: daemon.added(3), 120, "3 memories in the secured Chroma")
    await kafka.produce(t.recall_request, [{"persona_id": TECHLEAD, "query": "q1", "request_id": "r1", "k": 5}])
    assert len((await kafka.read(t.recall_result, min_count=1))[0]["results"]) == 3
    assert daemon.stop() == 0
    assert TOKEN not in daemon.log()

    auth = chromadb.Settings(
        anonymized_telemetry=False,
        chroma_client_auth_provider="chromadb.auth.token_authn.TokenAuthClientProvider",
        chroma_client_auth_credentials=TOKEN,
        chroma_server_ssl_verify=str(tls[0]),
    )
    mine = chromadb.HttpClient(host="127.0.0.1", port=secured.port, ssl=True, settings=auth, database="ings_team_a")
    assert sum(c.count() for c in memory_collections(mine)) == 3
    default = chromadb.HttpClient(host="127.0.0.1", port=secured.port, ssl=True, settings=auth)
    assert memory_collections(default) == []  # the created database holds them, not the default one


async def test_a_refused_token_is_one_line_naming_the_setting_and_the_readyz_reason(
    daemon_env: dict[str, str], secured: ChromaServer, tls: tuple[Path, Path], tmp_path: Path
) -> None:
    env = chroma_env(daemon_env, secured, tls[0], CHROMADB_AUTH_TOKEN="not-the-token")
    daemon = DaemonProcess(env, tmp_path / "daemon.log").start()
    named = "refused CHROMADB_AUTH_TOKEN"
    try:

        async def on_readyz() -> bool:
            assert daemon.proc is not None and daemon.proc.poll() is None, f"daemon exited:\n{daemon.log()}"
            status, body = await asyncio.to_thread(daemon.get, "/readyz")
            return status == 503 and named in json.loads(body)["reasons"].get("chroma", "")

        await wait_for(on_readyz, 120, f"/readyz to say {named!r}")
        lines = [json.loads(line) for line in daemon.log().splitlines() if '"chroma_unreachable"' in line]
        assert len(lines) == 1 and named in lines[0]["problem"], daemon.log()
        assert "CHROMADB_HOST" not in lines[0]["advice"]  # the server is there: the setting is what to fix
    finally:
        assert daemon.stop() == 0, daemon.log()
    log = daemon.log()
    assert TOKEN not in log and "not-the-token" not in log and "Traceback" not in log


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({}, "CHROMADB_AUTH_TOKEN is not set"),
        ({"chromadb_auth_token": TOKEN, "chromadb_tenant": "no-such-tenant"}, "CHROMADB_TENANT 'no-such-tenant'"),
    ],
    ids=["missing-token", "missing-tenant"],
)
async def test_a_missing_token_or_tenant_is_named_where_the_daemon_reports_it(
    extra: dict[str, str], named: str, secured: ChromaServer, tls: tuple[Path, Path]
) -> None:
    """What the start-up line and /readyz carry (the wrong-token case above shows both),
    asked of the storage layer directly: a refusal, retried, never a dead letter."""
    from ings_daemon.config import Settings
    from ings_daemon.storage.chroma import ChromaRefused, Collections, memory_of

    where = {"chromadb_host": "127.0.0.1", "chromadb_port": secured.port, "chromadb_ssl": True}
    collections = Collections(Settings(**where, chromadb_ssl_ca_file=tls[0], **extra))  # type: ignore[arg-type]
    problem = await collections.problem_at_start(30)
    assert problem is not None and named in problem and TOKEN not in problem
    with pytest.raises(ChromaRefused):  # a ConnectionError: the router retries it
        await collections.get(memory_of(TECHLEAD))
