"""The INGS guide's HTTP commands (INGS_HTTP_INGRESS): real requests to a real daemon,
and the events they put on a real broker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TECHLEAD, Kafka, example_events, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ings_daemon import ingress
from ings_daemon.config import Settings
from ings_daemon.dev.stack import Broker, free_port
from ings_daemon.runtime.http import HttpServer

pytestmark = pytest.mark.integration
TOKEN = "s3cret-token-for-tests"
ORIGIN = example_events("interactions/origin_record.json")[0]


def request(
    port: int, path: str, body: bytes | None = None, token: str | None = TOKEN, method: str | None = None
) -> tuple[int, dict[str, Any]]:
    """(status, JSON answer) of one HTTP request to 127.0.0.1:port."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def call(port: int, path: str, body: bytes | dict[str, Any] | None = None, **kw: Any) -> tuple[int, Any]:
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    return await asyncio.to_thread(request, port, path, raw, **kw)


async def test_the_guides_commands_go_through_kafka_and_come_back(
    kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any, tmp_path: Path
) -> None:
    t = kafka.topics
    env = {**daemon_env, "INGS_ROLE": "all", "INGS_HTTP_INGRESS": "true", "INGS_HTTP_TOKEN": TOKEN}
    daemon = await start_daemon(env)
    port = daemon.port
    persona_doc = {"version": "1.0", "persona": {"name": "Release Captain", "description": "Ships on Fridays."}}

    # Unauthorised: no header, a wrong token; nothing reaches Kafka.
    assert (await call(port, "/handshake", persona_doc, token=None))[0] == 401
    status, answer = await call(port, "/handshake", persona_doc, token="wrong")
    assert status == 401 and "Authorization: Bearer" in answer["reason"]

    # A handshake without a DID: the answer names the DID the consumer registers.
    status, answer = await call(port, "/handshake", persona_doc)
    assert status == 202 and answer["minted"] and answer["topic"] == t.handshake
    did = answer["persona_id"]
    personas = await kafka.read(t.persona, min_count=1)
    assert [p["persona_id"] for p in personas] == [did]

    # The origin's wrapped interaction, and the guide's interact body.
    wrapped = {**ORIGIN, "interaction": {**ORIGIN["interaction"], "persona_id": did}}
    status, answer = await call(port, "/interact", wrapped)
    assert status == 202 and answer["persona_id"] == did and answer["memory_id"]
    for n in range(2):
        body = {"persona_id": did, "input": f"When do we ship {n}?", "output": "Friday, after the canary."}
        assert (await call(port, "/interact", body))[0] == 202
    # The same interaction spelt three more ways (lower-case scheme too): one memory.
    same = {"persona_id": f" {did}", "message": " When do we ship 0? ", "response": "Friday, after the canary."}
    assert (await call(port, "/interact", same))[0] == 202
    assert (await call(port, "/interact", {"version": "9", "interaction": same}))[0] == 202
    lower = await asyncio.to_thread(
        request, port, "/interact", json.dumps({**same, "metadata": None}).encode(), token=None
    )
    assert lower[0] == 401
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/interact",
        data=json.dumps({**same, "metadata": None}).encode(),
        headers={"Authorization": f"bearer {TOKEN}"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 202

    async def remembered() -> bool:
        status, found = await call(port, f"/personas/{did}")
        return status == 200 and found["memory_count"] == 3 and found["persona"]["name"] == "Release Captain"

    await wait_for(remembered, 60, "3 memories and the persona")

    # Recall without a request id: one is given, and the result carries it.
    status, answer = await call(port, "/recall", {"persona_id": did, "query": "nightly job twice", "k": 1})
    assert status == 202 and answer["request_id"].startswith("http-") and answer["see"] == t.recall_result
    results = await kafka.read(t.recall_result, min_count=1)
    assert [r["request_id"] for r in results] == [answer["request_id"]]
    assert results[0]["results"][0]["metadata"] == ORIGIN["interaction"]["metadata"]

    # The guide's tune body: the outcome follows on ings.tune-status under the request id.
    tune = {
        "persona_id": did,
        "training_data": [{"input": f"q{i}?", "output": f"a{i}."} for i in range(12)],
        "lora_config": {"rank": 4},
    }
    status, answer = await call(port, "/tune", tune)
    assert status == 202
    statuses = await kafka.read(t.tune_status, min_count=1)
    first = statuses[0]
    assert first["request_id"] == answer["request_id"] and first["status"] == "accepted", first["reason"]

    # Invalid, oversized, unknown: answered at the door with the reasons, never produced.
    status, answer = await call(port, "/interact", {"persona_id": "did:bad", "input": "a", "output": "b"})
    assert status == 400 and answer["error"] == "invalid_did" and "persona_id" in answer["reason"]
    status, answer = await call(port, "/tune", b"{not json")
    assert status == 400 and answer["error"] == "not_json"
    status, answer = await call(port, "/interact", {**wrapped, "interaction": {**wrapped["interaction"], "input": "x"}})
    assert status == 400 and "not both" in answer["reason"]
    status, answer = await call(port, "/interact", b"x" * 1_000_001)
    assert status == 413 and "INGS_MAX_EVENT_BYTES" in answer["reason"]
    assert (await call(port, "/personas/did:nings:artificial:llm:nobody:v1.0:000000000000"))[0] == 404
    assert (await call(port, "/personas/not-a-did"))[0] == 400
    interactions = await kafka.read(t.interaction)
    assert len(interactions) == 6  # the six accepted, nothing else
    # What reaches the topic is the validated event in the contract's names, with its id.
    flat = interactions[0]
    assert "interaction" not in flat and flat["input"].startswith("Our nightly job") and flat["event_id"]
    assert {i["event_id"] for i in interactions[3:]} == {interactions[1]["event_id"]}

    assert await daemon.metric("ings_http_requests_total", route="/interact", code="202") == 6
    assert await daemon.metric("ings_http_requests_total", route="/interact", code="400") == 2
    assert await daemon.metric("ings_http_requests_total", route="/handshake", code="401") == 2
    assert await daemon.metric("ings_http_requests_total", route="/interact", code="401") == 1
    assert daemon.stop() == 0
    assert TOKEN not in daemon.log()


@pytest.fixture
def ingress_server(broker: Broker, tmp_path: Path) -> Iterator[HttpServer]:
    """The ingress alone, in this process, producing to the session's broker."""
    s = Settings(
        kafka_bootstrap_servers=broker.bootstrap,
        ings_topic_prefix="fuzz.",
        ings_http_ingress=True,
        chromadb_path=tmp_path / "chroma",
        ings_adapter_dir=tmp_path / "adapters",
        ings_max_event_bytes=20_000,
        ings_vllm_urls=["http://127.0.0.1:9"],  # nothing listens: chat gets as far as the server
    )
    routes = ingress.Ingress(s)
    server = HttpServer("127.0.0.1", 0, routes.routes(), max_body_bytes=s.ings_max_event_bytes)
    server.app.on_cleanup.append(routes.close)
    server.start()
    yield server
    server.stop()


json_bodies = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=12,
)
bodies = st.one_of(
    st.binary(max_size=300),
    json_bodies.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"persona_id": st.sampled_from([TECHLEAD, "did:x", ""])},
        optional={"input": st.text(max_size=5), "message": st.text(max_size=5), "output": st.text(max_size=5)},
    ).map(lambda v: json.dumps(v).encode()),
    st.integers(20_001, 30_000).map(lambda n: b" " * n),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(sorted(ingress.COMMANDS)), body=bodies)
