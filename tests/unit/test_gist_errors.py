"""How the Gist client classifies answers and failures, on an ``httpx.MockTransport``:
time-outs and connection errors, ``Retry-After`` in both forms, odd bodies, the headers
sent, and that no error or repr carries the API key."""

from __future__ import annotations

import contextlib
import email.utils
import gc
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest

from destination import __version__
from destination.gist import (
    USER_AGENT,
    CredentialsError,
    GistClient,
    GistError,
    Grant,
    PermanentError,
    Priority,
    RateLimitedError,
    RateLimiter,
    RetryableError,
    RetryPolicy,
    UnexpectedAnswerError,
)
from destination.gist._errors import (
    BODY_EXCERPT_CHARS,
    UNEXPECTED_ANSWER_ATTEMPTS,
    error_for_status,
)

KEY = "sk-unit-do-not-leak-42aa"
FAST = RetryPolicy(base=0.001, cap=0.002, max_elapsed=5.0)
ONCE = RetryPolicy(max_attempts=1)

Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """A MockTransport handler that answers from a script and keeps every request."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def client(handler: Handler, retry: RetryPolicy = FAST, **kwargs: Any) -> GistClient:
    return GistClient(
        KEY,
        base_url="https://gist.test",
        retry=retry,
        transport=httpx.MockTransport(handler),
        **kwargs,
    )


def ok(body: object) -> httpx.Response:
    return httpx.Response(200, content=orjson.dumps(body))


TOKEN = ok({"workspace_id": "w-1", "token_type": "Bearer"})


def assert_key_hidden(thing: object) -> None:
    assert KEY not in str(thing)
    assert KEY not in repr(thing)
    if isinstance(thing, GistError):
        assert KEY not in thing.body_excerpt


# --- the wire -----------------------------------------------------------------------
async def test_requests_name_the_project_and_version_and_send_json() -> None:
    rec = Recorder(ok({"contact": {"id": 1}}))
    async with client(rec) as gist:
        await gist.upsert_contact({"email": "a@example.com"})
    (request,) = rec.requests
    assert request.headers["User-Agent"] == USER_AGENT
    assert USER_AGENT.startswith(f"gist-destination/{__version__} ")
    assert "unknown" not in __version__  # the installed package's version, not a fallback
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert request.headers["Content-Type"] == "application/json"
    assert request.url == httpx.URL("https://gist.test/contacts")
    assert orjson.loads(request.content) == {"email": "a@example.com"}


async def test_the_key_is_stripped_and_an_empty_key_refused() -> None:
    rec = Recorder(TOKEN)
    async with GistClient(
        f"  {KEY}\n", base_url="https://gist.test/", transport=httpx.MockTransport(rec)
    ) as gist:
        await gist.token_info()
        assert_key_hidden(gist)
    assert rec.requests[0].headers["Authorization"] == f"Bearer {KEY}"
    assert rec.requests[0].url == httpx.URL("https://gist.test/token/info")
    for bad in ("", "   "):
        with pytest.raises(ValueError, match="API key is required"):
            GistClient(bad)


# --- transport failures -------------------------------------------------------------
@pytest.mark.parametrize(
    ("failure", "says"),
    [
        (httpx.ReadTimeout("slow"), "did not answer in time (ReadTimeout)"),
        (httpx.ConnectTimeout("slow"), "did not answer in time (ConnectTimeout)"),
        (httpx.ConnectError("refused"), "could not reach Gist (ConnectError)"),
        (httpx.RemoteProtocolError("closed"), "could not reach Gist (RemoteProtocolError)"),
    ],
)
async def test_transport_failures_are_retried_then_succeed(failure: Exception, says: str) -> None:
    rec = Recorder(failure, failure, TOKEN)
    async with client(rec) as gist:
        info = await gist.token_info()
    assert info.workspace_id == "w-1"
    assert len(rec.requests) == 3


@pytest.mark.parametrize(
    ("failure", "says"),
    [
        (httpx.ReadTimeout("slow"), "did not answer in time (ReadTimeout)"),
        (httpx.ConnectError("refused"), "could not reach Gist (ConnectError)"),
    ],
)
async def test_transport_failures_end_as_retryable_without_leaking_httpx(
    failure: Exception, says: str
) -> None:
    rec = Recorder(failure)
    async with client(rec, RetryPolicy(base=0.001, cap=0.002, max_attempts=3)) as gist:
        with pytest.raises(RetryableError) as caught:
            await gist.get_contact(email="ada@private.example")
    error = caught.value
    assert says in str(error)
    assert error.attempts == 3
    assert error.status is None
    assert error.retry_after is None
    assert not isinstance(error, httpx.HTTPError | RateLimitedError)
    assert error.__cause__ is None
    assert error.__suppress_context__
    assert "ada@private.example" not in str(error)  # the query stays out of the message
    assert len(rec.requests) == 3
    assert_key_hidden(error)


# --- Retry-After --------------------------------------------------------------------
def _http_date(offset: float) -> str:
    return email.utils.formatdate(time.time() + offset, usegmt=True)


@pytest.mark.parametrize(
    ("header", "low", "high"),
    [
        ("7", 7.0, 7.0),
        ("2.5", 2.5, 2.5),
        ("-3", 0.0, 0.0),
        (30.0, 28.0, 30.0),  # an HTTP date 30 s ahead (whole seconds): seconds from now
        (-30.0, 0.0, 0.0),  # an HTTP date already past: go now
        ("86400", 300.0, 300.0),  # a day: capped, one header must not stall everyone
        (7200.0, 300.0, 300.0),  # an HTTP date two hours ahead: capped too
    ],
)
async def test_retry_after_as_seconds_or_an_http_date(
    header: str | float, low: float, high: float
) -> None:
    value = header if isinstance(header, str) else _http_date(header)
    rec = Recorder(httpx.Response(429, headers={"Retry-After": value}, text="slow down"))
    limiter = RateLimiter()
    async with client(rec, ONCE, limiter=limiter) as gist:
        with pytest.raises(RateLimitedError) as caught:
            await gist.token_info()
    assert caught.value.retry_after is not None
    assert low <= caught.value.retry_after <= high
    assert caught.value.status == 429
    assert caught.value.body_excerpt == "slow down"
    assert limiter.rate_limited == 1
    assert limiter.current_limit == 70


@pytest.mark.parametrize("header", [None, "soon", "", "Thu, 99 Foo 2024", "nan"])
async def test_a_missing_or_unreadable_retry_after_is_none(header: str | None) -> None:
    headers = {} if header is None else {"Retry-After": header}
    rec = Recorder(httpx.Response(429, headers=headers))
    async with client(rec, ONCE) as gist:
        with pytest.raises(RateLimitedError) as caught:
            await gist.token_info()
    assert caught.value.retry_after is None


async def test_a_503_with_retry_after_waits_at_least_that_long() -> None:
    rec = Recorder(httpx.Response(503, headers={"Retry-After": "0.3"}), TOKEN)
    async with client(rec) as gist:
        started = time.monotonic()
        await gist.token_info()
        elapsed = time.monotonic() - started
        assert gist.limiter.rate_limited == 0  # a 5xx is no reason to slow the workspace
    assert len(rec.requests) == 2
    assert elapsed >= 0.3


# --- status classes -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, PermanentError),
        (404, PermanentError),
        (405, PermanentError),
        (409, PermanentError),
        (422, PermanentError),
        (401, CredentialsError),
        (403, CredentialsError),
        (408, RetryableError),
        (500, RetryableError),
        (502, RetryableError),
        (503, RetryableError),
        (504, RetryableError),
        (429, RateLimitedError),
    ],
)
def test_each_status_means_one_thing_to_do(status: int, kind: type[GistError]) -> None:
    error = error_for_status(
        status, method="POST", endpoint="POST /events", body="{}", retry_after=None
    )
    assert type(error) is kind
    assert error.status == status
    assert str(error).endswith(f"(POST /events -> {status}, attempts=1)")


async def test_a_long_error_body_is_cut_to_an_excerpt() -> None:
    body = "x" * 5000
    rec = Recorder(httpx.Response(422, text=body))
    async with client(rec) as gist:
        with pytest.raises(PermanentError) as caught:
            await gist.track_event({"event_name": "e", "email": "a@example.com"})
    assert caught.value.body_excerpt == "x" * BODY_EXCERPT_CHARS
    assert len(rec.requests) == 1


async def test_an_error_body_echoing_the_query_stays_out_of_str() -> None:
    rec = Recorder(httpx.Response(400, text='{"error": "bad email ada@private.example"}'))
    async with client(rec) as gist:
        with pytest.raises(PermanentError) as caught:
            await gist.get_contact(email="ada@private.example")
    assert rec.requests[0].url.params["email"] == "ada@private.example"
    assert "ada@private.example" not in str(caught.value)
    assert "GET /contacts" in str(caught.value)


# --- odd bodies ---------------------------------------------------------------------
async def test_a_2xx_body_that_is_not_json_is_retried() -> None:
    rec = Recorder(httpx.Response(200, text="<html>proxy</html>"), TOKEN)
    async with client(rec) as gist:
        assert (await gist.token_info()).workspace_id == "w-1"
    assert len(rec.requests) == 2
    rec = Recorder(httpx.Response(200, text="<html>proxy</html>"))
    async with client(rec, ONCE) as gist:
        with pytest.raises(RetryableError, match="not JSON"):
            await gist.token_info()


async def test_an_empty_2xx_body_is_success() -> None:
    rec = Recorder(httpx.Response(204))
    async with client(rec) as gist:
        assert await gist.delete_contact(id="12") is True
        assert await gist.upsert_contact({"email": "a@example.com"}) == {}
    assert [str(r.url) for r in rec.requests] == [
        "https://gist.test/contacts/12",
        "https://gist.test/contacts",
    ]


async def test_a_batch_accepted_without_an_id_is_tried_a_few_times_then_unexpected() -> None:
    """Regression: a 200 without batch_id was a PermanentError, so the pipeline halved the
    batch down to single contacts and dead-lettered them all as rejected although Gist
    may have queued them. It is an answer the reference does not describe: sent again a
    few times (upserts are idempotent), then the caller dead-letters."""
    rec = Recorder(ok({"status": "QUEUED", "queued_contacts": 1}))
    async with client(rec) as gist:
        with pytest.raises(UnexpectedAnswerError, match="without a batch_id") as caught:
            await gist.import_contacts([{"email": "a@example.com"}])
    assert "POST /contacts/batch" in str(caught.value)
    assert len(rec.requests) == UNEXPECTED_ANSWER_ATTEMPTS


async def test_only_unusable_answers_count_towards_their_own_cap() -> None:
    """Found by the model test: two 5xx and then one answer without a batch_id gave up,
    as if three unusable answers had come."""
    answers = [
        httpx.Response(503, json={}),
        httpx.Response(500, json={}),
        ok({"status": "QUEUED"}),
        ok({"status": "QUEUED", "batch_id": "b-1"}),
    ]
    rec = Recorder(*answers)
    async with client(rec) as gist:
        accepted = await gist.import_contacts([{"email": "a@example.com"}])
    assert accepted.batch_id == "b-1"
    assert len(rec.requests) == 4


async def test_an_unknown_batch_status_is_not_completed_and_not_retried() -> None:
    """Regression: an unknown status was a RetryableError, retried inside the client for
    hours while the poll slot was held. Now it is a status like any other, not
    completed, and the poller decides when to ask again."""
    for answer in ({"status": "EXPLODED"}, {"status": "completed"}, {"status": "FAILED"}):
        rec = Recorder(ok(answer))
        async with client(rec) as gist:
            status = await gist.batch_status("b/1")
        assert not status.completed
        assert len(rec.requests) == 1
    assert rec.requests[0].url.raw_path == b"/contacts/batch/b%2F1"  # the id is escaped


async def test_a_batch_status_that_is_not_json_is_unreadable_not_an_error() -> None:
    rec = Recorder(httpx.Response(200, text="<html>oops</html>"))
    async with client(rec) as gist:
        status = await gist.batch_status("b1")
    assert (status.status, status.completed) == ("UNREADABLE", False)
    assert len(rec.requests) == 1


async def test_an_event_answered_2xx_with_a_body_that_is_not_json_is_not_sent_again() -> None:
    """Sending it again would record the event twice."""
    rec = Recorder(httpx.Response(200, text="<html>ok</html>"))
    async with client(rec) as gist:
        await gist.track_event({"event_name": "X", "user_id": "u1"})
    assert len(rec.requests) == 1


async def test_a_value_json_cannot_carry_fails_before_sending() -> None:
    rec = Recorder(ok({}))
    async with client(rec) as gist:
        with pytest.raises(TypeError):
            await gist.track_event({"event_name": "X", "user_id": "u1", "occurred_at": 2**70})
    assert rec.requests == []


async def test_batch_errors_in_any_shape_are_read() -> None:
    rec = Recorder(
        ok(
            {
                "status": "COMPLETED",
                "imported_contacts": 1,
                "errors": [
                    {"index": 0, "email": "x", "message": "email is not valid"},
                    {"user_id": 42, "error": "conflict"},
                    "plain text",
                ],
            }
        )
    )
    async with client(rec) as gist:
        status = await gist.batch_status("b1")
    assert status.completed
    assert status.imported_contacts == 1
    first, second, third = status.errors
    assert (first.index, first.email, first.message) == (0, "x", "email is not valid")
    assert (second.index, second.user_id, second.message) == (None, "42", "conflict")
    assert third.message == "plain text"


# --- priorities: every call asks the limiter in its lane ------------------------------
class RecordingLimiter(RateLimiter):
    """The real limiter, keeping the priority of every slot asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.priorities: list[Priority] = []

    async def acquire(self, priority: Priority = Priority.NORMAL) -> Grant:
        self.priorities.append(priority)
        return await super().acquire(priority)


