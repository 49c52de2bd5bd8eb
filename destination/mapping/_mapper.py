"""One Segment message in, the Gist operations it causes out (or why none).

``Mapper(rules)`` compiles the rules once; ``Mapper.map`` never raises and touches only
plain dicts, compiled regexes and small caches per message. Every operation carries the
priority the rules' ``priorities`` section gives it. A field left out of a message that
is sent (``_reasons.FIELD_DROPS``) is reported to ``on_dropped``: by default counted in
``fields_dropped_total``; ``gist-destination map`` shows them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final, cast

from destination.gist._limiter import Priority
from destination.gist._models import ContactPayload, EventPayload
from destination.mapping import _reasons as reasons
from destination.mapping._commerce import CommerceMapper, is_commerce
from destination.mapping._schema import CONTACT_FIELDS, EventTag, Rules, TraitTag
from destination.mapping._syntax import (
    MISSING,
    Getter,
    Matcher,
    Template,
    compile_condition,
    event_key,
    first_rendered,
    getter,
    normalise_event_name,
    parse_path,
)
from destination.mapping._values import (
    CACHE_LIMIT,
    DROP,
    MAX_USER_ID,
    TIME_END,
    TIME_RULE,
    Dropped,
    InvalidField,
    PropertyNames,
    PropertyShaper,
    Unsendable,
    ValueConverter,
    email_problem,
    field_name,
    iso_seconds,
    message_time,
    time_seconds,
)
from destination.observability import metrics
from destination.operations import (
    ContactAlias,
    ContactDelete,
    ContactUpsert,
    EventTrack,
    Mapped,
    MapResult,
    Operation,
    Rejected,
    Skipped,
    SubscriptionChange,
    TagChange,
)

_INT64_MIN: Final = -(2**63)
_UINT64_MAX: Final = 2**64 - 1
_AUDIENCE_ENTERED: Final = event_key("Audience Entered")
_AUDIENCE_EXITED: Final = event_key("Audience Exited")
_AUDIENCE_EVENTS: Final = frozenset({_AUDIENCE_ENTERED, _AUDIENCE_EXITED})
_LAST_SEEN: Final = frozenset({"last_seen_ip", "last_seen_user_agent"})
_NULLABLE: Final = frozenset(
    {"name", "phone", "signed_up_at", "last_seen_ip", "last_seen_user_agent"}
)


class _Reject(Exception):
    """Raised inside a handler, turned into ``Rejected`` by ``Mapper.map``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


class _Invalid(Exception):
    """A contact field has the wrong type; ``invalid_fields`` says what follows."""


# Contact-field converters: value in, value out (or MISSING to skip); _Invalid on a bad type.


def _text(value: Any) -> Any:
    if isinstance(value, str):
        return value.strip() or MISSING
    raise _Invalid("a string")


def _phone(value: Any) -> Any:
    if type(value) is str:
        return value.strip() or MISSING
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _text(value)


def _unix(value: Any) -> Any:
    if type(value) is str:  # the usual case: an ISO-8601 date
        seconds = iso_seconds(value)
        if seconds is not None and 0.0 <= seconds < TIME_END:
            return int(seconds)
    seconds = time_seconds(value)
    if seconds is None:
        raise _Invalid(TIME_RULE)
    return int(seconds)


