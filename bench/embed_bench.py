"""Embedding precision, side by side in one run: float32 against the automatic choice
(bfloat16 autocast on CPUs with AVX-512 BF16 or AMX), same model, texts and batch size.
Prints both rates, their ratio and the cosine agreement, and appends a row to
bench/RESULTS.md.

    python bench/embed_bench.py [N] [--no-record]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import numpy as np
from results import record_row

from ings_daemon.contract.examples import example_text
from ings_daemon.storage.embedder import Embedder

TOPICS = ["rollbacks", "caching", "on-call", "schema changes", "code review", "hiring", "latency", "budgets"]


def texts(n: int) -> list[str]:
    """Interaction documents of about 45 tokens, as the daemon embeds them."""
    return [
        example_text(
            f"question {i}: how should a team of {i % 50 + 2} handle {TOPICS[i % len(TOPICS)]} this quarter?",
            f"answer {i}: start with {TOPICS[(i * 3) % len(TOPICS)]}, measure first, then change one thing.",
        )
        for i in range(n)
    ]


def rate(embedder: Embedder, docs: list[str], rounds: int = 2) -> tuple[float, np.ndarray]:
    """Best of `rounds` (texts per second) after one warm-up batch, and the vectors."""
    asyncio.run(embedder.embed(docs[:64]))
    best, vectors = 0.0, np.zeros(0)
    for _ in range(rounds):
        started = time.perf_counter()
        vectors = np.asarray(asyncio.run(embedder.embed(docs)))
        best = max(best, len(docs) / (time.perf_counter() - started))
    return best, vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("n", nargs="?", type=int, default=2000, help="texts to embed (default 2000)")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    docs = texts(args.n)
    exact = Embedder(None, 64, "float32")
    auto = Embedder(None, 64, "auto")
    exact_rate, a = rate(exact, docs)
    auto_rate, b = rate(auto, docs)
    cosine = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    print(f"float32:            {exact_rate:7.1f} texts/s")
    print(f"auto ({auto.precision}): {auto_rate:7.1f} texts/s")
    print(f"ratio auto/float32: {auto_rate / exact_rate:.2f}")
    print(f"cosine to float32:  min {cosine.min():.6f}  mean {cosine.mean():.6f}")
    if not args.no_record:
        record_row(
            Path(__file__),
            f"embed N={args.n}",
            f"float32 {exact_rate:.0f}/s, {auto.precision} {auto_rate:.0f}/s, "
            f"ratio {auto_rate / exact_rate:.2f}, cosine min {cosine.min():.5f}",
        )


if __name__ == "__main__":
    main()
