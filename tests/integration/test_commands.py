"""The operator's commands end to end, as an operator runs them: ``map`` on a file,
``plan`` on a topic, and ``replay`` of dead letters a bad rules file made, after the
rules are fixed, twice."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.integration.harness import (
    SandboxProcess,
    WorkerProcess,
    committed_offsets,
    list_topics,
    make_topics,
    make_worker_topics,
    produce,
    read_topic,
    suppressions_of,
    unique,
    wait_for,
    worker_env,
)

pytestmark = pytest.mark.integration


def command(
    *args: str, stdin: bytes | None = None, **env: str
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "destination", *args],
        input=stdin,
        capture_output=True,
        timeout=120,
        env={**os.environ, **env},
        check=False,
    )


def identify(user: str) -> dict[str, Any]:
    return {"type": "identify", "userId": user, "messageId": f"id-{user}",
            "traits": {"email": f"{user}@example.com", "plan": "pro"}}  # fmt: skip


def track(user: str, n: int) -> dict[str, Any]:
    return {"type": "track", "userId": user, "event": "Viewed", "messageId": f"tr-{user}-{n}",
            "context": {"traits": {"email": f"{user}@example.com"}}}  # fmt: skip


def test_map_shows_what_each_message_becomes(tmp_path: Path) -> None:
    source = tmp_path / "messages.jsonl"
    source.write_bytes(
        b"\n".join(
            [
                orjson.dumps(identify("u1")),
                orjson.dumps({"batch": [{"type": "page", "userId": "u1"}, track("u1", 1)]}),
                b"{not json",
            ]
        )
    )
    done = command("map", str(source))
    assert done.returncode == 0, done.stderr
    rows = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert [(r["record"], r["index"], r["outcome"]) for r in rows] == [
        (1, None, "sent"), (2, 0, "skipped"), (2, 1, "sent"), (3, None, "rejected"),
    ]  # fmt: skip
    assert rows[0]["operations"][0]["contact"]["custom_properties"] == {"plan": "pro"}
    assert rows[1]["reason"] == "type_off"
    assert rows[3]["reason"] == "invalid_json"
    # A rules change tried before it is deployed: page views become events.
    rules = tmp_path / "rules.yaml"
    rules.write_text("version: 1\npage:\n  enabled: true\n")
    done = command("map", str(source), "--rules", str(rules), "--format", "table")
    assert done.returncode == 0, done.stderr
    assert b"page      sent      event 'Viewed a Page' for u1" in done.stdout
    assert command("map", str(tmp_path / "missing.jsonl")).returncode == 2
    # In CI on a rules change: any rejected message fails the run.
    done = command("map", str(source), "--rules", str(rules), "--strict")
    assert done.returncode == 1
    assert done.stderr == b"gist-destination map: 1 of 4 message(s) rejected (--strict)\n"
    assert len(done.stdout.splitlines()) == 4


async def test_plan_reads_a_topic_and_says_whether_it_fits(kafka_bootstrap: str) -> None:
    topic = unique("segment")
    await make_topics(kafka_bootstrap, topic, partitions=2)
    messages: list[Any] = [identify(f"u{i}") for i in range(40)]
    messages += [track(f"u{i % 40}", i) for i in range(200)]
    messages += [messages[-1]] * 10  # a producer's retries
    await produce(kafka_bootstrap, topic, messages)
    done = await asyncio.to_thread(
        command, "plan", "--topic", topic, "--sample", "1000", "--json", "--rate", "50",
        KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, KAFKA_GROUP_ID=unique("group"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    plan = orjson.loads(done.stdout)
    assert plan["records"] == 250
    lines = {line["what"]: line for line in plan["lines"]}
    assert lines["track: Viewed"]["requests"] == 200  # one each, the retries none
    assert lines["track: Viewed"]["duplicates"] == 10
    assert lines["identify"]["requests"] < 1  # 40 contacts: part of one import and poll
    # 50 records/s at ~0.8 requests each is ~3.5M requests a day: more than 864,000.
    assert plan["fits"] is False
    assert plan["lag"] == 250  # the group never committed
    assert plan["group"].startswith("group-")
    assert plan["group_committed"] is False


async def test_plan_warns_of_a_burst_and_names_the_group(kafka_bootstrap: str) -> None:
    """A one-off produce two hours ago, all within a second: the rate its timestamps give
    is the burst's; the lag is the named group's, drained in minutes."""
    topic, group = unique("segment"), unique("group")
    await make_topics(kafka_bootstrap, topic, partitions=2)
    two_hours_ago = int((time.time() - 7200) * 1000)
    messages = [track(f"u{i % 40}", i) for i in range(300)]
    await produce(kafka_bootstrap, topic, messages[:150], timestamp_ms=two_hours_ago)
    await produce(kafka_bootstrap, topic, messages[150:], timestamp_ms=two_hours_ago + 500)
    done = await asyncio.to_thread(
        command, "plan", "--topic", topic, "--group", group,
        KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode()
    assert "WARNING: the sample is a burst (written in 0.5 s, then nothing for 2.0 h)" in out
    assert "the rate below is the burst's, not the topic's: give --rate R" in out
    assert "at 600.0 records/s (measured)" in out
    assert f"consumer group '{group}': lag 300 records (it has committed nothing" in out
    assert "min to drain at the budget's rate" in out  # 300 events: 30 s at 10 a second
    assert done.stderr == b""

    missing = unique("typo")
    done = await asyncio.to_thread(
        command, "plan", "--topic", missing, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap
    )
    assert done.returncode == 2
    assert f"--topic: no topic '{missing}'".encode() in done.stderr
    assert missing not in await list_topics(kafka_bootstrap)


async def test_replay_sends_fixed_dead_letters_once(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    sandbox = SandboxProcess(tmp_path, "--batch-delay", "0.1")
    await sandbox.ready()
    topic, dlq, group = unique("segment"), unique("dlq"), unique("group")
    await make_topics(kafka_bootstrap, topic, partitions=1)
    await make_worker_topics(kafka_bootstrap, dlq)
    bad_rules = tmp_path / "bad.yaml"  # the user id read from a field no message has
    bad_rules.write_text("version: 1\nidentity:\n  user_id: properties.uid\n  email: []\n")
    messages = [track(f"u{i}", i) for i in range(5)]
    for message in messages:
        del message["context"]  # no email: only the (badly configured) user id identifies
    await produce(kafka_bootstrap, topic, [identify(f"u{i}") for i in range(5)])
    env = worker_env(kafka_bootstrap, sandbox.url, topic, group, dlq)
    worker = WorkerProcess(tmp_path, env, name="setup")
    await wait_for(
        lambda: _committed(kafka_bootstrap, group, topic, 5), 60, what="the users imported"
    )
    worker.signal(signal.SIGTERM)
    assert await worker.exited(60) == 0

    await produce(kafka_bootstrap, topic, messages)
    worker = WorkerProcess(tmp_path, {**env, "MAPPING_CONFIG": str(bad_rules)}, name="bad")
    letters = await read_topic(kafka_bootstrap, dlq, expect=5, within=60)
    assert {dict(r.headers)["gist-dlq-reason"] for r in letters} == {b"missing_identity"}
    worker.signal(signal.SIGTERM)
    assert await worker.exited(60) == 0
    assert (await sandbox.state())["events"] == []

    worker = WorkerProcess(tmp_path, env, name="fixed")  # the rules fixed
    try:
        base = {
            "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
            "KAFKA_SUPPRESSION_TOPIC": suppressions_of(dlq),
        }
        dry = await asyncio.to_thread(
            command, "replay", "--from", dlq, "--to", topic, "--dry-run", **base
        )
        assert dry.returncode == 0, dry.stderr
        assert b"would copy 5" in dry.stdout
        assert b"5  missing_identity" in dry.stdout

        done = await asyncio.to_thread(
            command, "replay", "--from", dlq, "--to", topic, "--reason", "missing_identity",
            **base,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert b"copied 5" in done.stdout

        async def five_events() -> bool:
            return len((await sandbox.state())["events"]) == 5

        await wait_for(five_events, 60, what="the replayed tracks in Gist")
        replayed = [r for r in await read_topic(kafka_bootstrap, topic, expect=15) if r.headers]
        assert {k for r in replayed for k, _ in r.headers} >= {"gist-replay", "gist-replay-of"}
        assert not any(k.startswith("gist-dlq-") for r in replayed for k, _ in r.headers)

        again = await asyncio.to_thread(
            command, "replay", "--from", dlq, "--to", topic, **base
        )  # a second run: nothing is sent twice
        assert again.returncode == 0, again.stderr
        await wait_for(lambda: _committed(kafka_bootstrap, group, topic, 20), 60, what="commit")
        assert len((await sandbox.state())["events"]) == 5
        assert len(await read_topic(kafka_bootstrap, dlq, expect=5, within=3)) == 5  # left as is
    finally:
        worker.signal(signal.SIGTERM)
        assert await worker.exited(60) == 0
        await sandbox.close()


async def test_replay_names_a_missing_topic_and_creates_none(kafka_bootstrap: str) -> None:
    topic, dlq = unique("segment"), unique("dlq")
    await make_topics(kafka_bootstrap, topic, dlq)
    base = {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap}
    for source, target, option in ((dlq + "-typo", topic, "--from"), (dlq, topic + "-x", "--to")):
        done = await asyncio.to_thread(
            command, "replay", "--from", source, "--to", target, "--dry-run", **base
        )
        missing = source if option == "--from" else target
        assert done.returncode == 2, done.stderr
        assert f"{option}: no topic '{missing}'".encode() in done.stderr
        assert b"Traceback" not in done.stderr
        assert done.stdout == b""  # not "read 0 dead letters"
        assert missing not in await list_topics(kafka_bootstrap)


async def test_produce_uses_the_workers_kafka_settings_and_checks_the_topic(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = unique("segment")
    await make_topics(kafka_bootstrap, topic)
    source = tmp_path / "messages.jsonl"
    source.write_bytes(orjson.dumps(identify("u1")) + b"\n")
    base = {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap}
    # The embedded broker speaks no SASL: a producer that uses the settings cannot connect.
    sasl = {"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_USERNAME": "u",
            "KAFKA_SASL_PASSWORD": "p"}  # fmt: skip
    done = await asyncio.to_thread(command, "produce", str(source), "--topic", topic,
                                   **base, **sasl)  # fmt: skip
    assert done.returncode == 1, done.stdout
    assert done.stderr.decode().splitlines() == [
        f"gist-destination produce: cannot reach Kafka at {kafka_bootstrap} (set "
        "KAFKA_BOOTSTRAP_SERVERS or --bootstrap-servers, and KAFKA_SECURITY_PROTOCOL, "
        "KAFKA_SASL_* and KAFKA_SSL_* as for run)"
    ]
    assert await read_topic(kafka_bootstrap, topic, expect=0, within=2) == []
    incomplete = {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}  # no user name or password
    done = await asyncio.to_thread(command, "produce", str(source), "--topic", topic,
                                   **base, **incomplete)  # fmt: skip
    assert done.returncode == 2
    assert b"KAFKA_SASL_USERNAME: required" in done.stderr

    done = await asyncio.to_thread(command, "produce", str(source), "--topic", topic, **base)
    assert done.returncode == 0, done.stderr
    assert len(await read_topic(kafka_bootstrap, topic, expect=1)) == 1

    typo = topic + "-typo"
    done = await asyncio.to_thread(command, "produce", str(source), "--topic", typo, **base)
    assert done.returncode == 2
    assert f"--topic: no topic '{typo}'".encode() in done.stderr
    assert typo not in await list_topics(kafka_bootstrap)
    done = await asyncio.to_thread(
        command, "produce", str(source), "--topic", typo, "--create-topic", **base
    )
    assert done.returncode == 0, done.stderr
    assert typo in await list_topics(kafka_bootstrap)


async def _committed(bootstrap: str, group: str, topic: str, offset: int) -> bool:
    return (await committed_offsets(bootstrap, group, topic, 1)) == {0: offset}


async def test_replay_refuses_deleted_people_until_the_suppression_is_lifted(
    kafka_bootstrap: str,
) -> None:
    """A dead letter about a person a delete suppressed is refused by replay; ``suppressions
    list`` finds the person by id (the topic names no one), ``lift`` lifts it, and the next
    replay copies the letter."""
    from aiokafka import AIOKafkaProducer

    from destination.pipeline.suppress import Suppressions, identity_key

    topic, dlq = unique("segment"), unique("dlq")
    await make_topics(kafka_bootstrap, topic, partitions=1)
    await make_worker_topics(kafka_bootstrap, dlq)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        letter = {"type": "identify", "userId": "u-del", "traits": {"email": "gone@example.com"}}
        headers = [("gist-dlq-reason", b"retries_exhausted"), ("gist-dlq-time", b"1800000000")]
        await producer.send_and_wait(dlq, orjson.dumps(letter), key=b"u-del", headers=headers)
        (key, value), _ = Suppressions(30).suppress(["u:u-del", "e:gone@example.com"])
        await producer.send_and_wait(suppressions_of(dlq), value, key=key)
    finally:
        await producer.stop()
    env = {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
           "KAFKA_SUPPRESSION_TOPIC": suppressions_of(dlq)}  # fmt: skip

    refused = await asyncio.to_thread(command, "replay", "--from", dlq, "--to", topic, **env)
    assert refused.returncode == 0, refused.stderr
    assert b"copied 0" in refused.stdout
    assert b"refused: 1 about people deleted" in refused.stdout

    listed = await asyncio.to_thread(command, "suppressions", "list", "--json", **env)
    assert listed.returncode == 0, listed.stderr
    rows = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert [r["key"] for r in rows] == [identity_key("u:u-del").decode()]
    assert b"u-del" not in listed.stdout  # the list names no one...
    found = await asyncio.to_thread(
        command, "suppressions", "list", "--user-id", "u-del", "--json", **env
    )
    assert orjson.loads(found.stdout)["identity"] == "u-del"  # ...unless asked about one

    lifted = await asyncio.to_thread(
        command, "suppressions", "lift", "--user-id", "u-del", **env
    )
    assert lifted.returncode == 0, lifted.stderr
    copied = await asyncio.to_thread(command, "replay", "--from", dlq, "--to", topic, **env)
    assert copied.returncode == 0, copied.stderr
    assert b"copied 1" in copied.stdout
    missing = await asyncio.to_thread(
        command, "suppressions", "list", **{**env, "KAFKA_SUPPRESSION_TOPIC": "nope-x"}
    )
    assert missing.returncode == 2
    assert b"KAFKA_SUPPRESSION_TOPIC: no topic 'nope-x'" in missing.stderr