def _flag(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _Invalid("true or false")


def _tags(value: Any) -> Any:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise _Invalid("a list of tag names")
    tags: list[str] = []
    for item in items:
        if type(item) is not str and not isinstance(item, str):
            raise _Invalid("a list of tag names")
        tag = item.strip()
        if tag and tag not in tags:
            tags.append(tag)
    return tags or MISSING


_CONVERTERS: Final[dict[str, Callable[[Any], Any]]] = {
    "name": _text,
    "phone": _phone,
    "signed_up_at": _unix,
    "unsubscribed_from_emails": _flag,
    "tags": _tags,
    "last_seen_ip": _text,
    "last_seen_user_agent": _text,
}


Source = tuple[Getter, str]
"""Reads one source of a field from a message (MISSING when absent), and its path for
error messages."""


def _source(paths: tuple[str, ...]) -> Source:
    """A contact-field source: one path, or paths whose present parts are joined with a
    space (``firstName lastName``)."""
    if len(paths) == 1:
        return getter(parse_path(paths[0])), paths[0]
    getters = tuple(getter(parse_path(p)) for p in paths)

    def joined(message: Mapping[str, Any]) -> Any:
        return _joined([get(message) for get in getters])

    return joined, " + ".join(paths)


def _joined(values: Any) -> Any:
    """The present parts of a joined source, joined with a space, or MISSING."""
    parts: list[str] = []
    for value in values:
        if value is MISSING or value is None:
            continue
        if not isinstance(value, str):
            raise _Invalid("strings to join")
        value = value.strip()
        if value:
            parts.append(value)
    return " ".join(parts) if parts else MISSING


def _id_text(value: Any, path: str) -> str:
    """A user id that is not a plain string, as its text; ``_Reject`` if it is no id."""
    if isinstance(value, int) and not isinstance(value, bool):
        if _INT64_MIN <= value <= _UINT64_MAX:
            return str(int(value))
        raise _Reject(reasons.INVALID_FIELD, f"{path} must be an integer within 64 bits")
    if isinstance(value, str):
        return str(value)
    if isinstance(value, float):
        # orjson reads an integer beyond 64 bits as a float: 2**64 + 1 would print as
        # 2**64 and two users would merge. No float is taken as an id.
        raise _Reject(
            reasons.INVALID_FIELD,
            f"{path} must be a string or an integer within 64 bits, not a number with a "
            "fraction or an exponent",
        )
    raise _Reject(reasons.INVALID_FIELD, f"{path} must be a string or an integer")


# Where an identify's field source reads from. Most sources are a key of traits or of
# context, which the identify has in hand: reading them directly, not through a getter,
# keeps the per-message loop lean.
_TRAIT: Final = 0  # ref: a trait name
_TRAITS_JOINED: Final = 1  # ref: trait names whose values are joined
_CONTEXT: Final = 2  # ref: a key of context
_MESSAGE: Final = 3  # ref: a getter (any other path, or a join of them)

FieldSource = tuple[int, Any, str]
"""(where, what, the path for error messages)."""
ContactField = tuple[str, tuple[FieldSource, ...], Callable[[Any], Any], bool]
"""(Gist field, its sources in order, the converter, whether it may be sent as null)."""


def _field_source(paths: tuple[str, ...]) -> FieldSource:
    parsed = [parse_path(p) for p in paths]
    label = " + ".join(paths)
    if all(len(p) == 2 and p[0] == "traits" for p in parsed):
        if len(parsed) == 1:
            return _TRAIT, parsed[0][1], label
        return _TRAITS_JOINED, tuple(p[1] for p in parsed), label
    if len(parsed) == 1 and len(parsed[0]) == 2 and parsed[0][0] == "context":
        return _CONTEXT, parsed[0][1], label
    return _MESSAGE, _source(paths)[0], label


def _contact_field(name: str, sources: tuple[tuple[str, ...], ...]) -> ContactField:
    return (
        name,
        tuple(_field_source(s) for s in sources),
        _CONVERTERS[name],
        name in _NULLABLE,
    )


class _TagRule:
    __slots__ = ("applies", "events", "templates", "untag")

    def __init__(self, rule: TraitTag) -> None:
        texts = rule.tag if rule.tag is not None else rule.untag
        self.templates = tuple(Template(t) for t in texts or ())
        self.untag = rule.untag is not None
        self.applies = compile_condition(rule.when)
        self.events = Matcher(rule.event, event_names=True) if isinstance(rule, EventTag) else None


def _priority(name: str) -> Priority:
    return Priority[name.upper()]


DropReport = Callable[[str, str, str], None]
"""Told of each field left out of a message that is sent: (message type, the field as
a path, why: a code of ``_reasons.FIELD_DROPS``)."""


def count_dropped(message_type: str, field: str, reason: str) -> None:
    """The default ``DropReport``: ``fields_dropped_total{type,reason}``."""
    metrics.child(metrics.FIELDS_DROPPED, message_type, reason).inc()


CONSENT_EVENT: Final = event_key("Segment Consent Preference Updated")
"""The track Segment's consent management sends when a person changes their preferences."""


class _Consent:
    """``consent`` rules, compiled: category names compared case-insensitively."""

    def __init__(self, rules: Any) -> None:
        self.required = frozenset(c.lower() for c in rules.required)
        self.skip_without = rules.without_consent_data == "skip"
        self.email = rules.email.lower() if rules.email else None
        self.subscriptions = tuple(
            (name, category.lower()) for name, category in rules.subscription_types.items()
        )
        self.effects = self.email is not None or bool(self.subscriptions)

    @staticmethod
    def preferences(message: dict[str, Any]) -> dict[str, bool] | None:
        """The message's consent preferences by lower-cased category (None: it has none)."""
        context = message.get("context")
        consent = context.get("consent") if isinstance(context, dict) else None
        prefs = consent.get("categoryPreferences") if isinstance(consent, dict) else None
        if not isinstance(prefs, dict):
            return None
        return {str(k).lower(): v for k, v in prefs.items() if isinstance(v, bool)}

    def denied(self, prefs: dict[str, bool] | None) -> bool:
        """Whether the message may not go to Gist."""
        if prefs is None:
            return bool(self.required) and self.skip_without
        return any(prefs.get(category) is False for category in self.required)


class Mapper:
    """Maps Segment-spec messages to Gist operations according to ``rules``; each field
    left out of a message that is sent is told to ``on_dropped``."""

    def __init__(self, rules: Rules, on_dropped: DropReport = count_dropped) -> None:
        self.rules = rules
        self._on_dropped = on_dropped
        self._dropped: Dropped = []
        """What mapping the current message left out (emptied per message)."""
        self._integration = rules.integration
        self._on_invalid_drop = rules.invalid_fields == "drop"
        self._consent = _Consent(rules.consent)
        self._consent_priority = _priority(rules.priorities.consent)
        self._commerce = (
            CommerceMapper(
                _priority(rules.priorities.orders),
                _priority(rules.priorities.carts),
                self._invalid,
            )
            if rules.ecommerce.enabled
            else None
        )
        self._commerce_events = rules.ecommerce.send_events
        self._user_ids = tuple(_source((p,)) for p in rules.identity.user_id)
        self._emails = tuple(_source((p,)) for p in rules.identity.email)
        self._good_emails: set[str] = set()
        """Addresses that passed ``email_problem`` (the same ones come back)."""

        names = PropertyNames(rules.values.keys)
        self._names = names
        convert = ValueConverter(rules.values)
        self._convert = convert
        self._keep_nulls = rules.values.nulls == "keep"
        self._lower_event_names = rules.values.event_names == "lower_case"

        identify = rules.identify
        self._fields = tuple(
            _contact_field(name, sources)
            for name, sources in identify.fields.model_dump().items()
            if sources
        )
        # context.active false: "update the traits, not the last seen".
        self._inactive_fields = tuple(f for f in self._fields if f[0] not in _LAST_SEEN)
        used_traits = {
            ".".join(parse_path(p)[1:])
            for sources in identify.fields.model_dump().values()
            for source in sources
            for p in source
            if p.startswith("traits.")
        } | {
            ".".join(parse_path(p)[1:])
            for p in (*rules.identity.user_id, *rules.identity.email)
            if p.startswith("traits.")
        }
        drop = self._on_invalid_drop
        self._traits = PropertyShaper(
            identify.traits,
            names,
            convert,
            label="traits",
            skip=frozenset(used_traits),
            reserved=CONTACT_FIELDS,
            drop_invalid=drop,
            dropped=self._dropped,
        )
        self._audiences = rules.engage.audiences
        self._computed_traits = rules.engage.computed_traits
        self._engage_events = rules.engage.send_events

        track = rules.track
        self._event_include = Matcher(track.events.include, event_names=True)
        self._event_exclude = Matcher(track.events.exclude, event_names=True)
        self._event_rename = {event_key(k): v for k, v in track.events.rename.items()}
        self._event_cache: dict[str, tuple[str, str | None, tuple[_TagRule, ...], Priority]] = {}
        self._track_properties = PropertyShaper(
            track.properties,
            names,
            convert,
            label="properties",
            drop_invalid=drop,
            dropped=self._dropped,
        )

        self._trait_tags = tuple(_TagRule(rule) for rule in rules.tags.traits)
        self._event_tags = tuple(_TagRule(rule) for rule in rules.tags.events)

        self._page_names = tuple(Template(t) for t in rules.page.event)
        self._page_properties = PropertyShaper(
            rules.page.properties,
            names,
            convert,
            label="properties",
            drop_invalid=drop,
            dropped=self._dropped,
        )
        self._screen_names = tuple(Template(t) for t in rules.screen.event)
        self._screen_properties = PropertyShaper(
            rules.screen.properties,
            names,
            convert,
            label="properties",
            drop_invalid=drop,
            dropped=self._dropped,
        )
        self._group_traits = PropertyShaper(
            rules.group.traits,
            names,
            convert,
            label="traits",
            prefix=rules.group.prefix,
            reserved=CONTACT_FIELDS,
            drop_invalid=drop,
            dropped=self._dropped,
        )

        handlers: dict[str, Callable[[dict[str, Any], str], MapResult]] = {
            "identify": self._identify,
            "track": self._track,
            "page": self._page,
            "screen": self._screen,
            "group": self._group,
            "alias": self._alias,
            "delete": self._delete,
        }
        self._handlers = {
            kind: handler if getattr(rules, kind).enabled else _type_off
            for kind, handler in handlers.items()
        }

        priorities = rules.priorities
        self._priority = {kind: _priority(getattr(priorities.types, kind)) for kind in handlers}
        self._audience_priority = _priority(priorities.audiences)
        self._event_priorities = tuple(
            (Matcher((pattern,), event_names=True), _priority(name))
            for pattern, name in priorities.events.items()
        )

    # The entry point -------------------------------------------------------------------

    def map(self, message: object) -> MapResult:
        """The operations ``message`` causes, or why it is skipped or rejected. Never
        raises. When the message is sent, each field left out of it is told to
        ``on_dropped``."""
        dropped = self._dropped
        if dropped:
            dropped.clear()
        result = self._map(message)
        if dropped and type(result) is Mapped:
            kind = result.message_type
            report = self._on_dropped
            for field, reason in dropped:
                report(kind, field, reason)
        return result

    def _map(self, message: object) -> MapResult:
        kind = "unknown"
        try:
            if not isinstance(message, dict):
                return Rejected(kind, reasons.NOT_AN_OBJECT, "the message is not a JSON object")
            raw_kind = message.get("type")
            if not isinstance(raw_kind, str):
                if "batch" in message:
                    return Rejected(
                        kind, reasons.BATCH_ENVELOPE, "a batch envelope: split it into messages"
                    )
                return Rejected(kind, reasons.UNKNOWN_TYPE, "type is missing or not a string")
            # ``kind`` becomes a metric label and a dead-letter header: one of the spec's
            # types, never whatever a producer wrote (that would grow without bound).
            if raw_kind in self._handlers:
                kind = raw_kind
            else:
                canonical = raw_kind.strip().lower()
                if canonical not in self._handlers:
                    return Rejected(
                        kind,
                        reasons.UNKNOWN_TYPE,
                        f"type {raw_kind[:40]!r} is not a Segment message type",
                    )
                kind = canonical
            handler = self._handlers[kind]
            switches = message.get("integrations")
            if isinstance(switches, dict) and self._switched_off(switches):
                return Skipped(kind, reasons.INTEGRATION_OFF)
            consent = self._consent
            prefs = consent.preferences(message)
            if kind != "delete" and consent.denied(prefs):  # a deletion always goes
                return Skipped(kind, reasons.NO_CONSENT)
            result = handler(message, kind)
            if prefs and consent.effects and type(result) is Mapped:
                result = self._consent_changes(message, kind, prefs, result)
            return result
        except _Reject as rejection:
            return Rejected(kind, rejection.reason, rejection.detail)
        except InvalidField as invalid:
            return Rejected(kind, reasons.INVALID_FIELD, invalid.detail)
        except Exception as exc:  # the promise is "never raises": say so instead
            return Rejected(kind, reasons.MAPPING_ERROR, f"{type(exc).__name__} while mapping")

    def _consent_changes(
        self, message: dict[str, Any], kind: str, prefs: dict[str, bool], result: Mapped
    ) -> Mapped:
        """An identify, or the track Segment's consent management sends when preferences
        change: the e-mail consent becomes ``unsubscribed_from_emails`` and the rules'
        subscription types are set as their categories say."""
        if kind == "track":
            name = message.get("event")
            if not isinstance(name, str) or event_key(name) != CONSENT_EVENT:
                return result
        elif kind != "identify":
            return result
        consent = self._consent
        user_id, email = self._identity(message)
        if user_id is None and email is None:
            return result
        message_id, timestamp = self._stamp(message)
        operations = list(result.operations)
        changes = [
            SubscriptionChange(
                name, subscribed, user_id, email, message_id, timestamp, self._consent_priority
            )
            for name, category in consent.subscriptions
            if (subscribed := prefs.get(category)) is not None
        ]
        unsubscribed: bool | None = None
        if consent.email is not None and consent.email in prefs:
            unsubscribed = not prefs[consent.email]
        if unsubscribed is None and not changes:
            return result
        upserts = [op for op in operations if isinstance(op, ContactUpsert)]
        if upserts:
            if unsubscribed is not None:
                cast(dict[str, Any], upserts[0].contact)["unsubscribed_from_emails"] = unsubscribed
        else:
            # Gist (un)subscribes only a contact it has: the upsert makes sure of it (and
            # costs nothing when contact memory knows the contact).
            contact: dict[str, Any] = {}
            if unsubscribed is not None:
                contact["unsubscribed_from_emails"] = unsubscribed
            if user_id is not None:
                contact["user_id"] = user_id
            if email is not None:
                contact["email"] = email
            operations.insert(
                0,
                ContactUpsert(
                    cast(ContactPayload, contact), message_id, timestamp, self._consent_priority
                ),
            )
        operations.extend(changes)
        return Mapped(result.message_type, tuple(operations))

    def _switched_off(self, switches: dict[str, Any]) -> bool:
        # Segment's rule: the destination's own switch wins, else "All", else on.
        switch = switches.get(self._integration, MISSING)
        if switch is MISSING:
            switch = switches.get("All", True)
        return switch is False

    # Shared pieces ---------------------------------------------------------------------

    def _identity(self, message: dict[str, Any]) -> tuple[str | None, str | None]:
        """(user_id, email) by the identity rules."""
        return self._user_id(message, self._user_ids), self._email(message)

    def _user_id(self, message: dict[str, Any], sources: tuple[Source, ...]) -> str | None:
        """The first present, non-blank id, as a string (an integer becomes its decimal).
        A bad id rejects the message whatever ``invalid_fields`` says: sent, or dropped for
        the next source, it would touch another contact."""
        for get, path in sources:
            value = get(message)
            if type(value) is not str:  # a string is the usual case
                if value is MISSING or value is None:
                    continue
                value = _id_text(value, path)
            if len(value) > MAX_USER_ID:
                raise _Reject(
                    reasons.INVALID_FIELD, f"{path} must be at most {MAX_USER_ID} characters"
                )
            if value and not value.isspace():
                return value  # as written: only a blank id is no id
        return None

    def _email(self, message: dict[str, Any]) -> str | None:
        """The first present, non-blank email, trimmed; a bad one rejects the message, or
        is dropped for the next source under ``invalid_fields: drop``."""
        good = self._good_emails
        for get, path in self._emails:
            value = get(message)
            if value is MISSING or value is None:
                continue
            if not isinstance(value, str):
                self._invalid(path, "a string")
                continue
            email = value.strip()
            if email in good:  # the usual case: this address passed before
                return email
            if not email:
                continue
            problem = email_problem(email)
            if problem is not None:
                self._invalid(path, problem)
                continue
            if len(good) >= CACHE_LIMIT:
                good.clear()
            good.add(email)
            return email
        return None

    def _no_identity(self, message: dict[str, Any], detail: str) -> _Reject:
        """The rejection for a message without an identity: ``missing_identity``, or, when
        ``invalid_fields: drop`` dropped a bad email that was the only identity, that
        email's ``invalid_field`` (dropping it must not leave the message to pass)."""
        for get, path in self._emails:
            value = get(message)
            if value is MISSING or value is None:
                continue
            if not isinstance(value, str):
                return _Reject(reasons.INVALID_FIELD, f"{path} must be a string")
            email = value.strip()
            problem = email_problem(email) if email else None
            if problem is not None:
                return _Reject(reasons.INVALID_FIELD, f"{path} must be {problem}")
        return _Reject(reasons.MISSING_IDENTITY, detail)

    def _invalid(self, path: str, expected: str) -> None:
        """A field Gist cannot take: reject, unless the rules say drop it (return)."""
        if not self._on_invalid_drop:
            raise _Reject(reasons.INVALID_FIELD, f"{path} must be {expected}")
        self._dropped.append((path, reasons.INVALID_FIELD_DROPPED))

    def _custom_property(self, key: str, path: str) -> str | None:
        """The custom property an Engage key (an audience, a computed trait) sets, or
        ``None`` when it names none (rejected, unless ``invalid_fields: drop``)."""
        name = self._names(key)
        if name and name not in CONTACT_FIELDS:
            return name
        problem = (
            f"it becomes {name!r}, the name of a Gist contact field"
            if name
            else "it gives no property name (no letters or digits)"
        )
        self._invalid(path, f"a custom property name: {problem}")
        return None

    def _engage_value(self, value: Any, path: str) -> Any:
        """A computed trait's value as sent, or ``DROP``."""
        try:
            return self._convert(value)
        except Unsendable as exc:
            self._invalid(path, exc.rule)
            return DROP

    def _object(self, message: dict[str, Any], key: str) -> dict[str, Any]:
        """``traits`` / ``properties``: an object, or empty when absent."""
        value = message.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise _Reject(reasons.INVALID_FIELD, f"{key} must be an object")
        return value

    def _event_name(self, name: str) -> str:
        name = normalise_event_name(name)
        return name.lower() if self._lower_event_names else name

    # identify --------------------------------------------------------------------------

    def _identify(self, message: dict[str, Any], kind: str) -> MapResult:
        traits = message.get("traits")
        if type(traits) is not dict:
            traits = self._object(message, "traits")
        context = message.get("context")
        if not isinstance(context, dict):
            context = {}
        known = context.get("traits")
        if type(known) is dict and known:
            # Traits known at the time (RudderStack's SDKs send identify traits only
            # there): the message's own traits win. Every traits.* path of the rules
            # reads the merged traits.
            traits = {**known, **traits}
            message = {**message, "traits": traits}
        user_id, email = self._identity(message)
        if user_id is None and email is None:
            raise self._no_identity(message, "identify needs a userId or an email")
        contact: dict[str, Any] = {}
        if user_id is not None:
            contact["user_id"] = user_id
            for key in _USER_ID_TRAITS:
                if key in traits and _is_id(traits[key], user_id):
                    # the identity, already sent as user_id (RudderStack's mobile SDKs
                    # repeat it in context.traits): not a custom property
                    traits = {k: v for k, v in traits.items() if k != key}
        if email is not None:
            contact["email"] = email

        fields = self._inactive_fields if context.get("active") is False else self._fields
        trait, traits_joined, in_context, missing = _TRAIT, _TRAITS_JOINED, _CONTEXT, MISSING
        for name, sources, convert, nullable in fields:
            saw_null = False
            for where, ref, path in sources:
                try:
                    if where == trait:
                        value = traits.get(ref, missing)
                    elif where == traits_joined:
                        value = _joined([traits.get(key) for key in ref])
                    elif where == in_context:
                        value = context.get(ref, missing)
                    else:
                        value = ref(message)
                    if value is missing:
                        continue
                    if value is None:
                        saw_null = True
                        continue
                    value = convert(value)
                except _Invalid as exc:
                    self._invalid(path, str(exc))
                    continue
                if value is not missing:
                    contact[name] = value
                    break
            else:
                if saw_null and nullable and self._keep_nulls:
                    contact[name] = None

        properties = self._traits.shape(traits)
        priority = self._priority[kind]
        if (
            "personas" in context
            and (self._audiences or self._computed_traits)
            and self._engage_trait(context, traits, properties)
        ):
            priority = self._audience_priority
        if properties:
            contact["custom_properties"] = properties

        message_id, timestamp = self._stamp(message)
        if not self._trait_tags:
            upsert = ContactUpsert(cast(ContactPayload, contact), message_id, timestamp, priority)
            return Mapped(kind, (upsert,))
        changes = self._rule_tags(self._trait_tags, message)
        added = [tag for tag, untag in changes if not untag]
        if added:
            contact["tags"] = list(dict.fromkeys([*contact.get("tags", ()), *added]))
        upsert = ContactUpsert(cast(ContactPayload, contact), message_id, timestamp, priority)
        untags = (
            TagChange(tag, user_id, email, True, message_id, timestamp, priority)
            for tag, untag in changes
            if untag
        )
        return Mapped(kind, (upsert, *untags))

    def _engage_trait(
        self, context: dict[str, Any], traits: dict[str, Any], properties: dict[str, Any]
    ) -> bool:
        """An identify from Engage: its audience (a boolean) or computed trait is set
        whatever the trait filters say. True when it sets an audience's membership."""
        personas = context.get("personas")
        if not isinstance(personas, dict):
            return False
        key = personas.get("computation_key")
        if not isinstance(key, str) or key not in traits:
            return False
        name = self._custom_property(key, "context.personas.computation_key")
        if name is None:
            return False
        if personas.get("computation_class") == "audience":
            if self._audiences:
                member = _membership(traits[key])
                if member is not None:
                    properties[name] = member
                    return True
        elif self._computed_traits:
            value = self._engage_value(traits[key], f"traits.{field_name(key)}")
            if value is not DROP:
                properties[name] = value
        return False

    def _rule_tags(
        self, rules: tuple[_TagRule, ...], message: dict[str, Any]
    ) -> list[tuple[str, bool]]:
        """(tag, untag) for each rule that applies to ``message``, in rule order."""
        changes: list[tuple[str, bool]] = []
        for rule in rules:
            if rule.applies(message):
                tag = first_rendered(rule.templates, message)
                if tag is not None:
                    changes.append((tag, rule.untag))
        return changes

    def _stamp(self, message: dict[str, Any]) -> tuple[str | None, float | None]:
        """(messageId, timestamp) carried by every operation."""
        message_id = message.get("messageId")
        if not isinstance(message_id, str):
            message_id = (
                str(message_id)
                if isinstance(message_id, int) and not isinstance(message_id, bool)
                else None
            )
        return message_id, message_time(message, self._on_invalid_drop, self._dropped)

    # track -----------------------------------------------------------------------------

    def _track(self, message: dict[str, Any], kind: str) -> MapResult:
        name = message.get("event")
        if isinstance(name, str):
            if not name.strip():
                raise _Reject(reasons.MISSING_EVENT_NAME, "event is empty")
        elif name is None:
            raise _Reject(reasons.MISSING_EVENT_NAME, "track has no event")
        else:
            raise _Reject(reasons.INVALID_FIELD, "event must be a string")
        properties = message.get("properties")
        if type(properties) is not dict:
            properties = self._object(message, "properties")
        context = message.get("context")
        if not isinstance(context, dict):
            context = {}
        user_id, email = self._identity(message)
        if user_id is None and email is None:
            raise self._no_identity(
                message,
                "track needs a userId or an email (context.traits.email, properties.email)",
            )
        stamp = self._stamp(message)
        ops: list[Operation] = []
        key, event_name, tag_rules, priority = self._event_rules(name)

        if key in _AUDIENCE_EVENTS or "personas" in context:
            engage = self._engage_upsert(context, key, properties, user_id, email, stamp, priority)
            if engage is not None:
                ops.append(engage)
                if not self._engage_events:
                    event_name = None  # the property is what Gist needs, not the event

        commerce = None
        if self._commerce is not None and is_commerce(key):
            commerce = self._commerce.write(key, message, properties, user_id, email, stamp)
            if commerce is not None and not self._commerce_events:
                event_name = None  # the e-commerce record is what Gist needs

        if event_name is not None:
            event: dict[str, Any] = {"event_name": event_name}
            if user_id is not None:
                event["user_id"] = user_id
            if email is not None:
                event["email"] = email
            shaped = self._track_properties.shape(properties)
            if shaped:
                event["properties"] = shaped
            if stamp[1] is not None:
                event["occurred_at"] = int(stamp[1])
            ops.append(EventTrack(cast(EventPayload, event), *stamp, priority))
        if commerce is not None:
            ops.append(commerce)
        if tag_rules:
            ops.extend(
                TagChange(tag, user_id, email, untag, *stamp, priority)
                for tag, untag in self._rule_tags(tag_rules, message)
            )
        if not ops:
            return Skipped(kind, reasons.EVENT_EXCLUDED)
        return Mapped(kind, tuple(ops))

    def _event_rules(self, name: str) -> tuple[str, str | None, tuple[_TagRule, ...], Priority]:
        """(the event's key; the name to send, or None when excluded; the tag rules
        for this event; its priority)."""
        cached = self._event_cache.get(name)
        if cached is None:
            key = event_key(name)
            sent: str | None = None
            if self._event_include(key) and not self._event_exclude(key):
                sent = self._event_name(self._event_rename.get(key, name))
            rules = tuple(r for r in self._event_tags if r.events is not None and r.events(key))
            priority = next(
                (level for matches, level in self._event_priorities if matches(key)),
                self._priority["track"],
            )
            cached = (key, sent, rules, priority)
            if len(self._event_cache) >= CACHE_LIMIT:
                self._event_cache.clear()
            self._event_cache[name] = cached
        return cached

    def _engage_upsert(
        self,
        context: dict[str, Any],
        key: str,
        properties: dict[str, Any],
        user_id: str | None,
        email: str | None,
        stamp: tuple[str | None, float | None],
        priority: Priority,
    ) -> ContactUpsert | None:
        """A track from Engage (Audience Entered / Exited, a computed trait) sets a
        custom property on the contact; ``None`` for any other track. An audience's
        upsert takes the audiences' priority, a computed trait's ``priority``."""
        prop: tuple[str, Any] | None = None
        if self._audiences and key in _AUDIENCE_EVENTS:
            audience = properties.get("audience_key")
            if isinstance(audience, str):
                name = self._custom_property(audience, "properties.audience_key")
                if name is not None:
                    prop = (name, key == _AUDIENCE_ENTERED)
                    priority = self._audience_priority
            elif audience is not None:
                self._invalid("properties.audience_key", "a string")
        if prop is None and self._computed_traits:
            personas = context.get("personas")
            if isinstance(personas, dict) and personas.get("computation_class") not in (
                None,
                "audience",
            ):
                trait = personas.get("computation_key")
                if isinstance(trait, str) and trait in properties:
                    name = self._custom_property(trait, "context.personas.computation_key")
                    if name is not None:
                        path = f"properties.{field_name(trait)}"
                        value = self._engage_value(properties[trait], path)
                        if value is not DROP:
                            prop = (name, value)
        if prop is None:
            return None
        contact: dict[str, Any] = {"custom_properties": {prop[0]: prop[1]}}
        if user_id is not None:
            contact["user_id"] = user_id
        if email is not None:
            contact["email"] = email
        return ContactUpsert(cast(ContactPayload, contact), *stamp, priority)

    # page and screen -------------------------------------------------------------------

    def _page(self, message: dict[str, Any], kind: str) -> MapResult:
        return self._view(message, kind, self._page_names, self._page_properties)

    def _screen(self, message: dict[str, Any], kind: str) -> MapResult:
        return self._view(message, kind, self._screen_names, self._screen_properties)

    def _view(
        self,
        message: dict[str, Any],
        kind: str,
        templates: tuple[Template, ...],
        shaper: PropertyShaper,
    ) -> MapResult:
        properties = self._object(message, "properties")
        user_id, email = self._identity(message)
        if user_id is None and email is None:
            raise self._no_identity(message, f"{kind} needs a userId or an email")
        name = first_rendered(templates, message)
        if name is None:
            return Skipped(kind, reasons.NO_EVENT_NAME)
        stamp = self._stamp(message)
        event: dict[str, Any] = {"event_name": self._event_name(name)}
        if user_id is not None:
            event["user_id"] = user_id
        if email is not None:
            event["email"] = email
        shaped = shaper.shape(properties)
        if shaped:
            event["properties"] = shaped
        if stamp[1] is not None:
            event["occurred_at"] = int(stamp[1])
        return Mapped(kind, (EventTrack(cast(EventPayload, event), *stamp, self._priority[kind]),))

    # group, alias, delete --------------------------------------------------------------

    def _group(self, message: dict[str, Any], kind: str) -> MapResult:
        traits = self._object(message, "traits")
        # A group's traits are the company's (its email is the company's address): the
        # identity's traits.* paths read the user's, context.traits.
        context = message.get("context")
        known = context.get("traits") if isinstance(context, dict) else None
        user = {**message, "traits": known if type(known) is dict else {}}
        user_id, email = self._identity(user)
        if user_id is None and email is None:
            raise self._no_identity(user, "group needs a userId or an email")
        group_id = message.get("groupId")
        if (
            "id" not in traits
            and isinstance(group_id, str | int)
            and not isinstance(group_id, bool)
            and group_id != ""
        ):
            traits = {"id": str(group_id), **traits}
        properties = self._group_traits.shape(traits)
        if not properties:
            return Skipped(kind, reasons.NOTHING_TO_SEND)
        contact: dict[str, Any] = {"custom_properties": properties}
        if user_id is not None:
            contact["user_id"] = user_id
        if email is not None:
            contact["email"] = email
        upsert = ContactUpsert(
            cast(ContactPayload, contact), *self._stamp(message), self._priority[kind]
        )
        return Mapped(kind, (upsert,))

    def _alias(self, message: dict[str, Any], kind: str) -> MapResult:
        previous_id = self._user_id(message, _PREVIOUS_ID)
        user_id = self._user_id(message, _USER_ID)
        if previous_id is None or user_id is None:
            raise _Reject(reasons.MISSING_IDENTITY, "alias needs previousId and userId")
        if previous_id == user_id:
            return Skipped(kind, reasons.NOTHING_TO_SEND)
        alias = ContactAlias(previous_id, user_id, *self._stamp(message), self._priority[kind])
        return Mapped(kind, (alias,))

    def _delete(self, message: dict[str, Any], kind: str) -> MapResult:
        user_id, email = self._identity(message)
        if user_id is None and email is None:
            raise self._no_identity(message, "delete needs a userId or an email")
        delete = ContactDelete(user_id, email, *self._stamp(message), self._priority[kind])
        return Mapped(kind, (delete,))


_USER_ID_TRAITS: Final = ("userId", "user_id")
"""Traits that repeat the message's userId when a library copies it into the traits."""


def _is_id(value: Any, user_id: str) -> bool:
    """``value`` is ``user_id`` as written (an integer as its decimal)."""
    if isinstance(value, str):
        return value == user_id
    return isinstance(value, int) and not isinstance(value, bool) and str(value) == user_id


_PREVIOUS_ID: Final = (_source(("previousId",)),)
_USER_ID: Final = (_source(("userId",)),)


def _type_off(message: dict[str, Any], kind: str) -> MapResult:
    return Skipped(kind, reasons.TYPE_OFF)


def _membership(value: Any) -> bool | None:
    """An audience trait's value as membership: true / false (also as strings)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None
