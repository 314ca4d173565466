"""A train job's examples by claim check: the job names them, Chroma keeps them.

Interactions are already in the memory collection; a tune request's examples are added
to the examples collection when the request is accepted. The job carries the ids and the
sha256 of their content, so the trainer reads exactly the examples the job was made from,
or fails the job with a reason if they changed or went away.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..contract.events import ExampleSet, TrainExample
from ..contract.examples import Vector, example_text, examples_sha256
from . import feedback
from .chroma import Collections, Record, memory_of


class ExamplesUnavailable(Exception):
    """The examples a job names are missing or no longer match its content hash."""


async def keep_examples(
    collections: Collections, persona_id: str, examples: Sequence[TrainExample], vectors: Sequence[Vector]
) -> None:
    """Store a tune request's examples (ids derived from the request, so a replay adds nothing)."""
    stored = await collections.existing_ids("examples", [e.id for e in examples])
    await collections.add(
        "examples",
        [
            Record(
                id=e.id,
                document=example_text(e.input, e.output),
                metadata={"persona_id": persona_id, "input": e.input, "output": e.output},
                embedding=list(v),
            )
            for e, v in zip(examples, vectors, strict=True)
            if e.id not in stored
        ],
    )


async def load_examples(
    collections: Collections, persona_id: str, ref: ExampleSet, erased: frozenset[str] = frozenset()
) -> tuple[list[TrainExample], int]:
    """The job's examples in the job's order, all of them `persona_id`'s, each with its
    record's current feedback, and how many of them were erased since the job was made
    (left out).

    Raises ExamplesUnavailable when one is missing that the persona's erasure ledger does
    not list (`erased`), belongs to another persona (a job is an event anyone could
    produce), or, when none were erased, the content no longer matches the job's hash. With
    erasures the hash cannot be checked (it covers the whole set); the rest are the records
    the job named, since a record's content never changes under its id.
    """
    target = memory_of(persona_id) if ref.collection == "memory" else ref.collection
    found = {r.id: r for r in await collections.get(target, ids=list(ref.ids))}
    missing = [i for i in ref.ids if i not in found]
    unexplained = [i for i in missing if i not in erased]
    if unexplained:
        raise ExamplesUnavailable(f"{len(unexplained)} of the job's {len(ref.ids)} examples are no longer stored")
    foreign = [i for i in found if found[i].metadata.get("persona_id") != persona_id]
    if foreign:
        raise ExamplesUnavailable(f"{len(foreign)} of the job's examples belong to another persona")
    examples = [
        TrainExample(id=i, input=str(found[i].metadata["input"]), output=str(found[i].metadata["output"]))
        for i in ref.ids
        if i in found
    ]
    if not missing and examples_sha256(examples) != ref.sha256:
        raise ExamplesUnavailable("the job's examples changed since it was made (content hash differs)")
    # Feedback as it is now: it is not part of the content (storage/feedback.py).
    return [feedback.overlay(e, found[e.id].metadata) for e in examples], len(missing)
