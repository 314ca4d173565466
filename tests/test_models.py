"""`ings-daemon models`: importing a base model from a GGUF file, once, verified; and every
file it cannot use refused in one line naming it, whatever its bytes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ings_daemon.models import (
    GGUF_MAGIC,
    IMPORT_RECORD,
    SMOLLM2_NAME,
    SMOLLM2_SOURCE,
    ModelImportError,
    import_model,
    local_models,
    packaged_sources,
    sha256_file,
)


def write_gguf(path: Path, architecture: str, tensors: bool = True) -> Path:
    """A small, well-formed GGUF file of `architecture` with one tensor (not a usable model)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    if tensors:
        writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ings_daemon", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_the_packaged_smollm2_imports_once_verified(smollm2: Path) -> None:
    record = json.loads((smollm2 / IMPORT_RECORD).read_text())
    source = packaged_sources()[SMOLLM2_SOURCE]
    assert record["sha256"] == sha256_file(source) and record["architecture"] == "llama"
    assert record["parameters"] == 134_515_008 and record["test_generation"]["output"]
    assert json.loads((smollm2 / "config.json").read_text()).get("quantization_config") is None
    # Readable by a server or trainer running as another user.
    assert all(p.stat().st_mode & 0o004 for p in smollm2.iterdir())
    again = import_model(SMOLLM2_SOURCE, smollm2.parent, SMOLLM2_NAME)
    assert not again.imported and again.record == record
    assert (SMOLLM2_NAME, smollm2, record) in local_models(smollm2.parent)


def test_a_name_taken_by_another_model_is_refused(smollm2: Path, tmp_path: Path) -> None:
    (tmp_path / SMOLLM2_NAME).mkdir()
    (tmp_path / SMOLLM2_NAME / "config.json").write_text("{}")
    with pytest.raises(ModelImportError, match="already holds another model"):
        import_model(SMOLLM2_SOURCE, tmp_path)


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda p: p.write_bytes(b""), "not a GGUF file"),
        (lambda p: p.write_bytes(b"PK\x03\x04 a zip, not a model"), "not a GGUF file"),
        (lambda p: p.write_bytes(GGUF_MAGIC + b"\x03\x00\x00\x00" + b"\xff" * 40), "unreadable GGUF"),
        (lambda p: write_gguf(p, "clip"), "architecture 'clip' cannot be dequantised"),
        # A real header of a supported architecture, with none of a model's tensors or config.
        (lambda p: write_gguf(p, "llama"), "transformers could not load it"),
        (lambda p: p.mkdir(), "not a file"),
    ],
)
def test_files_that_cannot_be_imported_are_one_line(tmp_path: Path, make: object, why: str) -> None:
    source = tmp_path / "model.gguf"
    make(source)  # type: ignore[operator]
    with pytest.raises(ModelImportError) as refused:
        import_model(str(source), tmp_path / "models")
    message = str(refused.value)
    assert why in message and str(source) in message and "\n" not in message
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    head=st.sampled_from([b"", GGUF_MAGIC, GGUF_MAGIC + b"\x03\x00\x00\x00"]),
    body=st.binary(max_size=512),
)
def test_hostile_bytes_never_escape_as_anything_but_a_refusal(tmp_path: Path, head: bytes, body: bytes) -> None:
    source = tmp_path / "hostile.gguf"
    source.write_bytes(head + body)
    with pytest.raises(ModelImportError):
        import_model(str(source), tmp_path / "models")


@pytest.mark.parametrize("name", ["../escape", "UPPER", "a/b", "", ".hidden", "x" * 65, "evil\n"])
def test_names_that_could_reach_outside_are_refused(smollm2: Path, tmp_path: Path, name: str) -> None:
    with pytest.raises(ModelImportError, match="model name"):
        import_model(SMOLLM2_SOURCE, tmp_path, name or "")  # "" is refused as a name, not defaulted
    assert not any(tmp_path.iterdir())


def test_models_command_lists_and_refuses_in_one_line(smollm2: Path, tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "INGS_MODELS_DIR": str(smollm2.parent)}
    listed = cli("models", env=env)
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert {"name": SMOLLM2_NAME, "allowed": True, "architecture": "llama"}.items() <= next(
        r for r in rows if r.get("name") == SMOLLM2_NAME
    ).items()
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello")
    refused = cli("models", "import", str(bad), env=env)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip() == f"ings-daemon: cannot import {bad}: not a GGUF file (no GGUF magic number)"
