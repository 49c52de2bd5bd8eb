"""What Gist last confirmed of each contact, to leave out of an upsert what it already holds.

Engage re-syncs and chatty identify calls send traits and audience memberships Gist has
had for weeks; each costs a place in a batch import and, for a batch of nothing new, two
requests. ``Fingerprints`` keeps, per contact (its ``user_id``, else its e-mail), a hash
of each field's value **as Gist confirmed it**: recorded only once the contact's batch
import COMPLETED without an error for it, never when sent. An upsert then drops the
fields whose values Gist holds; one with nothing left is not sent (the message is
skipped, reason ``unchanged``).

The final state still equals the last message: writes to one contact are chained
(``ordering``), so when an upsert is taken into a batch every earlier write to that
contact has completed and been recorded here. A delete, an alias or a tag change forgets
the contact (the next upsert sends everything). Memory is bounded: least recently used
contacts beyond ``capacity`` and fingerprints older than ``ttl`` (default a day, so a
value edited in Gist by a person comes back within a day) are forgotten. With Redis the
fingerprints are shared by the replicas and survive restarts (``SharedFingerprints``).

A field's fingerprint is a 64-bit hash of its name and value (Python's hash in process;
BLAKE2b where it is shared, the same in every process).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from array import array
from collections.abc import Callable, Iterable
from typing import Any, TypeAlias, cast

import orjson
import structlog

from destination.gist import ContactPayload
from destination.observability import log_events, metrics

log = structlog.get_logger(__name__)

_IDENTITY = ("user_id", "email", "id")
_SCALARS = (str, int, float, bool, type(None))

Pairs: TypeAlias = "array[int]"
"""Signed 64-bit ints: field hash, value hash, field hash, value hash, ..."""


def local_hash(item: Any) -> int:
    """Python's hash: 64 bits, fast, the same within one process."""
    return hash(item)


def stable_hash(item: Any) -> int:
    """The same in every process (for fingerprints shared through Redis)."""
    raw = orjson.dumps(item, option=orjson.OPT_SORT_KEYS)
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big", signed=True)


def contact_key(payload: ContactPayload) -> str | None:
    """The contact a payload is remembered under: its user_id, else its e-mail."""
    user_id = payload.get("user_id")
    if user_id is not None:
        return "u:" + str(user_id)
    email = payload.get("email")
    if isinstance(email, str):
        return "e:" + email.lower()
    return None


def _freeze(value: Any) -> Any:
    if type(value) in _SCALARS:
        return value
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


