"""Monitoring against a running worker: the series deploy/ queries are on its /metrics, and a
real Prometheus scrapes it, loads deploy/prometheus/alerts.yml and evaluates the rules.

"A metric exists" here means: a family is declared in the exposition (``# TYPE``) and the
name is one of the series that family gives under its type, in the text format the worker
serves (0.0.4): a counter's declared name (it ends in ``_total``), a gauge's name, a
histogram's ``_bucket``/``_count``/``_sum``. A labelled family with no children yet shows
only its ``# HELP``/``# TYPE`` lines and still exists; a name with a suffix its type does not
give (``..._seconds`` of a histogram, a counter without ``_total``) does not.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from destination.devtools.broker import free_port
from destination.devtools.children import die_with_parent
from tests.integration.harness import (
    SandboxProcess,
    WorkerProcess,
    committed_offsets,
    make_topics,
    make_worker_topics,
    produce,
    unique,
    wait_for,
    worker_env,
)
from tests.integration.test_deploy import ALERTS, PREFIX, metric_names_used_in_deploy

pytestmark = pytest.mark.integration

# The job name alerts.yml matches on (up{job="gist-destination"}), as in deploy's config.
JOB = "gist-destination"

# The series each family type gives in the Prometheus text format 0.0.4. prometheus_client
# declares a counter with its ``_total`` name and ``_created`` as a separate gauge family.
_SERIES_SUFFIXES = {
    "counter": ("",),
    "gauge": ("",),
    "untyped": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("", "_count", "_sum"),
}

_TYPE_LINE = re.compile(r"# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (\w+)\s*$")
_SAMPLE_LINE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{.*\})? \S+(?: \S+)?$")


# --- reading an exposition --------------------------------------------------------------


def declared_families(exposition: str) -> dict[str, str]:
    """Family name -> type, from the ``# TYPE`` lines."""
    families: dict[str, str] = {}
    for line in exposition.splitlines():
        if match := _TYPE_LINE.match(line):
            families[match[1]] = match[2]
    return families


def sample_names(exposition: str) -> set[str]:
    """The names of the sample lines (series that have a value now)."""
    names = set()
    for line in exposition.splitlines():
        if line and not line.startswith("#"):
            match = _SAMPLE_LINE.match(line)
            assert match, f"not a sample line: {line!r}"
            names.add(match[1])
    return names


def exposed_series_names(exposition: str) -> set[str]:
    """Every series name the declared families give, children or not."""
    return {
        family + suffix
        for family, kind in declared_families(exposition).items()
        for suffix in _SERIES_SUFFIXES[kind]
    }


def missing_from(exposition: str, names: set[str]) -> set[str]:
    """The names no declared family of the exposition gives."""
    return names - exposed_series_names(exposition)


def test_missing_from_reads_families_with_and_without_children() -> None:
    """The helper on a handwritten exposition: what counts as there, and what does not."""
    exposition = "\n".join(
        [
            "# HELP gist_destination_x_total A labelled counter with no children yet.",
            "# TYPE gist_destination_x_total counter",
            "# HELP gist_destination_ready Ready.",
            "# TYPE gist_destination_ready gauge",
            "gist_destination_ready 1.0",
            "# HELP gist_destination_d_seconds A histogram.",
            "# TYPE gist_destination_d_seconds histogram",
            'gist_destination_d_seconds_bucket{le="+Inf"} 0.0',
            "gist_destination_d_seconds_count 0.0",
            "gist_destination_d_seconds_sum 0.0",
            "",
        ]
    )
    present = {
        "gist_destination_x_total",
        "gist_destination_ready",
        "gist_destination_d_seconds_bucket",
        "gist_destination_d_seconds_count",
        "gist_destination_d_seconds_sum",
    }
    assert missing_from(exposition, present) == set()
    wrong = {
        "gist_destination_x",  # a counter is exposed with _total only
        "gist_destination_ready_total",  # a gauge has no _total
        "gist_destination_d_seconds",  # a histogram has no bare series
        "gist_destination_made_up",
    }
    assert missing_from(exposition, present | wrong) == wrong
    # A family in a # HELP line only, or in a comment, is not declared.
    assert missing_from("# HELP gist_destination_y_total y\n", {"gist_destination_y_total"})
    assert sample_names(exposition) == present - {"gist_destination_x_total"}


