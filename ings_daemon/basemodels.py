"""Which base model a train job may load, and where it lies on this machine.

A job names its base model (`lora_config.model_name` or the default). That name comes from
an untrusted event, so it is checked against a grammar and the allow-list before it is
used as a path or a hub id, and nothing is ever downloaded: a model is either under
INGS_MODELS_DIR, an allowed absolute path, or already in the Hugging Face cache.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path, PurePosixPath

from .config import Settings
from .contract.events import LoraSpec
from .contract.serving import UNSERVABLE_MODULES, VLLM_LORA_RANKS

log = logging.getLogger(__name__)

MAX_NAME_LEN = 200
# A Hugging Face repo id: "name" or "org/name".
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
# A commit hash as the HF cache names snapshot folders.
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


class BaseModelError(Exception):
    """A base model cannot be used; the message says what to do about it."""


def check_name(name: str) -> None:
    """Reject names that could reach outside the places a model may come from."""
    if not name:
        raise BaseModelError("no base model named: set INGS_BASE_MODEL or lora_config.model_name")
    if len(name) > MAX_NAME_LEN:
        raise BaseModelError(f"base model name is longer than {MAX_NAME_LEN} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise BaseModelError("base model name contains control characters")
    if ".." in re.split(r"[/\\]", name):
        raise BaseModelError(f"base model name {name!r} must not contain '..'")


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _from_models_dir(name: str, models_dir: Path) -> Path | None:
    if name.startswith(("/", "\\", ".")) or "\\" in name:  # dot-folders: imports in progress
        return None
    candidate = models_dir / PurePosixPath(name)
    # normpath, not resolve: an operator may place symlinks in the models folder on purpose,
    # but the name itself must not climb out of it.
    inside = os.path.normpath(candidate).startswith(os.path.normpath(models_dir) + os.sep)
    return candidate if inside and _is_model_dir(candidate) else None


def _from_hf_cache(name: str, settings: Settings) -> Path | None:
    if not _HUB_ID_RE.match(name):
        return None
    from huggingface_hub import snapshot_download

    token = settings.huggingface_token.get_secret_value() if settings.huggingface_token else None
    try:
        folder = snapshot_download(repo_id=name, local_files_only=True, token=token)
    except Exception as exc:
        # Only the type: hub errors quote request details, and nothing here may echo the token.
        log.debug("base model %s is not in the Hugging Face cache (%s)", name, type(exc).__name__)
        return None
    if not isinstance(folder, str):
        return None
    path = Path(folder)
    return path if _is_model_dir(path) else None


def resolve_base_model(name: str, settings: Settings) -> str:
    """The local folder that holds base model `name`, or BaseModelError saying why not."""
    check_name(name)
    allowed = settings.allowed_base_models()
    if name not in allowed:
        listed = ", ".join(sorted(allowed)) or "(none: set INGS_ALLOWED_BASE_MODELS or INGS_BASE_MODEL)"
        raise BaseModelError(f"base model {name} is not allowed; allowed: {listed}")
    local = _from_models_dir(name, settings.ings_models_dir)
    if local is not None:
        return str(local)
    if Path(name).is_absolute():
        if _is_model_dir(Path(name)):
            return name
    else:
        cached = _from_hf_cache(name, settings)
        if cached is not None:
            return str(cached)
    raise BaseModelError(
        f"base model {name} is not available offline: put it under INGS_MODELS_DIR or in the Hugging Face cache"
    )


def revision_of(path: str | Path) -> str | None:
    """The commit of a base model folder that came from the HF cache (…/snapshots/<commit>)."""
    parts = Path(path).parts
    if len(parts) >= 2 and parts[-2] == "snapshots" and _COMMIT_RE.match(parts[-1]):
        return parts[-1]
    return None


# Where configs state the longest sequence the model can attend over, most specific first
# (Llama/Mistral/Qwen: max_position_embeddings; GPT-2: n_positions, n_ctx; others vary).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def context_length(config: object) -> int | None:
    """The context window, in tokens, that a model config states, or None if it states none.

    `config` is a config.json document (any JSON value: it is read, never trusted); a
    multimodal config's `text_config` is consulted when the top level names no length.
    """
    for level in (config, config.get("text_config") if isinstance(config, dict) else None):
        if isinstance(level, dict):
            for key in CONTEXT_KEYS:
                value = level.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
    return None


def model_context_length(path: str) -> int | None:
    """`context_length` of the config.json in model folder `path` (None if unreadable)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return context_length(config)


def within_context(spec: LoraSpec, window: int | None) -> LoraSpec:
    """`spec` with max_seq_len lowered to the model's context `window` where it is longer."""
    if window is None or spec.max_seq_len <= window:
        return spec
    return spec.model_copy(update={"max_seq_len": window})


def quantization_refusal(quantization: str | None, settings: Settings) -> str | None:
    """Why a run cannot load its base quantised here, or None when it can (or need not).

    bitsandbytes quantisation needs a CUDA device: INGS_TRAIN_DEVICE=cpu cannot, nor can
    `auto` on a machine without one (a split deployment whose trainers have GPUs sets
    INGS_TRAIN_DEVICE=cuda on its ingest side too).
    """
    if quantization is None or settings.ings_train_device == "cuda":
        return None
    if settings.ings_train_device == "auto":
        import torch

        if torch.cuda.is_available():
            return None
    return (
        f'lora_config.quantization "{quantization}" needs a CUDA GPU (bitsandbytes) and this deployment'
        f" trains on the CPU (INGS_TRAIN_DEVICE={settings.ings_train_device}): leave quantization out"
    )


def serving_refusal(spec: LoraSpec, settings: Settings) -> str | None:
    """Why vLLM would refuse an adapter trained as `spec`, or None: a rank above
    INGS_SERVING_MAX_LORA_RANK or outside vLLM's ranks, LoRA on the output head or the
    embeddings. Unchecked (None) when this deployment names no serving limit."""
    limit = settings.serving_max_lora_rank()
    if limit is None:
        return None
    if spec.rank > limit or spec.rank not in VLLM_LORA_RANKS:
        ranks = ", ".join(str(r) for r in VLLM_LORA_RANKS if r <= limit)
        return (
            f"lora_config.rank {spec.rank} cannot be served: the vLLM servers load ranks {ranks}"
            " (INGS_SERVING_MAX_LORA_RANK)"
        )
    unservable = sorted(set(spec.target_modules or ()) & UNSERVABLE_MODULES)
    if unservable:
        return f"lora_config.target_modules {unservable} cannot be served: vLLM loads no LoRA on the head or embeddings"
    return None
