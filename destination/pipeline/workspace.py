"""What the rules name in the workspace, found once at start-up.

The rules name Gist things by what people call them: subscription types by name, the
e-commerce store by its id or by a name, domain and currency. ``prepare`` finds them
(and creates the store the first time), before a message is read: a rules file that
names what the workspace does not have stops the start with a clear error
(``WorkspaceMismatch``, exit 2), never a dead letter per message later.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog

from destination.gist import (
    EcommerceStore,
    GistClient,
    PermanentError,
    Priority,
    StorePayload,
)
from destination.mapping import Rules
from destination.observability import log_events

log = structlog.get_logger(__name__)


class WorkspaceMismatch(Exception):
    """The rules name something the workspace does not have (or cannot be given)."""


@dataclass(frozen=True, slots=True)
class Workspace:
    subscription_types: dict[str, int] = field(default_factory=dict)
    """Each subscription type the rules name, by lower-cased name -> its id."""
    store: EcommerceStore | None = None
    """The e-commerce store (None: e-commerce is off)."""


def subscription_key(name: str) -> str:
    return name.strip().lower()


async def prepare(client: GistClient, rules: Rules) -> Workspace:
    """Look up what ``rules`` name (a few requests, critical: before any message)."""
    types: dict[str, int] = {}
    wanted = rules.consent.subscription_types
    if wanted:
        found = {
            subscription_key(t.name): t.id
            for t in await client.list_subscription_types(priority=Priority.CRITICAL)
        }
        missing = sorted(name for name in wanted if subscription_key(name) not in found)
        if missing:
            raise WorkspaceMismatch(
                "consent.subscription_types names subscription types the workspace does "
                f"not have: {', '.join(missing)} (it has: {', '.join(sorted(found)) or 'none'})"
            )
        types = {subscription_key(name): found[subscription_key(name)] for name in wanted}
    return Workspace(types, await _store(client, rules))


async def _store(client: GistClient, rules: Rules) -> EcommerceStore | None:
    commerce = rules.ecommerce
    if commerce.store_id is not None:
        stores = await client.list_stores(priority=Priority.CRITICAL)
        for store in stores:
            if store.store_id == commerce.store_id:
                return store
        raise WorkspaceMismatch(
            f"ecommerce.store_id {commerce.store_id!r} is not a store of the workspace "
            f"(it has: {', '.join(s.store_id for s in stores) or 'none'})"
        )
    wanted = commerce.store
    if wanted is None:
        return None
    found = await client.find_store(wanted.domain, priority=Priority.CRITICAL)
    if found is not None:
        return found
    payload: StorePayload = {
        "name": wanted.name,
        "domain": wanted.domain,
        "currency_code": wanted.currency,
        "abandon_cart_interval": wanted.abandon_cart_hours,
    }
    try:
        store = await client.create_store(payload, priority=Priority.CRITICAL)
    except PermanentError as error:
        # Another replica created it meanwhile (a domain is the workspace's once).
        found = await client.find_store(wanted.domain, priority=Priority.CRITICAL)
        if found is None:
            raise WorkspaceMismatch(
                f"Gist refused to create the e-commerce store of ecommerce.store: {error}"
            ) from error
        return found
    log.info(log_events.STORE_CREATED, store_id=store.store_id, domain=store.domain)
    return store
