"""A local stand-in for the Gist API, for the integration tests, benchmarks and the demo.

It keeps one workspace in memory, answers the endpoints the destination uses the way the
reference describes them (auth, the 100-per-10-s sliding rate limit, asynchronous batch
imports, event-name normalisation, tags, subscription types, and the e-commerce stores
with their customers, products, variants, categories, carts, orders and the lifetime
value orders give contacts: see ``_ecommerce`` and ``_subscriptions`` for how strictly
and how the places the reference leaves open are read), and lets a test inject faults
(server errors, latency, forced 429s, a disabled workspace, and answers the reference
does not describe: odd batch statuses, batches that never complete, other shapes of batch
errors, a batch accepted without an id, failing batch polls, non-JSON bodies; see
``SandboxConfig``) and inspect what it received through the unauthenticated
``/_sandbox/*`` endpoints::

    async with running_sandbox(SandboxConfig(batch_delay=0.05)) as sandbox:
        ...  # point a client at sandbox.url with "Authorization: Bearer sandbox-key"
        contact = sandbox.store.find_contact(email="a@example.com")
        shop = sandbox.store.ecommerce.find_store("https://example.com")

Control endpoints (no auth, never rate limited or faulted): ``GET /_sandbox/state``,
``GET /_sandbox/requests[?since=<monotonic seconds>]``, ``GET|POST /_sandbox/faults``,
``POST /_sandbox/subscription_types`` (add one), ``POST /_sandbox/reset``.
"""

from destination.devtools.sandbox._app import Sandbox, create_app, running_sandbox
from destination.devtools.sandbox._config import DEFAULT_API_KEY, SandboxConfig
from destination.devtools.sandbox._ecommerce import (
    Activity,
    Cart,
    Category,
    Commerce,
    Customer,
    EcommerceStore,
    Order,
    Product,
    Variant,
)
from destination.devtools.sandbox._store import ApiError, Batch, Contact, Event, Store, Tag
from destination.devtools.sandbox._subscriptions import SubscriptionType

__all__ = [
    "DEFAULT_API_KEY",
    "Activity",
    "ApiError",
    "Batch",
    "Cart",
    "Category",
    "Commerce",
    "Contact",
    "Customer",
    "EcommerceStore",
    "Event",
    "Order",
    "Product",
    "Sandbox",
    "SandboxConfig",
    "Store",
    "SubscriptionType",
    "Tag",
    "Variant",
    "create_app",
    "running_sandbox",
]