def test_any_body_is_answered_with_a_reason_never_an_error(ingress_server: HttpServer, path: str, body: bytes) -> None:
    """Whatever bytes arrive: 202, or 400/413 with an error type and a reason; never a 500."""
    status, answer = request(ingress_server.port, path, body, token=None)
    if status == 202:
        assert answer["accepted"] and answer["persona_id"]
    else:
        assert status in (400, 413) and answer["error"] and answer["reason"], (status, answer)


messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", ""]), "content": st.text(max_size=30)},
        optional={"name": st.text(max_size=3), "extra": st.integers()},
    ),
    max_size=3,
)
chat_bodies = st.one_of(
    bodies,
    st.fixed_dictionaries(
        {
            "model": st.sampled_from([TECHLEAD, "ings-techlead-v2.0-a7f3b9d2c8e1-v1", "gpt-4o", ""]),
            "messages": messages,
        },
        optional={"stream": st.booleans(), "max_tokens": st.integers(-5, 10**6), "n": st.integers(0, 3)},
    ).map(lambda v: json.dumps(v).encode()),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=chat_bodies)
def test_any_chat_body_is_answered_with_a_reason_never_an_error(ingress_server: HttpServer, body: bytes) -> None:
    """Chat: 400/413 for what is not a chat request, 404 for a model that names no persona
    here, 503 naming the server that does not answer; never a 500, never a hang."""
    status, answer = request(ingress_server.port, ingress.CHAT_PATH, body, token=None)
    error = answer["error"]  # in the OpenAI API's shape, which its clients read
    assert status in (400, 404, 413, 503) and error["code"] and error["message"]
    assert error["type"] == ("server_error" if status == 503 else "invalid_request_error")
    if status == 503:
        assert "127.0.0.1:9" in error["message"]


