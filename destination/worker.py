"""The worker's lifecycle: start, consume until told to stop, drain, commit, exit.

    run()          sync entry point: event loop, signal handlers, exit code
    Worker.serve() async: start-up checks, then the loops below until a stop
    shutdown       stop fetching, flush contacts, wait for in-flight work, commit what is
                   finished, hand the partitions over, leave the group: all of it within
                   SHUTDOWN_TIMEOUT of the stop request

SHUTDOWN_TIMEOUT (20 s) bounds the whole stop, so it ends well inside Kubernetes' default
terminationGracePeriodSeconds (30 s, which the manifests keep): the drain gets what is
left once ``CLOSING_RESERVE`` is kept for the commit, the hand-over and the clients'
stops. What did not end is left uncommitted for the next owner (at-least-once), with what
Gist confirmed of it recorded, never half-recorded.

Exit codes: 0 after a requested stop, 2 for bad settings or mapping rules,
3 when Gist rejects the API key (the stream is kept, nothing is dead-lettered).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import sys
import time
from collections import deque
from collections.abc import Awaitable
from typing import Any

import httpx
import structlog
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor

from destination.gist import (
    CredentialsError,
    GistClient,
    GistError,
    RateLimit,
    RateLimiter,
    RetryPolicy,
)
from destination.gist._redis import RedisBudget, redis_client
from destination.kafka_security import kafka_security as kafka_security  # re-exported
from destination.mapping import Mapper
from destination.observability import log_events, metrics
from destination.observability.health import HealthServer
from destination.pipeline.consume import FlowLimits, StreamConsumer, sticky_assignor
from destination.pipeline.dead_letter import (
    DeadLetterTopicError,
    DeadLetterWriter,
    KafkaRecordReader,
    check_topic,
)
from destination.pipeline.dedup import Dedup, DeliveredIds, SharedIds
from destination.pipeline.deliver import Delivery, DeliverySettings
from destination.pipeline.inflight import Failure, Ledger, MessageWork
from destination.pipeline.memory import ContactMemory, SharedContactMemory
from destination.pipeline.outcome import Outcomes
from destination.pipeline.read_ahead import Counts, ReadAhead
from destination.pipeline.suppress import SuppressionLog, Suppressions
from destination.pipeline.waiting import cancel_and_wait
from destination.pipeline.workspace import WorkspaceMismatch, prepare
from destination.settings import Settings, redis_password

log = structlog.get_logger(__name__)


class KafkaClients:
    """Makes the worker's Kafka clients: aiokafka's here, the in-memory twin's in tests
    (``destination.devtools.local_kafka.LocalKafkaClients``)."""

    def consumer(self, **options: Any) -> Any:
        from aiokafka import AIOKafkaConsumer

        from destination import kafka_join

        kafka_join.install()  # one JoinGroup naming every assignor (see the module)
        return AIOKafkaConsumer(**options)

    def producer(self, **options: Any) -> Any:
        from aiokafka import AIOKafkaProducer

        return AIOKafkaProducer(**options)

    def record_reader(self, bootstrap_servers: str, **options: Any) -> Any:
        """``ReadRecord`` with a ``close()``: reads records again by offset."""
        return KafkaRecordReader(bootstrap_servers, **options)

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_CREDENTIALS = 3


_LOOP_TURN_BOUND = 2.0
"""Seconds a stop waits for the consume loop's turn to end before cancelling it."""
_CLOSE_STEP_BOUND = 5.0
"""Seconds each Kafka step of the shutdown (the last commit, the hand-over, the clients'
stops) may take at most: with the broker gone, aiokafka would wait without end."""
CLOSING_RESERVE = 8.0
"""Seconds of SHUTDOWN_TIMEOUT kept, after the drain, for the last commit, the hand-over
and the clients' stops (at most 40% of it: a short SHUTDOWN_TIMEOUT still drains)."""

