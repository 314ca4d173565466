"""A LoRA resolver folder: `<folder>/<served name>/` per servable version.

vLLM's filesystem resolver (`VLLM_PLUGINS=lora_filesystem_resolver`,
`VLLM_LORA_RESOLVER_CACHE_DIR=<folder>`) loads an adapter the first time a request names it,
so one server can answer for thousands of personas without a load call per version. Folders
are copied whole into a hidden temporary name, made readable by any user, then renamed into
place: a server never sees half a folder. Only names this daemon makes (`ings-...`) are ever
removed; anything else in the folder is left alone.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..contract.serving import PREFIX, parse_served_name


def readable_copy(source: Path, target: Path) -> None:
    """Copy the regular files of `source` into the new folder `target` (0755, files 0644).

    Raises OSError when `target` exists or the copy fails (the partial copy is removed)."""
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for item in sorted(source.iterdir()):
            if item.is_file() and not item.is_symlink():
                shutil.copyfile(item, scratch / item.name)
                (scratch / item.name).chmod(0o644)
        scratch.chmod(0o755)
        scratch.rename(target)  # fails on a non-empty target: a racing copy won
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


class ResolverFolder:
    """The served names placed in one resolver folder. Methods raise OSError."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def names(self) -> set[str]:
        """The served names placed here (folders that parse as ones this daemon makes)."""
        self.root.mkdir(parents=True, exist_ok=True)
        return {p.name for p in self.root.iterdir() if p.is_dir() and parse_served_name(p.name) is not None}

    def place(self, name: str, source: Path) -> None:
        """Copy the version folder `source` in as `name`; nothing to do when it is there."""
        target = self.root / name
        if target.is_dir():
            return
        try:
            readable_copy(source, target)
        except OSError:
            if not target.is_dir():  # else another sync placed it first
                raise

    def remove(self, name: str) -> None:
        """Remove the folder of `name` (only a served name of this daemon's)."""
        if not name.startswith(PREFIX) or parse_served_name(name) is None:
            raise ValueError(f"{name!r} is not a served name of this daemon")
        target = self.root / name
        if target.is_dir():
            # Renamed away first, so the resolver never reads a half-deleted folder.
            doomed = Path(tempfile.mkdtemp(prefix=f".gone.{name}.", dir=self.root))
            target.rename(doomed / name)
            shutil.rmtree(doomed, ignore_errors=True)
