"""INGS_REDACT_PII through the real daemon: what is stored, embedded and trained on holds
placeholders, near misses survive, the counts are on /metrics, nothing reaches the log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TECHLEAD, Kafka, chroma_records, example_events

from ings_daemon.storage.embedder import Embedder

pytestmark = pytest.mark.integration
AWS_KEY = "AKIA" + "IOSFODNN7EXAMPLE"  # split: a secret scanner would flag the whole string
# (kind, text sent, text stored): each identifier kind, in an interaction's input.
CASES = [
    ("email", "Write to jane.doe@example.com today", "Write to [EMAIL] today"),
    ("phone", "Call +44 20 7946 0958 now", "Call [PHONE] now"),
    ("card", "Card 4111 1111 1111 1111 on file", "Card [CARD] on file"),
    ("iban", "Pay GB82 WEST 1234 5698 7654 32 please", "Pay [IBAN] please"),
    ("ip", "Server 192.168.0.1 is down", "Server [IP] is down"),
    ("secret", f"Key {AWS_KEY} leaked", "Key [SECRET] leaked"),
]
TOPICS = ["billing", "the VPN", "laptops", "payroll", "the wiki", "badges", "printers", "the CI runners"]
# Look alike, are not: kept as they are (a number failing Luhn, a wrong IBAN check, versions, dates).
NEAR_MISSES = [
    "Order 4111 1111 1111 1112 shipped",
    "Wrong GB83 WEST 1234 5698 7654 32 check",
    "Version 1.2.3 is out on 2026-11-30",
    "Ping 999.1.1.1 fails",
]


async def test_identifiers_are_replaced_before_anything_is_stored_embedded_or_trained(
    kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any, tmp_path: Path
) -> None:
    t = kafka.topics
    env = {
        **daemon_env,
        "INGS_ROLE": "all",
        "INGS_REDACT_PII": "true",
        "INGS_MIN_EXAMPLES": "4",
        "INGS_GATE_MIN_EXAMPLES": "1000",
    }
    await kafka.produce(t.handshake, example_events("personas/techlead_ings.json"))
    sent = [(text, stored) for _, text, stored in CASES] + [(text, text) for text in NEAR_MISSES]
    interactions = [
        {
            "event_id": f"pii-{n}",
            "persona_id": TECHLEAD,
            "input": text,
            "output": f"Noted ({n}); mail ops@example.org if it recurs.",
            "metadata": {"reporter": {"contact": "+1 415 555 2671"}, "n": n},
        }
        for n, (text, _) in enumerate(sent)
    ]
    await kafka.produce(t.interaction, interactions)
    tune = {
        "request_id": "pii-tune",
        "persona_id": TECHLEAD,
        "training_data": [
            {"input": f"Who handles {topic} from 10.0.0.{n}?", "output": f"Ask {n}@team.example.com"}
            for n, topic in enumerate(TOPICS)
        ],
    }
    await kafka.produce(t.tune_request, [tune])
    daemon = await start_daemon(env)  # after the events: one fetch, one auto job
    ready = {r["trigger"]: r for r in await kafka.read(t.adapter_ready, min_count=2, timeout=240)}
    assert set(ready) == {"auto", "pii-tune"}
    counts = {kind: await daemon.metric("ings_pii_redactions_total", kind=kind) for kind, _, _ in CASES}
    log = daemon.log()
    assert daemon.stop() == 0

    # Stored: text, document (what was embedded) and metadata hold placeholders only.
    stored = {r["event_id"]: r for r in chroma_records(tmp_path / "chroma")}
    for n, (_, expected) in enumerate(sent):
        record = stored[f"pii-{n}"]
        assert record["input"] == expected
        assert record["output"] == f"Noted ({n}); mail [EMAIL] if it recurs."
        assert record["document"] == f"input: {expected}\noutput: {record['output']}"
        assert record["meta.reporter.contact"] == "[PHONE]" and "555" not in record["metadata_json"]
    # Embedded: each vector is the redacted document's.
    embedder = Embedder(None, 64, "float32")
    documents = [stored[f"pii-{n}"]["document"] for n in range(len(sent))]
    ours = np.array(await embedder.embed(documents))
    theirs = np.array(_vectors(tmp_path / "chroma", [stored[f"pii-{n}"]["id"] for n in range(len(sent))]))
    assert np.allclose((ours * theirs).sum(axis=1), 1.0, atol=1e-3)
    # Trained on: the tune request's examples as kept for its claim check.
    examples = chroma_records(tmp_path / "chroma", "ings_memory_examples")
    assert len(examples) == len(TOPICS)
    assert all(e["input"].endswith("from [IP]?") and e["output"] == "Ask [EMAIL]" for e in examples)

    # Counted per kind (the outputs' and the tune's e-mails, the metadata's phones, ...).
    tuned = len(TOPICS)
    assert counts == {
        "email": 1 + len(sent) + tuned,
        "phone": 1 + len(sent),
        "card": 1,
        "iban": 1,
        "ip": 1 + tuned,
        "secret": 1,
    }
    for original in ("jane.doe@example.com", "7946 0958", "4111 1111 1111 1111", "WEST 1234", AWS_KEY, "415 555"):
        assert original not in log


def _vectors(path: Path, ids: list[str]) -> list[list[float]]:
    import chromadb
    from conftest import memory_collections

    client = chromadb.PersistentClient(path=str(path), settings=chromadb.Settings(anonymized_telemetry=False))
    found: dict[str, list[float]] = {}
    for collection in memory_collections(client):
        got = collection.get(ids=ids, include=["embeddings"])
        found.update({i: list(map(float, v)) for i, v in zip(got["ids"], got["embeddings"], strict=True)})
    return [found[i] for i in ids]
