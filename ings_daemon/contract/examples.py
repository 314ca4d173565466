"""Training examples: their text as memory and embedding input, their de-duplication, and
the content hash a train job's claim check carries."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .events import ExampleSet, TrainExample

# Cosine at or above this between two examples' embeddings makes the later one a near
# duplicate (all-MiniLM-L6-v2 scores paraphrases of one sentence around 0.9-0.98).
NEAR_DUPLICATE_COSINE = 0.97
SIMILARITY_BLOCK = 512
Vector = list[float]


def example_text(input: str, output: str) -> str:
    """One exchange as stored in memory and embedded: `input: ...\\noutput: ...`."""
    return f"input: {input}\noutput: {output}"


def examples_sha256(examples: Sequence[TrainExample]) -> str:
    """sha256 (hex) over the examples' ids and texts, in order: the claim check's content hash."""
    h = hashlib.sha256()
    for e in examples:
        for part in (e.id, e.input, e.output):
            h.update(part.encode())
            h.update(b"\x00")
    return h.hexdigest()


def example_set(collection: Literal["memory", "examples"], examples: Sequence[TrainExample]) -> ExampleSet:
    """The claim check for `examples` kept in Chroma's `collection`."""
    return ExampleSet(collection=collection, ids=[e.id for e in examples], sha256=examples_sha256(examples))


@dataclass(frozen=True)
class Candidate:
    example: TrainExample
    vector: Vector | None


def dedupe(candidates: Sequence[Candidate]) -> list[TrainExample]:
    """Drop exact duplicates (case and whitespace folded), then near duplicates by
    embedding cosine; the first of each group wins, order is kept."""
    seen: set[tuple[str, str]] = set()
    kept: list[Candidate] = []
    for c in candidates:
        key = (" ".join(c.example.input.lower().split()), " ".join(c.example.output.lower().split()))
        if key not in seen:
            seen.add(key)
            kept.append(c)
    with_vec = [c for c in kept if c.vector is not None]
    if len(with_vec) < 2:
        return [c.example for c in kept]
    matrix = np.asarray([c.vector for c in with_vec], dtype=np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True) + 1e-12
    dropped = np.zeros(len(with_vec), dtype=bool)
    # Compared a block of rows at a time: memory is SIMILARITY_BLOCK x n floats, not n x n
    # (a 40,000-example window would need 6.4 GB at once).
    for start in range(0, len(with_vec), SIMILARITY_BLOCK):
        block = matrix[start : start + SIMILARITY_BLOCK] @ matrix.T
        for row in range(block.shape[0]):
            i = start + row
            if not dropped[i]:
                dropped[i + 1 :] |= block[row, i + 1 :] >= NEAR_DUPLICATE_COSINE
    near = {id(with_vec[i]) for i in np.nonzero(dropped)[0]}
    return [c.example for c in kept if id(c) not in near]