ANSWER = ok({"workspace_id": "w-1", "batch_id": "b1", "status": "COMPLETED", "contact": {}})

CALLS: list[tuple[str, Callable[..., Awaitable[object]], Priority]] = [
    # (name, call(gist, **priority), its default priority)
    ("token_info", lambda g, **p: g.token_info(**p), Priority.CRITICAL),
    ("batch_status", lambda g, **p: g.batch_status("b1", **p), Priority.CRITICAL),
    (
        "import_contacts",
        lambda g, **p: g.import_contacts([{"email": "a@x.io"}], **p),
        Priority.HIGH,
    ),
    (
        "import_encoded",
        lambda g, **p: g.import_encoded([b'{"email":"a@x.io"}'], **p),
        Priority.HIGH,
    ),
    ("upsert_contact", lambda g, **p: g.upsert_contact({"user_id": "u1"}, **p), Priority.NORMAL),
    ("get_contact", lambda g, **p: g.get_contact(user_id="u1", **p), Priority.NORMAL),
    ("delete_contact", lambda g, **p: g.delete_contact(email="a@x.io", **p), Priority.NORMAL),
    (
        "track_event",
        lambda g, **p: g.track_event({"event_name": "X", "user_id": "u1"}, **p),
        Priority.NORMAL,
    ),
    (
        "tag_contacts",
        lambda g, **p: g.tag_contacts("vip", [{"user_id": "u1"}], **p),
        Priority.NORMAL,
    ),
]


