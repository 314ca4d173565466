"""The serving sync: vLLM servers and a resolver folder hold exactly each persona's current
adapter version.

The adapter store (INGS_ADAPTER_DIR, shared with the trainer) is the truth: a persona's
current version is its newest one that is not retired by an erasure, on the base model the
servers serve (INGS_BASE_MODEL), whose files match its manifest. `ings.adapter-ready` and
`ings.adapter-retired` only say which persona to look at again, so a repeated or replayed
event changes nothing, and an event never chooses a path (its `adapter_path` is not read).

Each target is kept in step by a reconcile: list what it holds (`/v1/models`, the folder),
load what is missing, unload what is no longer current. An event reconciles its personas at
once; `run()` reconciles every target every RECONCILE_EVERY_S, which is what repairs a
restarted server. A target that does not answer is retried with doubling delays up to
INGS_RETRY_MAX_S and named on /readyz; a version a target refuses is reported with the
target's reason (on `ings.served-model`) and not tried there again by this process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from ..config import Settings
from ..contract.erasure import AdapterRetired
from ..contract.events import AdapterReady
from ..contract.serving import ServedModel, parse_served_name, served_name
from ..runtime import logs, metrics
from ..runtime.decode import Incoming
from ..runtime.http import Health
from ..runtime.kafka import Publish
from ..runtime.router import Outcome, Route
from ..storage.adapters import AdapterStore, StoreError
from ..storage.erasures import ErasureLedger
from .resolver import ResolverFolder
from .vllm import Refused, ServerDown, VllmServer

RECONCILE_EVERY_S = 5.0
Notify = Callable[[Publish], Awaitable[None]]


@dataclass(frozen=True)
class Servable:
    """A persona's current adapter version and where the daemon keeps it."""

    persona_id: str
    version: int
    name: str
    path: Path
    base_model: str
    created_at: float | None  # Unix time the version was made, from its manifest


def current_version(
    store: AdapterStore, ledger: ErasureLedger, persona_id: str, base_model: str, *, verify: bool = True
) -> Servable | None:
    """The persona's newest unretired version on `base_model` (any base when empty) whose
    files match its manifest (checked only with `verify`: it reads every file); None when it
    has none. Blocking (reads the store)."""
    retired = ledger.retired(persona_id)
    for version in reversed(store.versions(persona_id)):
        if version in retired:
            continue
        try:
            manifest = store.manifest(persona_id, version)
        except (OSError, ValueError, StoreError):
            continue
        base = str(manifest.get("base_model", ""))
        if (base_model and base != base_model) or (verify and not store.verify(persona_id, version)):
            continue
        try:
            created = datetime.fromisoformat(str(manifest.get("created_at"))).timestamp()
        except ValueError:
            created = None
        path = store.version_path(persona_id, version)
        return Servable(persona_id, version, served_name(persona_id, version), path, base, created)
    return None


def _persona_of(name: str) -> str:
    parsed = parse_served_name(name)
    return parsed[0] if parsed else ""


class Backend(Protocol):
    async def names(self) -> set[str]: ...
    async def load(self, name: str, path: Path) -> None: ...
    async def unload(self, name: str) -> None: ...


class VllmBackend:
    """A vLLM server; adapter paths are rewritten from INGS_ADAPTER_DIR to the server's mount."""

    def __init__(self, server: VllmServer, adapter_dir: Path, server_root: Path | None) -> None:
        self.server, self.adapter_dir, self.server_root = server, adapter_dir.resolve(), server_root

    async def names(self) -> set[str]:
        return {m["id"] for m in await self.server.models() if parse_served_name(m["id"]) is not None}

    async def load(self, name: str, path: Path) -> None:
        seen = self.server_root / path.relative_to(self.adapter_dir) if self.server_root else path
        await self.server.load(name, str(seen))

    async def unload(self, name: str) -> None:
        await self.server.unload(name)