class Worker:
    def __init__(
        self,
        settings: Settings,
        mapper: Mapper,
        api_key: str,
        *,
        kafka: KafkaClients | None = None,
        gist_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``kafka`` and ``gist_transport`` replace the real Kafka clients and HTTP
        transport (tests run the whole worker in-process on twins)."""
        self.settings = settings
        self.mapper = mapper
        self.kafka = kafka or KafkaClients()
        rate = RateLimit(
            settings.gist_rate_limit, settings.gist_rate_window, settings.gist_rate_margin
        )
        # One of several replicas, perhaps: the budget is shared through Redis, else by
        # partitions (and by partitions too whenever Redis is unavailable).
        limiter = self.limiter = RateLimiter(rate)
        limiter.start_sharing()
        self.shared: RedisBudget | None = None
        if settings.redis_url:
            self.shared = RedisBudget(
                redis_client(settings.redis_url, redis_password(settings), settings.redis_timeout),
                rate,
                limiter,
                prefix=settings.redis_key_prefix,
                timeout=settings.redis_timeout,
            )
        requests = settings.gist_max_concurrent_requests
        imports = max(1, requests // 8)
        self.client = GistClient(
            api_key,
            base_url=settings.gist_api_url,
            limiter=self.shared or limiter,
            retry=RetryPolicy(
                base=settings.gist_retry_base,
                cap=settings.gist_retry_cap,
                max_elapsed=settings.gist_retry_max_duration,
            ),
            timeout=httpx.Timeout(settings.gist_request_timeout, connect=10.0),
            # One connection per concurrent request or import, one for the batch poller.
            limits=httpx.Limits(
                max_connections=requests + imports + 1,
                max_keepalive_connections=requests + imports + 1,
            ),
            transport=gist_transport,
        )
        self.ledger = Ledger()
        self.outcomes = Outcomes(self.ledger, _NotStarted())
        self.memory = (
            ContactMemory(
                settings.contact_memory_ttl,
                settings.contact_memory_max,
                settings.contact_memory_max_bytes,
                stable=self.shared is not None,
            )
            if settings.contact_memory
            else None
        )
        self.delivery = Delivery(
            self.client,
            DeliverySettings(
                batch_max_contacts=settings.gist_batch_size,
                batch_max_wait=settings.gist_batch_wait,
                max_concurrent_requests=requests,
                max_concurrent_imports=imports,
                poll_interval=settings.gist_batch_poll_interval,
                poll_max_interval=settings.gist_batch_poll_max_interval,
                batch_deadline=settings.gist_batch_deadline,
                late_import_watch=settings.gist_late_import_watch,
                revoke_wait=settings.rebalance_timeout,
            ),
            self.outcomes,
            on_fatal=self._credentials_rejected,
            memory=self.memory,
        )
        self.dedup: Dedup | None = None
        if settings.dedup_window > 0:
            self.dedup = Dedup(
                DeliveredIds(settings.dedup_window, settings.dedup_max_ids),
                self.delivery.submit,
                self.outcomes.skipped,
                self.outcomes.dead_letter,
            )
            self.outcomes.observers.append(self.dedup.ended)
            self.delivery.ids = self.dedup
        self.suppressions = Suppressions(settings.suppress_deleted_days)
        self.suppression_log: SuppressionLog | None = None
        self.health = HealthServer(
            settings.metrics_host, settings.metrics_port, self._not_ready, self._broken
        )
        self._stop = asyncio.Event()
        self._stop_by = float("inf")  # SHUTDOWN_TIMEOUT after the stop request
        self._fatal: CredentialsError | None = None
        self._gist_ok = False
        self._consuming = False
        self._crashed: str | None = None
        self._record_reader: Any = None
        self.stream: StreamConsumer | None = None

    # --- readiness and stopping -------------------------------------------------------
    def _not_ready(self) -> str | None:
        if self._fatal is not None:
            return "Gist rejected the API key"
        if not self._gist_ok:
            return "Gist has not accepted the API key yet"
        if not self._consuming:
            return "not consuming"
        return None

    def _broken(self) -> str | None:
        """Why the pipeline is broken (a component stopped on a bug), else None."""
        return self._crashed or self.delivery.broken

    def request_stop(self) -> None:
        if not self._stop.is_set():
            self._stop_by = time.monotonic() + self.settings.shutdown_timeout
        self._stop.set()

    def _closing_step(self) -> float:
        """How long the next closing step may take: its bound, within SHUTDOWN_TIMEOUT of
        the stop request (one second at least: a commit must be tried)."""
        return max(1.0, min(_CLOSE_STEP_BOUND, self._stop_by - time.monotonic()))

    def _credentials_rejected(self, error: CredentialsError) -> None:
        if self._fatal is None:
            self._fatal = error
            metrics.READY.set(0)
            log.error(
                log_events.CREDENTIALS_REJECTED,
                status=error.status,
                endpoint=error.endpoint,
                action="check GIST_API_KEY and the workspace; consumption stopped, "
                "nothing was dead-lettered, offsets stay at the last delivered message",
            )
        self.request_stop()

    # --- the lifecycle ----------------------------------------------------------------
    async def serve(self) -> int:
        settings = self.settings
        metrics.declare_series()
        if self.shared is None:
            metrics.LIMITER_BACKEND.labels("local").set(1)
        metrics.READY.set(0)
        metrics.RATE_LIMIT_CURRENT.set(settings.gist_rate_limit)
        await self.health.start()
        log.info(
            log_events.WORKER_STARTING,
            topics=settings.kafka_topics,
            group=settings.kafka_group_id,
            gist=settings.gist_api_url,
            metrics_port=self.health.port,
        )
        producer: Any = None
        consumer: Any = None
        starting: list[asyncio.Future[Any]] = []
        try:
            if not await self._check_key():
                return EXIT_CREDENTIALS if self._fatal else EXIT_OK
            # What the rules name in the workspace is looked up while Kafka starts (a
            # few critical requests, which may wait for the start's reserve).
            workspace = asyncio.ensure_future(prepare(self.client, self.mapper.rules))
            starting.append(workspace)
            security = kafka_security(settings)
            producer = self.kafka.producer(
                bootstrap_servers=settings.kafka_bootstrap_servers,
                client_id=settings.kafka_client_id,
                acks="all",
                max_request_size=settings.kafka_dlq_max_bytes,
                **security,
            )
            if not await self._unless_stopped(producer.start()):
                return EXIT_OK
            try:
                if not await self._unless_stopped(check_topic(producer, settings.kafka_dlq_topic)):
                    return EXIT_OK
            except DeadLetterTopicError as error:
                log.error(log_events.DLQ_TOPIC_INVALID, error=str(error))
                print(f"gist-destination: {error}", file=sys.stderr)
                return EXIT_CONFIG
            if settings.suppress_deleted_days > 0:
                try:
                    checked = check_topic(
                        producer,
                        settings.kafka_suppression_topic,
                        setting="KAFKA_SUPPRESSION_TOPIC",
                    )
                    if not await self._unless_stopped(checked):
                        return EXIT_OK
                except DeadLetterTopicError as error:
                    log.error(log_events.SUPPRESSION_TOPIC_INVALID, error=str(error))
                    print(f"gist-destination: {error}", file=sys.stderr)
                    return EXIT_CONFIG
                self.suppression_log = SuppressionLog(
                    self.suppressions,
                    settings.kafka_suppression_topic,
                    producer,
                    lambda: self.kafka.consumer(
                        bootstrap_servers=settings.kafka_bootstrap_servers,
                        client_id=settings.kafka_client_id,
                        group_id=None,
                        enable_auto_commit=False,
                        auto_offset_reset="earliest",
                        **security,
                    ),
                )
                self.delivery.suppression_log = self.suppression_log
                if not await self._unless_stopped(self.suppression_log.load()):
                    return EXIT_OK
                log.info(log_events.SUPPRESSIONS_LOADED, identities=len(self.suppressions))
                self.suppression_log.follow()
            self._record_reader = self.kafka.record_reader(
                settings.kafka_bootstrap_servers, client_id=settings.kafka_client_id, **security
            )
            self.outcomes.dead_letters = DeadLetterWriter(
                producer,
                settings.kafka_dlq_topic,
                self._record_reader,
                max_bytes=settings.kafka_dlq_max_bytes,
            )
            consumer = self.kafka.consumer(
                bootstrap_servers=settings.kafka_bootstrap_servers,
                client_id=settings.kafka_client_id,
                group_id=settings.kafka_group_id,
                enable_auto_commit=False,
                auto_offset_reset=settings.kafka_auto_offset_reset,
                max_poll_records=settings.kafka_max_poll_records,
                session_timeout_ms=settings.kafka_session_timeout_ms,
                # Kafka must not expel this member while it sends through a rebalance
                # (REBALANCE_SEND_THROUGH), nor before the requests then on the wire answer
                # (REBALANCE_TIMEOUT); 5 s for a heartbeat interval and the join itself.
                rebalance_timeout_ms=int(
                    (settings.rebalance_send_through + settings.rebalance_timeout + 5) * 1000
                ),
                # A member keeps the partitions it had through a rebalance; the group
                # falls back on aiokafka's default while an older worker (which names
                # only that) is in it, as during a rolling upgrade (one JoinGroup naming
                # both: ``kafka_join``).
                partition_assignment_strategy=(sticky_assignor(), RoundRobinPartitionAssignor),
                **security,
            )
            limiter = self.limiter
            self.stream = StreamConsumer(
                consumer,
                settings.kafka_topics,
                self.mapper,
                self.delivery,
                self.outcomes,
                FlowLimits(
                    settings.max_inflight_messages,
                    settings.max_inflight_bytes,
                    settings.max_inflight_per_partition,
                    settings.max_awaiting_import,
                    settings.max_uncommitted_per_partition,
                    settings.max_uncommitted_total,
                ),
                on_share=limiter.set_share,
                dedup=self.dedup,
                suppressions=self.suppressions if settings.suppress_deleted_days > 0 else None,
                send_through=settings.rebalance_send_through,
            )
            self.stream.subscribe()
            # aiokafka's start waits for the group's first assignment, without end if the
            # broker went away meanwhile: a stop request must still end the worker.
            if not await self._unless_stopped(consumer.start()):
                return EXIT_OK
            try:
                if not await self._unless_stopped(workspace):
                    return EXIT_OK
            except WorkspaceMismatch as error:
                log.error(log_events.WORKSPACE_MISMATCH, error=str(error))
                print(f"gist-destination: {error}", file=sys.stderr)
                return EXIT_CONFIG
            except GistError as error:  # retried and given up, as the key check does
                log.error(log_events.GIST_UNREACHABLE, error=str(error))
                raise
            self.delivery.use(workspace.result())
            self.delivery.start()
            return await self._consume(self.stream)
        finally:
            # Bounded: a start-up step that does not end on its cancellation must not
            # keep the worker from closing (its errors are retrieved: an early exit
            # leaves none unread).
            await cancel_and_wait(*starting, within=self._closing_step())
            await self._close(consumer, producer)

    async def _unless_stopped(self, step: Awaitable[Any]) -> bool:
        """Run a start-up step unless a stop is requested first (the step is then
        cancelled): True when the step finished."""
        task = asyncio.ensure_future(step)
        stop = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if task.done():
            task.result()  # its error, if any, is the start-up's
            return True
        await cancel_and_wait(task, within=self._closing_step())
        return False

    async def _check_key(self) -> bool:
        """Ask Gist who the key belongs to. The client retries while Gist is unreachable
        (and logs it); a stop request ends the wait."""
        check = asyncio.create_task(self.client.token_info())
        stop = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({check, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not check.done():
            await cancel_and_wait(check, within=self._closing_step())
            return False
        try:
            info = check.result()
        except CredentialsError as error:
            self._credentials_rejected(error)
            return False
        except GistError as error:
            log.error(log_events.GIST_UNREACHABLE, error=str(error))
            raise
        self._gist_ok = True
        log.info(log_events.WORKER_READY, workspace=info.workspace_id)
        if self.shared is not None:
            await self.shared.start(info.workspace_id or "unknown")
            prefix = self.shared.prefix
            timeout = self.settings.redis_timeout
            if prefix is not None and self.dedup is not None:
                self.dedup.shared = SharedIds(
                    self.shared.redis, prefix, self.settings.dedup_window, timeout
                )
            if prefix is not None and self.memory is not None:
                self.memory.shared = SharedContactMemory(self.shared.redis, prefix, timeout)
        return True

    async def _consume(self, stream: StreamConsumer) -> int:
        consuming = asyncio.create_task(stream.run(), name="consume")
        housekeeping = asyncio.create_task(self._housekeeping(stream), name="housekeeping")
        for task in (consuming, housekeeping):
            task.add_done_callback(self._component_done)
        stopping = asyncio.create_task(self._stop.wait())
        self._consuming = True
        metrics.READY.set(1)
        try:
            done, _ = await asyncio.wait({consuming, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if consuming in done:
                consuming.result()  # a crash of the loop surfaces here
        finally:
            self._consuming = False
            metrics.READY.set(0)
            stream.stop()
            stopping.cancel()
            # The loop ends after its turn, but aiokafka's getmany waits without a bound
            # while a group join is under way (found: a broker gone mid-join left a
            # worker deaf to SIGTERM for hours): a turn that outlasts the bound is
            # cancelled. Nothing is lost: records fetched but not opened are not ours
            # to commit.
            await asyncio.wait({consuming}, timeout=_LOOP_TURN_BOUND)
            await cancel_and_wait(consuming, within=self._closing_step())
        # A loop that crashed in its last turn (the stop asked first) is raised once the
        # stop is done: what ended is still committed and handed over.
        crash = None if consuming.cancelled() or not consuming.done() else consuming.exception()
        log.info(log_events.WORKER_STOPPING, in_flight=self.ledger.messages)
        partitions = list(self.ledger.partitions.values())
        if self._fatal is None:
            reserve = min(CLOSING_RESERVE, 0.4 * self.settings.shutdown_timeout)
            drain_for = self._stop_by - reserve - time.monotonic()
            finished = await stream.drain(partitions, max(0.0, drain_for))
            if not finished:
                # Requests still on the wire answer before the last commit, not after.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._closing_step() / 2):
                        await stream.stop_sending(partitions)
                log.warning(
                    log_events.SHUTDOWN_ABANDONED, in_flight=self.ledger.open_in(partitions)
                )
        else:
            stream.stop_opening(partitions)
        # Bounded: a housekeeping turn that does not end (it lost its cancellation once,
        # in asyncio.wait_for) must not hold the stop.
        await cancel_and_wait(housekeeping, within=self._closing_step())
        try:
            # aiokafka retries finding the group coordinator for as long as it is asked
            # to: a broker gone must not keep the worker from ending.
            # Released: nothing more is sent, and the next owner's share need not wait
            # a whole window (without Redis).
            async with asyncio.timeout(self._closing_step()):
                await stream.commit(release=True)
        except TimeoutError:
            log.warning(log_events.COMMIT_FAILED, error="timeout at shutdown")
        try:
            # What Gist confirmed is in Redis, and the partitions handed over, before
            # the next owner starts.
            async with asyncio.timeout(self._closing_step()):
                await stream.hand_over()
        except TimeoutError:
            log.warning(log_events.HAND_OVER_FAILED, error="timeout at shutdown")
        if crash is not None:
            raise crash
        return EXIT_CREDENTIALS if self._fatal is not None else EXIT_OK

    full_collection_every = 10.0
    """Seconds between full garbage collections, run by housekeeping. ``commands/run.py``
    makes the collector's young generations large, so on its own a full collection comes
    minutes apart, while libraries leave cycles that hold large buffers until one does:
    aiokafka drops the fetched records of a partition that backpressure paused in a
    cycle (the partition's records and their generator) that keeps the whole fetch
    response (measured at the real limit with Tansu: 15 of them alive, 66 MB freed by one
    collection, RSS growing 1.5 MB/s between). One costs about 25 ms over 250,000
    tracked objects (the most seen in a 300k drain; measured on a slow day): 0.25% of a
    core at this period. A collection stops the event loop, requests included, so a long
    one spaces the next out (``full_collection_share``)."""

    full_collection_share = 0.01
    """At most this share of the time goes to full collections: one that took 0.4 s
    (17,500 events waiting at the real limit, a loaded machine) comes again after 40 s,
    not 10; at 10 s each stopped the grants of the budget for 0.4 s, 4% of it."""

    full_collection_most_every = 60.0
    """Seconds between full collections at most, however long one takes."""

    @classmethod
    def collection_spacing(cls, took: float) -> float:
        """Seconds to the next full collection after one that took ``took``."""
        return min(
            cls.full_collection_most_every,
            max(cls.full_collection_every, took / cls.full_collection_share),
        )

    async def _housekeeping(self, stream: StreamConsumer) -> None:
        """Periodic commits, gauges, read-ahead bounds and full garbage collections."""
        limiter = self.client.limiter
        samples: deque[tuple[float, int, int]] = deque()  # (time, delivered, granted)
        settings = self.settings
        limits = stream.limits
        read_ahead = ReadAhead(
            settings.read_ahead_seconds,
            limits.max_messages,
            min_in_flight=max(200, 2 * settings.gist_batch_size),
        )
        limits.messages = read_ahead.in_flight
        collect_at = time.monotonic() + self.full_collection_every
        while True:
            await asyncio.sleep(self.settings.commit_interval)
            try:
                await stream.commit()
                lag = stream.update_gauges()
                now = time.monotonic()
                if now >= collect_at:
                    gc.collect()
                    collect_at = now + self.collection_spacing(time.monotonic() - now)
                samples.append((now, self.outcomes.delivered_count, self.limiter.granted))
                while samples[0][0] < now - 60:
                    samples.popleft()
                metrics.TIME_TO_DRAIN.set(self._time_to_drain(lag, samples))
                counts = Counts(
                    now,
                    self.limiter.granted,
                    self.outcomes.delivered_count + self.ledger.parked_total,
                )
                rate = self.client.limiter.current_limit / settings.gist_rate_window
                limits.messages = read_ahead.update(counts, rate)
                metrics.READ_AHEAD.labels("in_flight").set(limits.messages)
            except Exception:  # keep committing on the next turn; never stop silently
                metrics.INTERNAL_ERRORS.labels("housekeeping").inc()
                log.exception(log_events.HOUSEKEEPING_FAILED)
            metrics.RATE_LIMIT_UTILISATION.set(limiter.utilisation())
            metrics.RATE_LIMIT_CURRENT.set(limiter.current_limit)
            metrics.BATCHES_PENDING.set(self.delivery.batches_pending)
            metrics.OLDEST_PENDING_BATCH_AGE.set(self.delivery.oldest_pending_batch_age())
            if self.shared is not None:
                used = await self.shared.shared_use()
                if used is not None:
                    metrics.WORKSPACE_BUDGET_USED.set(used)

    def _time_to_drain(self, lag: int, samples: deque[tuple[float, int, int]]) -> float:
        """The lag over the throughput the budget allows, at the messages per request of
        the last minute (the budget alone: the other replicas' lag and share are theirs)."""
        if lag == 0:
            return 0.0
        delivered = samples[-1][1] - samples[0][1]
        requests = samples[-1][2] - samples[0][2]
        if delivered <= 0 or requests <= 0:
            return float("inf")
        per_second = self.client.limiter.current_limit / self.settings.gist_rate_window
        return lag / max(1e-9, per_second * delivered / requests)

    def _component_done(self, task: asyncio.Task[None]) -> None:
        """The consume loop or housekeeping ended: fine on a stop, a crash otherwise."""
        if task.cancelled() or task.exception() is None:
            return  # stopped, as asked
        error = task.exception()
        metrics.TASKS_FAILED.labels(task.get_name()).inc()
        log.error(log_events.TASK_FAILED, component=task.get_name(), exc_info=error)
        if self._crashed is None:
            self._crashed = f"{task.get_name()} stopped: {type(error).__name__}"

    async def _close(
        self, consumer: Any, producer: Any
    ) -> None:
        await self.delivery.close()
        await self.outcomes.close()
        if self.suppression_log is not None:
            await self.suppression_log.close()
        # Each Kafka client's stop is bounded: with the broker gone, aiokafka would wait
        # for a coordinator (consumer) or for pending sends (producer) without end. They
        # stop side by side.
        stops = [
            getattr(client, stop)()
            for client, stop in (
                (consumer, "stop"),
                (producer, "stop"),
                (self._record_reader, "close"),
            )
            if client is not None
        ]
        if stops:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._closing_step()):
                    await asyncio.gather(*stops, return_exceptions=True)
        await self.client.aclose()
        if self.shared is not None:
            with contextlib.suppress(Exception):
                await self.shared.close()
        await self.health.stop()
        log.info(log_events.WORKER_STOPPED)


class _NotStarted:
    """The dead-letter sink before the producer is up (nothing is consumed before)."""

    async def write(self, message: MessageWork, failure: Failure) -> None:
        raise RuntimeError("dead letter before the worker started")


async def serve(settings: Settings, mapper: Mapper, api_key: str) -> int:
    """Run a worker until SIGTERM / SIGINT (or a fatal error); returns the exit code."""
    worker = Worker(settings, mapper, api_key)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.request_stop)
    try:
        return await worker.serve()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