@pytest.mark.parametrize(("call", "default"), [c[1:] for c in CALLS], ids=[c[0] for c in CALLS])
async def test_every_call_asks_the_limiter_in_its_lane(
    call: Callable[..., Awaitable[object]], default: Priority
) -> None:
    limiter = RecordingLimiter()
    async with client(Recorder(ANSWER), limiter=limiter) as gist:
        await call(gist)
        await call(gist, priority=Priority.LOW)
        await call(gist, priority=Priority.CRITICAL)
    assert limiter.priorities == [default, Priority.LOW, Priority.CRITICAL]


async def test_every_retry_of_a_call_keeps_its_priority() -> None:
    limiter = RecordingLimiter()
    rec = Recorder(httpx.Response(503), httpx.Response(429), ok({"event": {"id": 1}}))
    async with client(rec, limiter=limiter) as gist:
        await gist.track_event({"event_name": "X", "user_id": "u1"}, priority=Priority.HIGH)
    assert len(rec.requests) == 3
    assert limiter.priorities == [Priority.HIGH] * 3


async def test_priority_is_keyword_only() -> None:
    async with client(Recorder(ANSWER)) as gist:
        with pytest.raises(TypeError):
            await gist.track_event({"event_name": "X"}, Priority.HIGH)  # type: ignore[call-arg]


# --- memory -----------------------------------------------------------------------------
@pytest.mark.parametrize("answer", [200, 400])
async def test_a_request_and_its_body_are_freed_as_soon_as_it_is_answered(answer: int) -> None:
    """Regression: httpx ties a response to its body stream both ways, so each batch
    import's request (~170 kB of contacts) lived until a full garbage collection, minutes
    apart with the worker's thresholds (RSS +1.5 MB/s at the real limit). With the cyclic
    collector off, the request must go by reference counting alone."""
    sent: list[weakref.ref[httpx.Request]] = []

    def gist(request: httpx.Request) -> httpx.Response:
        sent.append(weakref.ref(request))
        if answer == 200:
            return ok({"status": "QUEUED", "queued_contacts": 1, "batch_id": "b1"})
        return httpx.Response(400, json={"errors": [{"message": "bad"}]})

    async with client(gist) as gist_client:
        gc.collect()
        gc.disable()
        try:
            with contextlib.suppress(PermanentError):
                await gist_client.import_contacts([{"email": f"u{i}@x.io"} for i in range(500)])
            assert len(sent) == 1
            assert sent[0]() is None
        finally:
            gc.enable()
