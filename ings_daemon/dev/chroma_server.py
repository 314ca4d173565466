"""A real Chroma server on loopback, for the tests and benchmarks that need one.

Plain, it is `chroma run` (the Rust server of the pinned chromadb). With a `token` it is
Chroma's own Python server app (`chromadb.app` under uvicorn) with Chroma's
`TokenAuthenticationServerProvider`: `chroma run` 1.5 has no authentication of its own
(Chroma's docs secure 1.x servers behind a proxy), and this is the same HTTP API with the
token check Chroma ships. That app needs `fastapi`, `uvicorn` and
`opentelemetry-instrumentation-fastapi` (the `test` extra installs them).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import TracebackType

from .stack import free_port, stop_process, wait_for_port


class ChromaServer:
    """A Chroma server on 127.0.0.1:`port` storing in `path`; can be stopped and restarted."""

    def __init__(
        self, path: Path, log_path: Path, token: str | None = None, tls: tuple[Path, Path] | None = None
    ) -> None:
        """`token`: Chroma's Python app with token authentication; `tls` (certificate,
        key; with a token only): it serves HTTPS."""
        self.path = path
        self.port = free_port()
        self.log_path = log_path
        self.token = token
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> tuple[list[str], dict[str, str]]:
        env = {**os.environ, "ANONYMIZED_TELEMETRY": "False"}
        bin_dir = Path(sys.executable).parent
        if self.token is None:
            where = ["--path", str(self.path), "--host", "127.0.0.1", "--port", str(self.port)]
            return [str(bin_dir / "chroma"), "run", *where], env
        env.update(
            IS_PERSISTENT="TRUE",
            PERSIST_DIRECTORY=str(self.path),
            CHROMA_SERVER_AUTHN_PROVIDER="chromadb.auth.token_authn.TokenAuthenticationServerProvider",
            CHROMA_SERVER_AUTHN_CREDENTIALS=self.token,
        )
        app = ["-m", "uvicorn", "chromadb.app:app", "--host", "127.0.0.1", "--port", str(self.port)]
        # A client's idle keep-alive connection would hold a graceful stop for 30 s.
        app += ["--timeout-graceful-shutdown", "2"]
        if self.tls is not None:
            app += ["--ssl-certfile", str(self.tls[0]), "--ssl-keyfile", str(self.tls[1])]
        return [sys.executable, *app, "--log-level", "warning"], env

    def start(self) -> ChromaServer:
        command, env = self.command()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_for_port(self.port, 60, "chroma server", self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 30)

    def __enter__(self) -> ChromaServer:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()
