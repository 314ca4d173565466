"""A real Prometheus server for tests: start it against some targets, then query its API.

    with start_prometheus(tmp_path, ["127.0.0.1:8000"]) as base_url:
        wait_for_targets_up(base_url, ["127.0.0.1:8000"])
        wait_for(base_url, 'ings_ready == 1')

The binary is Debian's `prometheus` package (installed by .ci/setup-system.sh). Scrape and
rule evaluation run every second so tests see new samples quickly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, cast

import pytest

from ings_daemon.dev.stack import free_port, stop_process

JOB = "ings-daemon"
Series = dict[str, Any]


class PrometheusError(RuntimeError):
    """Prometheus refused a request (bad query) or did not start."""


def require_binary(name: str) -> str:
    """Return the path of `name`; without it, skip the test.

    Under CI (CI=true) a missing binary fails instead: CI installs it with
    .ci/setup-system.sh, and a skip there would hide a broken setup behind a green run.
    """
    path = shutil.which(name)
    if path is not None:
        return path
    reason = f"`{name}` is not on PATH; it comes from Debian's `prometheus` package (.ci/setup-system.sh)"
    if os.environ.get("CI", "").lower() == "true":
        _fail(f"{reason}; CI must install it")
    pytest.skip(reason)


def _fail(message: str) -> NoReturn:
    pytest.fail(message, pytrace=False)


def _config(
    targets: Sequence[str],
    job: str,
    labels: Mapping[str, str],
    rule_files: Sequence[Path],
    scrape_interval: str,
) -> dict[str, Any]:
    static: dict[str, Any] = {"targets": list(targets)}
    if labels:
        static["labels"] = dict(labels)
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": [str(Path(path).resolve()) for path in rule_files],
        "scrape_configs": [
            {
                "job_name": job,
                "scrape_timeout": scrape_interval,
                "static_configs": [static],
            }
        ],
    }


@contextmanager
def start_prometheus(
    tmp_path: Path,
    targets: list[str],
    *,
    job: str = JOB,
    labels: Mapping[str, str] | None = None,
    rule_files: Sequence[Path] = (),
    scrape_interval: str = "1s",
    startup_timeout: float = 30.0,
) -> Iterator[str]:
    """Run Prometheus scraping `targets` (host:port, path /metrics); yield its base URL.

    `labels` are added to every target, as prometheus.yml adds `role`; `rule_files` are
    loaded and evaluated at the scrape interval. The server stops when the block exits.
    """
    binary = require_binary("prometheus")
    workdir = Path(tempfile.mkdtemp(prefix="prometheus-", dir=tmp_path))
    config_file = workdir / "prometheus.yml"
    # JSON is YAML, so no YAML writer is needed.
    config_file.write_text(json.dumps(_config(targets, job, labels or {}, rule_files, scrape_interval), indent=2))
    log_path = workdir / "prometheus.log"

    # The port is picked before Prometheus binds it, so another process can take it in
    # between; a start that fails for that reason is retried on a new port.
    for _attempt in range(3):
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=info",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            if _wait_ready(proc, base_url, startup_timeout, log_path):
                yield base_url
                return
        finally:
            stop_process(proc, 15)
        if "address already in use" not in _tail(log_path):
            break
    raise PrometheusError(f"Prometheus did not start; log tail:\n{_tail(log_path)}")


def _wait_ready(proc: subprocess.Popen[bytes], base_url: str, timeout: float, log_path: Path) -> bool:
    """True once /-/ready answers 200; False if the process exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{base_url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise PrometheusError(f"Prometheus not ready after {timeout:.0f}s; log tail:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def api_get(base_url: str, endpoint: str, **params: str) -> Any:
    """GET /api/v1/<endpoint>; return its `data`, or raise PrometheusError with its error."""
    url = f"{base_url}/api/v1/{endpoint}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
    except urllib.error.HTTPError as exc:
        # Bad queries come back as 400/422 with a JSON body that says what is wrong.
        try:
            detail = json.load(exc)
        except ValueError:
            detail = {"error": exc.reason}
        raise PrometheusError(f"{endpoint} {params}: {detail.get('error', detail)}") from None
    if body.get("status") != "success":
        raise PrometheusError(f"{endpoint} {params}: {body}")
    return body["data"]


def query(base_url: str, promql: str) -> list[Series]:
    """Instant query; each series is {"metric": {labels}, "value": [time, "value"]}."""
    data = api_get(base_url, "query", query=promql)
    return cast(list[Series], data["result"])


def wait_for(
    base_url: str,
    promql: str,
    predicate: Callable[[list[Series]], bool] = bool,
    timeout: float = 30.0,
) -> list[Series]:
    """Poll an instant query until `predicate(result)` holds (default: any series)."""
    deadline = time.monotonic() + timeout
    while True:
        result = query(base_url, promql)
        if predicate(result):
            return result
        if time.monotonic() >= deadline:
            _fail(f"after {timeout:.0f}s, {promql!r} still gives {result!r}")
        time.sleep(0.2)


def value(series: Series) -> float:
    return float(series["value"][1])


def wait_for_targets_up(base_url: str, targets: Sequence[str], job: str = JOB, timeout: float = 30.0) -> list[Series]:
    """Wait until `up` is 1 for every one of `targets` (host:port) in `job`."""

    def all_up(result: list[Series]) -> bool:
        up = {series["metric"]["instance"]: value(series) for series in result}
        return all(up.get(target) == 1.0 for target in targets)

    return wait_for(base_url, f'up{{job="{job}"}}', all_up, timeout)


def alerts(base_url: str) -> list[dict[str, Any]]:
    """Active alerts (pending or firing), as /api/v1/alerts gives them."""
    return cast(list[dict[str, Any]], api_get(base_url, "alerts")["alerts"])


def wait_for_alert(
    base_url: str, name: str, state: str = "pending", timeout: float = 30.0, **labels: str
) -> dict[str, Any]:
    """Wait for alert `name` in `state` whose labels include `labels`; return it."""
    deadline = time.monotonic() + timeout
    while True:
        current = alerts(base_url)
        for alert in current:
            alert_labels = alert["labels"]
            if (
                alert_labels.get("alertname") == name
                and alert["state"] == state
                and all(alert_labels.get(key) == want for key, want in labels.items())
            ):
                return alert
        if time.monotonic() >= deadline:
            _fail(f"after {timeout:.0f}s no {state} alert {name} {labels}; active: {current!r}")
        time.sleep(0.2)


def rule_groups(base_url: str) -> list[dict[str, Any]]:
    return cast(list[dict[str, Any]], api_get(base_url, "rules")["groups"])
