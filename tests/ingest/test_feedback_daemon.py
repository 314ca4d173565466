"""Feedback through the whole daemon (Tansu, embedded Chroma, the worker process, a tiny
model for the plumbing): applied or waiting, answered, replay-safe, erased with its
exchange, shaping recall, and triggering a job whose run adds a preference phase."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import TECHLEAD, DaemonProcess, Kafka, wait_for

from ings_daemon.contract.ids import interaction_id

pytestmark = pytest.mark.integration
OTHER = "did:nings:artificial:llm:mentor:v1.0:0b02d4ddc497"


def exchange(i: int, tag: str = "m") -> dict[str, Any]:
    return {
        "event_id": f"{tag}-{i}",
        "persona_id": TECHLEAD,
        "input": f"{tag} question {i}: how should we roll out release {i} of the billing service?",
        "output": f"{tag} answer {i}: behind a flag, to one region first, watching error rates.",
    }


def feedback(event: str, rating: Any, n: int, **extra: Any) -> dict[str, Any]:
    return {
        "persona_id": TECHLEAD,
        "interaction_event_id": event,
        "rating": rating,
        "event_id": f"fb-{n}",
        "request_id": f"rq-{n}",
        **extra,
    }


def post(port: int, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.timeout(600)
async def test_feedback_is_applied_answered_erased_and_trains_preferences(
    kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any, tmp_path: Path
) -> None:
    t = kafka.topics
    env = {
        **daemon_env,
        "INGS_ROLE": "all",
        "INGS_HTTP_INGRESS": "true",
        "INGS_MIN_EXAMPLES": "1000",  # only feedback makes a job here
        "INGS_PREFERENCE_MIN_LABELS": "8",
        "INGS_FEEDBACK_WAIT_S": "3",
        "INGS_GATE_MIN_PREFERENCE": "0",  # a tiny random model: plumbing, not learning
    }
    daemon: DaemonProcess = await start_daemon(env)
    await kafka.produce(t.interaction, [exchange(i) for i in range(12)])
    await wait_for(lambda: daemon.added(12), 60, "12 exchanges stored")

    # Feedback before its exchange waits for it; feedback on one that never comes is refused.
    await kafka.produce(t.feedback, [feedback("late-0", "up", 0), feedback("never", "down", 1)])
    # Another persona naming this one's memory by id: never applied to it, refused in the end.
    hijack = {
        "persona_id": OTHER,
        "memory_id": interaction_id(TECHLEAD, "late-0"),
        "rating": "down",
        "event_id": "fb-h",
    }
    await kafka.produce(t.feedback, [{**hijack, "correction": "hijacked"}])
    await wait_for(lambda: daemon.metric_is("ings_feedback_waiting", 3), 60, "three feedback events waiting")
    await kafka.produce(t.interaction, [exchange(0, "late")])
    # Hostile: no exchange named, and a path for a memory id.
    await kafka.produce(t.feedback, [{"persona_id": TECHLEAD, "rating": "up"}], key=TECHLEAD)
    await kafka.produce(t.feedback, [feedback("x", "up", 99, memory_id="../../x")])
    n = 2
    labels = []
    for i in range(4):
        labels.append(feedback(f"m-{i}", "down", n := n + 1))
        labels.append(feedback(f"m-{i + 4}", 5, n := n + 1))
    labels.append(feedback("m-8", "down", n := n + 1, correction="Behind a flag, one region first."))
    labels.append(feedback("m-9", 3, n := n + 1))  # neutral: no label
    await kafka.produce(t.feedback, labels + labels[:2])  # the first two replayed

    async def answered() -> dict[str, dict[str, Any]]:
        by_event = {r["event_id"]: r for r in await kafka.read(t.feedback_result)}
        return by_event if {"fb-1", "fb-h", f"fb-{n}"} <= set(by_event) else {}

    # Refused once INGS_FEEDBACK_WAIT_S passed, at a periodic check.
    by_event = await wait_for(answered, 120, "every feedback answered")
    assert by_event["fb-0"]["status"] == "applied" and by_event["fb-0"]["request_id"] == "rq-0"
    assert by_event["fb-1"]["status"] == "rejected" and "INGS_FEEDBACK_WAIT_S" in by_event["fb-1"]["reason"]
    assert by_event["fb-1"]["memory_id"] == interaction_id(TECHLEAD, "never")
    assert by_event["fb-h"]["status"] == "rejected" and by_event["fb-h"]["persona_id"] == OTHER
    assert {by_event[f"fb-{k}"]["status"] for k in range(3, n + 1)} == {"applied"}
    assert by_event["fb-12"]["label"] == "neutral" and by_event["fb-4"]["label"] == "up"

    async def dead_lettered() -> bool:
        return bool(
            await daemon.metric("ings_events_dead_lettered_total", topic=t.feedback, reason="invalid_event") == 2
        )

    await wait_for(dead_lettered, 60, "two invalid feedback events dead-lettered")

    # 4 down + 4 up + 1 correction + the late one = 10 labels: one job, with a preference phase.
    job = (await kafka.read(t.train_job, min_count=1, timeout=120))[0]
    assert len(job["preference"]["ids"]) == 10
    assert interaction_id(TECHLEAD, "m-9") not in job["preference"]["ids"]
    ready = (await kafka.read(t.adapter_ready, min_count=1, timeout=300))[0]
    run = ready["metrics"]
    assert run["objective"] == "kto" and run["preference_gate"] == "passed"
    assert run["preference_labels"] + run["preference_eval_labels"] == 10 and run["preference_eval_labels"] == 2
    manifest = json.loads((Path(ready["adapter_path"]) / "manifest.json").read_text())
    assert manifest["training"]["preference"]["objective"] == "kto" and manifest["training"]["preference"]["steps"] > 0
    # The down-voted answers left the supervised set, and the held-out labels the whole run.
    ids = manifest["examples"]
    supervised = {*ids["supervised"], *ids["eval"]}
    assert not supervised & _down(4)
    assert len(supervised) == 13 - 4 - len(set(ids["preference_eval"]) - _down(4))
    # What the phase trained on counts as trained (an erasure of it retires the version).
    assert set(ids["preference"]) | set(ids["preference_eval"]) == set(job["preference"]["ids"])
    assert set(ids["train"]) == set(ids["supervised"]) | set(ids["preference"])
    done = [s for s in await kafka.read(t.tune_status) if s["status"] == "succeeded"]
    assert done[0]["objective"] == "kto"
    assert await daemon.metric("ings_preference_runs_total", objective="kto", gate="passed") == 1
    assert await daemon.metric("ings_feedback_total", label="up", outcome="applied") == 5 + 1  # a replay too
    assert await daemon.metric("ings_preference_labels_waiting") == 0

    # Recall shows the feedback and the corrected answer (the ranking: test_preference.py).
    await kafka.produce(
        t.recall_request,
        [
            {
                "persona_id": TECHLEAD,
                "query": "m question 8: how should we roll out release 8",
                "k": 13,
                "request_id": "r",
            }
        ],
    )
    recalled = (await kafka.read(t.recall_result, min_count=1))[0]["results"]
    rated = {r["id"]: r for r in recalled}[interaction_id(TECHLEAD, "m-8")]
    assert rated["feedback"] == "down" and rated["correction"] == "Behind a flag, one region first."
    assert [r["score"] for r in recalled] == sorted((r["score"] for r in recalled), reverse=True)
    late = {r["id"]: r for r in recalled}[interaction_id(TECHLEAD, "late-0")]
    assert late["feedback"] == "up" and late["correction"] is None  # its own feedback, not the other's

    # POST /feedback goes through Kafka like the rest; a bad body is 400 with the reason.
    status, answer = await asyncio.to_thread(
        post, daemon.port, "/feedback", json.dumps(feedback("m-10", "up", 50)).encode()
    )
    assert status == 202 and answer["memory_id"] == interaction_id(TECHLEAD, "m-10")
    assert answer["see"] == t.feedback_result
    status, answer = await asyncio.to_thread(post, daemon.port, "/feedback", b'{"persona_id": "x", "rating": 9}')
    assert status == 400

    # Erasure reaches feedback: waiting feedback of a forgotten exchange goes, and a
    # forgotten exchange takes its feedback with it.
    await kafka.produce(t.feedback, [feedback("gone-0", "down", 60, correction="secret correction")])
    await wait_for(lambda: daemon.metric_is("ings_feedback_waiting", 1), 60, "the feedback waiting")
    forget = {"request_id": "f1", "persona_id": TECHLEAD, "scope": "events", "event_ids": ["gone-0", "m-8"]}
    await kafka.produce(t.forget, [forget])
    erased = (await kafka.read(t.forget_result, min_count=1))[0]
    # m-8 (corrected) trained v1 unless the split held it out of the whole run.
    assert erased["adapters_retired"] == ([1] if interaction_id(TECHLEAD, "m-8") in ids["train"] else [])
    await wait_for(lambda: daemon.metric_is("ings_feedback_waiting", 0), 60, "the waiting feedback erased")
    assert "secret correction" not in _chroma_text(tmp_path / "chroma")
    assert "Behind a flag, one region first." not in _chroma_text(tmp_path / "chroma")
    assert daemon.stop() == 0


def _down(n: int) -> set[str]:
    return {interaction_id(TECHLEAD, f"m-{i}") for i in range(n)}


def _chroma_text(path: Path) -> str:
    """Every document and metadata string the embedded store still holds."""
    import chromadb

    client = chromadb.PersistentClient(path=str(path))
    out = []
    for c in client.list_collections():
        got = c.get(include=["documents", "metadatas"])
        out += [d or "" for d in got["documents"] or []] + [json.dumps(m) for m in got["metadatas"] or []]
    return "\n".join(out)