# --- a running worker -------------------------------------------------------------------


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[SandboxProcess]:
    sb = SandboxProcess(tmp_path, "--batch-delay", "0.2")
    await sb.ready()
    yield sb
    await sb.close()


def _identify(user: str) -> dict[str, Any]:
    return {
        "type": "identify",
        "messageId": unique("m"),
        "userId": user,
        "traits": {"email": f"{user}@example.com", "plan": "pro"},
        "timestamp": "2026-11-01T12:00:00.000Z",
    }


def _track(user: str, event: str) -> dict[str, Any]:
    return {
        "type": "track",
        "messageId": unique("m"),
        "userId": user,
        "event": event,
        "properties": {"n": 1},
        "timestamp": "2026-11-01T12:01:00.000Z",
    }


def mixed_stream() -> list[Any]:
    """Identifies, tracks, one message switched off for Gist and one poison record."""
    return [
        _identify("mon1"),
        _identify("mon2"),
        _track("mon1", "Order Completed"),
        _track("mon2", "Signed Up"),
        {
            "type": "track",
            "messageId": unique("skip"),
            "userId": "mon1",
            "event": "Hidden",
            "integrations": {"Gist": False},
        },
        b"{not json",  # dead-lettered: type "unknown", reason "invalid_json"
    ]


@dataclass
class Delivered:
    """A worker on a fresh topic whose stream has settled (every offset committed)."""

    worker: WorkerProcess
    topic: str


@contextlib.asynccontextmanager
async def delivered_stream(
    bootstrap: str, sandbox: SandboxProcess, tmp_path: Path, messages: list[Any]
) -> AsyncIterator[Delivered]:
    topic, dlq, group = unique("monitoring"), unique("monitoring-dlq"), unique("group")
    await make_topics(bootstrap, topic, partitions=1)
    await make_worker_topics(bootstrap, dlq)
    await produce(bootstrap, topic, messages)
    worker = WorkerProcess(tmp_path, worker_env(bootstrap, sandbox.url, topic, group, dlq))
    try:

        async def settled() -> bool:
            # Committed past the last record: each one delivered, skipped or dead-lettered.
            return (await committed_offsets(bootstrap, group, topic, 1))[0] == len(messages)

        await wait_for(settled, 45, what="every record to be committed")
        # The worker counts a dead letter before its offset can be committed, and sets the
        # lag right after the committed-offset gauge, in the same step.
        committed = f'gist_destination_committed_offset{{partition="0",topic="{topic}"}} '

        async def gauges_caught_up() -> bool:
            return f"{committed}{float(len(messages))}" in await worker.metrics()

        await wait_for(gauges_caught_up, 10, what="the committed-offset gauge")
        assert await worker.ready(), "/readyz does not answer 200"
        yield Delivered(worker, topic)
    finally:
        if worker.process.poll() is None:
            worker.signal(signal.SIGTERM)
            with contextlib.suppress(AssertionError):
                await worker.exited(30)
            worker.kill()
    assert worker.process.returncode == 0, worker.output()[-3000:]


# --- 1. every metric deploy/ uses is on /metrics ----------------------------------------


