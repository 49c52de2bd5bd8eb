"""The worker's lifecycle: start, consume until told to stop, drain, commit, exit.

    run()          sync entry point: event loop, signal handlers, exit code
    Worker.serve() async: start-up checks, then the loops below until a stop
    shutdown       stop fetching, flush contacts, wait for in-flight work up to
                   SHUTDOWN_TIMEOUT, commit what is finished, leave the group

Set SHUTDOWN_TIMEOUT below Kubernetes' terminationGracePeriodSeconds (the manifests use
30 s and 45 s): after the grace period the pod is killed, and whatever was not committed
is read again by the next owner (at-least-once).

Exit codes: 0 after a requested stop, 2 for bad settings or mapping rules,
3 when Gist rejects the API key (the stream is kept, nothing is dead-lettered).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from typing import Any

import httpx
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.helpers import create_ssl_context

from destination.gist import (
    CredentialsError,
    GistClient,
    GistError,
    RateLimit,
    RateLimiter,
    RetryPolicy,
)
from destination.mapping import Mapper
from destination.observability import log_events, metrics
from destination.observability.health import HealthServer
from destination.pipeline.consume import FlowLimits, StreamConsumer
from destination.pipeline.dead_letter import DeadLetterWriter, KafkaRecordReader
from destination.pipeline.deliver import Delivery, DeliverySettings
from destination.pipeline.inflight import Failure, Ledger, MessageWork
from destination.settings import Settings

log = structlog.get_logger(__name__)

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_CREDENTIALS = 3


def kafka_security(settings: Settings) -> dict[str, Any]:
    options: dict[str, Any] = {"security_protocol": settings.kafka_security_protocol}
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        cafile = str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
        options["ssl_context"] = create_ssl_context(cafile=cafile)
    if settings.kafka_security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        password = settings.kafka_sasl_password
        options["sasl_plain_password"] = password.get_secret_value() if password else None
    return options


class Worker:
    def __init__(self, settings: Settings, mapper: Mapper, api_key: str) -> None:
        self.settings = settings
        self.mapper = mapper
        limiter = RateLimiter(
            RateLimit(
                settings.gist_rate_limit, settings.gist_rate_window, settings.gist_rate_margin
            )
        )
        requests = settings.gist_max_concurrent_requests
        imports = max(1, requests // 8)
        self.client = GistClient(
            api_key,
            base_url=settings.gist_api_url,
            limiter=limiter,
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
            ),
            on_fatal=self._credentials_rejected,
        )
        self.ledger = Ledger(on_settled=self._settled)
        self.health = HealthServer(settings.metrics_host, settings.metrics_port, self._not_ready)
        self._stop = asyncio.Event()
        self._fatal: CredentialsError | None = None
        self._gist_ok = False
        self._consuming = False
        self._dead_letters: DeadLetterWriter | None = None
        self._record_reader: KafkaRecordReader | None = None
        self._dlq_tasks: set[asyncio.Task[None]] = set()
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

    def request_stop(self) -> None:
        self._stop.set()

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
        self._stop.set()

    # --- settled messages -------------------------------------------------------------
    def _settled(self, message: MessageWork) -> None:
        if message.failure is None:
            metrics.child(metrics.MESSAGES_DELIVERED, message.message_type).inc()
            if message.timestamp is not None:
                metrics.DELIVERY_DELAY.observe(max(0.0, time.time() - message.timestamp))
            self.ledger.finish(message)
        else:
            self._dead_letter(message, message.failure)

    def _dead_letter(self, message: MessageWork, failure: Failure) -> None:
        message.failure = failure
        task = asyncio.create_task(self._write_dead_letter(message, failure))
        self._dlq_tasks.add(task)
        task.add_done_callback(self._dlq_tasks.discard)

    async def _write_dead_letter(self, message: MessageWork, failure: Failure) -> None:
        assert self._dead_letters is not None
        await self._dead_letters.write(message, failure)
        metrics.MESSAGES_DEAD_LETTERED.labels(message.message_type, failure.reason).inc()
        record = message.record
        log.warning(
            log_events.DEAD_LETTERED,
            reason=failure.reason,
            status=failure.status,
            topic=record.partition.tp.topic,
            partition=record.partition.tp.partition,
            offset=record.offset,
            type=message.message_type,
        )
        self.ledger.finish(message)

    # --- the lifecycle ----------------------------------------------------------------
    async def serve(self) -> int:
        settings = self.settings
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
        producer: AIOKafkaProducer | None = None
        consumer: AIOKafkaConsumer | None = None
        try:
            if not await self._check_key():
                return EXIT_CREDENTIALS if self._fatal else EXIT_OK
            security = kafka_security(settings)
            producer = AIOKafkaProducer(
                bootstrap_servers=settings.kafka_bootstrap_servers,
                client_id=settings.kafka_client_id,
                acks="all",
                **security,
            )
            await producer.start()
            self._record_reader = KafkaRecordReader(
                settings.kafka_bootstrap_servers, client_id=settings.kafka_client_id, **security
            )
            self._dead_letters = DeadLetterWriter(
                producer, settings.kafka_dlq_topic, self._record_reader
            )
            consumer = AIOKafkaConsumer(
                bootstrap_servers=settings.kafka_bootstrap_servers,
                client_id=settings.kafka_client_id,
                group_id=settings.kafka_group_id,
                enable_auto_commit=False,
                auto_offset_reset=settings.kafka_auto_offset_reset,
                max_poll_records=settings.kafka_max_poll_records,
                session_timeout_ms=settings.kafka_session_timeout_ms,
                **security,
            )
            self.stream = StreamConsumer(
                consumer,
                settings.kafka_topics,
                self.mapper,
                self.delivery,
                self.ledger,
                FlowLimits(
                    settings.max_inflight_messages,
                    settings.max_inflight_bytes,
                    settings.max_inflight_per_partition,
                    settings.max_awaiting_import,
                    settings.max_uncommitted_per_partition,
                ),
                settings.rebalance_timeout,
                self._dead_letter,
            )
            self.stream.subscribe()
            await consumer.start()
            self.delivery.start()
            return await self._consume(self.stream)
        finally:
            await self._close(consumer, producer)

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
            check.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await check
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
        return True

    async def _consume(self, stream: StreamConsumer) -> int:
        consuming = asyncio.create_task(stream.run(), name="consume")
        housekeeping = asyncio.create_task(self._housekeeping(stream), name="housekeeping")
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
            with contextlib.suppress(asyncio.CancelledError):
                await consuming
        log.info(log_events.WORKER_STOPPING, in_flight=self.ledger.messages)
        if self._fatal is None:
            finished = await stream.drain(
                list(self.ledger.partitions.values()), self.settings.shutdown_timeout
            )
            if not finished:
                log.warning(log_events.SHUTDOWN_ABANDONED, in_flight=self.ledger.messages)
        housekeeping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await housekeeping
        await stream.commit()
        return EXIT_CREDENTIALS if self._fatal is not None else EXIT_OK

    async def _housekeeping(self, stream: StreamConsumer) -> None:
        """Periodic commits and gauges."""
        limiter = self.client.limiter
        while True:
            await asyncio.sleep(self.settings.commit_interval)
            try:
                await stream.commit()
                stream.update_lag()
            except Exception:  # keep committing on the next turn; never stop silently
                log.exception(log_events.HOUSEKEEPING_FAILED)
            metrics.RATE_LIMIT_UTILISATION.set(limiter.utilisation())
            metrics.RATE_LIMIT_CURRENT.set(limiter.current_limit)
            metrics.BATCHES_PENDING.set(self.delivery.batches_pending)

    async def _close(
        self, consumer: AIOKafkaConsumer | None, producer: AIOKafkaProducer | None
    ) -> None:
        await self.delivery.close()
        for task in list(self._dlq_tasks):
            task.cancel()
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()
        if producer is not None:
            with contextlib.suppress(Exception):
                await producer.stop()
        if self._record_reader is not None:
            with contextlib.suppress(Exception):
                await self._record_reader.close()
        await self.client.aclose()
        await self.health.stop()
        log.info(log_events.WORKER_STOPPED)


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
