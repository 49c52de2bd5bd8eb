from __future__ import annotations

import orjson

from destination.gist import BatchContactError, BatchStatus
from destination.pipeline.contacts import ContactStep
from destination.pipeline.dead_letter import dead_letter_headers, dead_letter_value
from destination.pipeline.deliver import match_batch_errors
from destination.pipeline.inflight import Failure, Ledger, TopicPartition


def _message(value: bytes, index: int | None = None, body: object = None):  # type: ignore[no-untyped-def]
    ledger = Ledger(on_settled=lambda m: None)
    partition = ledger.assign(TopicPartition("events", 3))
    record = ledger.open_record(partition, 42, b"u-1", value, [("trace", b"t-1")])
    return ledger.open_message(record, index, "track", None, body)


def test_headers_keep_the_original_and_say_why() -> None:
    message = _message(b'{"type":"track"}')
    failure = Failure(
        "gist_rejected",
        "Gist rejected the request with 404",
        status=404,
        body_excerpt='{"errors":[]}',
        attempts=1,
    )
    headers = dict(dead_letter_headers(message, failure))
    assert headers["trace"] == b"t-1"
    assert headers["gist-dlq-reason"] == b"gist_rejected"
    assert headers["gist-dlq-http-status"] == b"404"
    assert headers["gist-dlq-source-topic"] == b"events"
    assert headers["gist-dlq-source-partition"] == b"3"
    assert headers["gist-dlq-source-offset"] == b"42"
    assert headers["gist-dlq-attempts"] == b"1"
    assert headers["gist-dlq-body-excerpt"] == b'{"errors":[]}'
    assert "gist-dlq-envelope-index" not in headers
    assert dead_letter_value(message) == b'{"type":"track"}'


def test_a_message_from_an_envelope_is_dead_lettered_alone() -> None:
    body = {"type": "track", "event": "x"}
    message = _message(b'{"batch":[{},{}]}', index=1, body=body)
    headers = dict(dead_letter_headers(message, Failure("missing_identity", "no id")))
    assert headers["gist-dlq-envelope-index"] == b"1"
    assert orjson.loads(dead_letter_value(message) or b"") == body


def test_batch_errors_match_by_index_then_identity() -> None:
    steps = [
        ContactStep({"email": "a@x.io"}, ("e:a@x.io",)),
        ContactStep({"email": "B@x.io", "user_id": "u2"}, ("u:u2", "e:b@x.io")),
        ContactStep({"user_id": "u3"}, ("u:u3",)),
    ]
    status = BatchStatus(
        "COMPLETED",
        0,
        (
            BatchContactError("bad email", index=0),
            BatchContactError("unknown", email="b@x.io"),
            BatchContactError("needs email", user_id="u3"),
            BatchContactError("nobody", email="zzz@x.io"),
        ),
    )
    assert match_batch_errors(steps, status) == {0: "bad email", 1: "unknown", 2: "needs email"}