async def test_every_metric_deploy_uses_is_on_a_running_workers_metrics(
    kafka_bootstrap: str, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    used = metric_names_used_in_deploy()
    assert len(used) >= 20, f"too few names found in deploy/: {sorted(used)}"
    messages = mixed_stream()
    async with delivered_stream(kafka_bootstrap, sandbox, tmp_path, messages) as run:
        exposition = await run.worker.metrics()

    families = declared_families(exposition)
    ours = {name: kind for name, kind in families.items() if name.startswith(PREFIX)}
    assert ours, exposition[:2000]
    # The suffix table is right for this exposition: every sample belongs to a family.
    assert sample_names(exposition) <= exposed_series_names(exposition)

    missing = missing_from(exposition, used)
    assert not missing, f"used by deploy/ but not on the worker's /metrics: {sorted(missing)}"

    # The same helper would notice a name that is not there, or one with the wrong suffix.
    wrong = {
        PREFIX + "made_up_total",
        PREFIX + "messages_consumed",  # a counter without _total
        PREFIX + "delivery_delay_seconds",  # a histogram without _bucket
    }
    assert missing_from(exposition, used | wrong) == wrong

    # The traffic really flowed: what it moved has children, with the labels and values the
    # stream implies (2 identifies, 3 tracks of which 1 switched off, 1 poison record).
    lines = set(exposition.splitlines())
    partition = f'partition="0",topic="{run.topic}"'
    for sample in (
        'gist_destination_messages_consumed_total{type="identify"} 2.0',
        'gist_destination_messages_consumed_total{type="track"} 3.0',
        'gist_destination_messages_consumed_total{type="unknown"} 1.0',
        'gist_destination_messages_delivered_total{type="identify"} 2.0',
        'gist_destination_messages_delivered_total{type="track"} 2.0',
        'gist_destination_messages_dead_lettered_total{reason="invalid_json",type="unknown"} 1.0',
        'gist_destination_messages_skipped_total{reason="integration_off",type="track"} 1.0',
        f"gist_destination_committed_offset{{{partition}}} {float(len(messages))}",
        f"gist_destination_consumer_lag{{{partition}}} 0.0",
        f"gist_destination_partition_paused{{{partition}}} 0.0",
        "gist_destination_delivery_delay_seconds_count 4.0",
        "gist_destination_ready 1.0",
        "gist_destination_messages_in_flight 0.0",
    ):
        assert sample in lines, f"no {sample!r} in /metrics"
    for start in (
        'gist_destination_gist_requests_total{endpoint="POST /contacts/batch",status="200"} ',
        'gist_destination_gist_requests_total{endpoint="POST /events",status="200"} ',
        'gist_destination_gist_request_duration_seconds_bucket{endpoint="POST /events",',
    ):
        assert any(line.startswith(start) for line in lines), f"no {start}... in /metrics"


# --- 2. a real Prometheus scrapes the worker --------------------------------------------


class PrometheusProcess:
    """``prometheus`` on a free local port, scraping one target every second and
    evaluating deploy/prometheus/alerts.yml every second."""

    def __init__(self, binary: str, tmp: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {
                    "job_name": JOB,
                    "metrics_path": "/metrics",
                    "static_configs": [{"targets": [target]}],
                }
            ],
        }
        self.config = tmp / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.log = tmp / "prometheus.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={tmp / 'prometheus-data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        self.http = httpx.AsyncClient(base_url=self.url, timeout=5)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    async def ready(self, within: float = 30) -> None:
        async def up() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"prometheus exited {self.process.returncode}: {self.output()}"
                )
            try:
                return (await self.http.get("/-/ready")).status_code == 200
            except httpx.TransportError:
                return False

        await wait_for(up, within, what="Prometheus to be ready")

    async def api(self, path: str, **params: str) -> Any:
        response = await self.http.get(f"/api/v1/{path}", params=params)
        body = response.json()
        assert response.status_code == 200, body
        assert body["status"] == "success", body
        return body["data"]

    async def query(self, promql: str) -> list[dict[str, Any]]:
        data = await self.api("query", query=promql)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    async def rules(self) -> list[dict[str, Any]]:
        groups = (await self.api("rules"))["groups"]
        return [rule | {"file": group["file"]} for group in groups for rule in group["rules"]]

    async def close(self) -> None:
        await self.http.aclose()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@pytest.fixture
def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.skip(
            "the prometheus server is not on PATH (Debian: apt-get install prometheus; "
            "./dev test installs it)"
        )
    return path


def _epoch(rfc3339: str) -> float:
    """Seconds since the epoch of Prometheus' ``2026-11-22T22:52:21.192582059Z``."""
    return datetime.fromisoformat(rfc3339).timestamp()


