"""``GistClient`` against the Gist sandbox over real HTTP: every operation, every error
class, retries, 429s and what goes on the wire."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from importlib.metadata import version
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from destination import __version__
from destination.devtools.sandbox import Sandbox, SandboxConfig
from destination.gist import (
    USER_AGENT,
    CredentialsError,
    GistClient,
    GistError,
    PermanentError,
    RateLimitedError,
    RateLimiter,
    RetryableError,
    RetryPolicy,
)

KEY = "sk-live-do-not-leak-7f3a9c"
WRONG_KEY = "sk-wrong-do-not-leak-b41e"
FAST = RetryPolicy(base=0.01, cap=0.05, max_elapsed=10.0)


@pytest.fixture
def sandbox_config() -> SandboxConfig:
    """The shared ``sandbox`` fixture's config: our key, the real rate limit, fast batches."""
    return SandboxConfig(api_keys=frozenset({KEY}), batch_delay=0.05, seed=0)


@pytest.fixture
async def gist(sandbox: Sandbox) -> AsyncIterator[GistClient]:
    async with GistClient(KEY, base_url=sandbox.url, retry=FAST, limiter=RateLimiter()) as client:
        yield client


def statuses(sandbox: Sandbox) -> list[int]:
    """The status of every API request the sandbox answered, in order."""
    return [status for _, _, _, status in sandbox.store.requests]


def assert_key_hidden(*things: object) -> None:
    for thing in things:
        for text in (str(thing), repr(thing)):
            assert KEY not in text
            assert WRONG_KEY not in text
        if isinstance(thing, GistError):
            assert KEY not in thing.body_excerpt
            assert all(KEY not in str(arg) for arg in thing.args)


async def eventually(condition: Callable[[], bool], within: float = 5.0) -> None:
    for _ in range(int(within / 0.002)):
        if condition():
            return
        await asyncio.sleep(0.002)
    raise AssertionError(f"not true within {within} s")


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


# --- operations ---------------------------------------------------------------------
async def test_token_info_names_the_workspace(gist: GistClient) -> None:
    info = await gist.token_info()
    assert info.workspace_id == "sandbox-workspace"
    assert info.token_type == "Bearer"
    assert info.scope is not None
    assert "write_contact" in info.scope
    assert info.raw["workspace_id"] == "sandbox-workspace"


async def test_upsert_contact_creates_then_updates_by_user_id(
    gist: GistClient, sandbox: Sandbox
) -> None:
    created = await gist.upsert_contact(
        {
            "email": "Ada@Example.COM",
            "user_id": "u-1",
            "name": "Ada",
            "tags": ["vip"],
            "custom_properties": {"plan": "pro"},
        }
    )
    assert created["email"] == "ada@example.com"  # Gist down-cases the email
    assert created["type"] == "user"
    assert [t["name"] for t in created["tags"]] == ["vip"]

    updated = await gist.upsert_contact({"user_id": "u-1", "name": "Ada Lovelace"})
    assert updated["id"] == created["id"]
    assert updated["name"] == "Ada Lovelace"
    assert updated["custom_properties"] == {"plan": "pro"}
    stored = sandbox.store.find_contact(user_id="u-1")
    assert stored is not None
    assert stored.name == "Ada Lovelace"
    assert len(sandbox.store.contacts) == 1


async def test_import_contacts_completes_with_per_contact_errors(
    gist: GistClient, sandbox: Sandbox
) -> None:
    contacts: list[Any] = [
        {"email": "a@example.com", "user_id": "a"},
        {"email": "b@example.com", "name": "Bea"},
        {"email": "not-an-email", "user_id": "c"},
        {"email": "d@example.com", "custom_properties": {"n": 4}},
    ]
    accepted = await gist.import_contacts(contacts)
    assert accepted.status == "QUEUED"
    assert accepted.queued_contacts == 4
    assert accepted.batch_id
    assert sandbox.store.find_contact(email="a@example.com") is None  # not before COMPLETED

    seen = []
    async with asyncio.timeout(5):
        while True:
            status = await gist.batch_status(accepted.batch_id)
            seen.append(status.status)
            if status.completed:
                break
            assert status.imported_contacts is None
            assert status.errors == ()
            await asyncio.sleep(0.01)
    assert seen[0] in ("QUEUED", "IN_PROGRESS")
    assert status.imported_contacts == 3
    assert len(status.errors) == 1
    error = status.errors[0]
    assert error.index == 2
    assert error.email == "not-an-email"
    assert error.user_id == "c"
    assert "email" in error.message
    assert sandbox.store.find_contact(email="d@example.com") is not None
    assert sandbox.store.find_contact(user_id="c") is None


