"""Kafka record values from a file: JSON lines (one value a line), or one JSON array
(each element a value); ``-`` reads standard input. Values are given back as the bytes a
Kafka record would hold, so a line that is not JSON is what a broken record would be."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import orjson


def record_values(source: str) -> Iterator[bytes]:
    """Each record value of ``source``; ``OSError`` when it cannot be read."""
    stream = sys.stdin.buffer if source == "-" else Path(source).open("rb")  # noqa: SIM115
    try:
        first = b""
        while not first.strip():
            first = stream.readline()
            if not first:
                return
        if first.lstrip().startswith(b"["):
            data = first + stream.read()
            try:
                values = orjson.loads(data)
            except orjson.JSONDecodeError:
                values = None
            if isinstance(values, list):
                for value in values:
                    yield orjson.dumps(value)
                return
            yield from (line.rstrip(b"\r\n") for line in data.splitlines() if line.strip())
            return
        yield first.rstrip(b"\r\n")
        for line in stream:
            if line.strip():
                yield line.rstrip(b"\r\n")
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
