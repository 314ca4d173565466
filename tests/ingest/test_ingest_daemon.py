"""Integration: the daemon as a subprocess against a real Tansu broker and real Chroma."""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json
import re
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    ROOT,
    TECHLEAD,
    Kafka,
    chroma_records,
    example_events,
    memory_collections,
    wait_for,
)

from ings_daemon.contract.ids import DID_RE
from ings_daemon.dev.chroma_server import ChromaServer
from ings_daemon.storage.buckets import bucket_name, bucket_of

pytestmark = pytest.mark.integration


def interactions(persona: str, n: int, tag: str, with_ids: bool = True) -> list[dict[str, Any]]:
    return [
        {
            **({"event_id": f"{tag}-{i}"} if with_ids else {}),
            "persona_id": persona,
            "input": f"{tag} question number {i} about deployment pipelines and rollbacks",
            "output": f"{tag} answer number {i}: roll back first, then investigate with care",
        }
        for i in range(n)
    ]


async def test_examples_flow_in_and_replay_adds_nothing(
    kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any, tmp_path: Path
) -> None:
    t = kafka.topics
    daemon = await start_daemon(daemon_env)
    personas = example_events("personas/techlead_ings.json") + example_events("personas/mentor_ings.json")
    stream = example_events("interactions/techlead.jsonl")
    no_ids = [{k: v for k, v in e.items() if k != "event_id"} for e in interactions(TECHLEAD, 5, "anon")]
    await kafka.produce(t.handshake, personas)
    await kafka.produce(t.interaction, stream + no_ids)

    registered = await kafka.read(t.persona, min_count=2)
    by_name = {p["name"]: p for p in registered}
    assert by_name["TechLead"]["persona_id"] == TECHLEAD and not by_name["TechLead"]["minted"]
    assert by_name["Mentor"]["minted"] and DID_RE.fullmatch(by_name["Mentor"]["persona_id"])

    await wait_for(lambda: daemon.added(len(stream) + len(no_ids)), 60, "17 memory records")
    # Replay everything, including the events without an event_id: no new record.
    await kafka.produce(t.handshake, personas)
    await kafka.produce(t.interaction, stream + no_ids)

    async def replay_consumed() -> bool:
        return bool(await daemon.metric("ings_events_processed_total", topic=t.interaction) == 2 * (len(stream) + 5))

    await wait_for(replay_consumed, 60, "the replay to be processed")
    assert await daemon.metric("ings_memory_records_added_total") == len(stream) + len(no_ids)
    assert len(await kafka.read(t.persona, min_count=4)) == 4  # re-announced, same DIDs
    assert daemon.stop() == 0

    records = chroma_records(tmp_path / "chroma")
    assert len(records) == 17
    assert {r["persona_id"] for r in records} == {TECHLEAD}
    first = next(r for r in records if r["event_id"] == "techlead-demo-000")
    assert first["session_id"] == "demo-session-1" and first["mode"] == "code_review"
    assert first["occurred_at"].startswith("2026-11-20T10:00:00") and first["meta.channel"] == "slack"
    assert "roll out the new schema" in next(r["document"] for r in records if r["event_id"] == "techlead-demo-002")
    personas_ids = {p["persona_id"] for p in registered}
    assert {r["id"] for r in chroma_records(tmp_path / "chroma", "ings_memory_personas")} == personas_ids


def malformed_events() -> list[tuple[bytes, str]]:
    """100 bad events of eight kinds, each with the DLQ error type it must get."""
    good = interactions(TECHLEAD, 1, "x")[0]
    kinds: list[tuple[bytes, str]] = [
        (b"{not json", "not_json"),
        (b"\xff\xfe\x00garbage", "not_json"),
        (b"[1, 2, 3]", "not_object"),
        (json.dumps({**good, "persona_id": "did:nings:artificial:llm:../../etc:v1:abcdef"}).encode(), "invalid_did"),
        (json.dumps({k: v for k, v in good.items() if k != "output"}).encode(), "invalid_event"),
        (json.dumps({**good, "input": 42}).encode(), "invalid_event"),
        (json.dumps({**good, "unexpected": True}).encode(), "invalid_event"),
        (json.dumps({**good, "output": "x" * 2_000_000}).encode(), "too_large"),
    ]
    return [kinds[i % len(kinds)] for i in range(100)]