async def test_import_contacts_refuses_an_empty_batch_without_a_request(
    gist: GistClient, sandbox: Sandbox
) -> None:
    with pytest.raises(ValueError, match="at least one"):
        await gist.import_contacts([])
    assert statuses(sandbox) == []


async def test_batch_status_of_an_unknown_batch_is_permanent(gist: GistClient) -> None:
    with pytest.raises(PermanentError) as caught:
        await gist.batch_status("no-such-batch")
    assert caught.value.status == 404
    assert "batch_not_found" in caught.value.body_excerpt


async def test_get_contact_by_email_user_id_and_id_and_none_when_missing(
    gist: GistClient,
) -> None:
    created = await gist.upsert_contact({"email": "grace@example.com", "user_id": "g-7"})
    by_email = await gist.get_contact(email="GRACE@example.com")
    by_user_id = await gist.get_contact(user_id="g-7")
    by_id = await gist.get_contact(id=str(created["id"]))
    assert by_email is not None
    assert by_user_id is not None
    assert by_id is not None
    assert by_email["id"] == by_user_id["id"] == by_id["id"] == created["id"]
    assert by_id["user_id"] == "g-7"

    assert await gist.get_contact(email="nobody@example.com") is None
    assert await gist.get_contact(user_id="nobody") is None
    assert await gist.get_contact(id="987654") is None
    with pytest.raises(ValueError, match="addressed by"):
        await gist.get_contact()


async def test_delete_contact_by_each_key_and_false_when_already_gone(
    gist: GistClient, sandbox: Sandbox
) -> None:
    a = await gist.upsert_contact({"email": "a@example.com"})
    await gist.upsert_contact({"email": "b@example.com", "user_id": "b"})
    await gist.upsert_contact({"email": "c@example.com"})

    assert await gist.delete_contact(id=str(a["id"])) is True
    assert await gist.delete_contact(user_id="b") is True
    assert await gist.delete_contact(email="C@example.com") is True
    assert sandbox.store.contacts == {}
    assert await gist.delete_contact(email="c@example.com") is False
    assert await gist.delete_contact(user_id="b") is False
    assert await gist.delete_contact(id=str(a["id"])) is False


async def test_track_event_normalises_the_name_and_creates_a_lead_by_email(
    gist: GistClient, sandbox: Sandbox
) -> None:
    await gist.upsert_contact({"email": "ada@example.com", "user_id": "u-1"})
    event = await gist.track_event(
        {"event_name": "completed.order", "user_id": "u-1", "properties": {"total": 42}}
    )
    assert event["name"] == "completed-order"
    assert event["user_id"] == "u-1"
    assert event["properties"] == {"total": 42}

    lead_event = await gist.track_event({"event_name": "Signed Up", "email": "new@example.com"})
    lead = sandbox.store.find_contact(email="new@example.com")
    assert lead is not None
    assert lead.type == "lead"
    assert lead_event["contact_id"] == lead.id
    assert [e.name for e in sandbox.store.events] == ["completed-order", "Signed Up"]


async def test_track_event_for_an_unknown_user_id_is_a_permanent_404(
    gist: GistClient, sandbox: Sandbox
) -> None:
    with pytest.raises(PermanentError) as caught:
        await gist.track_event({"event_name": "clicked", "user_id": "ghost"})
    error = caught.value
    assert error.status == 404
    assert "contact_not_found" in error.body_excerpt
    assert error.attempts == 1
    assert statuses(sandbox) == [404]  # not retried
    assert sandbox.store.events == []
    assert_key_hidden(error)


async def test_tag_contacts_tags_and_untags(gist: GistClient, sandbox: Sandbox) -> None:
    await gist.upsert_contact({"email": "a@example.com", "user_id": "a"})
    await gist.upsert_contact({"email": "b@example.com"})

    tag = await gist.tag_contacts("beta", [{"user_id": "a"}, {"email": "b@example.com"}])
    assert tag["name"] == "beta"
    beta = sandbox.store.find_tag("beta")
    assert beta is not None
    a = sandbox.store.find_contact(user_id="a")
    b = sandbox.store.find_contact(email="b@example.com")
    assert a is not None
    assert b is not None
    assert beta.id in a.tag_ids
    assert beta.id in b.tag_ids

    again = await gist.tag_contacts("beta", [{"email": "b@example.com", "untag": True}])
    assert again["id"] == tag["id"]
    assert beta.id in a.tag_ids
    assert beta.id not in b.tag_ids