def _alert_rule_names() -> set[str]:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return {rule.get("alert") or rule["record"] for group in groups for rule in group["rules"]}


async def test_prometheus_scrapes_the_worker_and_evaluates_the_alerts(
    prometheus_binary: str, kafka_bootstrap: str, sandbox: SandboxProcess, tmp_path: Path
) -> None:
    messages = mixed_stream()
    async with delivered_stream(kafka_bootstrap, sandbox, tmp_path, messages) as run:
        instance = f"127.0.0.1:{run.worker.metrics_port}"
        prometheus = PrometheusProcess(prometheus_binary, tmp_path, instance)
        try:
            await prometheus.ready()

            # The worker's series arrive, from the one target, which is up.
            async def scraped() -> bool:
                consumed = await prometheus.query("gist_destination_messages_consumed_total")
                up = await prometheus.query(f'up{{job="{JOB}"}}')
                return bool(consumed) and [s["value"][1] for s in up] == ["1"]

            await wait_for(scraped, 30, what="Prometheus to scrape the worker")
            consumed = await prometheus.query("gist_destination_messages_consumed_total")
            assert {s["metric"]["job"] for s in consumed} == {JOB}
            assert {s["metric"]["instance"] for s in consumed} == {instance}
            assert {s["metric"]["type"] for s in consumed} == {"identify", "track", "unknown"}
            total = await prometheus.query("sum(gist_destination_messages_consumed_total)")
            assert float(total[0]["value"][1]) == len(messages)
            ready = await prometheus.query(f'gist_destination_ready{{instance="{instance}"}}')
            assert [s["value"][1] for s in ready] == ["1"]

            # The dashboard's variables find the worker and the topic.
            instances = await prometheus.api(
                "label/instance/values", **{"match[]": "gist_destination_ready"}
            )
            assert instances == [instance]
            topics = await prometheus.api(
                "label/topic/values", **{"match[]": "gist_destination_consumer_lag"}
            )
            assert run.topic in topics

            # The rules of alerts.yml are loaded, and each evaluates without error once the
            # worker's series are in (an evaluation before the first scrape proves nothing).
            scraped_at = float(consumed[0]["value"][0])  # Prometheus' clock, in seconds

            async def evaluated() -> bool:
                rules = await prometheus.rules()
                broken = {r["name"]: r.get("lastError") for r in rules if r["health"] == "err"}
                assert not broken, f"rules failing to evaluate: {broken}"
                return bool(rules) and all(
                    r["health"] == "ok" and _epoch(r["lastEvaluation"]) > scraped_at for r in rules
                )

            await wait_for(evaluated, 20, what="every rule to be evaluated")
            rules = {r["name"]: r for r in await prometheus.rules()}
            assert set(rules) == _alert_rule_names()
            assert {r["file"] for r in rules.values()} == {str(ALERTS)}
            assert all(r["type"] == "alerting" for r in rules.values())
            # Up and ready, no 401s, one dead letter before the first scrape: all quiet.
            firing = {name for name, r in rules.items() if r["state"] != "inactive"}
            assert not firing, f"alerts not inactive on a healthy worker: {firing}"

            # A dead letter while Prometheus watches puts GistDestinationDeadLetters pending
            # (its share of what came in; it fires only if a share lasts 15 minutes, which
            # promtool's cases check), with the labels the worker gives it.
            await produce(kafka_bootstrap, run.topic, [b"{still not json"])

            async def dead_letter_alert() -> list[dict[str, Any]]:
                alerts = (await prometheus.api("alerts"))["alerts"]
                return [
                    a
                    for a in alerts
                    if a["labels"]["alertname"] == "GistDestinationDeadLetters"
                    and a["state"] == "pending"
                ]

            async def pending() -> bool:
                return bool(await dead_letter_alert())

            await wait_for(pending, 30, what="GistDestinationDeadLetters to be pending")
            (alert,) = await dead_letter_alert()
            assert alert["labels"]["type"] == "unknown"
            assert alert["labels"]["reason"] == "invalid_json"
            assert alert["labels"]["severity"] == "warning"
        finally:
            await prometheus.close()
