"""Erasure and retention through the real daemon, broker, Chroma and tiny model: memories,
recall, the adapters trained on them, the retrain, and the other persona left alone."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from conftest import TECHLEAD, Kafka, chroma_records, example_events, wait_for

from ings_daemon.contract.ids import interaction_id
from ings_daemon.storage.adapters import AdapterStore
from ings_daemon.storage.erasures import ErasureLedger

pytestmark = pytest.mark.integration
OTHER = "did:nings:artificial:llm:other:v1.0:0123456789ab"
TOPICS = ("rollbacks", "caching", "on-call", "code review", "migrations", "feature flags", "tracing", "retries")


def said(persona: str, session: str, n: int) -> list[dict[str, Any]]:
    """n distinct interactions of one session (distinct enough to survive de-duplication)."""
    return [
        {
            "event_id": f"{session}-{i}",
            "persona_id": persona,
            "session_id": session,
            "input": f"In {session}, what is our rule {i} about {TOPICS[i % len(TOPICS)]}?",
            "output": f"Rule {i} of {session}: {TOPICS[(i * 3) % len(TOPICS)]} need a written plan ({i * 37}).",
        }
        for i in range(n)
    ]


async def read_raw(bootstrap: str, topic: str) -> list[tuple[str | None, bytes | None]]:
    """(key, value) of every record on a topic: tombstones have a None value."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    found: list[tuple[str | None, bytes | None]] = []
    try:
        while batch := await consumer.getmany(timeout_ms=1000):
            found += [(r.key.decode() if r.key else None, r.value) for rs in batch.values() for r in rs]
    finally:
        await consumer.stop()
    return found


async def test_forgetting_a_session_retires_its_adapter_and_retrains_without_it(
    kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any, tmp_path: Path
) -> None:
    t = kafka.topics
    env = {
        **daemon_env,
        "INGS_ROLE": "all",
        "INGS_MIN_EXAMPLES": "10",
        "INGS_GATE_MIN_EXAMPLES": "1000",  # every run published: this test is about erasure
        "INGS_ERASURE_RETRAIN": "true",
    }
    # Everything is on the topics before the daemon starts: its first fetch holds all of
    # it, so each persona gets exactly one auto job (16 and 10 examples).
    await kafka.produce(t.handshake, example_events("personas/techlead_ings.json"))
    s1, s2, theirs = said(TECHLEAD, "s1", 6), said(TECHLEAD, "s2", 10), said(OTHER, "o1", 10)
    await kafka.produce(t.interaction, s1 + s2 + theirs)
    daemon = await start_daemon(env)
    ready = {r["persona_id"]: r for r in await kafka.read(t.adapter_ready, min_count=2, timeout=240)}
    assert set(ready) == {TECHLEAD, OTHER} and ready[TECHLEAD]["version"] == 1

    forget = {"request_id": "forget-s1", "persona_id": TECHLEAD, "scope": "session", "session_id": "s1"}
    await kafka.produce(t.forget, [forget])
    result = (await kafka.read(t.forget_result, min_count=1))[0]
    assert result["memories_deleted"] == 6 and result["examples_deleted"] == 0
    assert result["adapters_retired"] == [1] and result["retrain_job_id"]
    retired = await kafka.read(t.adapter_retired, min_count=1)
    assert [(r["persona_id"], r["version"], r["reason"]) for r in retired] == [(TECHLEAD, 1, "erasure")]

    # The retrain: a normal job on what remains, none of the erased session in it.
    again = [r for r in await kafka.read(t.adapter_ready, min_count=3, timeout=240) if r["version"] == 2]
    assert again and again[0]["trigger"] == "forget-s1" and again[0]["job_id"] == result["retrain_job_id"]
    store = AdapterStore(tmp_path / "adapters")
    trained = set(store.manifest(TECHLEAD, 2)["examples"]["train"])
    erased = {interaction_id(TECHLEAD, e["event_id"]) for e in s1}
    assert trained and not trained & erased
    assert ErasureLedger(store).retired(TECHLEAD) == {1}
    assert ErasureLedger(store).erased_ids(TECHLEAD) == erased
    assert ErasureLedger(store).retired(TECHLEAD, "forget-s1") == {1}

    # Recall never returns the erased session; the other persona keeps all ten.
    await kafka.produce(
        t.recall_request,
        [
            {"persona_id": TECHLEAD, "query": "In s1, what is our rule", "k": 20, "request_id": "after"},
            {"persona_id": OTHER, "query": "rule", "k": 20, "request_id": "theirs"},
        ],
    )
    results = {r["request_id"]: r["results"] for r in await kafka.read(t.recall_result, min_count=2)}
    assert sorted(m["session_id"] for m in results["after"]) == ["s2"] * 10
    assert len(results["theirs"]) == 10

    # The whole persona: registry entry, memories and the compacted topic's value go.
    await kafka.produce(t.forget, [{"request_id": "forget-all", "persona_id": TECHLEAD, "scope": "persona"}])
    results = {r["request_id"]: r for r in await kafka.read(t.forget_result, min_count=2)}
    assert results["forget-all"]["memories_deleted"] == 10 and results["forget-all"]["adapters_retired"] == [2]
    # Replayed: nothing left to erase; what it retired is announced again, not retired twice.
    await kafka.produce(t.forget, [forget])
    replay = [r for r in await kafka.read(t.forget_result, min_count=3) if r["request_id"] == "forget-s1"][-1]
    assert replay["memories_deleted"] == 0 and replay["adapters_retired"] == [1]

    async def tombstoned() -> bool:
        records = [value for key, value in await read_raw(kafka.bootstrap, t.persona) if key == TECHLEAD]
        return bool(records) and records[-1] is None

    await wait_for(tombstoned, 30, "a tombstone for the persona")
    letters = [v for (name, _), v in (await daemon.metrics()).items() if name == "ings_memories_erased_total"]
    assert sum(letters) == 16
    assert await daemon.metric("ings_adapters_retired_total", reason="erasure") == 2
    assert daemon.stop() == 0

    left = chroma_records(tmp_path / "chroma")
    assert {r["persona_id"] for r in left} == {OTHER} and len(left) == 10
    personas = chroma_records(tmp_path / "chroma", "ings_memory_personas")
    assert TECHLEAD not in {r["id"] for r in personas}


