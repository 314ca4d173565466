"""The embedder's precision: chosen from the CPU, and bfloat16 agrees with float32."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from ings_daemon.storage.embedder import Embedder, cpu_has_bf16, resolve_precision

SAPPHIRE = "processor : 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
OLDER = "processor : 0\nflags\t\t: fpu sse2 avx2 avx512f\n"


def test_auto_precision_follows_the_cpu_flags() -> None:
    assert cpu_has_bf16(SAPPHIRE) and not cpu_has_bf16(OLDER) and not cpu_has_bf16("")
    assert resolve_precision("auto", SAPPHIRE) == "bfloat16"
    assert resolve_precision("auto", OLDER) == "float32"
    assert resolve_precision("float32", SAPPHIRE) == "float32"
    assert resolve_precision("bfloat16", OLDER) == "bfloat16"


@pytest.fixture(scope="module")
def texts() -> list[str]:
    topics = ["rollbacks", "caching", "on-call", "schema changes", "code review", "hiring", "latency", "budgets"]
    return [
        f"input: what do you think about {t} when the team is {n} people?\n"
        f"output: for {n} people, keep {t} simple, measure first and write the decision down."
        for t in topics
        for n in (3, 8, 40)
    ] + ["short", "ünïcödé and emoji 🎉", "x" * 2000]


def test_bfloat16_embeddings_agree_with_float32(texts: list[str]) -> None:
    exact = Embedder(None, 16, "float32")
    fast = Embedder(None, 16, "bfloat16")
    a = np.asarray(asyncio.run(exact.embed(texts)))
    b = np.asarray(asyncio.run(fast.embed(texts)))
    assert a.shape == b.shape == (len(texts), 384)
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-3)
    cosine = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosine.min() >= 0.999, cosine.min()


def test_an_unset_batch_size_follows_the_precision() -> None:
    """INGS_EMBEDDING_BATCH_SIZE unset: 32 texts a model batch in float32, 64 in bfloat16
    (the measured best of each); a set one is kept as it is."""
    assert Embedder(None, None, "float32").batch_size == 32
    assert Embedder(None, None, "bfloat16").batch_size == 64
    assert Embedder(None, 48, "bfloat16").batch_size == 48
