"""The adapter store: immutable, numbered adapter versions per persona.

Layout: `<root>/<type>/<version>/<id>/v0001/` for `did:nings:artificial:llm:<type>:<version>:<id>`,
and `<root>/.tmp/` for runs in progress. A run writes into a temporary folder on the same
filesystem; `publish` fsyncs it and renames it onto a version number nobody holds, so a
version folder is either absent or complete and is never replaced.

A run in progress holds an exclusive `flock` on `<folder>.lock` beside its temporary
folder until it is published or discarded; the kernel drops the lock when the process
dies. Trainers sharing the store (containers on one volume, where every daemon is pid 1
and host networking gives them one hostname) tell a dead run from a live one by whether
that lock can be taken, not by a pid or a hostname.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ..contract.events import AdapterMetrics, TrainJob
from ..contract.ids import DID_RE, utcnow

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_VERSION_RE = re.compile(r"^v([0-9]{4,9})$")
_RENAME_NOREPLACE = 1  # from linux/fs.h


class StoreError(Exception):
    """The store cannot do what was asked (bad id, path escape, nothing to publish)."""


def file_checksums(path: Path, *, exclude: frozenset[str] = frozenset({MANIFEST})) -> dict[str, str]:
    """sha256 of every regular file under `path`, keyed by its POSIX path relative to it."""
    sums: dict[str, str] = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if rel in exclude:
            continue
        h = hashlib.sha256()
        with file.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        sums[rel] = h.hexdigest()
    return sums


def write_manifest(
    folder: Path,
    *,
    job: TrainJob,
    metrics: AdapterMetrics,
    training: dict[str, Any],
    example_ids: dict[str, list[str]],
    parent_version: int | None,
    base_revision: str | None,
    tokenizer_sha256: str | None,
) -> dict[str, str]:
    """Write the manifest of a finished run into its folder, with the sha256 of every other
    file there. Returns those checksums plus the manifest's own, for the announcement."""
    files = file_checksums(folder)
    manifest = {
        "format": MANIFEST_FORMAT,
        "persona_id": job.persona_id,
        "job_id": job.job_id,
        "trigger": job.trigger,
        "parent_version": parent_version,
        "base_model": job.base_model,
        "base_model_revision": base_revision,
        "tokenizer_sha256": tokenizer_sha256,
        "training": training,
        "examples": example_ids,
        "metrics": metrics.model_dump(mode="json"),
        "libraries": {
            **{lib: importlib.metadata.version(lib) for lib in ("torch", "transformers", "peft")},
            "python": platform.python_version(),
        },
        "job_created_at": job.created_at.isoformat(),
        "created_at": utcnow().isoformat(),
        "files": files,
    }
    data = json.dumps(manifest, indent=2, sort_keys=True).encode()
    (folder / MANIFEST).write_bytes(data)
    return {**files, MANIFEST: hashlib.sha256(data).hexdigest()}


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with file.open("rb") as fh:
                os.fsync(fh.fileno())
    for folder in [path, *(p for p in path.rglob("*") if p.is_dir())]:
        _fsync_dir(folder)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_renameat2() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        return libc.renameat2
    except (OSError, AttributeError):
        return None


