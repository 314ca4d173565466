"""The erasure ledger: what was erased from a persona, and which adapters it retired.

Adapter versions are immutable, so an erasure is recorded beside them, one JSON line per
erasure in `<persona's adapter folder>/erasures.jsonl`: when, why (`erasure` for an
`ings.forget`, `retention` for the INGS_MEMORY_RETENTION_DAYS sweep), the request, the
record ids erased, and the versions whose training examples (their manifests'
`examples.train`) included any of them. Both roles read it: the ingest role appends when it
erases, the trainer skips erased examples of a pending job and retires a version it has
just trained on one. Held-out examples are not counted: they shaped no weights.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from typing import Any, Literal

from ..contract.ids import utcnow
from .adapters import AdapterStore, StoreError

LEDGER = "erasures.jsonl"
Reason = Literal["erasure", "retention"]
log = logging.getLogger("ings.erasures")


class ErasureLedger:
    """Reads and appends the ledgers of one adapter store. Not for concurrent writers of
    one persona: a persona's records are handled by one consumer at a time (its partition)."""

    def __init__(self, store: AdapterStore) -> None:
        self.store = store

    def entries(self, persona_id: str) -> list[dict[str, Any]]:
        """Every erasure recorded for the persona, oldest first; a torn last line (a crash
        while appending) is skipped."""
        path = self.store.persona_dir(persona_id) / LEDGER
        if not path.is_file():
            return []
        found = []
        for line in path.read_text("utf-8").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                log.warning("skipping an unreadable line of %s", path)
                continue
            if isinstance(entry, dict):
                found.append(entry)
        return found

    def erased_ids(self, persona_id: str) -> set[str]:
        """Every record id erased from the persona."""
        return {str(i) for e in self.entries(persona_id) for i in e.get("erased_ids", [])}

    def retired(self, persona_id: str, request_id: str | None = None) -> set[int]:
        """Every retired version (`request_id`: only those its erasure retired)."""
        return {
            int(v)
            for e in self.entries(persona_id)
            if request_id is None or e.get("request_id") == request_id
            for v in e.get("versions", [])
        }

    def recorded(self, persona_id: str, request_id: str) -> bool:
        """Whether an erasure with this request id is in the ledger already (a replay)."""
        return any(e.get("request_id") == request_id for e in self.entries(persona_id))

    def trained_on(self, persona_id: str, ids: Iterable[str] | None) -> list[int]:
        """Versions not yet retired whose training examples include any of `ids` (None:
        every version, for an erasure of the whole persona)."""
        erased = None if ids is None else set(ids)
        retired = self.retired(persona_id)
        hit = []
        for version in self.store.versions(persona_id):
            if version in retired:
                continue
            if erased is None:
                hit.append(version)
                continue
            try:
                trained = self.store.manifest(persona_id, version).get("examples", {}).get("train", [])
            except (OSError, ValueError, StoreError) as exc:
                # Unreadable: it may hold erased data, and nothing can show it does not.
                log.warning("retiring %s v%d, its manifest is unreadable: %s", persona_id, version, exc)
                hit.append(version)
                continue
            if erased.intersection(str(i) for i in trained):
                hit.append(version)
        return hit

    def record(
        self,
        persona_id: str,
        reason: Reason,
        request_id: str | None,
        erased_ids: list[str],
        versions: list[int],
        horizon: dict[str, Any] | None = None,
    ) -> None:
        """Append one erasure, flushed to disk before returning. `horizon` says which
        interactions produced before the erasure but consumed after it are dropped
        (`ingest.forget.Horizons`)."""
        folder = self.store.persona_dir(persona_id)
        folder.mkdir(parents=True, exist_ok=True)
        entry = {
            "at": utcnow().isoformat(),
            "reason": reason,
            "request_id": request_id,
            "erased_ids": erased_ids,
            "versions": versions,
            "horizon": horizon,
        }
        with (folder / LEDGER).open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
