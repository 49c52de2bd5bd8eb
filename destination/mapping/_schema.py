"""The shape of a mapping-rules file, with every default.

``Rules()`` is the built-in default, and ``config/mapping-rules.yaml`` (shipped as
``default_rules.yaml``) spells the same values out for operators; a test keeps the two
equal. Every key of a rules file is optional: an omitted key keeps its default.

The models validate (types, unknown keys, patterns, paths, templates) and are frozen;
the mapper compiles them once into plain callables and never touches them per message.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

from annotated_types import MinLen
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)
from pydantic.json_schema import WithJsonSchema

from destination.mapping._syntax import (
    Scalar,
    event_key,
    parse_path,
    parse_template,
    pattern_regex,
)


def _one_or_many(what: str, item: Any = str) -> BeforeValidator:
    """Accept one item or a list of items; always give a list. (``item``: the type of an
    item as written, for the JSON Schema of the file.)"""

    def coerce(value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            return value
        raise ValueError(f"expected {what} or a list of them")

    return BeforeValidator(coerce, json_schema_input_type=str | list[item])


def _check_path(text: str) -> str:
    parse_path(text)
    return text


def _check_pattern(text: str) -> str:
    pattern_regex(text)
    return text


def _check_template(text: str) -> str:
    parse_template(text)
    return text


_PROPERTY_NAME = re.compile(r"[a-z0-9_]+")

CONTACT_FIELDS: Final = frozenset(
    {
        # writable (ContactPayload)
        "id", "email", "user_id", "name", "phone", "signed_up_at", "last_seen_ip",
        "last_seen_user_agent", "unsubscribed_from_emails", "tags", "custom_properties",
        # the rest of the contact object Gist returns (reference: "The contact object")
        "type", "created_at", "updated_at", "last_seen_at", "last_contacted_at",
        "session_count", "avatar", "landing_url", "original_referrer", "location_data",
        "segments", "subscription_types", "social_profiles",
    }
)  # fmt: skip
"""The fields of a Gist contact: no custom property takes one of these names (it would
sit beside the field of the same name, or be taken for it)."""


def _check_property_name(text: str) -> str:
    if not _PROPERTY_NAME.fullmatch(text):
        raise ValueError(
            f"expected a Gist property name (lower-case letters, digits and _), got {text!r}"
        )
    return text


def _check_not_a_contact_field(text: str) -> str:
    if text in CONTACT_FIELDS:
        raise ValueError(
            f"{text!r} is a Gist contact field: a custom property cannot take its name"
        )
    return text


def _check_prefix(text: str) -> str:
    if text and not _PROPERTY_NAME.fullmatch(text):
        raise ValueError(f"expected lower-case letters, digits and _ (or ''), got {text!r}")
    return text


def _check_non_empty(text: str) -> str:
    if not text.strip():
        raise ValueError("expected a non-empty name")
    return text


def _source(value: Any) -> Any:
    """A contact-field source: a path, or a list of paths whose present parts are joined
    with a space (``[traits.firstName, traits.lastName]``)."""
    parts = [value] if isinstance(value, str) else value
    if not isinstance(parts, list) or not parts or not all(isinstance(p, str) for p in parts):
        raise ValueError("expected a path, or a list of paths to join with a space")
    for part in parts:
        parse_path(part)
    return tuple(parts)


def _not_critical(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() == "critical":
        raise ValueError(
            "expected 'high', 'normal' or 'low' (critical is kept for batch-status polls "
            "and the start-up key check)"
        )
    return value


def _condition_values(value: Any) -> Any:
    values = value if isinstance(value, list) else [value]
    for item in values:
        if not (item is None or isinstance(item, str | int | float | bool)):
            raise ValueError(
                "expected a value (string, number, true/false, null) or a list of them"
            )
    return tuple(values)


# Rule maps (renames, priorities by event) ----------------------------------------------

REPLACE: Final = "replace"
"""The key of a rule map that says whether the file's entries replace the default's."""


@dataclass(frozen=True, slots=True)
class RuleMap:
    """Marks a field as a rule map: a map a file *adds to* its default (the file's entry
    wins for a key both have, keys compared by ``key``), unless the map as written is
    ``{}`` (no entries at all) or says ``replace: true`` (only the file's entries)."""

    key: Callable[[str], str] = str.lower


def _no_stray_replace(value: Any) -> Any:
    # What the merge leaves of a ``replace`` key is one that is not true or false.
    if isinstance(value, dict) and REPLACE in value:
        raise ValueError(
            f"{REPLACE}: expected true or false ({REPLACE}: true keeps only this file's "
            f"entries; a field named {REPLACE!r} is written {REPLACE.title()!r}, names "
            "match case-insensitively)"
        )
    return value


_RULE_MAP_SCHEMA: Final[dict[str, Any]] = {
    "properties": {
        REPLACE: {
            "type": "boolean",
            "description": (
                "true: only this map's entries; false or absent: they are added to the "
                "default's (an entry here wins). {} clears the default's."
            ),
        }
    }
}


_REPLACE_CHECK: Final = BeforeValidator(_no_stray_replace)
_REPLACE_SCHEMA: Final[Any] = Field(json_schema_extra=_RULE_MAP_SCHEMA)


def merge_rule_map(
    default: dict[str, Any], given: dict[Any, Any], key: Callable[[str], str]
) -> dict[Any, Any]:
    """The map a file's ``given`` entries make of ``default`` (see ``RuleMap``). A
    ``replace`` that is not true or false is left in for validation to report."""
    if not given:
        return {}
    replace = given.get(REPLACE)
    if not isinstance(replace, bool):
        replace = False
        entries = dict(given)
    else:
        entries = {k: v for k, v in given.items() if k != REPLACE}
    if replace or not default:
        return entries
    named = {_map_key(k, key) for k in entries}
    return {**entries, **{k: v for k, v in default.items() if _map_key(k, key) not in named}}


def _map_key(name: Any, key: Callable[[str], str]) -> Any:
    return key(name) if isinstance(name, str) else name


def _rule_maps(model: type[BaseModel]) -> Iterator[tuple[str, RuleMap, Any]]:
    """(field name, its ``RuleMap``, its default) for each rule map of ``model``."""
    for name, field in model.model_fields.items():
        for meta in field.metadata:
            if isinstance(meta, RuleMap):
                yield name, meta, field.default


def rule_map_notes(data: Any, model: type[BaseModel]) -> Iterator[tuple[tuple[str, ...], str]]:
    """Warnings for the rule maps of a file's ``data`` read as ``model`` (key path, what
    to know): an entry that takes the place of a default entry, default entries that
    ``{}`` or ``replace: true`` drop, and an entry that gives the name a kept default
    entry gives (two fields one property). Nothing here makes a file invalid."""
    if not isinstance(data, dict):
        return
    maps = {name: (meta, default) for name, meta, default in _rule_maps(model)}
    for name, value in data.items():
        field = model.model_fields.get(name) if isinstance(name, str) else None
        if field is None or not isinstance(value, dict):
            continue
        if name in maps:
            meta, default = maps[name]
            yield from _map_notes((name,), value, default, meta.key)
        elif isinstance(field.annotation, type) and issubclass(field.annotation, _Section):
            for path, note in rule_map_notes(value, field.annotation):
                yield (name, *path), note


def _map_notes(
    path: tuple[str, ...], given: dict[Any, Any], default: dict[str, Any], key: Callable[[str], str]
) -> Iterator[tuple[tuple[str, ...], str]]:
    if not default:
        return
    merged = merge_rule_map(default, given, key)
    named = {_map_key(k, key) for k in merged}
    by_key = {key(k): k for k in default}
    dropped = [k for k in default if key(k) not in named]
    if dropped:
        how = "{}" if not given else f"{REPLACE}: true"
        listed = ", ".join(f"{k}: {default[k]}" for k in dropped)
        note = f"{how} drops the default entries {listed}"
        reserved = [k for k in dropped if k in CONTACT_FIELDS]
        if len(reserved) == 1:
            note += f" (a field named {reserved[0]} is then an invalid field unless excluded)"
        elif reserved:
            names = ", ".join(reserved)
            note += f" (fields named {names} are then invalid fields unless excluded)"
        yield path, note
    kept_targets = {v: k for k, v in default.items() if merged.get(k) == v}
    for name, value in given.items():
        if not isinstance(name, str) or name == REPLACE:
            continue
        shadowed = by_key.get(key(name))
        if shadowed is not None and value != default[shadowed]:
            note = f"takes the place of the default entry {shadowed}: {default[shadowed]}"
            yield (*path, name), note
        elif shadowed is None and isinstance(value, str) and value in kept_targets:
            other = kept_targets[value]
            note = (
                f"gives {value!r} as the default entry {other}: {value} does: a message "
                f"with both {name} and {other} (different values) has an invalid field"
            )
            yield (*path, name), note


# ``json_schema_input_type`` and ``WithJsonSchema`` below shape only the JSON Schema of
# the file (``rules_json_schema``): the shorthands a user may write, and what an editor
# can check of the validators.
PathText = Annotated[str, AfterValidator(_check_path)]
Paths = Annotated[tuple[PathText, ...], _one_or_many("a path")]
Patterns = Annotated[
    tuple[Annotated[str, AfterValidator(_check_pattern)], ...], _one_or_many("a pattern")
]
Templates = Annotated[
    tuple[Annotated[str, AfterValidator(_check_template)], ...], _one_or_many("a template")
]
_PROPERTY_NAME_SCHEMA: Final[dict[str, Any]] = {"type": "string", "pattern": "^[a-z0-9_]+$"}
PropertyName = Annotated[
    str, AfterValidator(_check_property_name), WithJsonSchema(_PROPERTY_NAME_SCHEMA)
]
CustomPropertyName = Annotated[
    PropertyName,
    AfterValidator(_check_not_a_contact_field),
    WithJsonSchema({**_PROPERTY_NAME_SCHEMA, "not": {"enum": sorted(CONTACT_FIELDS)}}),
]
_NON_EMPTY_SCHEMA: Final[dict[str, Any]] = {"type": "string", "pattern": "\\S"}
EventName = Annotated[str, AfterValidator(_check_non_empty), WithJsonSchema(_NON_EMPTY_SCHEMA)]
_SOURCE_INPUT = str | Annotated[list[str], MinLen(1)]
Source = Annotated[tuple[str, ...], BeforeValidator(_source, json_schema_input_type=_SOURCE_INPUT)]
Sources = Annotated[tuple[Source, ...], _one_or_many("a path", _SOURCE_INPUT)]
Expected = Annotated[
    tuple[Scalar, ...],
    BeforeValidator(_condition_values, json_schema_input_type=Scalar | list[Scalar]),
]
EventPattern = Annotated[str, AfterValidator(_check_pattern)]
PriorityName = Annotated[Literal["high", "normal", "low"], BeforeValidator(_not_critical)]
"""A lane at Gist's rate limit, as rules name it (``Priority`` in lower case)."""

_BY_NAME: Final = RuleMap()
Renames = Annotated[dict[str, PropertyName], _BY_NAME, _REPLACE_CHECK, _REPLACE_SCHEMA]
CustomRenames = Annotated[dict[str, CustomPropertyName], _BY_NAME, _REPLACE_CHECK, _REPLACE_SCHEMA]
EventRenames = Annotated[
    dict[EventName, EventName], RuleMap(event_key), _REPLACE_CHECK, _REPLACE_SCHEMA
]
EventPriorities = Annotated[
    dict[EventPattern, PriorityName], _BY_NAME, _REPLACE_CHECK, _REPLACE_SCHEMA
]


_MAPS_OF: dict[type[BaseModel], tuple[tuple[str, RuleMap, Any], ...]] = {}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _add_rule_maps_to_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        maps = _MAPS_OF.get(cls)
        if maps is None:
            maps = _MAPS_OF[cls] = tuple(_rule_maps(cls))
        for name, meta, default in maps:
            given = data.get(name)
            if isinstance(given, dict):
                data = {**data, name: merge_rule_map(default, given, meta.key)}
        return data


class PropertySelection(_Section):
    """Which names of an object become properties, and under which property name.

    ``include`` / ``exclude`` are patterns on the name as sent (nested: ``address.city``);
    exclude wins. ``rename`` maps a name as sent to a property name (used as given)."""

    include: Patterns = ("*",)
    exclude: Patterns = ()
    rename: Renames = {}


class ContactPropertySelection(PropertySelection):
    """A ``PropertySelection`` whose properties are the contact's custom properties: no
    rename gives one the name of a contact field (``CONTACT_FIELDS``)."""

    rename: CustomRenames = {}


class EventSelection(_Section):
    """Which track events are sent, and renames. Names compare the way Gist compares them
    (case-insensitive, ``.`` and ``$`` as ``-``)."""

    include: Patterns = ("*",)
    exclude: Patterns = ()
    rename: EventRenames = {}


class Identity(_Section):
    """Where the contact's ``user_id`` and ``email`` come from: first present path wins."""

    user_id: Paths = ("userId",)
    email: Paths = ("traits.email", "context.traits.email", "properties.email")


class Values(_Section):
    """How values are sent (contact custom properties and event properties)."""

    keys: Literal["snake_case", "lower_case"] = "snake_case"
    dates: Literal["unix", "keep"] = "unix"
    lists: Literal["keep", "join", "drop"] = "keep"
    list_objects: Literal["flatten", "json", "drop"] = "flatten"
    nulls: Literal["keep", "drop"] = "keep"
    event_names: Literal["as_sent", "lower_case"] = "as_sent"


class ContactFields(_Section):
    """Gist contact field <- sources (first present wins); ``[]`` never sets the field."""

    name: Sources = (
        ("traits.name",),
        ("traits.firstName", "traits.lastName"),
        ("traits.first_name", "traits.last_name"),
    )
    phone: Sources = (("traits.phone",),)
    signed_up_at: Sources = (("traits.createdAt",), ("traits.created_at",))
    unsubscribed_from_emails: Sources = (("traits.unsubscribed",),)
    tags: Sources = (("traits.tags",),)
    last_seen_ip: Sources = (("context.ip",),)
    last_seen_user_agent: Sources = (("context.userAgent",),)


SEGMENT_TRAIT_RENAMES: dict[str, str] = {"id": "segment_id", "avatar": "avatar_url"}
"""Segment's spec traits that are named like a Gist contact field (which no custom
property may be): renamed by default so that identifies carrying them keep flowing."""


class IdentifyTraits(ContactPropertySelection):
    """The traits an identify copies as custom properties: Segment's ``id`` and
    ``avatar`` are renamed unless the file's ``rename`` drops those entries."""

    rename: CustomRenames = SEGMENT_TRAIT_RENAMES


class Identify(_Section):
    enabled: bool = True
    fields: ContactFields = ContactFields()
    traits: IdentifyTraits = IdentifyTraits()


class Engage(_Section):
    audiences: bool = True
    computed_traits: bool = True
    send_events: bool = False


class Track(_Section):
    enabled: bool = True
    events: EventSelection = EventSelection()
    properties: PropertySelection = PropertySelection()


class TraitTag(_Section):
    """On identify: ``tag`` adds a tag to the contact, ``untag`` removes one, when every
    path in ``when`` holds one of its values and the template renders."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {"required": [key], "properties": {key: {"not": {"type": "null"}}}}
                for key in ("tag", "untag")
            ]
        }
    )

    tag: Templates | None = None
    untag: Templates | None = None
    when: dict[PathText, Expected] = {}

    @model_validator(mode="after")
    def _one_action(self) -> TraitTag:
        if (self.tag is None) == (self.untag is None):
            raise ValueError("give exactly one of tag or untag")
        return self


class EventTag(TraitTag):
    """On track: tag or untag the contact when the event name matches ``event``."""

    event: Patterns


class Tags(_Section):
    traits: tuple[TraitTag, ...] = ()
    events: tuple[EventTag, ...] = ()


class Page(_Section):
    enabled: bool = False
    event: Templates = ("Viewed {name} Page", "Viewed a Page")
    properties: PropertySelection = PropertySelection()


class Screen(_Section):
    enabled: bool = False
    event: Templates = ("Viewed {name} Screen", "Viewed a Screen")
    properties: PropertySelection = PropertySelection()


class Group(_Section):
    enabled: bool = False
    prefix: Annotated[
        str,
        AfterValidator(_check_prefix),
        WithJsonSchema({"type": "string", "pattern": "^[a-z0-9_]*$"}),
    ] = "company_"
    traits: ContactPropertySelection = ContactPropertySelection()


class Switch(_Section):
    enabled: bool = True


class TypePriorities(_Section):
    """The priority of each message type's requests."""

    identify: PriorityName = "high"
    track: PriorityName = "normal"
    page: PriorityName = "low"
    screen: PriorityName = "low"
    group: PriorityName = "normal"
    alias: PriorityName = "normal"
    delete: PriorityName = "high"


class Priorities(_Section):
    """Which requests go first when requests wait at Gist's rate limit; never whether
    they go. A track's priority is that of the first ``events`` pattern (in file order)
    matching its event name as sent, compared the way ``track.events`` compares names,
    else ``types.track``; every other message takes its type's. ``audiences`` is the
    priority of Engage audience updates (an audience identify, Audience Entered /
    Exited), whatever their type or event says."""

    types: TypePriorities = TypePriorities()
    events: EventPriorities = {}
    audiences: PriorityName = "high"
    consent: PriorityName = "high"
    """E-mail consent and subscription-type changes (``consent``)."""
    orders: PriorityName = "normal"
    """E-commerce orders and their updates, with the customers and products they need."""
    carts: PriorityName = "low"
    """E-commerce carts, with the customers and products they need."""


class Consent(_Section):
    """Segment's consent categories (``context.consent.categoryPreferences``), as
    Segment's consent management applies them to a destination."""

    required: tuple[Annotated[str, AfterValidator(_check_non_empty)], ...] = ()
    """Categories Gist needs: a message that sets any of them to false is skipped
    (``no_consent``), never sent (a delete is never skipped)."""
    without_consent_data: Literal["send", "skip"] = "send"
    """A message with no consent preferences: sent (as Segment does), or skipped."""
    email: Annotated[str, AfterValidator(_check_non_empty)] | None = None
    """The category whose preference is the contact's e-mail consent: false sets
    ``unsubscribed_from_emails``, true clears it."""
    subscription_types: dict[str, str] = {}
    """Gist subscription type (by name) -> the category whose preference subscribes the
    contact to it (true) or unsubscribes it (false)."""


def _check_currency(text: str) -> str:
    if not re.fullmatch(r"[A-Z]{3}", text):
        raise ValueError("a currency is an ISO 4217 code: three capital letters (USD)")
    return text


NonEmpty = Annotated[str, AfterValidator(_check_non_empty), WithJsonSchema(_NON_EMPTY_SCHEMA)]
Currency = Annotated[
    str,
    AfterValidator(_check_currency),
    WithJsonSchema({"type": "string", "pattern": "^[A-Z]{3}$"}),
]


def _id_text(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class Store(_Section):
    """An e-commerce store the worker creates at its first start, and finds again by
    ``domain`` at every later one (by any replica)."""

    name: NonEmpty
    domain: NonEmpty
    currency: Currency
    """The store's currency: the default of an order or cart without ``currency``."""
    abandon_cart_hours: Annotated[float, Field(gt=0)] = 1.0
    """After how many hours Gist calls a cart abandoned."""


class Ecommerce(_Section):
    """Segment's E-commerce Spec (v2) to Gist's e-commerce API (customers, products and
    variants, carts, orders): off until a store is named, by ``store_id`` or ``store``."""

    store_id: Annotated[NonEmpty | None, BeforeValidator(_id_text)] = None
    """An existing store of the workspace (start-up fails if it has no such store)."""
    store: Store | None = None
    send_events: bool = True
    """Each e-commerce track is also sent as its plain event."""

    @model_validator(mode="after")
    def _one_store(self) -> Ecommerce:
        if self.store_id is not None and self.store is not None:
            raise ValueError("name the store by store_id or by store, not both")
        return self

    @property
    def enabled(self) -> bool:
        return self.store_id is not None or self.store is not None


class Rules(_Section):
    """A whole mapping-rules file. ``Rules()`` is the shipped default."""

    version: Literal[1] = 1
    integration: Annotated[
        str, AfterValidator(_check_non_empty), WithJsonSchema(_NON_EMPTY_SCHEMA)
    ] = "Gist"
    invalid_fields: Literal["reject", "drop"] = "reject"
    identity: Identity = Identity()
    values: Values = Values()
    identify: Identify = Identify()
    engage: Engage = Engage()
    track: Track = Track()
    tags: Tags = Tags()
    page: Page = Page()
    screen: Screen = Screen()
    group: Group = Group()
    alias: Switch = Switch()
    delete: Switch = Switch()
    consent: Consent = Consent()
    ecommerce: Ecommerce = Ecommerce()
    priorities: Priorities = Priorities()

    def summary(self) -> str:
        """One line: what is on, what is off, how many custom rules."""
        types = ("identify", "track", "page", "screen", "group", "alias", "delete")
        on = [t for t in types if getattr(self, t).enabled]
        off = [t for t in types if t not in on]
        renames = len(self.track.events.rename)
        tag_rules = len(self.tags.traits) + len(self.tags.events)
        return (
            f"{', '.join(on) or 'nothing'} on; {', '.join(off) or 'nothing'} off; "
            f"{renames} event rename(s), {tag_rules} tag rule(s)"
        )


JSON_SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"


def rules_json_schema() -> dict[str, Any]:
    """The JSON Schema of a rules file as users write it, for editors to validate and
    complete it (``config/mapping-rules.schema.json``; ``gist-destination check-config
    --schema`` prints it).

    ``Rules``' schema in validation mode, so with the shorthands the loader takes (one
    path, pattern or template where a list is allowed; one value for a list of values),
    and ``null`` for an empty file. It checks the shape, the names and the choices, not
    the small languages (paths, patterns, templates): ``check-config`` checks those too.
    """
    schema = Rules.model_json_schema(mode="validation")
    for key in ("title", "description"):
        schema.pop(key, None)
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "title": "gist-destination mapping rules",
        "description": (
            "How Segment messages become Gist operations. Every key is optional: an omitted "
            "key keeps the shipped default (config/mapping-rules.yaml). Check a file with "
            "`gist-destination check-config PATH`."
        ),
        **schema,
        "type": ["object", "null"],
    }
