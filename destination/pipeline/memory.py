"""Contact memory: what Gist last confirmed of each contact, so that an upsert leaves out
what Gist already holds.

Engage re-syncs and chatty identify calls send traits and audience memberships Gist has
had for weeks; each costs a place in a batch import and, for a batch of nothing new, two
requests. ``ContactMemory`` keeps, per contact, a 64-bit hash of each field's value **as
Gist confirmed it**: recorded only once the contact's batch import COMPLETED without an
error for it, never when sent. An upsert then drops the fields whose values Gist holds;
one with nothing left is not sent (the message is skipped, reason ``unchanged``).

The final state still equals the last message: writes to one contact are chained
(``ordering``), so when an upsert is taken into a batch every earlier write to that
contact has ended, and this memory says what it left in Gist or nothing.

**What a record is.** A record belongs to one write's identities (``u:<user_id>``,
``e:<email>``, both when the write had both), is stored under each of them, and says
which partition confirmed it and when it was *first* recorded. A write may strip
against a record only if it has exactly the record's identities, every one of its keys
holds that same record, it comes from the partition that confirmed it, and the record
is younger than the TTL. Anything else is "not sure", and not sure means *send*.

**What invalidates a record** (every key it is stored under, here and in Redis):

- a write of the contact that is not a confirmed success: dead-lettered, failed, timed
  out, a batch Gist reports as failed, or abandoned on a revocation (Gist may import it
  later or never) — ``invalidate``;
- a delete, an alias or a tag change of the contact, before its request goes out —
  ``invalidate``;
- a write under other identities replaces it (the old record's other keys go with it);
- its partition is revoked: another owner may write the contact meanwhile — ``revoke``;
- age: ``ttl`` after it was first recorded, however often it was confirmed since, so a
  value a person edited in Gist comes back within the TTL;
- eviction: least recently used records beyond ``max_contacts`` or ``max_bytes``; a
  record keeps at most ``MAX_FIELDS`` fields (the rest are simply sent).

With Redis (``SharedContactMemory``) the records are shared by the replicas and survive
restarts; the same rules hold there, plus a **generation per partition** that every
shared record carries: a shared write that fails (a Redis blip, a time-out) leaves Redis
not sure, so the partition's generation is bumped as soon as Redis answers again, and
every record of the old generation is ignored from then on. A replica taking a partition
over bumps it too unless the previous owner handed it over cleanly (``handover``: every
write flushed, at the offset the group committed); a killed owner hands nothing over.

Hashes: Python's (salted, per process) in one process; BLAKE2b where they are shared,
the same in every process. Values hash with their JSON type: ``1``, ``1.0`` and ``true``
are three values.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import struct
import time
import uuid
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import orjson
import structlog

from destination.gist import ContactPayload
from destination.observability import log_events, metrics
from destination.pipeline.inflight import PartitionWork, TopicPartition

log = structlog.get_logger(__name__)

MAX_FIELDS = 256
"""Fields remembered per contact at most: a producer sending thousands of traits must
not make one contact cost megabytes here (the fields beyond are simply sent)."""

_IDENTITY = frozenset({"user_id", "email", "id"})
_MASK = (1 << 64) - 1
_HEADER = struct.Struct("<IHB")  # first recorded (s), partition slot, number of keys
_KEYS = [struct.Struct(f"<{n}q") for n in range(256)]  # a record's keys, by count
_NAMES_KEPT = 100_000
"""Field names whose hashes are kept (custom property names repeat across contacts)."""


def _stable_hash(item: Any) -> int:
    raw = orjson.dumps(item, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big", signed=True)


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _freeze(value: Any) -> Any:
    """A hashable form of a JSON value that keeps its type (``1``, ``1.0``, ``true``)."""
    kind = type(value)
    if kind is str or value is None:
        return value
    if kind is bool:
        return ("\0b", value)
    if kind is int:
        return ("\0i", value)
    if kind is float:
        return ("\0f", value)
    if kind is list:
        return ("\0l", *(_freeze(v) for v in value))
    if kind is dict:
        return ("\0d", *sorted((str(k), _freeze(v)) for k, v in value.items()))
    return ("\0r", repr(value))


@dataclass(slots=True)
class Note:
    """What a write will leave in Gist once confirmed (``strip`` makes it)."""

    keys: tuple[int, ...]  # the write's identity keys, sorted
    partition: PartitionWork | None
    base: bytes | None  # the record it was stripped against (None: none it could trust)
    sent: bytes  # (field, value) hash pairs of what is sent: signed 64-bit, packed


class ContactMemory:
    """Per contact, the hashes of the field values Gist last confirmed (see the module
    docstring for what a record is and what invalidates it)."""

    def __init__(
        self,
        ttl: float,
        max_contacts: int,
        max_bytes: int = 64 * 1024 * 1024,
        *,
        stable: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``stable``: hashes that are the same in every process (Redis will share them:
        ``shared`` is attached once the workspace is known)."""
        self.ttl = ttl
        self.max_contacts = max_contacts
        self.max_bytes = max_bytes
        self.shared: SharedContactMemory | None = None
        self._clock = clock
        self._hash: Callable[[Any], int] = _stable_hash if stable else hash
        self._names: dict[tuple[str, str], int] = {}  # (kind, name) -> its field hash
        # key hash -> record; a record is in here under each of its keys, or under none;
        # least recently used first.
        self._known: dict[int, bytes] = {}
        self._records = 0
        self._bytes = 0
        self._slots: dict[PartitionWork, int] = {}
        self._next_slot = 0

    def __len__(self) -> int:
        """Contacts remembered."""
        return self._records

    @property
    def held_bytes(self) -> int:
        """Bytes of the records (the bound is ``max_bytes``)."""
        return self._bytes

    # --- an upsert going out ----------------------------------------------------------
    def keys(self, identities: Iterable[str]) -> tuple[int, ...]:
        h = self._hash
        found = [h(identity) for identity in identities]
        if len(found) == 1:
            return (found[0],)
        return tuple(sorted(set(found)))

    def _name(self, kind: str, name: str) -> int:
        names = self._names
        found = names.get((kind, name))
        if found is None:
            if len(names) >= _NAMES_KEPT:
                names.clear()
            found = names[(kind, name)] = self._hash((kind, name))
        return found

    def pairs(self, payload: ContactPayload) -> array[int]:
        """(field hash, value hash) of each field of ``payload`` but its identity, in
        order: custom properties by name, tags by lower-cased name (present: the field's
        own hash), the other fields by name (an e-mail lower-cased: Gist's own case)."""
        h = self._hash
        names = self._names
        name_hash = self._name
        out = array("q")
        add = out.append
        key_email = payload.get("user_id") is not None  # with a user_id, email is a field
        for name, value in cast(dict[str, Any], payload).items():
            if name == "custom_properties" and type(value) is dict:
                for prop, prop_value in value.items():
                    f = names.get(("p", prop)) or name_hash("p", prop)
                    add(f)
                    add(h((f, prop_value if type(prop_value) is str else _freeze(prop_value))))
            elif name == "tags" and type(value) is list:
                for tag in value:
                    f = name_hash("t", str(tag).lower())
                    add(f)
                    add(f)
            elif name in _IDENTITY and not (name == "email" and key_email):
                continue
            else:
                f = names.get(("f", name)) or name_hash("f", name)
                add(f)
                if type(value) is str:
                    add(h((f, value.lower() if name == "email" else value)))
                else:
                    add(h((f, _freeze(value))))
        return out

    def strip(
        self,
        payload: ContactPayload,
        identities: Sequence[str],
        partition: PartitionWork | None,
    ) -> tuple[ContactPayload | None, Note, int]:
        """``payload`` without the fields Gist holds (None: nothing left to send), the note
        to ``confirm`` once Gist imported it, and how many fields were left out."""
        keys = self.keys(identities)
        pairs = self.pairs(payload)
        base = self._valid(keys, partition)
        if base is None:  # the usual first sight of a contact: everything goes
            return payload, Note(keys, partition, None, pairs.tobytes()), 0
        # A value hash names its field too (it hashes the field's hash with the value):
        # what Gist holds is the values both have.
        if not pairs:  # its identity only, of a contact Gist confirmed: nothing to send
            return None, Note(keys, partition, base, b""), 0
        record_values = array("q")
        record_values.frombytes(base[_HEADER.size + 8 * len(keys) :])
        held_values = set(pairs[1::2]).intersection(record_values[1::2])
        if not held_values:
            return payload, Note(keys, partition, base, pairs.tobytes()), 0
        sent = array("q")
        held: set[int] = set()
        for i in range(0, len(pairs), 2):
            if pairs[i + 1] in held_values:
                held.add(pairs[i])
            else:
                sent.append(pairs[i])
                sent.append(pairs[i + 1])
        note = Note(keys, partition, base, sent.tobytes())
        if not sent:
            return None, note, len(held)  # Gist holds all of it (or it names a known contact)
        return self._without(payload, held), note, len(held)

    def _without(self, payload: ContactPayload, held: set[int]) -> ContactPayload:
        name_hash = self._name
        out = cast(dict[str, Any], dict(payload))
        props = out.get("custom_properties")
        if type(props) is dict:
            kept = {k: v for k, v in props.items() if name_hash("p", k) not in held}
            if kept:
                out["custom_properties"] = kept
            else:
                del out["custom_properties"]
        tags = out.get("tags")
        if type(tags) is list:
            left = [t for t in tags if name_hash("t", str(t).lower()) not in held]
            if left:
                out["tags"] = left
            else:
                del out["tags"]
        for name in list(out):
            if name not in ("custom_properties", "tags") and name_hash("f", name) in held:
                del out[name]
        return cast(ContactPayload, out)

    # --- what Gist confirmed, and what invalidates it ---------------------------------
    def confirm(self, note: Note) -> None:
        """The write's batch import completed without an error for it."""
        partition = note.partition
        if partition is not None and partition.revoked:
            return  # another owner may have written the contact since
        base = note.base
        if base is not None and self._valid(note.keys, partition) is base:
            merged = _pairs(base)
            merged.update(_pairs(note.sent, skip=0))
            stamp = _HEADER.unpack_from(base)[0]
            flat = array("q")
            for f, v in merged.items():
                flat.append(f)
                flat.append(v)
            body = flat.tobytes()
        else:  # the usual first confirmation: what was sent is all that is known
            stamp = int(self._clock()) & 0xFFFFFFFF
            body = note.sent
        body = body[: 16 * MAX_FIELDS]
        keys = note.keys
        record = (
            _HEADER.pack(stamp, self._slot(partition), len(keys))
            + _KEYS[len(keys)].pack(*keys)
            + body
        )
        self._store(note.keys, record)
        if self.shared is not None and partition is not None:
            self.shared.record(partition.tp, note.keys, stamp, body, self.ttl)

    def invalidate(self, identities: Iterable[str], partition: PartitionWork | None) -> None:
        """A write of the contact that is not a confirmed success, or a delete, alias or
        tag change: forget it under every key, here and in Redis."""
        keys = self.keys(identities)
        for key in keys:
            self._drop(key)
        if self.shared is not None and partition is not None:
            self.shared.forget(partition.tp, keys)

    def revoke(self, partitions: Iterable[PartitionWork]) -> None:
        """The partitions are revoked: forget what they confirmed (another owner may write
        those contacts before they come back)."""
        gone = {self._slots.pop(p) for p in partitions if p in self._slots}
        if not gone:
            return
        for key, record in list(self._known.items()):
            if key in self._known and _HEADER.unpack_from(record)[1] in gone:
                self._drop(key)

    # --- Redis ------------------------------------------------------------------------
    async def load(self, notes: Iterable[tuple[Sequence[str], PartitionWork | None]]) -> None:
        """Fetch from Redis the records of contacts not known here (before stripping)."""
        shared = self.shared
        if shared is None:
            return
        wanted: dict[tuple[int, ...], PartitionWork] = {}
        for identities, partition in notes:
            if partition is None or partition.revoked:
                continue
            keys = self.keys(identities)
            if keys and keys not in wanted and self._valid(keys, partition) is None:
                wanted[keys] = partition
        if not wanted:
            return
        found = await shared.fetch([(keys, p.tp) for keys, p in wanted.items()], self.ttl)
        for keys, (stamp, body) in found.items():
            partition = wanted[keys]
            if not partition.revoked and self._valid(keys, partition) is None:
                record = (
                    _HEADER.pack(stamp, self._slot(partition), len(keys))
                    + _KEYS[len(keys)].pack(*keys)
                    + body[: 16 * MAX_FIELDS]
                )
                self._store(keys, record)

    # --- the store --------------------------------------------------------------------
    def _slot(self, partition: PartitionWork | None) -> int:
        if partition is None:
            return 0xFFFF
        slot = self._slots.get(partition)
        if slot is None:
            in_use = set(self._slots.values())
            while True:
                self._next_slot = (self._next_slot + 1) % 0xFFFF
                if self._next_slot not in in_use:
                    break
            slot = self._slots[partition] = self._next_slot
        return slot

    def _valid(self, keys: tuple[int, ...], partition: PartitionWork | None) -> bytes | None:
        """The record every one of ``keys`` holds, if it is one and the same, of exactly
        those keys, from ``partition``, and younger than the TTL; else None."""
        if not keys:
            return None
        record = self._known.get(keys[0])
        if record is None:
            return None
        stamp, slot, count = _HEADER.unpack_from(record)
        want = 0xFFFF if partition is None else self._slots.get(partition)
        if count != len(keys) or slot != want:
            return None
        if _KEYS[count].unpack_from(record, _HEADER.size) != keys:
            return None
        for key in keys[1:]:
            if self._known.get(key) is not record:
                return None
        if (int(self._clock()) & 0xFFFFFFFF) - stamp > self.ttl:
            for key in keys:
                self._drop(key)
            return None
        for key in keys:  # most recently used
            del self._known[key]
            self._known[key] = record
        return record

    def _store(self, keys: tuple[int, ...], record: bytes) -> None:
        for key in keys:
            self._drop(key)
        for key in keys:
            self._known[key] = record
        self._records += 1
        self._bytes += len(record)
        if self._records > self.max_contacts or self._bytes > self.max_bytes:
            self._evict()

    def _evict(self) -> None:
        """Forget the least recently used records until both bounds hold with a
        hundredth to spare, in passes of a hundredth: a dict evicted from its front
        keeps the deleted entries' slots until it resizes, and finding its first key
        walks over them, so one eviction a look-up (the bound held exactly) cost 62% of
        the worker's CPU on a 1,000,000 drain at the bound."""
        known = self._known
        contacts = self.max_contacts - self.max_contacts // 100
        size = self.max_bytes - self.max_bytes // 100
        while known and (self._records > contacts or self._bytes > size):
            for key in list(itertools.islice(known, max(1, len(known) // 100))):
                self._drop(key)  # a record's other keys go with it: some are gone already
                if self._records <= contacts and self._bytes <= size:
                    return

    def _drop(self, key: int) -> None:
        """Forget the record under ``key``, under all its keys."""
        record = self._known.pop(key, None)
        if record is None:
            return
        count = _HEADER.unpack_from(record)[2]
        for other in _KEYS[count].unpack_from(record, _HEADER.size):
            if other != key and self._known.get(other) is record:
                del self._known[other]
        self._records -= 1
        self._bytes -= len(record)


def _pairs(blob: bytes, skip: int | None = None) -> dict[int, int]:
    """The (field, value) pairs of a record (or, with ``skip=0``, of packed pairs)."""
    if skip is None:
        skip = _HEADER.size + 8 * _HEADER.unpack_from(blob)[2]
    values = array("q")
    values.frombytes(blob[skip:])
    return dict(zip(values[::2], values[1::2], strict=True))


class SharedContactMemory:
    """Contact memory in Redis, for every replica: one hash per identity key
    (``{prefix}:memory:{key}``) holding the record's fields, its keys, the partition and
    generation that confirmed it and when it was first recorded. Written in the
    background; a write that fails makes its partition *dirty*: nothing of it is read
    from Redis until its generation is bumped (the next write that reaches Redis does
    it), so a stale record is never trusted."""

    def __init__(self, redis: Any, prefix: str, timeout: float) -> None:
        self._redis = redis
        self._prefix = prefix
        self._timeout = timeout
        self._gens: dict[TopicPartition, int] = {}
        self._dirty: set[TopicPartition] = set()
        self._writes: list[tuple[TopicPartition, list[tuple[Any, ...]]]] = []
        self._unflushed: dict[int, int] = {}  # key -> writes of it not yet in Redis
        self._flushing: asyncio.Task[None] | None = None
        self._retry_at = 0.0
        self._closed = False

    def _key(self, key: int) -> str:
        return f"{self._prefix}:memory:{key & _MASK:016x}"

    def _gen_key(self, tp: TopicPartition) -> str:
        return f"{self._prefix}:memory-gen:{tp.topic}:{tp.partition}"

    def _handover_key(self, tp: TopicPartition) -> str:
        return f"{self._prefix}:memory-handover:{tp.topic}:{tp.partition}"

    def _meta(self, tp: TopicPartition) -> str:
        return f"{tp.topic}:{tp.partition}:{self._gens.get(tp, 0)}"

    def dirty(self, tp: TopicPartition) -> bool:
        return tp in self._dirty or tp not in self._gens

    # --- reading ----------------------------------------------------------------------
    async def fetch(
        self, wanted: list[tuple[tuple[int, ...], TopicPartition]], ttl: float
    ) -> dict[tuple[int, ...], tuple[int, bytes]]:
        """The valid records of the wanted contacts: (first recorded, packed pairs)."""
        asked = [
            (keys, tp)
            for keys, tp in wanted
            if not self.dirty(tp) and not any(k in self._unflushed for k in keys)
        ]
        if not asked:
            return {}
        try:
            async with asyncio.timeout(self._timeout):
                pipe = self._redis.pipeline(transaction=False)
                for keys, _ in asked:
                    for key in keys:
                        pipe.hgetall(self._key(key))
                answers = await pipe.execute()
        except Exception as error:
            metrics.LIMITER_REDIS_ERRORS.labels("contact_memory").inc()
            log.warning(log_events.MEMORY_REDIS_UNAVAILABLE, error=type(error).__name__)
            return {}
        now = time.time()
        out: dict[tuple[int, ...], tuple[int, bytes]] = {}
        at = 0
        for keys, tp in asked:
            records = answers[at : at + len(keys)]
            at += len(keys)
            found = self._read(keys, tp, records, now, ttl)
            if found is not None:
                out[keys] = found
        return out

    def _read(
        self,
        keys: tuple[int, ...],
        tp: TopicPartition,
        records: list[dict[bytes, bytes]],
        now: float,
        ttl: float,
    ) -> tuple[int, bytes] | None:
        if self.dirty(tp) or not all(records):
            return None
        first = records[0]
        version = first.get(b"_v")
        if any(r.get(b"_v") != version for r in records):
            return None  # not one record under every key
        if first.get(b"_k") != ",".join(f"{k & _MASK:016x}" for k in keys).encode():
            return None
        if first.get(b"_p") != self._meta(tp).encode():
            return None
        try:
            stamp = int(first[b"_t"])
        except (KeyError, ValueError):
            return None
        if now - stamp > ttl:
            return None
        flat = array("q")
        for name, value in first.items():
            if name.startswith(b"_"):
                continue
            flat.append(_signed(int(name, 16)))
            flat.append(_signed(int(value, 16)))
        return stamp, flat.tobytes()

    # --- writing ----------------------------------------------------------------------
    def record(
        self, tp: TopicPartition, keys: tuple[int, ...], stamp: int, body: bytes, ttl: float
    ) -> None:
        if self.dirty(tp):
            self._schedule()  # bumps its generation: nothing of it is read before
            return
        mapping = {
            b"_v": uuid.uuid4().hex[:16],
            b"_k": ",".join(f"{k & _MASK:016x}" for k in keys),
            b"_p": self._meta(tp),
            b"_t": str(stamp),
        }
        flat = array("q")
        flat.frombytes(body)
        for i in range(0, len(flat), 2):
            mapping[f"{flat[i] & _MASK:x}".encode()] = f"{flat[i + 1] & _MASK:x}"
        expire = max(1, int(stamp + ttl - time.time()) + 1)
        ops: list[tuple[Any, ...]] = []
        for key in keys:
            ops.append(("delete", key))
            ops.append(("hset", key, mapping))
            ops.append(("expire", key, expire))
        self._queue(tp, ops, keys)

    def forget(self, tp: TopicPartition, keys: tuple[int, ...]) -> None:
        self._queue(tp, [("delete", key) for key in keys], keys)

    def _queue(self, tp: TopicPartition, ops: list[tuple[Any, ...]], keys: Iterable[int]) -> None:
        for key in keys:
            self._unflushed[key] = self._unflushed.get(key, 0) + 1
        self._writes.append((tp, ops))
        self._schedule()

    def _schedule(self) -> None:
        if not self._closed and (self._flushing is None or self._flushing.done()):
            self._flushing = asyncio.ensure_future(self._flush_soon())

    async def _flush_soon(self) -> None:
        # Gather a few; after a failure, give Redis a second before the next try.
        await asyncio.sleep(max(0.02, self._retry_at - time.monotonic()))
        await self.flush()

    async def flush(self) -> bool:
        """Write what is queued (and bump the generation of dirty partitions); False when
        Redis failed (the partitions concerned are dirty then)."""
        ok = True
        while self._writes or (self._dirty & set(self._gens)):
            writes, self._writes = self._writes, []
            bump = sorted(self._dirty & set(self._gens))
            try:
                async with asyncio.timeout(self._timeout * 4):
                    pipe = self._redis.pipeline(transaction=True)
                    for tp in bump:
                        pipe.incr(self._gen_key(tp))
                    for _, ops in writes:
                        for op in ops:
                            if op[0] == "delete":
                                pipe.delete(self._key(op[1]))
                            elif op[0] == "hset":
                                pipe.hset(self._key(op[1]), mapping=op[2])
                            else:
                                pipe.expire(self._key(op[1]), op[2])
                    answers = await pipe.execute()
            except Exception as error:
                ok = False
                metrics.LIMITER_REDIS_ERRORS.labels("contact_memory").inc()
                log.warning(log_events.MEMORY_REDIS_UNAVAILABLE, error=type(error).__name__)
                self._dirty.update(tp for tp, _ in writes)
                self._written(writes)
                self._retry_at = time.monotonic() + 1.0
                return False
            for tp, gen in zip(bump, answers, strict=False):
                self._gens[tp] = int(gen)
                self._dirty.discard(tp)
            self._written(writes)
        return ok

    def _written(self, writes: list[tuple[TopicPartition, list[tuple[Any, ...]]]]) -> None:
        for _, ops in writes:
            for op in ops:
                if op[0] != "expire" and op[0] != "hset":
                    key = op[1]
                    left = self._unflushed.get(key, 0) - 1
                    if left > 0:
                        self._unflushed[key] = left
                    else:
                        self._unflushed.pop(key, None)

    # --- partitions changing hands ----------------------------------------------------
    async def take_over(self, partitions: dict[TopicPartition, int | None]) -> None:
        """New partitions, at the group's committed offsets: keep their generation if the
        previous owner handed them over cleanly at that offset, else bump it (a killed
        owner, a failed write: its records may be stale)."""
        if not partitions:
            return
        tps = list(partitions)
        try:
            async with asyncio.timeout(self._timeout * 4):
                pipe = self._redis.pipeline(transaction=False)
                for tp in tps:
                    pipe.getdel(self._handover_key(tp))
                    pipe.get(self._gen_key(tp))
                answers = await pipe.execute()
                pipe = self._redis.pipeline(transaction=False)
                bumped: list[TopicPartition] = []
                for i, tp in enumerate(tps):
                    marker, gen = answers[2 * i], answers[2 * i + 1]
                    current = int(gen) if gen is not None else 0
                    committed = partitions[tp]
                    clean = committed is not None and marker == f"{current}:{committed}".encode()
                    if clean:
                        self._gens[tp] = current
                        self._dirty.discard(tp)
                    else:
                        bumped.append(tp)
                        pipe.incr(self._gen_key(tp))
                if bumped:
                    for tp, gen in zip(bumped, await pipe.execute(), strict=True):
                        self._gens[tp] = int(gen)
                        self._dirty.discard(tp)
        except Exception as error:
            metrics.LIMITER_REDIS_ERRORS.labels("contact_memory").inc()
            log.warning(log_events.MEMORY_REDIS_UNAVAILABLE, error=type(error).__name__)
            for tp in tps:
                self._gens.setdefault(tp, 0)
                self._dirty.add(tp)

    async def handover(
        self, partitions: dict[TopicPartition, int | None], leaving: bool = True
    ) -> None:
        """The partitions may leave this replica at these committed offsets: flush, and
        tell the next owner that their records are complete (only when they are).
        ``leaving``: they are gone (else a rebalance is deciding: ``resume`` if they
        stay)."""
        if not partitions:
            return
        flushed = await self.flush()
        try:
            async with asyncio.timeout(self._timeout * 4):
                pipe = self._redis.pipeline(transaction=False)
                for tp, committed in partitions.items():
                    if flushed and committed is not None and not self.dirty(tp):
                        pipe.set(
                            self._handover_key(tp),
                            f"{self._gens[tp]}:{committed}",
                            ex=7 * 86_400,
                        )
                    else:
                        pipe.delete(self._handover_key(tp))
                await pipe.execute()
        except Exception:
            metrics.LIMITER_REDIS_ERRORS.labels("contact_memory").inc()
        if leaving:
            self.release(partitions)

    def release(self, partitions: Iterable[TopicPartition]) -> None:
        """The partitions are another's now: nothing more of theirs is written here."""
        for tp in partitions:
            self._gens.pop(tp, None)
            self._dirty.discard(tp)

    async def resume(self, partitions: Iterable[TopicPartition]) -> None:
        """The partitions stayed with this replica: the hand-over written for them no
        longer holds (this replica writes on); one that cannot be taken back makes the
        partition dirty (its generation is bumped before anything of it is read)."""
        tps = [tp for tp in partitions if tp in self._gens]
        if not tps:
            return
        try:
            async with asyncio.timeout(self._timeout * 4):
                await self._redis.delete(*(self._handover_key(tp) for tp in tps))
        except Exception as error:
            metrics.LIMITER_REDIS_ERRORS.labels("contact_memory").inc()
            log.warning(log_events.MEMORY_REDIS_UNAVAILABLE, error=type(error).__name__)
            self._dirty.update(tps)

    async def close(self) -> None:
        self._closed = True
        if self._flushing is not None and not self._flushing.done():
            self._flushing.cancel()
