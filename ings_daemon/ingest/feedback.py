"""The feedback route: a rating or correction of one remembered exchange.

Feedback is applied to the exchange's memory record (`storage.feedback.patch`) and
answered `applied` on ings.feedback-result. Feedback on an exchange not stored yet (an
interaction still on its way, a chat exchange not produced yet) waits in the shared
`feedback` collection until its exchange is stored (`on_stored`), up to
INGS_FEEDBACK_WAIT_S and INGS_FEEDBACK_MAX_WAITING; then it is answered `rejected` with the
reason. Labels are counted by the batcher, which adds a preference phase to the persona's
jobs (docs/training.md, "Feedback and preference runs").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal

from ..config import Settings
from ..contract.feedback import Feedback, FeedbackResult
from ..runtime import logs, metrics
from ..runtime.decode import Incoming
from ..runtime.kafka import Ownership, Publish
from ..runtime.router import Outcome
from ..storage import feedback as stored
from ..storage.chroma import Collections, Metadata, Record, memory_of, scoped
from . import privacy
from .batcher import Batcher

# Waiting feedback read per check, at most.
EXPIRE_PAGE = 1_000


class FeedbackRoute:
    def __init__(self, settings: Settings, collections: Collections, batcher: Batcher, ownership: Ownership) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.collections = collections
        self.batcher = batcher
        self.ownership = ownership
        self.waiting: int | None = None  # feedback waiting for its exchange, counted once

    async def handle(self, items: list[Incoming[Feedback]]) -> Outcome:
        """Apply each feedback to its exchange, or keep it waiting."""
        if self.settings.ings_redact_pii:
            items = await privacy.redacted(items, privacy.feedback)
        by_persona: dict[str, set[str]] = {}
        for item in items:
            by_persona.setdefault(item.event.persona_id, set()).add(item.event.target)
        # Read per persona, narrowed to its records: a memory_id is anyone's to name, and
        # only the persona's own exchange may take its feedback.
        found: dict[tuple[str, str], Metadata] = {}
        for persona, ids in sorted(by_persona.items()):
            for r in await self.collections.get(memory_of(persona), ids=sorted(ids)):
                found[(persona, r.id)] = r.metadata
        ready = [(i.event, i.event_id) for i in items if (i.event.persona_id, i.event.target) in found]
        outcome = await self._apply(ready, found)
        for item in items:
            if (item.event.persona_id, item.event.target) not in found:
                outcome.extend(await self._wait(item.event, item.event_id))
        return outcome

    async def on_stored(self, records: Sequence[Record]) -> Outcome:
        """Apply the waiting feedback on exchanges just stored (`records`), oldest first."""
        if not records or not await self._count():
            return Outcome()
        got = await self.collections.call(
            stored.WAITING,
            "get",
            where={"memory_id": {"$in": [r.id for r in records]}},
            include=["documents", "metadatas"],
        )
        stored_now = {(str(r.metadata["persona_id"]), r.id): r.metadata for r in records}
        # Only feedback of the exchange's own persona (a memory_id is anyone's to name); the
        # rest waits on, and is refused when its wait ends.
        rows = sorted(
            (
                (rid, doc, meta)
                for rid, doc, meta in zip(got["ids"], got["documents"], got["metadatas"], strict=True)
                if (str(meta["persona_id"]), str(meta["memory_id"])) in stored_now
            ),
            key=lambda row: float(row[2]["at"]),
        )
        if not rows:
            return Outcome()
        outcome = await self._apply(
            [(Feedback.model_validate_json(doc), str(meta["event_id"])) for _, doc, meta in rows], stored_now
        )
        outcome.then.append(self._forget_waiting([rid for rid, _, _ in rows]))
        return outcome

    def _forget_waiting(self, ids: list[str]) -> Callable[[], Awaitable[None]]:
        """Deletes waiting feedback once its outcome is published."""

        async def forget() -> None:
            await self.collections.delete(stored.WAITING, ids)
            self.waiting = max(0, (self.waiting or 0) - len(ids))
            metrics.FEEDBACK_WAITING.set(self.waiting)

        return forget

    async def _apply(self, ready: list[tuple[Feedback, str]], current: dict[tuple[str, str], Metadata]) -> Outcome:
        """Put `ready` feedback on its exchanges (`current`: their stored metadata by
        (persona, id), each the persona's own)."""
        outcome = Outcome()
        by_persona: dict[str, dict[str, Metadata]] = {}
        for fb, event_id in ready:
            # Later feedback in the batch wins: the topic is keyed by persona, so it is later.
            by_persona.setdefault(fb.persona_id, {})[fb.target] = stored.patch(fb, event_id)
        for persona, patches in sorted(by_persona.items()):
            # A replay of feedback already applied changes nothing (it would mark its label
            # as waiting for a preference job again).
            fresh = {i: p for i, p in patches.items() if current[(persona, i)].get(stored.EVENT) != p[stored.EVENT]}
            if not fresh:
                continue
            await self.collections.call(memory_of(persona), "update", ids=list(fresh), metadatas=list(fresh.values()))
            labelled = [i for i, p in fresh.items() if p[stored.LABELLED]]
            unlabelled = [i for i, p in fresh.items() if not p[stored.LABELLED]]
            outcome.extend(await self.batcher.labels_changed(persona, labelled, unlabelled))
        for fb, event_id in ready:
            metrics.FEEDBACK.labels(label=fb.label, outcome="applied").inc()
            logs.event("feedback_applied", persona_id=fb.persona_id, memory_id=fb.target, label=fb.label)
            outcome.publish.append(self._result(fb, event_id, "applied"))
        return outcome

    async def _wait(self, fb: Feedback, event_id: str) -> Outcome:
        record = stored.waiting_record(fb, event_id, time.time())
        if await self.collections.existing_ids(stored.WAITING, [record.id]):
            return Outcome()  # a replay: it already waits
        limit = self.settings.ings_feedback_max_waiting
        if await self._count() >= limit:
            reason = f"its exchange is not stored and {limit} feedback events already wait (INGS_FEEDBACK_MAX_WAITING)"
            return self._rejected(fb, event_id, reason)
        await self.collections.add(stored.WAITING, [record])
        self.waiting = (self.waiting or 0) + 1
        metrics.FEEDBACK_WAITING.set(self.waiting)
        metrics.FEEDBACK.labels(label=fb.label, outcome="waiting").inc()
        logs.event("feedback_waiting", persona_id=fb.persona_id, memory_id=fb.target)
        return Outcome()

    async def expire(self) -> Outcome:
        """Answer `rejected` to waiting feedback of owned personas older than INGS_FEEDBACK_WAIT_S."""
        if not await self._count():
            return Outcome()
        cutoff = time.time() - self.settings.ings_feedback_wait_s
        got = await self.collections.call(
            stored.WAITING, "get", where={"at": {"$lt": cutoff}}, limit=EXPIRE_PAGE, include=["documents", "metadatas"]
        )
        outcome = Outcome()
        done = []
        for rid, doc, meta in zip(got["ids"], got["documents"], got["metadatas"], strict=True):
            if not self.ownership.owns(str(meta["persona_id"])):
                continue
            fb = Feedback.model_validate_json(doc)
            wait = self.settings.ings_feedback_wait_s
            reason = f"no exchange {fb.target} of this persona was stored within {wait:g} s (INGS_FEEDBACK_WAIT_S)"
            outcome.extend(self._rejected(fb, str(meta["event_id"]), reason))
            done.append(rid)

        if done:
            outcome.then.append(self._forget_waiting(done))
        return outcome

    async def erase(self, persona: str, memory_ids: list[str] | None) -> None:
        """Drop waiting feedback of an erased persona (`memory_ids` None) or exchanges."""
        if memory_ids == [] or not await self._count():
            return
        named = None if memory_ids is None else {"memory_id": {"$in": memory_ids}}
        await self.collections.call(stored.WAITING, "delete", where=scoped(persona, named))
        self.waiting = None  # counted again when next needed

    async def _count(self) -> int:
        if self.waiting is None:
            self.waiting = int(await self.collections.call(stored.WAITING, "count"))
            metrics.FEEDBACK_WAITING.set(self.waiting)
        return self.waiting

    def _rejected(self, fb: Feedback, event_id: str, reason: str) -> Outcome:
        metrics.FEEDBACK.labels(label=fb.label, outcome="rejected").inc()
        logs.event("feedback_rejected", logging.WARNING, persona_id=fb.persona_id, memory_id=fb.target, reason=reason)
        return Outcome(publish=[self._result(fb, event_id, "rejected", reason)])

    def _result(
        self, fb: Feedback, event_id: str, status: Literal["applied", "rejected"], reason: str | None = None
    ) -> Publish:
        result = FeedbackResult(
            persona_id=fb.persona_id,
            event_id=event_id,
            request_id=fb.request_id,
            memory_id=fb.target,
            status=status,
            label=fb.label,
            reason=reason,
        )
        return Publish(self.topics.feedback_result, fb.persona_id, result)
