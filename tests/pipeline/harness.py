"""The whole worker in-process, fast: the in-memory Kafka twin
(``destination.devtools.local_kafka``) for Kafka, ``ModelGist`` at the HTTP edge for
Gist, and the real ``Worker`` (intake, mapping, delivery, outcomes, commits) between.

``Group`` starts and stops workers of one consumer group and watches every message end
(``Outcomes.observers``), so the tests can check the invariants: every committed offset
is below only ended records, no message ends twice or two ways, memory stays within the
limits, and every message ends once Gist behaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from aiokafka.structs import TopicPartition

from destination.devtools.local_kafka import LocalBroker, LocalKafkaClients, LocalProducer
from destination.mapping import Mapper, load_rules
from destination.pipeline.inflight import MessageWork
from destination.settings import load_settings
from destination.worker import Worker

MessageKey = tuple[int, int, int]
"""(partition, offset, index in the envelope or -1)."""


class ModelGist:
    """A Gist workspace at the HTTP edge (an ``httpx.MockTransport`` handler) whose
    answers follow a mode the test sets:

    - ``healthy``: answers as the reference says; a batch completes after 0-2 polls;
    - ``down``: every API request gets a 503;
    - ``flaky``: a third of the answers are 5xx, 429, time-outs, or a 2xx whose body is
      not JSON (after the request took effect);
    - ``odd``: batch polls answer statuses the reference does not know (``???``,
      ``completed``), completed batches report errors as plain strings or not at all,
      batch imports come back without a ``batch_id`` now and then (queued all the same).

    Contacts whose email starts with ``bad`` fail inside a completed batch; a batch
    holding one whose email starts with ``reject`` is refused whole (400). Everything
    else is applied when its batch completes; events are kept as they come.
    """

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.mode = "healthy"
        self.contacts: dict[str, dict[str, Any]] = {}  # by user_id (else email)
        self.events: list[dict[str, Any]] = []
        self.batches: dict[str, dict[str, Any]] = {}
        self.requests = 0
        self._ids = itertools.count()
        # An import answer the client cannot use (no batch_id, not JSON) is given once
        # per batch at most: the client tries such a request a few times only, and the
        # model's messages must end as their content says, not by chance.
        self._unusable: set[bytes] = set()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        path = request.url.path
        if path == "/token/info":
            return httpx.Response(200, json={"workspace_id": "w-model"})
        if self.mode == "down":
            return httpx.Response(503, json={"errors": [{"code": "unavailable"}]})
        if self.mode == "flaky" and self.rng.random() < 0.33:
            fault = self.rng.choice(["500", "503", "429", "timeout", "html"])
            if fault == "timeout":
                raise httpx.ReadTimeout("model time-out", request=request)
            if fault == "429":
                return httpx.Response(429, headers={"Retry-After": "0"}, json={"errors": []})
            if fault != "html":
                return httpx.Response(int(fault), json={"errors": [{"code": "server_error"}]})
            if path == "/contacts/batch" and not self._may_be_unusable(request):
                return self._answer(request, path)
            answer = self._answer(request, path)
            if answer.status_code == 200:
                return httpx.Response(200, text="<html>oops</html>")
            return answer
        return self._answer(request, path)

    def _may_be_unusable(self, request: httpx.Request) -> bool:
        body = bytes(request.content)
        if body in self._unusable:
            return False
        self._unusable.add(body)
        return True

    def _answer(self, request: httpx.Request, path: str) -> httpx.Response:
        body = orjson.loads(request.content) if request.content else None
        if path == "/contacts/batch":
            contacts = body["contacts"]
            if any(str(c.get("email", "")).startswith("reject") for c in contacts):
                return httpx.Response(400, json={"errors": [{"code": "invalid_email"}]})
            batch_id = f"b{next(self._ids)}"
            self.batches[batch_id] = {"contacts": contacts, "polls": self.rng.randint(0, 2)}
            answer: dict[str, Any] = {"status": "QUEUED", "queued_contacts": len(contacts)}
            if not (self.mode == "odd" and self.rng.random() < 0.2) or not self._may_be_unusable(
                request
            ):
                answer["batch_id"] = batch_id
            return httpx.Response(200, json=answer)
        if path.startswith("/contacts/batch/"):
            batch = self.batches.get(path.rsplit("/", 1)[1])
            if batch is None:
                return httpx.Response(404, json={"errors": [{"code": "not_found"}]})
            if batch["polls"] > 0 or (self.mode == "odd" and self.rng.random() < 0.5):
                batch["polls"] = max(0, batch["polls"] - 1)
                choices = ["QUEUED", "IN_PROGRESS"]
                if self.mode == "odd":
                    choices += ["completed", "???"]  # unknown: not completed yet
                return httpx.Response(200, json={"status": self.rng.choice(choices)})
            return httpx.Response(200, json=self._complete(batch))
        if path == "/events":
            self.events.append(body)
            return httpx.Response(200, json={"event": {"id": len(self.events)}})
        return httpx.Response(200, json={})

    def _complete(self, batch: dict[str, Any]) -> dict[str, Any]:
        # Gist imports batches in turn: completing one applies every earlier one first
        # (an old owner's batch never lands after a newer owner's).
        for earlier in self.batches.values():
            if earlier is batch:
                break
            if "result" not in earlier:
                self._apply(earlier)
        if "result" not in batch:
            self._apply(batch)
        return self._status(batch)

    def _apply(self, batch: dict[str, Any]) -> None:
        contacts = batch["contacts"]
        if "result" not in batch:  # applied once, however often it is polled
            failed = []
            for index, contact in enumerate(contacts):
                if str(contact.get("email", "")).startswith("bad"):
                    failed.append(index)
                    continue
                key = str(contact.get("user_id") or contact.get("email"))
                stored = self.contacts.setdefault(key, {"custom_properties": {}})
                for name, value in contact.items():
                    if name == "custom_properties":
                        stored["custom_properties"].update(value)
                    else:
                        stored[name] = value
            batch["result"] = failed

    def _status(self, batch: dict[str, Any]) -> dict[str, Any]:
        return completed_status(self.rng, self.mode, len(batch["contacts"]), batch["result"])


def completed_status(
    rng: random.Random, mode: str, contacts: int, failed: list[int]
) -> dict[str, Any]:
    """A COMPLETED batch status with its failed contacts' errors, in the shape the mode
    asks (``odd``: objects, plain strings or none at all, at random)."""
    shape = rng.choice(["objects", "strings", "omitted"]) if mode == "odd" else "objects"
    errors: list[Any] = {
        "objects": [{"index": i, "message": "invalid email"} for i in failed],
        "strings": [f"contact {i}: invalid email" for i in failed],
        "omitted": [],
    }[shape]
    return {"status": "COMPLETED", "imported_contacts": contacts - len(failed), "errors": errors}


def message_key(message: MessageWork) -> MessageKey:
    """(partition, offset, index in its envelope or -1): where a message was read."""
    record = message.record
    return (
        record.partition.tp.partition,
        record.offset,
        -1 if message.index is None else message.index,
    )


@dataclass
class End:
    key: MessageKey
    worker: int
    how: str
    reason: str | None
    at: float  # time.monotonic()


@dataclass
class Ends:
    """Every end observed, by message, in order (``log``) and all of them in the order
    they happened (``sequence``). A crashed worker's ends after its crash are not
    counted (``silence``): a killed process ends nothing. ``listeners`` hear each end
    as it happens."""

    log: dict[MessageKey, list[tuple[int, str, str | None]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    sequence: list[End] = field(default_factory=list)
    silenced: set[int] = field(default_factory=set)
    listeners: list[Callable[[End, MessageWork], None]] = field(default_factory=list)

    def silence(self, worker_id: int) -> None:
        self.silenced.add(worker_id)

    def observer(self, worker_id: int) -> Callable[[MessageWork, str, str | None], None]:
        def observe(message: MessageWork, how: str, reason: str | None) -> None:
            if worker_id in self.silenced:
                return
            key = message_key(message)
            self.log[key].append((worker_id, how, reason))
            end = End(key, worker_id, how, reason, time.monotonic())
            self.sequence.append(end)
            for listener in self.listeners:
                listener(end, message)

        return observe


DEFAULTS: dict[str, Any] = {
    "gist_api_key": "model-key",
    "gist_api_url": "http://gist.model",
    "gist_rate_limit": 10_000,
    "gist_rate_window": 0.2,
    "gist_rate_margin": 0.0,
    "gist_batch_size": 20,
    "gist_batch_wait": 0.02,
    "gist_batch_poll_interval": 0.01,
    "gist_batch_poll_max_interval": 0.05,
    "gist_retry_base": 0.01,
    "gist_retry_cap": 0.05,
    "gist_retry_max_duration": 3600.0,
    "gist_request_timeout": 5.0,
    "commit_interval": 0.05,
    "rebalance_timeout": 1.0,
    "shutdown_timeout": 2.0,
    "metrics_port": 0,
    "metrics_host": "127.0.0.1",
    "log_level": "WARNING",
}


class Group:
    """Workers of one consumer group on a twin broker, against one ``ModelGist``.

    The model test plugs in what it plays beyond that: ``transport_for(worker_id)``
    gives each worker its own Gist transport, ``clients_for(broker)`` its Kafka clients,
    ``rules`` the mapping rules file, ``on_worker(worker_id, worker)`` runs before the
    worker serves, and ``on_crash(worker_id, worker, clients)`` when it is killed,
    before anything else (to cut it off from Gist and Redis at once).
    ``building`` is the id of the worker being constructed (for factories the worker
    calls from its constructor)."""

    def __init__(
        self,
        broker: LocalBroker,
        topic: str,
        dlq: str,
        gist: Any,
        *,
        transport_for: Callable[[int], httpx.AsyncBaseTransport] | None = None,
        clients_for: Callable[[LocalBroker], LocalKafkaClients] | None = None,
        rules: Path | None = None,
        on_worker: Callable[[int, Worker], None] | None = None,
        on_crash: Callable[[int, Worker, LocalKafkaClients], None] | None = None,
        **settings: Any,
    ) -> None:
        self.broker = broker
        self.topic = topic
        self.dlq = dlq
        self.gist = gist
        self.group_id = f"group-{topic}"
        self.settings = {
            **DEFAULTS,
            "kafka_topics": topic,
            "kafka_dlq_topic": dlq,
            "kafka_suppression_topic": f"{dlq}-suppressions",
            "kafka_group_id": self.group_id,
            **settings,
        }
        self.mapper = Mapper(load_rules(rules))
        self.ends = Ends()
        self.workers: dict[int, tuple[Worker, asyncio.Task[int], LocalKafkaClients]] = {}
        self._ids = itertools.count(1)
        self._transport_for = transport_for or (lambda _: httpx.MockTransport(self.gist))
        self._clients_for = clients_for or LocalKafkaClients
        self._on_worker = on_worker
        self._on_crash = on_crash
        self.building: int | None = None

    async def start_worker(self) -> Worker:
        worker_id = next(self._ids)
        clients = self._clients_for(self.broker)
        self.building = worker_id
        try:
            worker = Worker(
                load_settings(**self.settings),
                self.mapper,
                "model-key",
                kafka=clients,
                gist_transport=self._transport_for(worker_id),
            )
        finally:
            self.building = None
        worker.outcomes.observers.append(self.ends.observer(worker_id))
        if self._on_worker is not None:
            self._on_worker(worker_id, worker)
        task = asyncio.create_task(worker.serve(), name=f"worker-{worker_id}")
        self.workers[worker_id] = (worker, task, clients)
        async with asyncio.timeout(10):
            while worker.stream is None or not worker.stream.assigned_once.is_set():
                if task.done():
                    raise AssertionError(f"worker {worker_id} exited: {task.result()}")
                await asyncio.sleep(0.01)
        return worker

    async def stop_worker(self, worker_id: int) -> int:
        """SIGTERM: drain, commit, leave."""
        worker, task, _ = self.workers.pop(worker_id)
        worker.request_stop()
        async with asyncio.timeout(30):
            return await task

    async def crash_worker(self, worker_id: int) -> None:
        """Killed: nothing more is committed; the group notices it is gone. Its
        consumers' coordinators are stopped, so that they do not revoke and rejoin for a
        dead process (which would let it commit again)."""
        worker, task, clients = self.workers.pop(worker_id)
        if self._on_crash is not None:
            self._on_crash(worker_id, worker, clients)
        for consumer in clients.consumers:
            coordinator, consumer._coordinator = consumer._coordinator, None
            if coordinator is not None:
                coordinator.cancel()
            with contextlib.suppress(Exception):
                self.broker.expel(consumer)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    async def stop_all(self) -> None:
        for worker_id in list(self.workers):
            await self.stop_worker(worker_id)

    async def stop_all_quietly(self) -> None:
        """After a failed test: end every worker, whatever state it is in."""
        for worker_id in list(self.workers):
            await self.crash_worker(worker_id)

    def committed(self) -> dict[int, int]:
        partitions = self.broker.partitions_for(self.topic)
        return {
            p: self.broker.committed(self.group_id, TopicPartition(self.topic, p)) or 0
            for p in partitions
        }

    def end_offsets(self) -> dict[int, int]:
        return {
            p: self.broker.end_offset(self.topic, p)
            for p in self.broker.partitions_for(self.topic)
        }

    async def until_committed(self, within: float = 30.0) -> None:
        """Wait until every record in the topic is committed."""
        deadline = time.monotonic() + within
        while self.committed() != self.end_offsets():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"not all committed: {self.committed()} of {self.end_offsets()}"
                )
            await asyncio.sleep(0.02)


def make_broker(topic: str, dlq: str, partitions: int = 3) -> LocalBroker:
    """A twin broker whose input topic takes records up to 8 MiB (the dead-letter
    producer keeps Kafka's default 1 MiB, so a huge record's dead letter is truncated)."""
    broker = LocalBroker(max_message_bytes=8 * 1024 * 1024)
    broker.create_topic(topic, partitions)
    broker.create_topic(dlq, 1)
    broker.create_topic(f"{dlq}-suppressions", 1)
    return broker


async def produce(
    broker: LocalBroker,
    topic: str,
    values: list[tuple[bytes | None, Any]],
    partition: int | None = None,
) -> None:
    """Send (key, message) pairs; a message that is not bytes is sent as JSON."""
    producer = LocalProducer(broker, max_request_size=8 * 1024 * 1024)
    await producer.start()
    for key, value in values:
        raw = value if isinstance(value, bytes) else orjson.dumps(value)
        await producer.send_and_wait(topic, raw, key=key, partition=partition)
    await producer.stop()


def dead_letters(broker: LocalBroker, dlq: str) -> list[Any]:
    return broker.records(dlq, 0)


def header(record: Any, name: str) -> bytes | None:
    for key, value in record.headers:
        if key == name:
            return bytes(value)
    return None
