"""The first README command, run the way a newcomer runs it, and ``produce``."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from destination.devtools.sample import sample_stream
from tests.integration.harness import make_topics, read_topic, unique

pytestmark = pytest.mark.integration


def test_demo_runs_the_pipeline_end_to_end(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "destination",
            "demo",
            "--users",
            "8",
            "--batch-delay",
            "0.2",
            "--workdir",
            str(tmp_path),
            "--timeout",
            "120",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    expected = len(sample_stream(8))
    assert f"sent {expected} sample Segment messages" in out
    assert f"consumed {expected}/{expected}" in out
    assert "contacts: 8 (8 users)" in out
    # One event per user, and the shoppers' (users 1, 2, 5, 6): two Product Added each,
    # then a Cart Viewed (1, 5) or an Order Completed (2, 6).
    assert "events:   20:" in out
    assert "e-commerce store 'Demo Shop': 4 customers, 2 products, 2 carts, 2 orders" in out
    # user 0 enters vip_buyers then exits it; user 4 enters churn_risk
    assert "churn_risk=true: 1" in out
    assert "vip_buyers=false: 1" in out
    assert "Dead-lettered to 'segment-events-dlq': 3" in out
    for reason in ("invalid_json", "missing_identity", "unknown_type"):
        assert reason in out
    assert "Metrics were served at http://127.0.0.1:" in out
    assert (tmp_path / "worker.log").stat().st_size > 0


async def test_produce_sends_a_file_keyed_by_user(kafka_bootstrap: str, tmp_path: Path) -> None:
    topic = unique("produce")
    await make_topics(kafka_bootstrap, topic, partitions=1)
    lines = [
        {"type": "identify", "userId": "u-1", "traits": {"email": "a@example.com"}},
        {"type": "track", "anonymousId": "anon-9", "event": "Viewed"},
    ]
    source = tmp_path / "messages.jsonl"
    source.write_bytes(b"\n".join(orjson.dumps(m) for m in lines) + b"\n")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "destination",
        "produce",
        str(source),
        "--topic",
        topic,
        "--bootstrap-servers",
        kafka_bootstrap,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    records = await read_topic(kafka_bootstrap, topic, expect=2)
    assert [r.key for r in records] == [b"u-1", b"anon-9"]
    assert [orjson.loads(r.value) for r in records] == lines


def test_produce_reports_a_bad_line(tmp_path: Path) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text('{"type": "track"}\n{oops\n')
    result = subprocess.run(
        [sys.executable, "-m", "destination", "produce", str(source), "--topic", "t"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "bad.jsonl:2: not a JSON line" in result.stderr
