"""The image as built from the project's Dockerfile: who it runs as, what it starts, and
that the embedding model is inside it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from containers.conftest import CONTAINER_TESTS, Images
from containers.engine import docker, inspect

pytestmark = CONTAINER_TESTS

IMAGE_USER = "10001:10001"  # the Dockerfile's INGS_UID default


def test_the_image_runs_as_its_user_and_starts_the_daemon_itself(images: Images) -> None:
    config = inspect("image", images.daemon)["Config"]
    assert config["User"] == IMAGE_USER
    # Exec form and no entrypoint: the daemon is PID 1 and receives `docker stop`'s SIGTERM.
    assert config["Cmd"] == ["ings-daemon", "run"] and not config["Entrypoint"]
    check = config["Healthcheck"]["Test"]
    assert check[0] == "CMD" and any("/healthz" in part for part in check)
    assert "HF_HUB_OFFLINE=1" in config["Env"]


def test_the_embedding_model_is_inside_and_loads_without_a_network(images: Images) -> None:
    script = (
        "import json, os; from ings_daemon.storage.embedder import Embedder; "
        "v = Embedder(None, 8).encode(['the model ships in the image']); "
        "print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(), 'dims': len(v[0])}))"
    )
    out = docker("run", "--rm", "--network", "none", images.daemon, "python", "-c", script, timeout=180)
    assert json.loads(out.strip().splitlines()[-1]) == {"uid": 10001, "gid": 10001, "dims": 384}


def test_a_volume_the_image_user_cannot_write_stops_it_with_one_line(images: Images, tmp_path: Path) -> None:
    owned_by_root = tmp_path / "adapters"
    owned_by_root.mkdir()
    owned_by_root.chmod(0o755)
    run = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "-v", f"{owned_by_root}:/data/adapters",
         "-e", "INGS_ROLE=trainer", images.daemon],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    errors = [line for line in map(json.loads, run.stderr.splitlines()) if line["level"] == "error"]
    assert len(errors) == 1 and "INGS_ADAPTER_DIR=/data/adapters is not writable by uid 10001" in errors[0]["error"]
