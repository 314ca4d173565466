"""Session fixtures for the container tests: the Docker engine, started here when none
answers (or one skip line saying why it cannot start), and the images, built once."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from containers.engine import (
    CHROMA_IMAGE,
    PROMETHEUS_IMAGE,
    PYTHON_IMAGE,
    Builds,
    Engine,
    EngineUnavailable,
    daemon_image,
    debian_image,
    local_image,
    tansu_image,
)

# The first test also waits for the images: a cold build here took about three minutes.
CONTAINER_TESTS = [pytest.mark.containers, pytest.mark.timeout(1200)]


@dataclass(frozen=True)
class Images:
    """Tags of the images built for this session."""

    daemon: str
    tansu: str
    chroma: str
    prometheus: str


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    try:
        started = Engine(tmp_path_factory.mktemp("dockerd") / "dockerd.log").start()
    except EngineUnavailable as exc:
        # CI sets INGS_REQUIRE_CONTAINERS=1 (.ci/run): there a skip would hide a broken path.
        if os.environ.get("INGS_REQUIRE_CONTAINERS") == "1":
            pytest.fail(f"container tests: INGS_REQUIRE_CONTAINERS=1 but {exc}", pytrace=False)
        pytest.skip(f"container tests: no Docker daemon can start here: {exc}")
    yield started
    started.stop()


@pytest.fixture(scope="session")
def images(engine: Engine) -> Images:
    builds = Builds()
    debian = debian_image(builds)
    python = local_image(builds, PYTHON_IMAGE, "python.Dockerfile", debian)
    daemon = daemon_image(builds, python)
    built = Images(
        daemon=daemon,
        tansu=tansu_image(builds, debian),
        # The daemon image already holds the pinned chromadb and its CLI.
        chroma=local_image(builds, CHROMA_IMAGE, "chroma.Dockerfile", daemon),
        prometheus=local_image(builds, PROMETHEUS_IMAGE, "prometheus.Dockerfile", debian),
    )
    builds.report()
    return built
