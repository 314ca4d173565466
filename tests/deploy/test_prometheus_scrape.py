"""The Prometheus fixture in prom.py against a real Prometheus and a real /metrics endpoint.

The target is prometheus_client's own HTTP server with a private registry, the same
library and exposition format the daemon uses; the daemon's integration tests point the
same fixture at the daemon's /metrics.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prom import (
    JOB,
    query,
    require_binary,
    start_prometheus,
    value,
    wait_for,
    wait_for_targets_up,
)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ings_daemon.dev.stack import free_port

pytestmark = pytest.mark.integration


@contextmanager
def serve_metrics(registry: CollectorRegistry) -> Iterator[str]:
    """Serve `registry` on a loopback port the OS picks; yield host:port."""
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_prometheus_scrapes_a_live_target(tmp_path: Path) -> None:
    require_binary("prometheus")
    registry = CollectorRegistry()
    consumed = Counter("ings_events_consumed_total", "Records fetched.", ["topic"], registry=registry)
    ready = Gauge("ings_ready", "Ready.", registry=registry)
    embedding = Histogram("ings_embedding_seconds", "Embedding time.", registry=registry)
    consumed.labels(topic="ings.interaction").inc(3)
    ready.set(1)
    embedding.observe(0.02)
    embedding.observe(0.3)

    with serve_metrics(registry) as target, start_prometheus(tmp_path, [target]) as base_url:
        (up,) = wait_for_targets_up(base_url, [target])
        assert up["metric"] == {"__name__": "up", "instance": target, "job": JOB}

        (series,) = wait_for(base_url, 'ings_events_consumed_total{topic="ings.interaction"}')
        assert value(series) == 3.0
        assert series["metric"]["instance"] == target
        assert value(query(base_url, "ings_ready")[0]) == 1.0
        (count,) = wait_for(base_url, "ings_embedding_seconds_count")
        assert value(count) == 2.0

        # Later changes arrive too: Prometheus keeps scraping, not just once.
        consumed.labels(topic="ings.interaction").inc(2)
        ready.set(0)
        wait_for(
            base_url,
            'ings_events_consumed_total{topic="ings.interaction"}',
            lambda result: bool(result) and value(result[0]) == 5.0,
        )
        wait_for(base_url, "ings_ready == 0")


def test_prometheus_marks_an_unreachable_target_down_and_labels_targets(tmp_path: Path) -> None:
    require_binary("prometheus")
    registry = CollectorRegistry()
    Gauge("ings_consumer_paused", "Paused.", registry=registry).set(1)
    # Nothing listens on this port: the shape of a daemon that crashed or never started.
    dead = f"127.0.0.1:{free_port()}"

    with (
        serve_metrics(registry) as live,
        start_prometheus(tmp_path, [live, dead], labels={"role": "trainer"}) as base_url,
    ):
        wait_for_targets_up(base_url, [live])
        (down,) = wait_for(base_url, f'up{{instance="{dead}"}} == 0')
        assert down["metric"]["job"] == JOB
        # Static labels reach every series of the target, as `role` does in prometheus.yml.
        assert down["metric"]["role"] == "trainer"
        (paused,) = wait_for(base_url, "ings_consumer_paused")
        assert paused["metric"]["role"] == "trainer"
        assert value(paused) == 1.0