# --- errors -------------------------------------------------------------------------
async def test_a_wrong_key_is_a_credentials_error_and_is_not_retried(sandbox: Sandbox) -> None:
    before = metric("gist_destination_credentials_rejected_total")
    async with GistClient(WRONG_KEY, base_url=sandbox.url, retry=FAST) as client:
        with pytest.raises(CredentialsError) as caught:
            await client.token_info()
        assert_key_hidden(client)
    assert caught.value.status == 401
    assert caught.value.attempts == 1
    assert statuses(sandbox) == [401]
    assert metric("gist_destination_credentials_rejected_total") == before + 1
    assert_key_hidden(caught.value)


async def test_a_disabled_workspace_is_a_credentials_error(
    gist: GistClient, sandbox: Sandbox
) -> None:
    sandbox.config.disabled = True
    with pytest.raises(CredentialsError) as caught:
        await gist.upsert_contact({"email": "a@example.com"})
    assert caught.value.status == 403
    assert "workspace_disabled" in caught.value.body_excerpt
    assert statuses(sandbox) == [403]
    assert not isinstance(caught.value, RetryableError | PermanentError)
    assert_key_hidden(caught.value, gist)


async def test_a_bad_request_is_permanent_with_status_and_body_excerpt(
    gist: GistClient, sandbox: Sandbox
) -> None:
    with pytest.raises(PermanentError) as caught:
        await gist.upsert_contact({"name": "No Email"})
    error = caught.value
    assert error.status == 400
    assert "email is required" in error.body_excerpt
    assert error.method == "POST"
    assert "POST /contacts" in str(error)
    assert "-> 400" in str(error)
    assert error.attempts == 1
    assert statuses(sandbox) == [400]
    assert_key_hidden(error)


async def test_a_429_with_retry_after_is_waited_out_then_succeeds(
    gist: GistClient, sandbox: Sandbox
) -> None:
    sandbox.config.force_429 = 1  # the sandbox answers Retry-After: 1
    before = metric("gist_destination_rate_limited_total")
    started = time.monotonic()
    info = await gist.token_info()
    elapsed = time.monotonic() - started
    assert info.workspace_id == "sandbox-workspace"
    assert statuses(sandbox) == [429, 200]
    assert gist.limiter.rate_limited == 1
    assert gist.limiter.current_limit == 70  # cut after a 429 we did not cause
    assert metric("gist_destination_rate_limited_total") == before + 1
    (t429, *_), (t200, *_) = sandbox.store.requests
    assert t200 - t429 >= 0.95  # the retry waited for Retry-After, not the tiny backoff
    assert elapsed >= 0.95


async def test_429s_without_retry_after_back_off_then_succeed(
    gist: GistClient, sandbox: Sandbox
) -> None:
    sandbox.config.retry_after = False
    sandbox.config.force_429 = 3
    started = time.monotonic()
    await gist.upsert_contact({"email": "a@example.com"})
    assert statuses(sandbox) == [429, 429, 429, 200]
    assert gist.limiter.rate_limited == 3
    assert time.monotonic() - started < 1.0  # the policy's backoff, not a second per try
    assert sandbox.store.find_contact(email="a@example.com") is not None


async def test_persistent_429s_end_in_a_rate_limited_error(sandbox: Sandbox) -> None:
    sandbox.config.retry_after = False
    sandbox.config.force_429 = 10
    policy = RetryPolicy(base=0.01, cap=0.02, max_attempts=3)
    async with GistClient(KEY, base_url=sandbox.url, retry=policy) as client:
        with pytest.raises(RateLimitedError) as caught:
            await client.track_event({"event_name": "x", "email": "a@example.com"})
        assert client.limiter.rate_limited == 3
    assert caught.value.status == 429
    assert caught.value.attempts == 3
    assert caught.value.retry_after is None
    assert statuses(sandbox) == [429, 429, 429]
    assert_key_hidden(caught.value)


async def test_server_errors_are_retried_until_the_server_recovers(
    gist: GistClient, sandbox: Sandbox
) -> None:
    sandbox.config.error_rate = 1.0
    call = asyncio.create_task(gist.upsert_contact({"email": "a@example.com"}))
    await eventually(lambda: sum(1 for s in statuses(sandbox) if s >= 500) >= 3)
    assert not call.done()
    sandbox.config.error_rate = 0.0
    contact = await call
    seen = statuses(sandbox)
    assert seen[-1] == 200
    assert len(seen) >= 4
    assert all(s in (500, 502, 503) for s in seen[:-1])
    assert contact["email"] == "a@example.com"
    assert len(sandbox.store.contacts) == 1  # one contact, however many tries