class Fingerprints:
    """Per contact, the hashes of the field values Gist last confirmed."""

    def __init__(
        self,
        ttl: float,
        capacity: int,
        *,
        shared: SharedFingerprints | None = None,
        stable: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``stable``: hashes that are the same in every process (Redis will share them;
        ``shared`` may be attached later, once the workspace is known)."""
        self.ttl = ttl
        self.capacity = capacity
        self.shared = shared
        self._clock = clock
        self._hash = stable_hash if (stable or shared is not None) else local_hash
        # hash of the contact's key -> its record (``_put``); least recently used first.
        self._known: dict[int, bytes] = {}

    def __len__(self) -> int:
        return len(self._known)

    # --- an upsert going out ----------------------------------------------------------
    def fields(self, payload: ContactPayload) -> dict[int, tuple[int, str, str | None]]:
        """field hash -> (value hash, top-level key, custom property or tag name), for the
        fields of ``payload`` that are not its identity."""
        out: dict[int, tuple[int, str, str | None]] = {}
        h = self._hash
        key_email = payload.get("user_id") is not None  # with a user_id, email is a field
        for name, value in cast(dict[str, Any], payload).items():
            if name == "custom_properties" and isinstance(value, dict):
                for prop, prop_value in value.items():
                    out[h(("p", prop))] = (h(("p", prop, _freeze(prop_value))), name, prop)
            elif name == "tags" and isinstance(value, list):
                for tag in value:
                    tag_name = str(tag).lower()
                    out[h(("t", tag_name))] = (h(("t", tag_name)), name, str(tag))
            elif name in _IDENTITY and not (name == "email" and key_email):
                continue
            else:
                text = value.lower() if name == "email" and isinstance(value, str) else value
                out[h(("f", name))] = (h(("f", name, _freeze(text))), name, None)
        return out

    def strip(self, payload: ContactPayload) -> tuple[ContactPayload | None, bytes, int]:
        """``payload`` without the fields Gist holds (None: nothing left to send), the
        fingerprints of what is sent (packed: kept while the contact waits for its
        import), and how many fields were left out."""
        key = contact_key(payload)
        known = None if key is None else self._get(key)
        fields = self.fields(payload)
        sent = array("q")
        if known is None:  # the usual first sight of a contact: everything goes
            for f, (v, _, _) in fields.items():
                sent.append(f)
                sent.append(v)
            return payload, sent.tobytes(), 0
        held = {f for f, (v, _, _) in fields.items() if known.get(f) == v}
        for f, (v, _, _) in fields.items():
            if f not in held:
                sent.append(f)
                sent.append(v)
        if len(held) == len(fields):
            return None, b"", len(held)  # Gist holds all of it (or it names a known contact)
        if not held:
            return payload, sent.tobytes(), 0
        out = cast(dict[str, Any], dict(payload))
        props = dict(out.get("custom_properties") or {})
        tags = list(out.get("tags") or [])
        for f in held:
            _, name, sub = fields[f]
            if name == "custom_properties":
                props.pop(cast(str, sub), None)
            elif name == "tags":
                tags = [t for t in tags if str(t) != sub]
            else:
                out.pop(name, None)
        if "custom_properties" in out:
            if props:
                out["custom_properties"] = props
            else:
                del out["custom_properties"]
        if "tags" in out:
            if tags:
                out["tags"] = tags
            else:
                del out["tags"]
        return cast(ContactPayload, out), sent.tobytes(), len(held)

    # --- what Gist confirmed ----------------------------------------------------------
    def confirm(self, key: str | None, sent: bytes) -> None:
        """The contact's batch import completed without an error for it (``sent`` as
        ``strip`` gave it)."""
        if key is None:
            return
        slot = local_hash(key)
        if slot in self._known:
            known = self._get(key) or {}
            pairs = array("q")
            pairs.frombytes(sent)
            known.update(zip(pairs[::2], pairs[1::2], strict=True))
            self._put(key, known)
        else:  # the usual first confirmation: what was sent is all that is known
            self._known[slot] = self._stamp() + sent
            while len(self._known) > self.capacity:
                del self._known[next(iter(self._known))]
        if self.shared is not None:
            pairs = array("q")
            pairs.frombytes(sent)
            self.shared.record(key, pairs, self.ttl)

    def forget(self, identities: Iterable[str]) -> None:
        """A delete, an alias or a tag change touched the contact."""
        keys = list(identities)
        for key in keys:
            self._known.pop(local_hash(key), None)
        if self.shared is not None:
            self.shared.forget(keys)

    async def load(self, keys: Iterable[str]) -> None:
        """Fetch from Redis the fingerprints of contacts not known here."""
        if self.shared is None:
            return
        missing = [k for k in set(keys) if local_hash(k) not in self._known]
        for key, known in (await self.shared.fetch(missing)).items():
            self._put(key, known)

    # --- the store --------------------------------------------------------------------
    # Per contact one bytes object: 4 bytes of the time it was recorded (whole seconds of
    # the clock), then a (field, value) pair of 64-bit hashes per field; keyed by a hash of
    # the contact's key. About 250 bytes a contact with nine fields (measured in the tests).
    def _stamp(self) -> bytes:
        return (int(self._clock()) & 0xFFFFFFFF).to_bytes(4, "big")

    def _get(self, key: str) -> dict[int, int] | None:
        slot = local_hash(key)
        blob = self._known.pop(slot, None)
        if blob is None:
            return None
        recorded = int.from_bytes(blob[:4], "big")
        if int(self._clock()) - recorded > self.ttl:
            return None
        self._known[slot] = blob  # most recently used
        pairs = array("q")
        pairs.frombytes(blob[4:])
        return dict(zip(pairs[::2], pairs[1::2], strict=True))

    def _put(self, key: str, known: dict[int, int]) -> None:
        pairs = array("q")
        for f, v in known.items():
            pairs.append(f)
            pairs.append(v)
        slot = local_hash(key)
        self._known.pop(slot, None)
        self._known[slot] = self._stamp() + pairs.tobytes()
        while len(self._known) > self.capacity:
            del self._known[next(iter(self._known))]


class SharedFingerprints:
    """The fingerprints in Redis: one hash per contact, expiring ``ttl`` after its last
    confirmation. Written in the background; a failure only costs a field sent again."""

    def __init__(self, redis: Any, prefix: str, timeout: float) -> None:
        self._redis = redis
        self._prefix = prefix
        self._timeout = timeout
        self._writes: list[tuple[str, Pairs, float] | tuple[str, None, float]] = []
        self._flushing: asyncio.Task[None] | None = None

    def _key(self, key: str) -> str:
        return f"{self._prefix}:contact:{key}"

    async def fetch(self, keys: list[str]) -> dict[str, dict[int, int]]:
        if not keys:
            return {}
        try:
            async with asyncio.timeout(self._timeout):
                pipe = self._redis.pipeline(transaction=False)
                for key in keys:
                    pipe.hgetall(self._key(key))
                answers = await pipe.execute()
        except Exception as error:
            metrics.LIMITER_REDIS_ERRORS.labels("contact_memory").inc()
            log.warning(log_events.MEMORY_REDIS_UNAVAILABLE, error=type(error).__name__)
            return {}
        out: dict[str, dict[int, int]] = {}
        for key, fields in zip(keys, answers, strict=True):
            if fields:
                out[key] = {_signed(int(f, 16)): _signed(int(v, 16)) for f, v in fields.items()}
        return out

    def record(self, key: str, sent: Pairs, ttl: float) -> None:
        self._writes.append((key, sent, ttl))
        self._schedule()

    def forget(self, keys: list[str]) -> None:
        for key in keys:
            self._writes.append((key, None, 0.0))
        self._schedule()

    def _schedule(self) -> None:
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        await asyncio.sleep(0.02)
        while self._writes:
            writes, self._writes = self._writes, []
            try:
                async with asyncio.timeout(self._timeout * 4):
                    pipe = self._redis.pipeline(transaction=False)
                    for key, sent, ttl in writes:
                        name = self._key(key)
                        if sent is None:
                            pipe.delete(name)
                            continue
                        mapping = {
                            format(f & _MASK, "x"): format(v & _MASK, "x")
                            for f, v in zip(sent[::2], sent[1::2], strict=True)
                        }
                        pipe.hset(name, mapping=mapping)
                        pipe.expire(name, int(ttl))
                    await pipe.execute()
            except Exception:
                metrics.LIMITER_REDIS_ERRORS.labels("contact_memory").inc()


_MASK = (1 << 64) - 1


def _signed(value: int) -> int:
    """A 64-bit hash read back from its unsigned hex form."""
    return value - (1 << 64) if value >= 1 << 63 else value
