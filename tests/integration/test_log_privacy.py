"""No log line names a contact: every request the Gist client makes, answered and failed,
over real HTTP (so httpx and httpcore log as they would in the worker), with logging at
DEBUG, and then all the output searched for the contact's e-mail address in every
encoding, its other trait values, its user id and the API key."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import orjson
import pytest
import structlog

from destination.devtools.sandbox import Sandbox, SandboxConfig
from destination.gist import GistClient, GistError, RateLimiter, RetryPolicy
from destination.observability.logging import configure_logging
from tests.integration.harness import forms_of_the_address
from tests.support.ports import free_port

KEY = "sk-live-never-logged-5c1d"
EMAIL = "Secret.Person@example.com"
USER_ID = "user-secret-4711"
TRAITS = {"name": "Hidden Q. Name", "phone": "+44 20 7946 0958", "plan": "platinum-zz9"}
FAST = RetryPolicy(base=0.01, cap=0.02, max_elapsed=0.2)


@pytest.fixture
def sandbox_config() -> SandboxConfig:
    return SandboxConfig(api_keys=frozenset({KEY}), batch_delay=0.01, seed=0)


@pytest.fixture
def debug_logs(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """Logs at DEBUG, as JSON, for the test; configured by ``start`` in the test itself
    (standard error is the test's capture only then)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    quiet = {name: logging.getLogger(name).level for name in ("httpx", "httpcore", "aiokafka")}
    yield capsys
    root.handlers, root.level = handlers, level
    for name, was in quiet.items():
        logging.getLogger(name).setLevel(was)
    logging.captureWarnings(False)
    structlog.reset_defaults()


def start() -> None:
    configure_logging("json", "DEBUG", log_emails=False)


async def every_request_shape(sandbox: Sandbox) -> None:
    """Each call the client has, by each address it takes, answered 2xx and 404; then a
    4xx, a 429, a 5xx, a 401, a time-out and a refused connection."""
    contact = {"email": EMAIL, "user_id": USER_ID, "name": TRAITS["name"],
               "phone": TRAITS["phone"], "custom_properties": {"plan": TRAITS["plan"]}}  # fmt: skip
    async with GistClient(KEY, base_url=sandbox.url, retry=FAST, limiter=RateLimiter()) as gist:
        await gist.token_info()
        stored = await gist.upsert_contact(contact)
        accepted = await gist.import_contacts([contact, {"email": "not-an-address"}])
        while (await gist.batch_status(accepted.batch_id)).status != "COMPLETED":
            pass
        await gist.track_event(
            {"event_name": "Viewed", "email": EMAIL, "properties": {"plan": TRAITS["plan"]}}
        )
        await gist.tag_contacts("vip", [{"email": EMAIL}, {"user_id": USER_ID}])
        await gist.get_contact(id=str(stored["id"]))
        await gist.get_contact(user_id=USER_ID)
        await gist.get_contact(email=EMAIL)
        await gist.delete_contact(email=EMAIL)
        for address in ({"id": str(stored["id"])}, {"user_id": USER_ID}, {"email": EMAIL}):
            assert await gist.get_contact(**address) is None  # 404
            assert await gist.delete_contact(**address) is False  # 404
        with pytest.raises(GistError):  # 400: an event without a contact
            await gist.track_event({"event_name": "Viewed", "properties": TRAITS})
        sandbox.config.force_429 = 1
        await gist.get_contact(email=EMAIL)  # a 429, then the retry
        sandbox.config.error_rate = 1.0
        with pytest.raises(GistError):
            await gist.delete_contact(email=EMAIL)  # 5xx until the retries give up
        sandbox.config.error_rate = 0.0
    async with GistClient("sk-wrong-" + KEY, base_url=sandbox.url, retry=FAST) as wrong:
        with pytest.raises(GistError):
            await wrong.get_contact(email=EMAIL)  # 401
    sandbox.config.latency = 0.2
    async with GistClient(
        KEY, base_url=sandbox.url, retry=FAST, timeout=httpx.Timeout(0.05)
    ) as slow:
        with pytest.raises(GistError):
            await slow.get_contact(user_id=USER_ID)  # time-outs
    sandbox.config.latency = 0.0
    async with GistClient(KEY, base_url=f"http://127.0.0.1:{free_port()}", retry=FAST) as gone:
        with pytest.raises(GistError):
            await gone.delete_contact(email=EMAIL)  # connection refused


async def test_no_request_the_client_makes_puts_a_contact_in_the_logs(
    sandbox: Sandbox, debug_logs: pytest.CaptureFixture[str]
) -> None:
    start()
    await every_request_shape(sandbox)
    captured = debug_logs.readouterr()
    output = captured.out + captured.err
    lines = [orjson.loads(line) for line in captured.err.splitlines() if line.strip()]
    requests = [line for line in lines if line["event"] == "gist.request"]
    # Our own line per request is there (so the search below searched something) ...
    assert {line["endpoint"] for line in requests} >= {
        "GET /token/info", "POST /contacts", "POST /contacts/batch",
        "GET /contacts/batch/{id}", "POST /events", "POST /tags", "GET /contacts",
        "DELETE /contacts",
    }  # fmt: skip
    assert {line["status"] for line in requests} >= {200, 404, 400, 429, 401, "ConnectError"}
    assert any(str(line["status"]).endswith("Timeout") for line in requests)
    assert len(requests) >= len(sandbox.store.requests)
    # ... and httpx's and httpcore's are not.
    assert not [line for line in lines if str(line.get("logger", "")).startswith("http")]
    lowered = output.lower()
    local_part = EMAIL.split("@")[0]
    for secret in forms_of_the_address(EMAIL) | {local_part, *TRAITS.values(), USER_ID, KEY}:
        assert secret.lower() not in lowered, f"{secret!r} is in the logs"
    assert "?" not in "".join(str(line.get("endpoint", "")) for line in requests)


def test_addresses_in_every_encoding_are_masked_in_any_loggers_lines(
    debug_logs: pytest.CaptureFixture[str],
) -> None:
    start()
    texts = sorted(forms_of_the_address(EMAIL))
    for text in texts:
        logging.getLogger("aiokafka").warning("about %s", text)
        structlog.get_logger("worker").info("event", detail={"nested": [f"<{text}>"]})
    output = debug_logs.readouterr().err.lower()
    assert output.count("s***@example.com") == 2 * len(texts)
    for secret in forms_of_the_address(EMAIL):
        assert secret.lower() not in output


def test_kafka_clients_debug_lines_with_record_values_are_not_written(
    debug_logs: pytest.CaptureFixture[str],
) -> None:
    """aiokafka's DEBUG lines carry requests, responses and record values (the producer's
    "Sending (key=... value=...)" of a dead letter); its INFO lines are kept."""
    start()
    value = orjson.dumps({"type": "identify", "traits": {"name": TRAITS["name"]}})
    logging.getLogger("aiokafka.producer.producer").debug("Sending (key=%s value=%s)", b"u", value)
    logging.getLogger("aiokafka.conn").debug("Response from %s: %s", "broker", value)
    logging.getLogger("aiokafka.consumer.group_coordinator").info("Joined group %s", "g-1")
    output = debug_logs.readouterr().err
    assert TRAITS["name"] not in output
    assert "Joined group g-1" in output
