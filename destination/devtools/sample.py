"""Generated Segment traffic for the demo and ``gist-destination produce --sample``.

A realistic little stream: identifies for new users (with the traits the default rules
map), tracks right after them, returning users' trait updates, Engage audience entries
and exits (as identifies and as ``Audience Entered`` / ``Exited`` tracks), shoppers as
Segment's E-commerce Spec sends them (products added to a cart and the cart viewed, or
an order completed: ``DEMO_RULES`` names a store for them), and a few records a real
stream also carries: a value that is not JSON, an identify without any identity, a
message of an unknown type. Deterministic for a given seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

PLANS = ("free", "starter", "pro", "enterprise")
EVENTS = ("Signed Up", "Product Viewed", "Feature Used", "Invite Sent", "Plan.Upgraded")
PRODUCTS: tuple[dict[str, Any], ...] = (
    {"product_id": "sku-tee", "name": "Demo Tee", "variant": "M", "sku": "TEE-M", "price": 19.9},
    {"product_id": "sku-mug", "name": "Demo Mug", "price": 8.5, "brand": "Acme"},
)
DEMO_RULES = """\
# The demo's rules: the shipped defaults, and an e-commerce store for its shoppers.
ecommerce:
  store: {name: Demo Shop, domain: shop.demo.test, currency: EUR}
"""
AUDIENCES = ("vip_buyers", "churn_risk", "trial_power_users")


@dataclass(frozen=True, slots=True)
class SampleRecord:
    key: bytes | None
    value: Any  # a JSON-able message, or raw bytes for a deliberately broken record


def sample_stream(users: int = 50, seed: int = 7) -> list[SampleRecord]:
    rng = random.Random(seed)
    start = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
    clock = iter(start + timedelta(seconds=7 * i) for i in range(1_000_000))
    out: list[SampleRecord] = []

    def emit(user: str | None, message: dict[str, Any]) -> None:
        message.setdefault("messageId", f"demo-{len(out):06d}")
        message.setdefault("timestamp", next(clock).isoformat().replace("+00:00", "Z"))
        out.append(SampleRecord(user.encode() if user else None, message))

    for n in range(users):
        user = f"user-{n:04d}"
        email = f"{user}@example.com"
        emit(
            user,
            {
                "type": "identify",
                "userId": user,
                "traits": {
                    "email": email.title() if n % 5 == 0 else email,
                    "firstName": rng.choice(("Ada", "Grace", "Alan", "Edsger", "Barbara")),
                    "lastName": rng.choice(("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov")),
                    "plan": rng.choice(PLANS),
                    "createdAt": "2026-10-01T08:00:00Z",
                    "address": {"city": rng.choice(("London", "Paris", "Lisbon")), "country": "EU"},
                },
                "context": {"ip": f"203.0.113.{n % 250}", "userAgent": "Mozilla/5.0 (demo)"},
            },
        )
        emit(
            user,
            {
                "type": "track",
                "userId": user,
                "event": rng.choice(EVENTS),
                "properties": {"value": rng.randint(1, 500), "currency": "EUR"},
                "context": {"traits": {"email": email}},
            },
        )
        if n % 4 in (1, 2):
            _shop(emit, user, email, n % 4 == 2, rng)
        if n % 3 == 0:
            emit(
                user,
                {
                    "type": "identify",
                    "userId": user,
                    "traits": {"plan": "enterprise", "seats": rng.randint(2, 50)},
                },
            )
        if n % 4 == 0:
            audience = AUDIENCES[n % len(AUDIENCES)]
            personas = {
                "computation_class": "audience",
                "computation_key": audience,
                "computation_id": f"aud_{audience}",
                "space_id": "spa_demo",
            }
            emit(
                user,
                {
                    "type": "identify",
                    "userId": user,
                    "traits": {"email": email, audience: True},
                    "context": {"personas": personas},
                    "integrations": {"All": False, "Gist": True},
                },
            )
            if n % 8 == 0:
                emit(
                    user,
                    {
                        "type": "track",
                        "userId": user,
                        "event": "Audience Exited",
                        "properties": {"audience_key": audience, audience: False},
                        "context": {"personas": personas, "traits": {"email": email}},
                        "integrations": {"All": False, "Gist": True},
                    },
                )
    # What real streams carry too: each ends in the dead-letter topic with its reason.
    out.append(SampleRecord(b"broken", b"{this is not json"))
    out.append(
        SampleRecord(
            None, {"type": "identify", "messageId": "demo-no-identity", "traits": {"plan": "free"}}
        )
    )
    out.append(
        SampleRecord(
            b"user-0000", {"type": "hologram", "messageId": "demo-unknown", "userId": "user-0000"}
        )
    )
    return out


def _shop(emit: Any, user: str, email: str, orders: bool, rng: random.Random) -> None:
    """A shopper: two products into the cart, then the cart viewed, or an order."""
    context = {"traits": {"email": email}}
    lines: list[dict[str, Any]] = [
        {**product, "quantity": rng.randint(1, 3)} for product in PRODUCTS
    ]
    for line in lines:
        emit(
            user,
            {
                "type": "track",
                "userId": user,
                "event": "Product Added",
                "properties": {"cart_id": f"cart-{user}", **line},
                "context": context,
            },
        )
    if not orders:
        emit(user, {"type": "track", "userId": user, "event": "Cart Viewed",
                    "properties": {"cart_id": f"cart-{user}", "products": lines},
                    "context": context})  # fmt: skip
        return
    total = round(sum(line["price"] * line["quantity"] for line in lines), 2)
    emit(user, {"type": "track", "userId": user, "event": "Order Completed",
                "properties": {"order_id": f"order-{user}", "total": round(total + 4.9, 2),
                               "revenue": total, "shipping": 4.9, "currency": "EUR",
                               "products": lines},
                "context": context})  # fmt: skip