_renameat2 = _load_renameat2()


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, failing with FileExistsError if `dst` exists in any form.

    Plain rename(2) silently replaces an empty directory, so Linux's RENAME_NOREPLACE is
    used where the kernel and filesystem offer it; elsewhere an existence check narrows the
    race to an empty folder appearing in between, which holds no data to lose.
    """
    if _renameat2 is not None:
        at_fdcwd = -100
        rc = _renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(src))
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    src.rename(dst)


class AdapterStore:
    def __init__(self, root: Path, *, stale_tmp_after_s: float = 24 * 3600.0) -> None:
        self.root = Path(root).resolve()
        self.tmp_root = self.root / ".tmp"
        self.tmp_root.mkdir(parents=True, exist_ok=True)
        self._locks: dict[Path, int] = {}  # temporary folder -> the fd holding its lock
        self.stale_tmp_after_s = stale_tmp_after_s
        self.cleanup_tmp()

    # --- paths ----------------------------------------------------------------------------

    def persona_dir(self, persona_id: str) -> Path:
        if not isinstance(persona_id, str) or not DID_RE.fullmatch(persona_id):
            raise StoreError(f"not a valid persona id: {persona_id!r}")
        kind, version, ident = persona_id.split(":")[4:]
        path = (self.root / kind / version / ident).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise StoreError(f"persona id {persona_id!r} leads outside the adapter store")
        return path

    def version_path(self, persona_id: str, version: int) -> Path:
        if not isinstance(version, int) or not 0 < version < 10**9:
            raise StoreError(f"not a valid adapter version: {version!r}")
        return self.persona_dir(persona_id) / f"v{version:04d}"

    # --- reading --------------------------------------------------------------------------

    def versions(self, persona_id: str) -> list[int]:
        folder = self.persona_dir(persona_id)
        if not folder.is_dir():
            return []
        found = []
        for entry in folder.iterdir():
            match = _VERSION_RE.match(entry.name)
            if match and entry.is_dir() and not entry.is_symlink():
                found.append(int(match.group(1)))
        return sorted(found)

    def personas(self) -> list[str]:
        """Every persona id with a folder here (`<type>/<version>/<id>`, rebuilt as DIDs)."""
        found = []
        for kind in self.root.iterdir():
            for doc in kind.iterdir() if kind.is_dir() and not kind.name.startswith(".") else ():
                for ident in doc.iterdir() if doc.is_dir() else ():
                    did = f"did:nings:artificial:llm:{kind.name}:{doc.name}:{ident.name}"
                    if ident.is_dir() and DID_RE.fullmatch(did):
                        found.append(did)
        return sorted(found)

    def latest(self, persona_id: str) -> int | None:
        versions = self.versions(persona_id)
        return versions[-1] if versions else None

    def latest_on(
        self, persona_id: str, base_model: str, skip: frozenset[int] = frozenset()
    ) -> tuple[int, frozenset[str]] | None:
        """The newest version trained on `base_model` (leaving out `skip`: retired ones), and
        the ids it was trained on: what a new run on that base is compared with (versions
        chain per persona and base model)."""
        for version in reversed(self.versions(persona_id)):
            if version in skip:
                continue
            try:
                manifest = self.manifest(persona_id, version)
            except (OSError, ValueError, StoreError) as exc:
                log.warning("unreadable manifest for %s v%d: %s", persona_id, version, exc)
                continue
            if manifest.get("base_model") == base_model:
                trained = manifest.get("examples", {}).get("train", [])
                return version, frozenset(str(i) for i in trained if isinstance(i, str))
        return None

    def manifest(self, persona_id: str, version: int) -> dict[str, Any]:
        data = json.loads((self.version_path(persona_id, version) / MANIFEST).read_text("utf-8"))
        if not isinstance(data, dict):
            raise StoreError(f"manifest of {persona_id} v{version} is not an object")
        return data

    def find_job(self, persona_id: str, job_id: str) -> int | None:
        """The version a job already produced, so a replayed job does not make another."""
        for version in reversed(self.versions(persona_id)):
            try:
                if self.manifest(persona_id, version).get("job_id") == job_id:
                    return version
            except (OSError, ValueError, StoreError) as exc:
                log.warning("unreadable manifest for %s v%d: %s", persona_id, version, exc)
        return None

    @staticmethod
    def checksums(path: Path) -> dict[str, str]:
        return file_checksums(path)

    def verify(self, persona_id: str, version: int) -> bool:
        """True when the version's files are exactly those its manifest lists, unchanged."""
        try:
            expected = self.manifest(persona_id, version).get("files")
        except (OSError, ValueError, StoreError):
            return False
        return isinstance(expected, dict) and expected == file_checksums(self.version_path(persona_id, version))

    # --- writing --------------------------------------------------------------------------

    def new_tmp_dir(self, persona_id: str) -> Path:
        """A new temporary folder for a run, locked by this process until `publish` or
        `discard`. Raises StoreError for an invalid persona id."""
        self.persona_dir(persona_id)  # validates the id before anything is created
        tmp_dir = Path(tempfile.mkdtemp(prefix="run.", dir=self.tmp_root))
        # Locked under a scratch name, then renamed: a sweep never sees the final name unlocked.
        scratch = tmp_dir.with_name(f"{tmp_dir.name}.lock-new")
        fd = os.open(scratch, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        scratch.rename(_lock_path(tmp_dir))
        self._locks[tmp_dir] = fd
        return tmp_dir

    def _unlock(self, tmp_dir: Path) -> None:
        fd = self._locks.pop(tmp_dir, None)
        if fd is not None:
            with contextlib.suppress(FileNotFoundError):
                _lock_path(tmp_dir).unlink()
            os.close(fd)

    def publish(self, persona_id: str, tmp_dir: Path) -> int:
        """Move a finished run into place as the next version and return its number.

        Raises StoreError for a folder that is not this store's or has no manifest."""
        tmp_dir = Path(tmp_dir).resolve()
        if tmp_dir.parent != self.tmp_root or not tmp_dir.is_dir():
            raise StoreError(f"{tmp_dir} is not a temporary folder of this store")
        if not (tmp_dir / MANIFEST).is_file():
            raise StoreError(f"{tmp_dir} has no {MANIFEST}; refusing to publish an unfinished run")
        try:
            return self._publish(persona_id, tmp_dir)
        finally:
            self._unlock(tmp_dir)

    def _publish(self, persona_id: str, tmp_dir: Path) -> int:
        target_parent = self.persona_dir(persona_id)
        target_parent.mkdir(parents=True, exist_ok=True)
        # Readable by any user: a vLLM server or a resolver runs as another user (safetensors
        # writes its files 0600).
        for path in tmp_dir.rglob("*"):
            if not path.is_symlink():
                path.chmod(0o755 if path.is_dir() else 0o644)
        tmp_dir.chmod(0o755)
        _fsync_tree(tmp_dir)
        version = (self.latest(persona_id) or 0) + 1
        while True:
            target = self.version_path(persona_id, version)
            try:
                rename_noreplace(tmp_dir, target)
            except FileExistsError:
                # Another writer took this number between our look and our rename.
                version += 1
                continue
            except OSError as exc:
                if exc.errno == errno.ENOTEMPTY:
                    version += 1
                    continue
                raise
            break
        _fsync_dir(target_parent)
        _fsync_dir(self.tmp_root)
        return version

    def discard(self, tmp_dir: Path) -> None:
        """Remove a temporary folder of a run that will not be published."""
        tmp_dir = Path(tmp_dir).resolve()
        if tmp_dir.parent == self.tmp_root:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            self._unlock(tmp_dir)

    def cleanup_tmp(self) -> int:
        """Remove temporary folders of runs that can no longer finish: those whose lock no
        live process holds, and any entry older than `stale_tmp_after_s` seconds (folders
        without a lock file, from before locks or from a crash between mkdir and lock, are
        left to that rule). Returns how many runs' entries were removed."""
        stale_after_s = self.stale_tmp_after_s
        removed = 0
        now = time.time()
        for entry in self.tmp_root.iterdir():
            if entry.name.endswith((".lock", ".lock-new")):
                continue  # taken with its folder below, or by the age rule when orphaned
            try:
                old = now - entry.lstat().st_mtime > stale_after_s
            except FileNotFoundError:
                continue
            lock = _lock_path(entry)
            if old or _abandoned(lock):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        entry.unlink()
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
                removed += 1
        for orphan in self.tmp_root.glob("*.lock*"):
            folder = self.tmp_root / orphan.name.rsplit(".lock", 1)[0]
            with contextlib.suppress(FileNotFoundError):
                if not folder.exists() and now - orphan.lstat().st_mtime > stale_after_s:
                    orphan.unlink()
        if removed:
            log.info("removed %d stale temporary adapter folders", removed)
        return removed


def _lock_path(tmp_dir: Path) -> Path:
    return tmp_dir.with_name(f"{tmp_dir.name}.lock")


def _abandoned(lock: Path) -> bool:
    """True when `lock` exists and no process holds it: its run's process has died."""
    try:
        # Read-only is enough for flock, and works on another user's 0644 lock file.
        fd = os.open(lock, os.O_RDONLY)
    except (FileNotFoundError, PermissionError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing also releases the lock just taken
    return True