async def test_server_errors_give_up_as_retryable_after_max_attempts(sandbox: Sandbox) -> None:
    sandbox.config.error_rate = 1.0
    policy = RetryPolicy(base=0.01, cap=0.02, max_attempts=4)
    async with GistClient(KEY, base_url=sandbox.url, retry=policy) as client:
        with pytest.raises(RetryableError) as caught:
            await client.token_info()
    error = caught.value
    assert not isinstance(error, RateLimitedError)
    assert error.attempts == 4
    assert error.status in (500, 502, 503)
    assert "server_error" in error.body_excerpt
    assert len(statuses(sandbox)) == 4
    assert_key_hidden(error)


async def test_an_unreachable_gist_is_retryable_and_leaks_no_httpx_error() -> None:
    policy = RetryPolicy(base=0.01, cap=0.02, max_attempts=2)
    # A port nothing listens on: connection refused, a real transport error.
    async with GistClient(KEY, base_url="http://127.0.0.1:9", retry=policy) as client:
        with pytest.raises(RetryableError) as caught:
            await client.token_info()
    error = caught.value
    assert error.status is None
    assert error.attempts == 2
    assert "could not reach Gist" in str(error)
    assert error.__cause__ is None
    assert error.__suppress_context__
    assert not isinstance(error, httpx.HTTPError)
    assert_key_hidden(error)


async def test_an_answer_trickling_past_its_deadline_is_a_retryable_timeout() -> None:
    """httpx's read time-out bounds one read: a server sending a byte every 0.1 s never
    trips a 0.5-s read time-out, and would hold the request (and its contacts'
    partitions) for ever. The attempt's deadline (the sum of the time-outs) ends it."""
    trickling = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(Exception):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
            writer.write(b"Content-Length: 100000\r\n\r\n{")
            trickling.set()
            while True:
                await asyncio.sleep(0.1)
                writer.write(b" ")
                await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    timeout = httpx.Timeout(connect=0.5, read=0.5, write=0.5, pool=0.5)
    policy = RetryPolicy(base=0.01, cap=0.02, max_attempts=1)
    try:
        async with GistClient(
            KEY, base_url=f"http://127.0.0.1:{port}", retry=policy, timeout=timeout
        ) as client:
            started = time.monotonic()
            with pytest.raises(RetryableError) as caught:
                await client.token_info()
            took = time.monotonic() - started
    finally:
        server.close()
        for writer in writers:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        await server.wait_closed()
    assert trickling.is_set()
    assert "did not answer in time (Deadline)" in str(caught.value)
    assert 2.0 - 0.1 <= took < 10.0  # the deadline (2 s), not for ever
    assert_key_hidden(caught.value)


# --- what goes on the wire ----------------------------------------------------------
class RecordingTransport(httpx.AsyncBaseTransport):
    """Real HTTP, keeping each request as sent."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.sent: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_requests_carry_the_user_agent_and_bearer_key(sandbox: Sandbox) -> None:
    transport = RecordingTransport()
    async with GistClient(KEY, base_url=sandbox.url, transport=transport) as client:
        await client.token_info()
        await client.upsert_contact({"email": "a@example.com"})
    assert statuses(sandbox) == [200, 200]  # the sandbox accepted the key as sent
    assert __version__ == version("gist-destination")
    for request in transport.sent:
        assert request.headers["User-Agent"] == USER_AGENT
        assert request.headers["User-Agent"].startswith(f"gist-destination/{__version__} ")
        assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert transport.sent[1].headers["Content-Type"] == "application/json"


async def test_the_client_never_shows_its_key(gist: GistClient, sandbox: Sandbox) -> None:
    assert sandbox.url in repr(gist)
    assert_key_hidden(gist)


async def test_every_request_of_a_call_takes_a_limiter_slot(
    gist: GistClient, sandbox: Sandbox
) -> None:
    sandbox.config.retry_after = False
    sandbox.config.force_429 = 2
    await gist.token_info()
    await gist.get_contact(email="nobody@example.com")
    # 3 tries of token_info + 1 look-up: retries count against the budget too.
    assert gist.limiter.granted == 4
    assert len(statuses(sandbox)) == 4