def test_commands_are_off_unless_enabled_and_a_broker_away_is_a_503(tmp_path: Path) -> None:
    s = Settings(
        kafka_bootstrap_servers=f"127.0.0.1:{free_port()}", chromadb_path=tmp_path / "c", ings_http_ingress=False
    )
    off = HttpServer("127.0.0.1", 0, ingress.Ingress(s).routes())
    off.start()
    try:
        status, answer = request(off.port, "/handshake", b"{}", token=None)
        assert status == 404 and "INGS_HTTP_INGRESS=true" in answer["reason"]
    finally:
        off.stop()

    away = ingress.Ingress(s.model_copy(update={"ings_http_ingress": True}))
    server = HttpServer("127.0.0.1", 0, away.routes(), on_cleanup=[away.close])
    server.start()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ingress, "PRODUCE_TIMEOUT_S", 2.0)
            body = json.dumps({"persona_id": TECHLEAD, "input": "a", "output": "b"}).encode()
            status, answer = request(server.port, "/interact", body, token=None)
        assert status == 503 and answer["error"] == "kafka_unavailable"
        assert "KAFKA_BOOTSTRAP_SERVERS" in answer["reason"] and s.kafka_bootstrap_servers in answer["reason"]
    finally:
        server.stop()


def raw_http(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes and return everything the server answers until it closes or pauses."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer and answer.count(b"{") and answer.rstrip().endswith(b"}"):
                    break
        except TimeoutError:
            pass
        return answer


def test_malformed_and_oversized_requests_are_answered_at_once_with_reasons(
    ingress_server: HttpServer, caplog: pytest.LogCaptureFixture
) -> None:
    port = ingress_server.port
    # Declared too large: refused before a byte of the body is sent, with or without Expect.
    head = b"POST /interact HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n"
    assert b" 413 " in raw_http(port, head + b"\r\n").split(b"\r\n")[0]
    assert b" 413 " in raw_http(port, head + b"Expect: 100-continue\r\n\r\n").split(b"\r\n")[0]
    # A body its encoding does not decode: 400 with a reason, never a 500.
    bad_gzip = b"POST /interact HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nContent-Length: 7\r\n\r\nnotgzip"
    answer = raw_http(port, bad_gzip)
    assert b" 400 " in answer.split(b"\r\n")[0] and b"unreadable_body" in answer
    # aiohttp's own answers are JSON too.
    status, body = request(port, "/nowhere", token=None)
    assert status == 404 and body["error"] == "not_found"
    status, body = request(port, "/interact", token=None, method="GET")
    assert status == 405 and body["error"] == "method_not_allowed"
    # A malformed header quoting a secret: logged as one line, without the header.
    with caplog.at_level("DEBUG", logger="ings.http"):
        raw_http(port, b"POST /interact HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\x01\r\n\r\n")
    assert "s3cret" not in caplog.text


def test_silent_and_slow_clients_are_cut_off_and_connections_capped(
    broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket
    import time

    from ings_daemon.runtime import http

    monkeypatch.setattr(http, "IDLE_TIMEOUT_S", 1.0)
    monkeypatch.setattr(http, "MAX_CONNECTIONS", 20)
    monkeypatch.setattr(ingress, "BODY_TIMEOUT_S", 1.0)
    s = Settings(kafka_bootstrap_servers=broker.bootstrap, chromadb_path=tmp_path / "c", ings_http_ingress=True)
    server = HttpServer("127.0.0.1", 0, ingress.Ingress(s).routes())
    server.start()
    try:
        silent = socket.create_connection(("127.0.0.1", server.port))
        half_head = socket.create_connection(("127.0.0.1", server.port))
        half_head.sendall(b"POST /interact HTTP/1.1\r\nHost: x\r\n")
        for conn in (silent, half_head):
            conn.settimeout(5)
            started = time.monotonic()
            assert conn.recv(100) == b"" and time.monotonic() - started < 4  # closed by the server
        # A body that stops half way: 408 after the body timeout.
        answer = raw_http(server.port, b"POST /interact HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{", 5)
        assert b" 408 " in answer.split(b"\r\n")[0]
        # More connections than the cap: the extra ones are closed at once, the rest served.
        held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(30)]
        closed = 0
        for conn in held:
            conn.settimeout(0.5)
            with contextlib.suppress(TimeoutError):
                closed += conn.recv(1) == b""
        assert closed >= 10
        for conn in held:
            conn.close()
    finally:
        server.stop()


def test_a_chat_for_a_persona_unknown_here_is_a_404_naming_it(ingress_server: HttpServer) -> None:
    body = {"model": TECHLEAD, "messages": [{"role": "user", "content": "Hello?"}]}
    status, answer = request(ingress_server.port, ingress.CHAT_PATH, json.dumps(body).encode(), token=None)
    assert status == 404 and TECHLEAD in answer["error"]["message"]
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello?"}]}
    status, answer = request(ingress_server.port, ingress.CHAT_PATH, json.dumps(body).encode(), token=None)
    assert status == 404 and "neither a persona DID nor a served name" in answer["error"]["message"]