async def test_malformed_events_are_dead_lettered_and_good_ones_stored(
    kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any, tmp_path: Path
) -> None:
    t = kafka.topics
    daemon = await start_daemon(daemon_env)
    bad = malformed_events()
    good = interactions(TECHLEAD, 20, "good")
    mixed: list[bytes | dict[str, Any]] = []
    for i, (raw, _) in enumerate(bad):
        mixed.append(raw)
        if i % 5 == 0:
            mixed.append(good[i // 5])
    await kafka.produce(t.interaction, mixed, key=TECHLEAD)  # one partition: order is checkable
    await kafka.produce(t.handshake, [b"\x00\x01 not a persona"])

    letters = await kafka.read(t.dlq, min_count=101, timeout=90)
    assert len(letters) == 101
    on_interaction = [d for d in letters if d["topic"] == t.interaction]
    assert Counter(d["error_type"] for d in on_interaction) == Counter(kind for _, kind in bad)
    assert all(d["reason"] for d in letters)
    # The original bytes and their coordinates come back exactly.
    assert sorted(d["value_sha256"] for d in on_interaction) == sorted(
        hashlib.sha256(raw).hexdigest() for raw, _ in bad
    )
    whole = [base64.b64decode(d["value_b64"]) for d in on_interaction if not d["value_truncated"]]
    assert sorted(whole) == sorted(raw for raw, _ in bad if len(raw) < 700_000)
    # The 2 MB one is kept as a prefix: its letter still fits Kafka's 1 MiB.
    assert all(len(json.dumps(d)) < 1_048_576 for d in letters)
    offsets = sorted(d["offset"] for d in on_interaction)
    assert len(set(offsets)) == 100 and {d["partition"] for d in on_interaction} == {on_interaction[0]["partition"]}
    assert any("output" in d["reason"] and "Field required" in d["reason"] for d in on_interaction)

    await wait_for(lambda: daemon.added(20), 60, "the 20 good interactions")
    assert await daemon.metric("ings_events_dead_lettered_total", topic=t.interaction, reason="too_large") > 0
    # Still running, and every offset, bad ones included, is committed.
    assert daemon.get("/healthz")[0] == 200

    group = daemon_env["KAFKA_GROUP_ID"]
    await wait_for(lambda: kafka.fully_committed(group, t.interaction), 30, "offsets committed up to the highwater")
    assert daemon.stop() == 0


async def test_interactions_before_their_handshake_are_kept(
    kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any
) -> None:
    t = kafka.topics
    late = "did:nings:artificial:llm:latecomer:v1.0:0123456789ab"
    await kafka.produce(t.interaction, interactions(late, 6, "early"))
    daemon = await start_daemon(daemon_env)

    await wait_for(lambda: daemon.added(6), 60, "interactions of a persona not yet registered")
    doc = copy.deepcopy(example_events("personas/techlead_ings.json")[0])
    doc["persona"]["persona_id"] = late
    doc["persona"]["name"] = "Latecomer"
    await kafka.produce(t.handshake, [doc])
    await kafka.read(t.persona, min_count=1)
    await kafka.produce(t.recall_request, [{"persona_id": late, "query": "rollbacks", "k": 10, "request_id": "r1"}])
    result = (await kafka.read(t.recall_result, min_count=1))[0]
    assert len(result["results"]) == 6
    assert daemon.stop() == 0


async def test_recall_returns_only_that_personas_memories(
    kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any
) -> None:
    t = kafka.topics
    other = "did:nings:artificial:llm:other:v1.0:ffffeeee0000"
    daemon = await start_daemon(daemon_env)
    await kafka.produce(t.interaction, example_events("interactions/techlead.jsonl"))
    # The other persona says nearly the same things: only the filter keeps them apart.
    await kafka.produce(
        t.interaction,
        [
            {**e, "persona_id": other, "event_id": "other-" + e["event_id"]}
            for e in example_events("interactions/techlead.jsonl")
        ],
    )
    await wait_for(lambda: daemon.added(24), 60, "24 records")
    await kafka.produce(t.recall_request, [example_events("recall/techlead_recall.json")[0]])
    await kafka.produce(
        t.recall_request, [{"persona_id": other, "query": "schema migration", "k": 50, "request_id": "other-1"}]
    )
    results = {r["request_id"]: r for r in await kafka.read(t.recall_result, min_count=2)}
    mine = results["techlead-recall-001"]["results"]
    assert len(mine) == 3 and {m["persona_id"] for m in mine} == {TECHLEAD}
    assert "schema" in mine[0]["input"]  # the nearest memory ranks first
    assert mine[0]["score"] >= mine[1]["score"] >= mine[2]["score"]
    theirs = results["other-1"]["results"]
    assert len(theirs) == 12 and {m["persona_id"] for m in theirs} == {other}
    assert daemon.stop() == 0


async def test_origin_records_and_any_metadata_are_stored_and_recalled_with_it(
    kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any, tmp_path: Path
) -> None:
    """The INGS origin's wrapped record (message/response/timestamp, a list in metadata),
    and metadata holding nulls, nested objects, keys that differ by a space and an int past
    int64: stored, indexed flat in Chroma, and recalled exactly as sent."""
    t = kafka.topics
    daemon = await start_daemon({**daemon_env, "INGS_ROLE": "ingest"})
    origin = example_events("interactions/origin_record.json")[0]
    odd = {
        "persona_id": TECHLEAD,
        "event_id": "odd-metadata",
        "input": "What did the retro decide about on-call?",
        "output": "Two people per rotation, and a written handover.",
        "metadata": {"nothing": None, "nested": {"deep": {"er": [1, 2.5]}}, " team": "a", "team": "b", "id": 2**70},
    }
    # Long enough that 100 of them cannot share one 1 MiB recall result.
    long = [
        {"persona_id": TECHLEAD, "event_id": f"long-{n}", "input": f"retro note {n} " + "x" * 15_000, "output": "ok"}
        for n in range(80)
    ]
    await kafka.produce(t.interaction, [origin, odd, *long], key=TECHLEAD)
    await wait_for(lambda: daemon.added(82), 60, "82 records")
    await kafka.produce(
        t.recall_request,
        [
            {"persona_id": TECHLEAD, "query": "nightly job runs twice", "k": 1, "request_id": "origin"},
            {"persona_id": TECHLEAD, "query": "retro on-call", "k": 2, "request_id": "odd"},
            {"persona_id": TECHLEAD, "query": "retro note", "k": 100, "request_id": "many"},
        ],
        key=TECHLEAD,
    )
    results = {r["request_id"]: r for r in await kafka.read(t.recall_result, min_count=3)}
    assert results["origin"]["results"][0]["metadata"] == origin["interaction"]["metadata"]
    assert results["odd"]["results"][0]["metadata"] == odd["metadata"]
    many = results["many"]
    assert many["truncated"] and 0 < len(many["results"]) < 82
    scores = [m["score"] for m in many["results"]]
    assert scores == sorted(scores, reverse=True)  # the best ones are the ones kept
    letters = [v for (name, _), v in (await daemon.metrics()).items() if name == "ings_dlq_records_total"]
    assert sum(letters) == 0
    assert daemon.stop() == 0

    stored = {r["event_id"]: r for r in chroma_records(tmp_path / "chroma")}
    first = next(m for m in stored.values() if m["input"].startswith("Our nightly job"))
    assert first["output"].startswith("Make it idempotent") and first["occurred_at"] == "2026-11-20T10:05:00+00:00"
    assert first["meta.validated_by"] == ["alice", "bob"] and first["meta.ticket.id"] == "OPS-142"
    assert "meta.follow_up" not in first
    flat = stored["odd-metadata"]
    assert flat["meta.nested.deep.er"] == [1.0, 2.5] and flat["meta. team"] == "a" and flat["meta.team"] == "b"
    assert "meta.id" not in flat and "meta.nothing" not in flat  # past int64 / null: in the original only


async def test_restart_resumes_from_committed_offsets(
    kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any, tmp_path: Path
) -> None:
    t = kafka.topics
    first = interactions(TECHLEAD, 40, "first") + interactions("did:nings:artificial:llm:b:v1:aaaaaa", 40, "first")
    await kafka.produce(t.interaction, first)
    daemon = await start_daemon(daemon_env)
    await wait_for(lambda: daemon.added(80), 60, "the first 80")
    assert daemon.stop() == 0
    committed = await kafka.committed(daemon_env["KAFKA_GROUP_ID"], t.interaction)
    assert sum(committed.values()) == 80

    second = interactions(TECHLEAD, 30, "second")
    await kafka.produce(t.interaction, second)
    daemon = await start_daemon(daemon_env)
    await wait_for(lambda: daemon.added(30), 60, "the 30 produced while it was down")
    # Exactly the new records were consumed: no gap, nothing re-read.
    assert await daemon.metric("ings_events_consumed_total", topic=t.interaction) == 30
    assert daemon.stop() == 0
    assert len(chroma_records(tmp_path / "chroma")) == 110


async def test_sigterm_finishes_the_batch_and_commits(
    kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any, tmp_path: Path
) -> None:
    t = kafka.topics
    daemon = await start_daemon({**daemon_env, "KAFKA_MAX_POLL_RECORDS": "64"})
    await kafka.produce(t.interaction, interactions(TECHLEAD, 300, "bulk"))
    await wait_for(lambda: _some_added(daemon), 60, "ingest to begin")
    started = time.monotonic()
    assert daemon.stop(signal.SIGTERM, timeout=60) == 0
    took = time.monotonic() - started
    assert took < 60
    log = daemon.log()
    assert '"event": "stopped"' in log and '"exit_code": 0' in log
    # What is committed is exactly what is stored: the batch in hand was finished.
    committed = sum((await kafka.committed(daemon_env["KAFKA_GROUP_ID"], t.interaction)).values())
    assert committed == len(chroma_records(tmp_path / "chroma")) > 0


async def _some_added(daemon: Any) -> bool:
    return bool(await daemon.metric("ings_memory_records_added_total") > 0)


async def test_chroma_server_outage_pauses_then_everything_arrives(
    kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any, chroma_server: ChromaServer
) -> None:
    import chromadb

    t = kafka.topics
    env = {**daemon_env, "CHROMADB_HOST": "127.0.0.1", "CHROMADB_PORT": str(chroma_server.port), "INGS_STALL_S": "3"}
    daemon = await start_daemon(env)
    group = env["KAFKA_GROUP_ID"]
    await kafka.produce(t.interaction, interactions(TECHLEAD, 10, "before"))
    await wait_for(lambda: daemon.added(10), 60, "records before the outage")

    chroma_server.stop()
    await kafka.produce(t.interaction, interactions(TECHLEAD, 25, "during"))

    async def paused() -> bool:
        failed = await daemon.metric("ings_events_failed_total", topic=t.interaction)
        return bool(await daemon.metric("ings_consumer_paused") == 1 and failed > 0)

    await wait_for(paused, 60, "consumption to pause while Chroma is down")
    assert daemon.get("/healthz")[0] == 200  # the process is alive, only not ready

    async def not_ready() -> bool:
        return bool(daemon.get("/readyz")[0] == 503)

    await wait_for(not_ready, 30, "/readyz to report Chroma unreachable")

    async def stalled() -> bool:
        status, body = await asyncio.to_thread(daemon.get, "/readyz")
        reasons = json.loads(body).get("reasons", {}) if status == 503 else {}
        return bool(
            "stalled" in reasons.get("consumer", "") and await daemon.metric("ings_consumer_stalled", group=group)
        )

    # Longer than INGS_STALL_S in retries: the stall is named on /readyz and on /metrics.
    await wait_for(stalled, 30, "/readyz and ings_consumer_stalled to report the stall")
    chroma_server.start()
    await wait_for(lambda: daemon.added(35), 90, "every record after Chroma came back")

    async def resumed() -> bool:
        return bool(await daemon.metric("ings_consumer_paused") == 0)

    await wait_for(resumed, 10, "consumption to resume")

    async def unstalled() -> bool:
        return bool(await daemon.metric("ings_consumer_stalled", group=group) == 0 and daemon.get("/readyz")[0] == 200)

    await wait_for(unstalled, 30, "the stall to clear")
    client = chromadb.HttpClient(host="127.0.0.1", port=chroma_server.port)
    assert sum(c.count() for c in memory_collections(client)) == 35
    assert daemon.stop() == 0


async def test_metrics_and_probes(kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any, tmp_path: Path) -> None:
    import subprocess

    from prom import require_binary, start_prometheus
    from prom import value as prom_value
    from prom import wait_for as prom_wait_for
    from prom import wait_for_targets_up as prom_wait_for_targets_up

    t = kafka.topics
    daemon = await start_daemon(daemon_env)
    await kafka.produce(t.interaction, interactions(TECHLEAD, 5, "m"))
    await kafka.produce(t.interaction, [b"nope"], key=TECHLEAD)
    await wait_for(lambda: daemon.added(5), 60, "5 records")
    await wait_for(lambda: _dlq_count(daemon, t.interaction), 30, "the dead letter metric")

    async def batch_counted() -> bool:
        # Counted once the whole batch is handled, after its records were stored.
        return bool(await daemon.metric("ings_events_processed_total", topic=t.interaction) == 6)

    await wait_for(batch_counted, 60, "the batch to be counted as processed")
    samples = await daemon.metrics()
    names = {name for name, _ in samples}
    for expected in (
        "ings_events_consumed_total",
        "ings_events_processed_total",
        "ings_consumer_paused",
        "ings_event_processing_seconds_bucket",
        "ings_embedding_seconds_count",
        "ings_chroma_write_seconds_count",
        "ings_consume_batch_size_count",
        "ings_ready",
        "ings_embedding_batch_size_sum",
        "ings_build_info",
    ):
        assert expected in names, expected
    assert samples[("ings_events_processed_total", (("topic", t.interaction),))] == 6
    assert any(n == "ings_consumer_lag" and dict(lbl)["topic"] == t.interaction for n, lbl in samples)
    assert samples[("ings_ready", ())] == 1
    status, body = daemon.get("/healthz")
    assert status == 200 and json.loads(body)["ok"] is True
    status, body = daemon.get("/readyz")
    assert status == 200 and json.loads(body) == {
        "ok": True,
        "alive": True,
        "kafka_group": True,
        "consumer": True,
        "chroma": True,
        "reasons": {},
    }
    text = daemon.get("/metrics")[1]
    check = subprocess.run([require_binary("promtool"), "check", "metrics"], input=text.encode(), capture_output=True)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    # A real Prometheus, with the shipped alert and recording rules, scrapes the daemon.
    require_binary("prometheus")
    target = f"127.0.0.1:{daemon.port}"
    rules = [ROOT / "deploy" / "prometheus" / "rules.yml"]
    with start_prometheus(tmp_path, [target], rule_files=rules) as url:
        prom_wait_for_targets_up(url, [target])
        processed = f'ings_events_processed_total{{topic="{t.interaction}"}}'
        prom_wait_for(url, processed, lambda r: bool(r) and prom_value(r[0]) == 6)
        prom_wait_for(url, "ings_ready", lambda r: bool(r) and prom_value(r[0]) == 1)
    assert daemon.stop() == 0


async def _dlq_count(daemon: Any, topic: str) -> bool:
    return bool(await daemon.metric("ings_events_dead_lettered_total", topic=topic, reason="not_json") == 1)


def test_wrong_setting_fails_at_start_with_one_line(daemon_env: dict[str, str], tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {**daemon_env, "INGS_HTTP_PORT": "not-a-port", "HUGGINGFACE_TOKEN": "hf_secret_value_123"}
    proc = subprocess.run([sys.executable, "-m", "ings_daemon", "run"], env=env, capture_output=True, timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode != 0
    assert re.search(r"invalid configuration: INGS_HTTP_PORT: .*integer", err), err
    assert len(err.strip().splitlines()) == 1
    assert "hf_secret_value_123" not in err + proc.stdout.decode()


async def test_batcher_count_survives_restart_and_max_wait_triggers(
    kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any
) -> None:
    t = kafka.topics
    stream = example_events("interactions/techlead.jsonl")  # distinct: none is a near duplicate
    daemon = await start_daemon(daemon_env)
    await kafka.produce(t.interaction, stream[:6])
    await wait_for(lambda: daemon.added(6), 60, "6 records")
    assert daemon.stop() == 0
    # After a restart the 6 still count: 4 more reach INGS_MIN_EXAMPLES=10.
    other = "did:nings:artificial:llm:quiet:v1:abcdef012345"
    daemon = await start_daemon(daemon_env)
    await kafka.produce(t.interaction, stream[6:10] + [{**e, "persona_id": other} for e in stream[:3]])
    job = (await kafka.read(t.train_job, min_count=1))[0]
    assert job["trigger"] == "auto" and len(job["examples"]["ids"]) == 10 and job["base_model"] == "tiny-llama"
    assert job["lora"]["rank"] == 16 and job["lora"]["alpha"] == 32  # the default plan
    await wait_for(lambda: daemon.added(7), 60, "7 more records")
    assert daemon.stop() == 0

    # The quiet persona's 3 examples, stored before this restart and with no event since,
    # get a job once the oldest has waited INGS_MAX_WAIT_S.
    daemon = await start_daemon({**daemon_env, "INGS_MAX_WAIT_S": "2"})
    jobs = await kafka.read(t.train_job, min_count=2, timeout=60)
    assert [len(j["examples"]["ids"]) for j in jobs if j["persona_id"] == other] == [3]
    assert len(jobs) == 2  # the restarts did not republish the first job
    assert daemon.stop() == 0


async def test_a_shared_memory_collection_is_moved_into_persona_buckets(
    kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any, tmp_path: Path
) -> None:
    import chromadb
    import numpy as np

    other = "did:nings:artificial:llm:other:v1.0:0123456789ab"
    # The layout an earlier version wrote: every persona's memories in one collection.
    client = chromadb.PersistentClient(
        path=str(tmp_path / "chroma"), settings=chromadb.Settings(anonymized_telemetry=False)
    )
    shared = client.create_collection(
        "ings_memory", embedding_function=None, configuration={"hnsw": {"space": "cosine"}}
    )
    owners = [TECHLEAD] * 3 + [other] * 2
    vectors = np.random.default_rng(1).standard_normal((5, 384)).astype(np.float32)
    shared.add(
        ids=[f"old-{i}" for i in range(5)],
        embeddings=(vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).tolist(),
        documents=[f"input: q{i}\noutput: a{i}" for i in range(5)],
        metadatas=[
            {
                "persona_id": p,
                "event_id": f"old-{i}",
                "input": f"q{i}",
                "output": f"a{i}",
                "ingested_ts": 1.0,
                "job_id": "",
            }
            for i, p in enumerate(owners)
        ],
    )
    del shared, client

    t = kafka.topics
    daemon = await start_daemon({**daemon_env, "INGS_BASE_MODEL": ""})
    await kafka.produce(
        t.recall_request, [{"persona_id": TECHLEAD, "query": "q1", "request_id": "after-move", "k": 10}]
    )
    result = (await kafka.read(t.recall_result, min_count=1))[0]
    assert sorted(m["id"] for m in result["results"]) == ["old-0", "old-1", "old-2"]
    assert daemon.stop() == 0

    records = chroma_records(tmp_path / "chroma")
    assert sorted((r["id"], r["persona_id"]) for r in records) == sorted((f"old-{i}", p) for i, p in enumerate(owners))
    client = chromadb.PersistentClient(
        path=str(tmp_path / "chroma"), settings=chromadb.Settings(anonymized_telemetry=False)
    )
    names = {c.name for c in client.list_collections()}
    assert "ings_memory" not in names and {c.name for c in memory_collections(client) if c.count()} == {
        bucket_name("ings_memory", bucket_of(p)) for p in owners
    }