async def test_a_pending_job_trains_without_erased_examples_or_is_dropped(
    kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any, tmp_path: Path
) -> None:
    """A job made before its examples were erased: trained on the rest when enough remain,
    dropped with the reason when too few do. The trainer runs after the erasure here."""
    t = kafka.topics
    env = {**daemon_env, "INGS_ROLE": "ingest", "INGS_MIN_EXAMPLES": "10", "INGS_GATE_MIN_EXAMPLES": "1000"}
    await kafka.produce(t.interaction, said(TECHLEAD, "a", 12) + said(OTHER, "b", 10))
    ingest = await start_daemon(env)  # after the events: one fetch, one job per persona
    jobs = {j["persona_id"]: j for j in await kafka.read(t.train_job, min_count=2)}
    assert len(jobs[TECHLEAD]["examples"]["ids"]) == 12 and len(jobs[OTHER]["examples"]["ids"]) == 10
    await kafka.produce(
        t.forget,
        [
            {"request_id": "two", "persona_id": TECHLEAD, "scope": "events", "event_ids": ["a-0", "a-1", "nope"]},
            {"request_id": "one", "persona_id": OTHER, "scope": "events", "event_ids": ["b-3"]},
        ],
    )
    results = {r["request_id"]: r for r in await kafka.read(t.forget_result, min_count=2)}
    assert results["two"]["memories_deleted"] == 2 and results["two"]["jobs_affected"] == 1
    assert results["one"]["memories_deleted"] == 1 and results["one"]["jobs_affected"] == 1
    assert ingest.stop() == 0

    trainer = await start_daemon({**env, "INGS_ROLE": "trainer", "INGS_HTTP_PORT": str(ingest.port + 1)})
    ready = (await kafka.read(t.adapter_ready, min_count=1, timeout=240))[0]
    assert ready["persona_id"] == TECHLEAD and ready["metrics"]["examples"] == 10

    async def dropped() -> bool:
        found = [s for s in await kafka.read(t.tune_status) if s["persona_id"] == OTHER and s["status"] == "failed"]
        return bool(found) and "9 remain" in found[0]["reason"] and "INGS_MIN_EXAMPLES" in found[0]["reason"]

    await wait_for(dropped, 120, "the other persona's job dropped")
    assert trainer.stop() == 0


async def test_retention_erases_only_memories_older_than_the_period(
    kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any, tmp_path: Path
) -> None:
    t = kafka.topics
    period_s = 20.0
    env = {
        **daemon_env,
        "INGS_MEMORY_RETENTION_DAYS": str(period_s / 86_400),
        "INGS_RETENTION_SWEEP_S": "1",
    }
    daemon = await start_daemon(env)
    await kafka.produce(t.interaction, said(TECHLEAD, "old", 5))
    await wait_for(lambda: daemon.added(5), 60, "the old memories")
    stored_old = time.monotonic()
    # Ages are set by the daemon's clock at ingest: the second batch must be younger than
    # the first by more than a sweep's delay (checks every 5 s).
    await asyncio.sleep(12)
    await kafka.produce(t.interaction, said(TECHLEAD, "new", 5) + said(OTHER, "x", 3))
    await wait_for(lambda: daemon.added(13), 60, "the new memories")
    first = (await kafka.read(t.forget_result, min_count=1, timeout=60))[0]
    assert time.monotonic() - stored_old >= period_s
    assert first["scope"] == "retention" and first["request_id"].startswith("retention-")
    assert first["persona_id"] == TECHLEAD and first["memories_deleted"] == 5
    await kafka.produce(t.recall_request, [{"persona_id": TECHLEAD, "query": "rule", "k": 20, "request_id": "r"}])
    recalled = (await kafka.read(t.recall_result, min_count=1))[0]["results"]
    assert sorted(m["session_id"] for m in recalled) == ["new"] * 5
    assert await daemon.metric("ings_memories_erased_total", reason="retention") == 5
    assert daemon.stop() == 0
    assert json.dumps(first)  # the result is plain JSON


