"""The real Prometheus scrapes the service's process collector and its liveness gauge: a
service learning from a file, paused inside a batch, is scraped until Prometheus holds
``process_resident_memory_bytes`` (what ``/proc`` says the process uses) and sees the loop's age
pass the liveness bound while ``/healthz`` answers 503."""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.prometheus import prometheus_server  # noqa: F401
from tests.service_doubles import PausingService
from tests.test_predict_http import Running, _config, _csv

pytestmark = pytest.mark.integration


def _rss_bytes() -> int:
    for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _healthz(url: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_prometheus_scrapes_process_memory_and_the_stalled_loop(
    tmp_path: Path,
    prometheus_server: Any,  # noqa: F811
) -> None:
    config = _config(tmp_path, _csv(tmp_path / "data.csv", 1500), "classification",
                     liveness_timeout_seconds=3.0)  # fmt: skip
    running = Running(PausingService(config, pause_after=10))
    try:
        assert running.service.paused.wait(timeout=60)
        url = running.url
        prometheus = prometheus_server([url.removeprefix("http://")])
        prometheus.wait_for_scrape(timeout=30)
        rss = prometheus.value('process_resident_memory_bytes{job="stream-trainer"}')
        assert 0.5 * _rss_bytes() < rss < 2 * _rss_bytes()
        assert prometheus.value('process_start_time_seconds{job="stream-trainer"}') <= time.time()
        assert prometheus.value("python_info") == 1.0
        deadline = time.monotonic() + 30
        while True:
            age = prometheus.value('stream_trainer_loop_seconds_since_iteration{run="default"}')
            if age > 3.0:
                break
            assert time.monotonic() < deadline, f"the scraped loop age stayed at {age}"
            time.sleep(0.5)
        assert _healthz(url) == 503
    finally:
        running.service.resume.set()
        running.stop()