class ResolverBackend:
    """The resolver folder; file work runs in a thread. OSError counts as the target down."""

    def __init__(self, folder: ResolverFolder) -> None:
        self.folder = folder

    async def names(self) -> set[str]:
        names: set[str] = await self._io(self.folder.names)
        return names

    async def load(self, name: str, path: Path) -> None:
        await self._io(lambda: self.folder.place(name, path))

    async def unload(self, name: str) -> None:
        await self._io(lambda: self.folder.remove(name))

    async def _io(self, fn: Callable[[], Any]) -> Any:
        try:
            return await asyncio.to_thread(fn)
        except OSError as exc:
            raise ServerDown(f"resolver folder {self.folder.root}: {exc}") from exc


@dataclass
class Target:
    """One serving target, its health, backoff and the names it refused."""

    name: str
    backend: Backend
    problem: str | None = None
    failures: int = 0
    next_try: float = 0.0
    refused: dict[str, str] = field(default_factory=dict)


class ServingSync:
    """The serving role: `routes()` for the consumer loop, `run()` as a background task."""

    def __init__(self, settings: Settings, health: Health, notify: Notify) -> None:
        self.settings, self.health, self.notify = settings, health, notify
        self.store = AdapterStore(settings.ings_adapter_dir)
        self.ledger = ErasureLedger(self.store)
        self.servers = [VllmServer(url, settings.ings_vllm_api_key) for url in settings.ings_vllm_urls]
        root = settings.ings_serving_adapter_root
        self.targets = [Target(s.url, VllmBackend(s, settings.ings_adapter_dir, root)) for s in self.servers]
        if settings.ings_serving_resolver_dir is not None:
            folder = ResolverFolder(settings.ings_serving_resolver_dir)
            self.targets.append(Target("resolver", ResolverBackend(folder)))
        self.desired: dict[str, Servable] = {}  # persona id -> current version
        self.lock = asyncio.Lock()  # one reconcile of a target at a time
        for target in self.targets:
            self.health.set_check(f"serving {target.name}", "not reconciled yet")

    def routes(self) -> dict[str, Route[Any]]:
        topics = self.settings.topics
        return {
            topics.adapter_ready: Route(AdapterReady, self.on_change),
            topics.adapter_retired: Route(AdapterRetired, self.on_change),
        }

    async def close(self) -> None:
        for server in self.servers:
            await server.close()

    async def _current(self, persona_id: str) -> Servable | None:
        base = self.settings.ings_base_model
        return await asyncio.to_thread(current_version, self.store, self.ledger, persona_id, base)

    async def on_change(self, items: list[Incoming[AdapterReady]] | list[Incoming[AdapterRetired]]) -> Outcome:
        """Look at the events' personas again, bring every answering target in step, and
        publish each persona's served model (after the loads, so the name is servable)."""
        personas = sorted({item.event.persona_id for item in items})
        for persona_id in personas:
            self._set_desired(persona_id, await self._current(persona_id))
        for target in self.targets:
            if target.problem is None or time.monotonic() >= target.next_try:
                await self.reconcile(target, only=set(personas))
        return Outcome(publish=[self.served_model(p) for p in personas])

    def _set_desired(self, persona_id: str, servable: Servable | None) -> None:
        if servable is None:
            self.desired.pop(persona_id, None)
        else:
            self.desired[persona_id] = servable

    def served_model(self, persona_id: str) -> Publish:
        """The persona's `ings.served-model` event, with any target's refusal of it."""
        current = self.desired.get(persona_id)
        refused = {t.name: t.refused[current.name] for t in self.targets if current and current.name in t.refused}
        event = ServedModel(
            persona_id=persona_id,
            served_name=current.name if current and not refused else None,
            version=current.version if current else None,
            base_model=current.base_model if current else None,
            refused=refused,
        )
        return Publish(self.settings.topics.served_model, persona_id, event)

    async def run(self) -> None:
        """Read every persona's current version from the store, then reconcile each target
        every RECONCILE_EVERY_S (a target that is down: when its backoff has passed)."""
        for persona_id in await asyncio.to_thread(self.store.personas):
            try:
                self._set_desired(persona_id, await self._current(persona_id))
            except Exception as exc:  # one persona's unreadable ledger must not stop the rest
                logs.event("serving_persona_unreadable", logging.ERROR, persona_id=persona_id, error=logs.describe(exc))
        logs.event("serving_started", targets=[t.name for t in self.targets], personas=len(self.desired))
        while True:
            for target in self.targets:
                if time.monotonic() >= target.next_try:
                    await self.reconcile(target)
            await asyncio.sleep(RECONCILE_EVERY_S)

    async def reconcile(self, target: Target, only: set[str] | None = None) -> None:
        """Load what `target` lacks and unload what is not current (only `only`'s personas
        when given). A target that does not answer is marked down and left for later."""
        async with self.lock:
            try:
                await self._reconcile(target, only)
            except ServerDown as exc:
                self._down(target, str(exc))
                return
            except Exception as exc:  # a bug or an answer nobody foresaw: shown, retried later
                logs.event("serving_reconcile_failed", logging.ERROR, target=target.name, exc=exc)
                self._down(target, f"{target.name}: reconcile failed: {logs.describe(exc)}")
                return
        if target.problem is not None:
            logs.event("serving_target_back", target=target.name)
        target.problem, target.failures, target.next_try = None, 0, 0.0
        self.health.set_check(f"serving {target.name}", None)
        metrics.SERVING_UP.labels(target=target.name).set(1)

    async def _reconcile(self, target: Target, only: set[str] | None) -> None:
        def mine(persona_id: str) -> bool:
            return only is None or persona_id in only

        have = {n for n in await target.backend.names() if mine(_persona_of(n))}
        want = {s.name: s for s in self.desired.values() if mine(s.persona_id)}
        for name, servable in want.items():
            if name not in have and name not in target.refused:
                await self._load(target, servable)
        for name in have - want.keys():
            try:
                await target.backend.unload(name)
            except Refused as exc:  # left loaded; tried again at the next reconcile
                metrics.SERVING_OPERATIONS.labels(target=target.name, operation="unload", result="refused").inc()
                logs.event(
                    "adapter_unload_refused", logging.WARNING, target=target.name, served_name=name, reason=str(exc)
                )
                continue
            metrics.SERVING_OPERATIONS.labels(target=target.name, operation="unload", result="ok").inc()
            logs.event("adapter_unloaded", target=target.name, served_name=name)
        if only is None:
            loaded = len(want.keys() - target.refused.keys())
            metrics.SERVING_ADAPTERS.labels(target=target.name).set(loaded)

    async def _load(self, target: Target, servable: Servable) -> None:
        try:
            await target.backend.load(servable.name, servable.path)
        except Refused as exc:
            target.refused[servable.name] = str(exc)
            metrics.SERVING_OPERATIONS.labels(target=target.name, operation="load", result="refused").inc()
            logs.event(
                "adapter_refused", logging.WARNING, target=target.name, served_name=servable.name, reason=str(exc)
            )
            await self.notify(self.served_model(servable.persona_id))
            return
        metrics.SERVING_OPERATIONS.labels(target=target.name, operation="load", result="ok").inc()
        if servable.created_at is not None:
            metrics.SERVABLE_SECONDS.observe(max(0.0, time.time() - servable.created_at))
        logs.event("adapter_loaded", target=target.name, served_name=servable.name, persona_id=servable.persona_id)

    def _down(self, target: Target, reason: str) -> None:
        # Doubling delays, capped: a server that is away for long is asked about every
        # INGS_RETRY_MAX_S, not every RECONCILE_EVERY_S.
        target.failures += 1
        delay = min(self.settings.ings_retry_max_s, RECONCILE_EVERY_S * 2 ** (target.failures - 1))
        target.next_try = time.monotonic() + delay
        if target.problem is None:
            logs.event("serving_target_down", logging.WARNING, target=target.name, reason=reason, retry_in_s=delay)
        target.problem = reason
        self.health.set_check(f"serving {target.name}", reason)
        metrics.SERVING_UP.labels(target=target.name).set(0)
        metrics.SERVING_OPERATIONS.labels(target=target.name, operation="reconcile", result="down").inc()