async def produce_at(bootstrap: str, topic: str, events: list[dict[str, Any]], timestamp_ms: int) -> None:
    """Produce with a given CreateTime: records a producer wrote at that moment."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, acks="all")
    await producer.start()
    try:
        for e in events:
            await producer.send_and_wait(
                topic, json.dumps(e).encode(), key=e["persona_id"].encode(), timestamp_ms=timestamp_ms
            )
    finally:
        await producer.stop()


async def test_a_forget_outruns_what_was_produced_before_it_and_reused_ids_are_new_data(
    kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any, tmp_path: Path
) -> None:
    """Interactions produced before a forget but consumed after it are dropped; the same
    event ids sent afterwards are new data: a new job and adapter, never the retired one."""
    t = kafka.topics
    env = {**daemon_env, "INGS_ROLE": "all", "INGS_MIN_EXAMPLES": "3", "INGS_GATE_MIN_EXAMPLES": "1000"}
    daemon = await start_daemon(env)
    first = said(OTHER, "k", 3)
    await kafka.produce(t.interaction, first)
    v1 = (await kafka.read(t.adapter_ready, min_count=1, timeout=240))[0]
    assert v1["persona_id"] == OTHER and v1["version"] == 1

    forgot_at = int(time.time() * 1000)
    await produce_at(
        kafka.bootstrap, t.forget, [{"request_id": "f1", "persona_id": OTHER, "scope": "persona"}], forgot_at
    )
    result = (await kafka.read(t.forget_result, min_count=1))[0]
    assert result["memories_deleted"] == 3 and result["adapters_retired"] == [1]

    late = [{**e, "output": "late, written before the forget"} for e in first]
    await produce_at(kafka.bootstrap, t.interaction, late, forgot_at - 5_000)
    again = [{**e, "output": f"new answer {n}, after the forget"} for n, e in enumerate(first)]
    await kafka.produce(t.interaction, again)
    ready = await kafka.read(t.adapter_ready, min_count=2, timeout=240)
    v2 = ready[-1]
    assert v2["version"] == 2 and v2["job_id"] != v1["job_id"]
    assert await daemon.metric("ings_memory_records_added_total") == 6  # 3, then 3 new; the late ones dropped
    await kafka.produce(t.recall_request, [{"persona_id": OTHER, "query": "rule", "k": 10, "request_id": "r"}])
    recalled = (await kafka.read(t.recall_result, min_count=1))[0]["results"]
    assert sorted(m["output"] for m in recalled) == sorted(e["output"] for e in again)
    retired = await kafka.read(t.adapter_retired, min_count=1)
    assert [r["version"] for r in retired] == [1]  # v2 was trained on new data: not retired

    # A forget that does not validate is answered, not only dead-lettered.
    await kafka.produce(t.forget, [{"request_id": "bad", "persona_id": OTHER, "scope": "session"}])
    results = {r["request_id"]: r for r in await kafka.read(t.forget_result, min_count=2)}
    assert results["bad"]["memories_deleted"] == 0 and "session_id" in results["bad"]["rejected"]
    assert daemon.stop() == 0


async def test_a_forget_spares_what_was_produced_after_it_in_the_same_fetch(
    kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any
) -> None:
    """Interactions are handled before forgets within one fetch: the ones produced after the
    forget are new data and stay, whatever the order the daemon meets them in."""
    t = kafka.topics
    persona = "did:nings:artificial:llm:samebatch:v1.0:5a5a5a5a5a5a"
    now = int(time.time() * 1000)
    await produce_at(kafka.bootstrap, t.interaction, said(persona, "old", 3), now - 5_000)
    forget = {"request_id": "f-same", "persona_id": persona, "scope": "persona"}
    await produce_at(kafka.bootstrap, t.forget, [forget], now)
    await produce_at(kafka.bootstrap, t.interaction, said(persona, "new", 2), now + 5_000)
    empty = {"request_id": "f-empty", "persona_id": persona, "scope": "session", "session_id": ""}
    await produce_at(kafka.bootstrap, t.forget, [empty], now + 6_000)
    daemon = await start_daemon(daemon_env)  # after the events: one fetch holds them all
    results = {r["request_id"]: r for r in await kafka.read(t.forget_result, min_count=2)}
    assert results["f-same"]["memories_deleted"] == 3
    assert results["f-empty"]["rejected"] and results["f-empty"]["memories_deleted"] == 0
    await kafka.produce(t.recall_request, [{"persona_id": persona, "query": "rule", "k": 10, "request_id": "r"}])
    recalled = (await kafka.read(t.recall_result, min_count=1))[0]["results"]
    assert sorted(m["session_id"] for m in recalled) == ["new", "new"]
    assert daemon.stop() == 0
