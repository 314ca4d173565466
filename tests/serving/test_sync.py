"""The serving sync's logic against a real adapter store and resolver folder, with a fake
vLLM backend (the real server is in test_vllm_serving.py): served names, idempotent
loads, versions superseded and retired, refusals reported once, servers down and back."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import FakeRecord
from hypothesis import given
from hypothesis import strategies as st

from ings_daemon.config import Settings
from ings_daemon.contract.erasure import AdapterRetired
from ings_daemon.contract.ids import DID_PATTERN
from ings_daemon.contract.serving import ServedModel, parse_served_name, served_name
from ings_daemon.runtime.decode import Incoming
from ings_daemon.runtime.http import Health
from ings_daemon.runtime.kafka import Publish
from ings_daemon.serving.resolver import ResolverFolder
from ings_daemon.serving.sync import ServingSync, Target
from ings_daemon.serving.vllm import Refused, ServerDown
from ings_daemon.storage.adapters import MANIFEST, AdapterStore, file_checksums
from ings_daemon.storage.erasures import ErasureLedger

DID = "did:nings:artificial:llm:techlead:v2.0:a7f3b9d2c8e1"
OTHER = "did:nings:artificial:llm:mentor:v1.0:b1b2b3b4b5b6"


@given(st.from_regex(DID_PATTERN, fullmatch=True), st.integers(1, 10**9 - 1))
def test_every_version_has_its_own_name_that_parses_back(did: str, version: int) -> None:
    name = served_name(did, version)
    assert parse_served_name(name) == (did, version)
    assert len(name) <= 150 and all(c.isalnum() or c in "_.-" for c in name)


@given(st.text(max_size=300))
def test_any_model_name_parses_to_a_persona_or_none(name: str) -> None:
    parsed = parse_served_name(name)
    assert parsed is None or served_name(*parsed) == name


def publish_version(store: AdapterStore, did: str, base: str = "smollm2", weights: bytes = b"w") -> int:
    tmp = store.new_tmp_dir(did)
    (tmp / "adapter_model.safetensors").write_bytes(weights)
    (tmp / "adapter_config.json").write_text("{}")
    manifest = {"base_model": base, "created_at": datetime.now(UTC).isoformat(), "files": file_checksums(tmp)}
    (tmp / MANIFEST).write_text(json.dumps(manifest))
    return store.publish(did, tmp)


class FakeServer:
    """What a vLLM server holds; `down` and `refuse` make it fail the way one does."""

    def __init__(self) -> None:
        self.loaded: dict[str, Path] = {"someone-elses-adapter": Path("/x")}
        self.loads = 0
        self.down: str | None = None
        self.refuse: dict[str, str] = {}

    async def names(self) -> set[str]:
        if self.down:
            raise ServerDown(self.down)
        return {n for n in self.loaded if parse_served_name(n)}

    async def load(self, name: str, path: Path) -> None:
        if name in self.refuse:
            raise Refused(self.refuse[name])
        self.loads += 1
        self.loaded[name] = path

    async def unload(self, name: str) -> None:
        self.loaded.pop(name, None)


def event(did: str) -> Incoming[Any]:
    retired = AdapterRetired(persona_id=did, version=1, reason="erasure", request_id=None)
    return Incoming(FakeRecord(b"{}"), retired, "e", {})


@pytest.fixture
def parts(tmp_path: Path) -> tuple[ServingSync, FakeServer, AdapterStore, Health]:
    settings = Settings(
        ings_adapter_dir=tmp_path / "adapters",
        ings_serving_resolver_dir=tmp_path / "resolver",
        ings_base_model="smollm2",
        ings_retry_max_s=30,
    )
    health = Health()
    sent: list[Publish] = []

    async def notify(item: Publish) -> None:
        sent.append(item)

    sync = ServingSync(settings, health, notify)
    server = FakeServer()
    sync.targets.insert(0, Target("http://vllm:8000", server))
    return sync, server, sync.store, health


def served(outcome_publish: list[Publish]) -> list[ServedModel]:
    return [p.event for p in outcome_publish if isinstance(p.event, ServedModel)]


async def test_a_version_is_loaded_once_however_often_it_is_announced(parts: Any, tmp_path: Path) -> None:
    sync, server, store, health = parts
    publish_version(store, DID)
    name = served_name(DID, 1)
    for _ in range(3):  # at-least-once: the same announcement after a rebalance
        outcome = await sync.on_change([event(DID)])
    assert server.loads == 1 and name in server.loaded
    assert "someone-elses-adapter" in server.loaded  # names this daemon did not make stay
    assert [e.served_name for e in served(outcome.publish)] == [name]
    assert (tmp_path / "resolver" / name / "adapter_model.safetensors").read_bytes() == b"w"
    mode = (tmp_path / "resolver" / name / "adapter_model.safetensors").stat().st_mode
    assert mode & stat.S_IROTH and health.failures() == {}


async def test_a_new_version_replaces_the_old_and_a_retired_one_goes(parts: Any, tmp_path: Path) -> None:
    sync, server, store, _ = parts
    publish_version(store, DID)
    await sync.on_change([event(DID)])
    publish_version(store, DID, weights=b"v2")
    await sync.on_change([event(DID)])
    assert set(server.loaded) == {"someone-elses-adapter", served_name(DID, 2)}
    assert ResolverFolder(tmp_path / "resolver").names() == {served_name(DID, 2)}
    # v2 retired by an erasure: v1 is current again; both retired: nothing is served.
    ErasureLedger(store).record(DID, "erasure", "r1", [], [2])
    outcome = await sync.on_change([event(DID)])
    assert served_name(DID, 1) in server.loaded and served_name(DID, 2) not in server.loaded
    assert served(outcome.publish)[0].version == 1
    ErasureLedger(store).record(DID, "erasure", "r2", [], [1])
    outcome = await sync.on_change([event(DID)])
    assert set(server.loaded) == {"someone-elses-adapter"} and ResolverFolder(tmp_path / "resolver").names() == set()
    assert served(outcome.publish)[0].served_name is None


async def test_versions_on_another_base_or_with_altered_files_are_not_served(parts: Any) -> None:
    sync, server, store, _ = parts
    publish_version(store, DID, base="tiny-llama")
    publish_version(store, OTHER)
    (store.version_path(OTHER, 1) / "adapter_model.safetensors").write_bytes(b"tampered")
    await sync.on_change([event(DID), event(OTHER)])
    assert set(server.loaded) == {"someone-elses-adapter"}


async def test_a_refusal_is_reported_with_the_servers_reason_and_not_retried(parts: Any) -> None:
    sync, server, store, _ = parts
    publish_version(store, DID)
    server.refuse[served_name(DID, 1)] = "HTTP 500: LoRA rank 32 is greater than max_lora_rank 16."
    outcome = await sync.on_change([event(DID)])
    event_ = served(outcome.publish)[0]
    assert event_.served_name is None and "max_lora_rank" in event_.refused["http://vllm:8000"]
    server.refuse.clear()
    await sync.reconcile(sync.targets[0])
    assert server.loads == 0


async def test_a_server_that_is_down_is_named_retried_later_and_reconciled(parts: Any) -> None:
    sync, server, store, health = parts
    publish_version(store, DID)
    server.down = "http://vllm:8000: ClientConnectorError: Connect call failed"
    await sync.on_change([event(DID)])
    target = sync.targets[0]
    assert "Connect call failed" in health.failures()["serving http://vllm:8000"] and not health.ready()
    assert target.failures == 1 and target.next_try > 0
    await sync.reconcile(target)
    assert target.failures == 2  # the delay doubles
    server.down = None
    server.loaded.clear()  # a restarted server holds nothing
    await sync.reconcile(target)
    assert served_name(DID, 1) in server.loaded and "serving http://vllm:8000" not in health.failures()


def test_the_resolver_folder_only_touches_its_own_names(tmp_path: Path) -> None:
    folder = ResolverFolder(tmp_path)
    (tmp_path / "their-adapter").mkdir()
    source = tmp_path / "src"
    source.mkdir()
    (source / "adapter_config.json").write_text("{}")
    (source / "adapter_config.json").chmod(0o600)
    name = served_name(DID, 3)
    folder.place(name, source)
    folder.place(name, source)
    assert folder.names() == {name} and (tmp_path / name / "adapter_config.json").stat().st_mode & 0o777 == 0o644
    with pytest.raises(ValueError):
        folder.remove("their-adapter")
    folder.remove(name)
    assert folder.names() == set() and (tmp_path / "their-adapter").is_dir()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_with_serving_on_only_adapters_vllm_loads_are_trained(tmp_path: Path) -> None:
    from ings_daemon.basemodels import serving_refusal
    from ings_daemon.contract.events import LoraSpec

    off = Settings(ings_adapter_dir=tmp_path)
    on = Settings(ings_adapter_dir=tmp_path, ings_vllm_urls=["http://vllm:8000/"])
    assert on.ings_vllm_urls == ["http://vllm:8000"] and on.serving_max_lora_rank() == 16
    assert serving_refusal(LoraSpec(rank=12), off) is None  # no serving here: anything goes
    assert serving_refusal(LoraSpec(), on) is None  # the default plan is servable
    assert "1, 8, 16" in (serving_refusal(LoraSpec(rank=12), on) or "")
    assert "INGS_SERVING_MAX_LORA_RANK" in (serving_refusal(LoraSpec(rank=32), on) or "")
    wide = Settings(ings_adapter_dir=tmp_path, ings_serving_max_lora_rank=64)
    assert serving_refusal(LoraSpec(rank=32), wide) is None
    assert "lm_head" in (serving_refusal(LoraSpec(target_modules=["q_proj", "lm_head"]), on) or "")


@pytest.mark.parametrize(
    ("setting", "value"),
    [("ings_serving_max_lora_rank", 12), ("ings_vllm_urls", ["vllm:8000"]), ("ings_vllm_urls", ["http://a b"])],
)
def test_serving_settings_a_server_would_not_take_are_refused_at_start(setting: str, value: Any) -> None:
    with pytest.raises(ValueError, match=setting):
        Settings(**{setting: value})


async def test_an_answer_nobody_foresaw_marks_the_target_down_and_the_sync_goes_on(parts: Any) -> None:
    sync, server, store, health = parts
    publish_version(store, DID)

    async def broken() -> set[str]:
        raise KeyError("data")  # a server answering a shape this daemon does not know

    server.names = broken
    await sync.on_change([event(DID)])
    assert "reconcile failed" in health.failures()["serving http://vllm:8000"]
    # The other target is not held up.
    assert ResolverFolder(sync.settings.ings_serving_resolver_dir).names() == {served_name(DID, 1)}
