"""How fast one core turns Segment JSON into Gist operations: ``orjson.loads`` + ``map``.

    .venv/bin/python benchmarks/bench_mapping.py [--messages N] [--rounds R] [--rules PATH]

The input is a realistic mix (shapes from ../shared/segment-messages.md, with the context
a browser library sends): 40% identify, 45% track, 10% Engage audience identifies and 5%
Audience Entered / Exited tracks, over 2,000 users and 25 event names. Each figure is
the best of R rounds over the same pre-serialised messages, in CPU time of this process
(so other work on a shared machine skews it less). The target is 100,000 messages per
second for the mix.
"""

from __future__ import annotations

import argparse
import platform
import random
import time
from collections.abc import Callable
from typing import Any

import orjson

from destination.mapping import Mapper, load_rules
from destination.operations import Mapped

TARGET = 100_000

EVENTS = [
    "Order Completed", "Product Viewed", "Product Added", "Cart Viewed", "Checkout Started",
    "Signed Up", "Signed In", "Signed Out", "Subscription Started", "Subscription Cancelled",
    "Trial Started", "Trial Ended", "Invite Sent", "Feature Used", "Report Exported",
    "Search Performed", "Video Played", "Video Completed", "Form Submitted", "Email Opened",
    "Link Clicked", "File Uploaded", "Plan Upgraded", "Plan Downgraded", "Payment Failed",
]  # fmt: skip
PLANS = ["free", "pro", "team", "enterprise"]
AUDIENCES = ["order_completed_last_30days", "high_value_customers", "churn_risk"]


def _context(rng: random.Random, user: int, email: bool) -> dict[str, Any]:
    context: dict[str, Any] = {
        "ip": f"203.0.113.{user % 250}",
        "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/17.5 Safari/605.1.15",
        "library": {"name": "analytics.js", "version": "4.1.0"},
        "locale": "en-GB",
        "page": {"path": "/app", "url": "https://app.example.com/app", "title": "App"},
    }
    if email:
        context["traits"] = {"email": f"user{user}@example.com"}
    return context


def _common(rng: random.Random, kind: str, user: int, second: int) -> dict[str, Any]:
    return {
        "type": kind,
        "messageId": f"{rng.getrandbits(64):016x}-{second}",
        "userId": f"u-{user}",
        "anonymousId": f"a-{user}",
        "timestamp": f"2026-11-01T12:{second // 60 % 60:02d}:{second % 60:02d}.{user % 1000:03d}Z",
        "sentAt": f"2026-11-01T12:{second // 60 % 60:02d}:{second % 60:02d}.999Z",
    }


def identify(rng: random.Random, user: int, second: int) -> dict[str, Any]:
    return {
        **_common(rng, "identify", user, second),
        "traits": {
            "email": f"User{user}@Example.com",
            "firstName": "Ada",
            "lastName": f"Lovelace{user}",
            "phone": "+44 20 7946 0000",
            "createdAt": "2024-03-01T10:00:00Z",
            "plan": rng.choice(PLANS),
            "logins": rng.randint(1, 500),
            "company": {"name": "Acme", "employee_count": 40},
            "address": {"city": "London", "country": "UK"},
            "unsubscribed": False,
            "tags": ["beta"],
        },
        "context": _context(rng, user, email=False),
    }


def track(rng: random.Random, user: int, second: int) -> dict[str, Any]:
    return {
        **_common(rng, "track", user, second),
        "event": rng.choice(EVENTS),
        "properties": {
            "order_id": f"o-{rng.getrandbits(32)}",
            "revenue": round(rng.uniform(1, 500), 2),
            "currency": "EUR",
            "coupon": None,
            "category": "Books",
            "shipping": {"method": "UPS", "days": 3},
            "skus": ["b-1", "b-2"],
        },
        "context": _context(rng, user, email=True),
    }


def audience_identify(rng: random.Random, user: int, second: int) -> dict[str, Any]:
    key = rng.choice(AUDIENCES)
    return {
        **_common(rng, "identify", user, second),
        "traits": {"email": f"user{user}@example.com", key: rng.random() < 0.7},
        "context": {
            "personas": {
                "computation_class": "audience",
                "computation_key": key,
                "computation_id": "aud_2Jx",
                "space_id": "spa_9",
            },
            "library": {"name": "unknown", "version": "unknown"},
        },
        "integrations": {"All": False, "Gist": True},
    }


def audience_track(rng: random.Random, user: int, second: int) -> dict[str, Any]:
    key = rng.choice(AUDIENCES)
    entered = rng.random() < 0.7
    return {
        **_common(rng, "track", user, second),
        "event": "Audience Entered" if entered else "Audience Exited",
        "properties": {"audience_key": key, key: entered},
        "context": {
            "traits": {"email": f"user{user}@example.com"},
            "personas": {"computation_class": "audience", "computation_key": key},
        },
        "integrations": {"All": False, "Gist": True},
    }


MIX: list[tuple[str, float, Callable[[random.Random, int, int], dict[str, Any]]]] = [
    ("identify", 0.40, identify),
    ("track", 0.45, track),
    ("audience identify", 0.10, audience_identify),
    ("audience track", 0.05, audience_track),
]


def build(count: int, seed: int = 7) -> dict[str, list[bytes]]:
    """``count`` messages as JSON bytes, by kind (proportions of MIX)."""
    rng = random.Random(seed)
    kinds = rng.choices(range(len(MIX)), weights=[share for _, share, _ in MIX], k=count)
    out: dict[str, list[bytes]] = {name: [] for name, _, _ in MIX}
    mixed: list[bytes] = []
    for i, k in enumerate(kinds):
        name, _, make = MIX[k]
        data = orjson.dumps(make(rng, rng.randrange(2000), i))
        out[name].append(data)
        mixed.append(data)
    out["mix"] = mixed
    return out


def rate(mapper: Mapper, messages: list[bytes], rounds: int) -> float:
    """Messages per second, best of ``rounds``."""
    loads, map_ = orjson.loads, mapper.map
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for data in messages:
            map_(loads(data))
        best = min(best, time.process_time() - start)
    return len(messages) / best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rules", default=None, help="a rules file (default: the shipped one)")
    args = parser.parse_args()

    mapper = Mapper(load_rules(args.rules))
    corpus = build(args.messages)
    for data in corpus["mix"]:  # every message maps: the benchmark measures real work
        result = mapper.map(orjson.loads(data))
        assert isinstance(result, Mapped), result

    size = sum(map(len, corpus["mix"])) / len(corpus["mix"])
    print(
        f"mapping: orjson.loads + Mapper.map, one core, Python {platform.python_version()}, "
        f"{len(corpus['mix']):,} messages (avg {size:.0f} bytes), best of {args.rounds}"
    )
    mix_rate = rate(mapper, corpus["mix"], args.rounds)
    print(f"  {'mix':<18} {mix_rate:>10,.0f} msg/s  ({1e6 / mix_rate:.1f} µs/msg)")
    for name, share, _ in MIX:
        per_kind = rate(mapper, corpus[name], args.rounds)
        print(f"  {name:<18} {per_kind:>10,.0f} msg/s  ({1e6 / per_kind:.1f} µs/msg, {share:.0%})")
    verdict = "meets" if mix_rate >= TARGET else "BELOW"
    print(f"  {verdict} the target of {TARGET:,} msg/s for the mix")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
