"""The Gist sandbox, over real HTTP: what every other integration test relies on."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from destination.devtools.sandbox import Sandbox, SandboxConfig, command, running_sandbox
from destination.devtools.sandbox._ratelimit import SlidingWindow

AUTH = {"Authorization": "Bearer sandbox-key"}


@pytest.fixture
async def client(sandbox: Sandbox) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sandbox.url, headers=AUTH, timeout=10) as http:
        yield http


@pytest.fixture
async def control(sandbox: Sandbox) -> AsyncIterator[httpx.AsyncClient]:
    """A client without credentials, for the ``/_sandbox/*`` endpoints."""
    async with httpx.AsyncClient(base_url=sandbox.url, timeout=10) as http:
        yield http


def config(**changes: Any) -> pytest.MarkDecorator:
    """Parametrize the ``sandbox_config`` fixture of one test."""
    return pytest.mark.parametrize("sandbox_config", [SandboxConfig(**changes)])


def error_code(response: httpx.Response) -> str:
    assert response.headers["content-type"].startswith("application/json")
    code: str = response.json()["errors"][0]["code"]
    return code


async def upsert(client: httpx.AsyncClient, **contact: Any) -> dict[str, Any]:
    response = await client.post("/contacts", json=contact)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()["contact"]
    return result


async def poll_batch(
    client: httpx.AsyncClient, batch_id: str, *, every: float = 0.01, limit: float = 5.0
) -> list[dict[str, Any]]:
    """Every distinct status answer until COMPLETED (bounded)."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        response = await client.get(f"/contacts/batch/{batch_id}")
        assert response.status_code == 200, response.text
        body = response.json()
        if not seen or seen[-1] != body:
            seen.append(body)
        if body["status"] == "COMPLETED":
            return seen
        await asyncio.sleep(every)
    raise AssertionError(f"batch {batch_id} did not complete in {limit}s: {seen}")


# -- auth ---------------------------------------------------------------------------------


async def test_missing_or_unknown_key_is_401(sandbox: Sandbox) -> None:
    async with httpx.AsyncClient(base_url=sandbox.url) as http:
        missing = await http.get("/token/info")
        wrong = await http.get("/token/info", headers={"Authorization": "Bearer nope"})
        basic = await http.get("/token/info", headers={"Authorization": "Basic sandbox-key"})
        good = await http.get("/token/info", headers=AUTH)
    assert [missing.status_code, wrong.status_code, basic.status_code] == [401, 401, 401]
    assert {error_code(missing), error_code(wrong), error_code(basic)} == {"api_key_invalid"}
    assert good.status_code == 200


@config(api_keys=frozenset({"k1", "k2"}), workspace_id="ws-1")
async def test_several_keys_share_one_workspace(sandbox: Sandbox) -> None:
    async with httpx.AsyncClient(base_url=sandbox.url) as http:
        infos = [
            (await http.get("/token/info", headers={"Authorization": f"Bearer {k}"})).json()
            for k in ("k1", "k2")
        ]
        default = await http.get("/token/info", headers=AUTH)
    assert [i["workspace_id"] for i in infos] == ["ws-1", "ws-1"]
    assert default.status_code == 401


async def test_disabled_workspace_is_403(
    client: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    assert (await control.post("/_sandbox/faults", json={"disabled": True})).status_code == 200
    response = await client.post("/contacts", json={"email": "a@example.com"})
    assert response.status_code == 403
    assert error_code(response) == "workspace_disabled"
    async with httpx.AsyncClient(base_url=str(client.base_url)) as anonymous:
        assert (await anonymous.get("/token/info")).status_code == 401  # auth comes first
    await control.post("/_sandbox/faults", json={"disabled": False})
    assert (await client.get("/token/info")).status_code == 200


@config(rate_limit=1, rate_window=60.0)
async def test_auth_is_checked_before_the_rate_limit(
    sandbox: Sandbox, client: httpx.AsyncClient
) -> None:
    assert (await client.get("/token/info")).status_code == 200
    assert (await client.get("/token/info")).status_code == 429
    bad = await client.get("/token/info", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401


async def test_token_info(client: httpx.AsyncClient) -> None:
    response = await client.get("/token/info")
    assert response.status_code == 200
    body = response.json()
    assert body["workspace_id"] == "sandbox-workspace"
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 0
    assert body["app_id"] is None
    assert isinstance(body["scope"], str)
    assert isinstance(body["created_at"], int)


# -- contacts -----------------------------------------------------------------------------


async def test_create_lead_then_user_and_email_is_down_cased(client: httpx.AsyncClient) -> None:
    lead = await upsert(client, email="Mixed.Case@Example.COM", name="Ada")
    assert lead["email"] == "mixed.case@example.com"
    assert lead["type"] == "lead"
    assert lead["user_id"] is None
    assert isinstance(lead["id"], int)
    for key in ("created_at", "updated_at", "tags", "custom_properties", "location_data"):
        assert key in lead

    user = await upsert(client, email="MIXED.case@example.com", user_id=42)
    assert user["id"] == lead["id"]
    assert user["type"] == "user"
    assert user["user_id"] == "42"
    assert user["name"] == "Ada"  # absent keys are left alone

    new_user = await upsert(client, email="u@example.com", user_id="u-1")
    assert new_user["type"] == "user"
    assert new_user["id"] != lead["id"]


async def test_lookup_order_is_id_then_user_id_then_email(client: httpx.AsyncClient) -> None:
    a = await upsert(client, email="a@example.com", user_id="ua")
    b = await upsert(client, email="b@example.com")

    by_id = await upsert(client, id=str(b["id"]), name="by id")
    assert by_id["id"] == b["id"]
    assert by_id["name"] == "by id"

    by_user_id = await upsert(client, id="999999", user_id="ua", name="by user_id")
    assert by_user_id["id"] == a["id"]

    by_email = await upsert(client, user_id="ub", email="B@EXAMPLE.com", name="by email")
    assert by_email["id"] == b["id"]
    assert by_email["type"] == "user"
    assert by_email["user_id"] == "ub"

    # user_id wins over email: this finds A and would give it B's email
    clash = await client.post("/contacts", json={"user_id": "ua", "email": "b@example.com"})
    assert clash.status_code == 400
    assert "email" in clash.json()["errors"][0]["message"]
    assert (await client.get("/contacts", params={"user_id": "ua"})).json()["contact"][
        "email"
    ] == "a@example.com"


async def test_fields_tags_and_custom_properties_merge(client: httpx.AsyncClient) -> None:
    await upsert(
        client,
        email="p@example.com",
        phone="+33 1",
        signed_up_at=1_700_000_000,
        last_seen_ip="10.0.0.1",
        last_seen_user_agent="curl",
        unsubscribed_from_emails=True,
        tags=["VIP"],
        custom_properties={"plan": "pro", "age": 3},
    )
    merged = await upsert(
        client,
        email="p@example.com",
        phone=None,
        tags=["vip", "New"],
        custom_properties={"age": None, "seats": 5},
    )
    assert merged["phone"] is None
    assert merged["signed_up_at"] == 1_700_000_000
    assert merged["last_seen_ip"] == "10.0.0.1"
    assert merged["last_seen_user_agent"] == "curl"
    assert merged["unsubscribed_from_emails"] is True
    assert [t["name"] for t in merged["tags"]] == ["VIP", "New"]
    assert merged["custom_properties"] == {"plan": "pro", "age": None, "seats": 5}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"user_id": "no-email"}, "email"),
        ({"email": "not-an-email"}, "email"),
        ({"email": 12}, "email"),
        ({"email": "x@example.com", "signed_up_at": "yesterday"}, "signed_up_at"),
        ({"email": "x@example.com", "unsubscribed_from_emails": "yes"}, "unsubscribed"),
        ({"email": "x@example.com", "tags": "VIP"}, "tags"),
        ({"email": "x@example.com", "custom_properties": {"a": {"b": 1}}}, "custom_properties"),
        ({"email": "x@example.com", "name": 5}, "name"),
        ({"email": "x@example.com", "user_id": 1.5}, "user_id"),
    ],
)
async def test_invalid_contact_is_400_naming_the_field(
    client: httpx.AsyncClient, sandbox: Sandbox, body: dict[str, Any], field: str
) -> None:
    response = await client.post("/contacts", json=body)
    assert response.status_code == 400
    assert field in response.json()["errors"][0]["message"]
    assert sandbox.store.contacts == {}  # nothing half-applied


async def test_get_and_delete_by_email_user_id_and_id(client: httpx.AsyncClient) -> None:
    c1 = await upsert(client, email="one@example.com", user_id="1")
    c2 = await upsert(client, email="two@example.com", user_id="2")
    c3 = await upsert(client, email="three@example.com")

    assert (await client.get("/contacts", params={"email": "ONE@example.com"})).json()["contact"][
        "id"
    ] == c1["id"]
    assert (await client.get("/contacts", params={"user_id": "2"})).json()["contact"]["id"] == c2[
        "id"
    ]
    assert (await client.get(f"/contacts/{c3['id']}")).json()["contact"]["email"] == (
        "three@example.com"
    )

    deleted = await client.delete("/contacts", params={"email": "one@example.com"})
    assert deleted.json() == {"id": str(c1["id"]), "object": "contact", "deleted": True}
    assert (await client.delete("/contacts", params={"user_id": "2"})).status_code == 200
    assert (await client.delete(f"/contacts/{c3['id']}")).status_code == 200

    for response in (
        await client.get("/contacts", params={"email": "one@example.com"}),
        await client.get("/contacts", params={"user_id": "2"}),
        await client.get(f"/contacts/{c3['id']}"),
        await client.delete(f"/contacts/{c3['id']}"),
    ):
        assert response.status_code == 404
        assert error_code(response) == "contact_not_found"
    # the email is free again
    assert (await upsert(client, email="one@example.com"))["id"] != c1["id"]


# -- batches ------------------------------------------------------------------------------


@config(batch_delay=0.1)
async def test_batch_goes_queued_in_progress_completed_with_per_contact_errors(
    client: httpx.AsyncClient,
) -> None:
    contacts: list[Any] = [
        {"email": "B1@example.com", "user_id": "b1", "tags": ["Batch"]},
        {"user_id": "no-email"},
        "not an object",
        {"email": "bad-email"},
        {"email": "b2@example.com", "signed_up_at": "soon"},
        {"email": "b3@example.com"},
    ]
    queued = await client.post("/contacts/batch", json={"contacts": contacts})
    assert queued.status_code == 200
    body = queued.json()
    assert body["status"] == "QUEUED"
    assert body["queued_contacts"] == len(contacts)
    # nothing is visible before the batch completes
    assert (await client.get("/contacts", params={"email": "b1@example.com"})).status_code == 404

    seen = await poll_batch(client, body["batch_id"])
    assert [s["status"] for s in seen] == ["QUEUED", "IN_PROGRESS", "COMPLETED"]
    assert "imported_contacts" not in seen[0]
    done = seen[-1]
    assert done["imported_contacts"] == 2
    errors = {e["index"]: e for e in done["errors"]}
    assert sorted(errors) == [1, 2, 3, 4]
    assert errors[1]["user_id"] == "no-email"
    assert "email" in errors[1]["message"]
    assert errors[3]["email"] == "bad-email"
    assert "signed_up_at" in errors[4]["message"]
    stored = (await client.get("/contacts", params={"user_id": "b1"})).json()["contact"]
    assert stored["email"] == "b1@example.com"
    assert [t["name"] for t in stored["tags"]] == ["Batch"]


@config(batch_delay=0.02)
async def test_batches_apply_in_order(client: httpx.AsyncClient, sandbox: Sandbox) -> None:
    ids = []
    for name in ("first", "second", "third"):
        response = await client.post(
            "/contacts/batch", json={"contacts": [{"email": "o@example.com", "name": name}]}
        )
        ids.append(response.json()["batch_id"])
    assert len(set(ids)) == 3
    async with asyncio.timeout(5):
        await sandbox.wait_for_batches()
    for batch_id in ids:
        assert (await client.get(f"/contacts/batch/{batch_id}")).json()["status"] == "COMPLETED"
    contact = sandbox.store.find_contact(email="o@example.com")
    assert contact is not None
    assert contact.name == "third"


@config(max_batch_size=3)
async def test_batch_request_validation_and_unknown_batch(client: httpx.AsyncClient) -> None:
    bodies: list[dict[str, Any]] = [
        {"contacts": []},
        {"contacts": {}},
        {},
        {"contacts": [{"email": "a@b.co"}] * 4},
    ]
    for body in bodies:
        response = await client.post("/contacts/batch", json=body)
        assert response.status_code == 400, body
    missing = await client.get("/contacts/batch/00000000-0000-4000-8000-000000000000")
    assert missing.status_code == 404


# -- events -------------------------------------------------------------------------------


async def test_event_names_are_normalised_and_case_insensitive(
    client: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    await upsert(client, email="e@example.com", user_id="eu")
    first = await client.post(
        "/events",
        json={"event_name": "Completed.Order", "user_id": "eu", "properties": {"total": 9}},
    )
    assert first.status_code == 200
    event = first.json()["event"]
    assert event["name"] == "Completed-Order"
    assert event["properties"] == {"total": 9}
    assert event["email"] == "e@example.com"
    second = await client.post(
        "/events",
        json={"event_name": "completed$order", "email": "E@example.com", "occurred_at": None},
    )
    assert second.json()["event"]["name"] == "Completed-Order"
    iso = await client.post(
        "/events",
        json={"event_name": "x", "user_id": "eu", "occurred_at": "2024-01-02T03:04:05Z"},
    )
    assert iso.json()["event"]["occurred_at"] == 1704164645
    state = (await control.get("/_sandbox/state")).json()
    assert [e["name"] for e in state["events"]] == ["Completed-Order", "Completed-Order", "x"]


async def test_event_for_unknown_email_creates_a_lead_unknown_user_id_is_404(
    client: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    created = await client.post("/events", json={"event_name": "signup", "email": "n@example.com"})
    assert created.status_code == 200
    lead = sandbox.store.find_contact(email="n@example.com")
    assert lead is not None
    assert lead.type == "lead"

    missing = await client.post("/events", json={"event_name": "signup", "user_id": "ghost"})
    assert missing.status_code == 404
    assert error_code(missing) == "contact_not_found"
    by_id = await client.post("/events", json={"event_name": "signup", "id": "987654"})
    assert by_id.status_code == 404
    assert len(sandbox.store.events) == 1


@pytest.mark.parametrize(
    "body",
    [
        {"email": "a@example.com"},
        {"event_name": "", "email": "a@example.com"},
        {"event_name": "x"},
        {"event_name": "x", "email": "a@example.com", "properties": [1]},
        {"event_name": "x", "email": "a@example.com", "occurred_at": "not a time"},
    ],
)
async def test_invalid_event_is_400(
    client: httpx.AsyncClient, sandbox: Sandbox, body: dict[str, Any]
) -> None:
    response = await client.post("/events", json=body)
    assert response.status_code == 400
    assert sandbox.store.events == []


# -- tags ---------------------------------------------------------------------------------


async def test_tag_and_untag_contacts(client: httpx.AsyncClient, sandbox: Sandbox) -> None:
    a = await upsert(client, email="ta@example.com")
    await upsert(client, email="tb@example.com", user_id="tb")
    tagged = await client.post(
        "/tags",
        json={
            "name": "Trial",
            "contacts": [{"id": str(a["id"])}, {"user_id": "tb"}, {"email": "ghost@x.io"}],
        },
    )
    assert tagged.status_code == 200
    tag = tagged.json()["tag"]
    assert tag["name"] == "Trial"

    def names(email: str) -> list[str]:
        contact = sandbox.store.find_contact(email=email)
        assert contact is not None
        return [t["name"] for t in sandbox.store.contact_json(contact)["tags"]]

    assert names("ta@example.com") == ["Trial"]
    assert names("tb@example.com") == ["Trial"]

    untagged = await client.post(
        "/tags", json={"name": "TRIAL", "contacts": [{"email": "TA@example.com", "untag": True}]}
    )
    assert untagged.json()["tag"] == tag  # case-insensitive: the same tag
    assert names("ta@example.com") == []
    assert names("tb@example.com") == ["Trial"]

    by_id = await client.post("/tags", json={"id": tag["id"], "contacts": [{"id": a["id"]}]})
    assert by_id.status_code == 200
    assert names("ta@example.com") == ["Trial"]
    assert len(sandbox.store.tags) == 1
    assert (await client.post("/tags", json={"id": 424242})).status_code == 404
    assert (await client.post("/tags", json={"contacts": []})).status_code == 400


# -- rate limit ---------------------------------------------------------------------------


def test_sliding_window_never_exceeds_the_limit_in_any_interval() -> None:
    rng = random.Random(7)
    limit, window = 5, 1.0
    limiter = SlidingWindow()
    now, accepted = 0.0, []
    for _ in range(3000):
        now += rng.expovariate(20.0)
        wait = limiter.try_acquire(now, limit, window)
        if wait is None:
            accepted.append(now)
        else:
            assert wait > 0
            # the promised slot really is free then
            assert sum(1 for t in accepted if t > now + wait - window + 1e-9) < limit
    assert len(accepted) > 3000 / 20 * limit / window * 0.5
    for i, start in enumerate(accepted):
        in_window = [t for t in accepted[i:] if t < start + window]
        assert len(in_window) <= limit


@config(rate_limit=5, rate_window=0.5)
async def test_rate_limit_is_a_sliding_window_over_accepted_requests(
    client: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    start = time.monotonic()
    while time.monotonic() - start < 1.0:
        await asyncio.gather(*(client.get("/token/info") for _ in range(3)))
        await asyncio.sleep(0.03)
    log = (await control.get("/_sandbox/requests")).json()
    accepted = sorted(r["t"] for r in log if r["status"] == 200)
    rejected = [r for r in log if r["status"] == 429]
    assert rejected
    assert {r["status"] for r in log} == {200, 429}
    assert len(accepted) >= 10  # the window slides: more than one window's worth got in
    for i, first in enumerate(accepted):
        assert sum(1 for t in accepted[i:] if t < first + 0.5) <= 5
    stats = (await control.get("/_sandbox/state")).json()["stats"]
    assert stats["rate_limited"] == len(rejected)
    assert stats["by_status"] == {"200": len(accepted), "429": len(rejected)}


@config(rate_limit=2, rate_window=30.0)
async def test_429_carries_retry_after_unless_turned_off(
    client: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    assert [(await client.get("/token/info")).status_code for _ in range(2)] == [200, 200]
    limited = await client.get("/contacts", params={"email": "a@example.com"})
    assert limited.status_code == 429
    assert error_code(limited) == "rate_limited"
    assert 25 <= int(limited.headers["Retry-After"]) <= 30

    await control.post("/_sandbox/faults", json={"retry_after": False})
    bare = await client.get("/token/info")
    assert bare.status_code == 429
    assert "Retry-After" not in bare.headers


@config(rate_limit=2, rate_window=0.4)
async def test_rejected_requests_do_not_use_up_the_window(
    client: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    assert [(await client.get("/token/info")).status_code for _ in range(2)] == [200, 200]
    # The window opened when the sandbox counted the first request (its clock is this
    # process's monotonic clock), not when the second answer came back: on a loaded
    # machine the two can be far apart, and hammering then ran past the window.
    first_ok = float(sandbox.store.requests_json()[0]["t"])
    statuses = []
    while time.monotonic() - first_ok < 0.3:  # hammer while the window is full
        statuses.append((await client.get("/token/info")).status_code)
    assert statuses
    assert set(statuses) == {429}
    await asyncio.sleep(0.4 - (time.monotonic() - first_ok) + 0.05)
    assert (await client.get("/token/info")).status_code == 200


# -- faults and control -------------------------------------------------------------------


@config(error_rate=1.0, seed=1)
async def test_error_rate_one_fails_every_api_request(
    client: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    statuses = {(await client.get("/token/info")).status_code for _ in range(30)}
    assert statuses <= {500, 502, 503}
    assert len(statuses) > 1
    assert (await control.get("/_sandbox/state")).status_code == 200  # control is exempt
    await control.post("/_sandbox/faults", json={"error_rate": 0.0})
    assert (await client.get("/token/info")).status_code == 200


async def test_force_429_and_latency_at_run_time(
    client: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    knobs = await control.post("/_sandbox/faults", json={"force_429": 2})
    assert knobs.json()["force_429"] == 2
    statuses = [(await client.get("/token/info")).status_code for _ in range(3)]
    assert statuses == [429, 429, 200]

    await control.post("/_sandbox/faults", json={"latency": 0.2})
    started = time.perf_counter()
    assert (await client.get("/token/info")).status_code == 200
    assert time.perf_counter() - started >= 0.19
    started = time.perf_counter()
    await control.get("/_sandbox/state")
    assert time.perf_counter() - started < 0.2  # control endpoints are never slowed


async def test_faults_endpoint_rejects_unknown_knobs_and_bad_values(
    control: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    for body in ({"nope": 1}, {"error_rate": "high"}, {"error_rate": 2.0}, {"disabled": 1}):
        response = await control.post("/_sandbox/faults", json=body)
        assert response.status_code == 400, body
    assert sandbox.config.error_rate == 0.0
    assert sandbox.config.disabled is False
    ok = await control.post("/_sandbox/faults", json={"batch_delay": 0.01, "error_rate": 0.5})
    assert ok.status_code == 200
    assert (sandbox.config.batch_delay, sandbox.config.error_rate) == (0.01, 0.5)


async def test_state_requests_and_reset(
    client: httpx.AsyncClient, control: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    before = time.monotonic()
    await upsert(client, email="s@example.com", tags=["T"])
    await client.post("/events", json={"event_name": "e", "email": "s@example.com"})
    batch = (await client.post("/contacts/batch", json={"contacts": [{"email": "q@x.io"}]})).json()
    await client.get("/nowhere")

    state = (await control.get("/_sandbox/state")).json()
    assert [c["email"] for c in state["contacts"]] == ["s@example.com"]
    assert [e["name"] for e in state["events"]] == ["e"]
    assert [t["name"] for t in state["tags"]] == ["T"]
    assert state["batches"][batch["batch_id"]]["status"] in ("QUEUED", "IN_PROGRESS")
    assert state["stats"]["requests"] == 4
    assert state["stats"]["by_status"] == {"200": 3, "404": 1}

    log = (await control.get("/_sandbox/requests", params={"since": before})).json()
    assert [(r["method"], r["path"], r["status"]) for r in log] == [
        ("POST", "/contacts", 200),
        ("POST", "/events", 200),
        ("POST", "/contacts/batch", 200),
        ("GET", "/nowhere", 404),
    ]
    assert all(before <= r["t"] <= time.monotonic() for r in log)

    assert (await control.post("/_sandbox/reset")).status_code == 200
    state = (await control.get("/_sandbox/state")).json()
    assert state["contacts"] == state["events"] == state["tags"] == []
    assert state["batches"] == {}
    assert state["stats"]["requests"] == 0
    assert (await control.get("/_sandbox/requests")).json() == []
    async with asyncio.timeout(2):
        await sandbox.wait_for_batches()  # the dropped batch never lands
    assert sandbox.store.find_contact(email="q@x.io") is None


# -- answers the reference does not describe -----------------------------------------------


async def queue(client: httpx.AsyncClient, *contacts: Any) -> dict[str, Any]:
    response = await client.post("/contacts/batch", json={"contacts": list(contacts)})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def set_faults(control: httpx.AsyncClient, **knobs: Any) -> dict[str, Any]:
    response = await control.post("/_sandbox/faults", json=knobs)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_new_fault_knobs_are_off_by_default_and_validated(
    control: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    knobs = (await control.get("/_sandbox/faults")).json()
    assert {k: knobs[k] for k in knobs if k.startswith(("batch_", "non_json"))} == {
        "batch_delay": 0.05,
        "batch_status": None,
        "batch_stuck": False,
        "batch_errors": "objects",
        "batch_id_missing": False,
        "batch_poll_status": None,
        "non_json_rate": 0.0,
    }
    for body in (
        {"batch_status": 5},
        {"batch_stuck": 1},
        {"batch_errors": "xml"},
        {"batch_errors": None},
        {"batch_id_missing": "yes"},
        {"batch_poll_status": 200},
        {"batch_poll_status": True},
        {"batch_poll_status": "500"},
        {"non_json_rate": 1.5},
        {"non_json_rate": None},
    ):
        response = await control.post("/_sandbox/faults", json=body)
        assert response.status_code == 400, body
    assert (await control.get("/_sandbox/faults")).json() == knobs
    set_ = await set_faults(control, batch_status="FAILED", batch_poll_status=503)
    assert (set_["batch_status"], set_["batch_poll_status"]) == ("FAILED", 503)
    cleared = await set_faults(control, batch_status=None, batch_poll_status=None)
    assert (cleared["batch_status"], cleared["batch_poll_status"]) == (None, None)
    assert (sandbox.config.batch_status, sandbox.config.batch_poll_status) == (None, None)
    with pytest.raises(ValueError, match="batch_errors"):
        SandboxConfig(batch_errors="xml")  # type: ignore[arg-type]


@config(batch_delay=0.02)
async def test_batch_status_replaces_the_answer_and_pauses_the_batches(
    client: httpx.AsyncClient, control: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    done = await queue(client, {"email": "before@example.com"})
    await poll_batch(client, done["batch_id"])
    await set_faults(control, batch_status="FAILED")
    held = await queue(client, {"email": "held@example.com"}, {"email": "bad"})
    await asyncio.sleep(0.3)  # many times the QUEUED + IN_PROGRESS delays
    for batch_id in (done["batch_id"], held["batch_id"]):
        answer = await client.get(f"/contacts/batch/{batch_id}")
        assert answer.status_code == 200
        assert answer.json() == {"status": "FAILED"}  # completed ones too, no counts
    # paused, not running underneath: nothing applied, nothing completed
    assert sandbox.store.batches[held["batch_id"]].status == "IN_PROGRESS"
    assert sandbox.store.find_contact(email="held@example.com") is None
    state = (await control.get("/_sandbox/state")).json()  # the truth
    assert state["batches"][done["batch_id"]]["status"] == "COMPLETED"
    assert state["batches"][held["batch_id"]]["status"] == "IN_PROGRESS"

    for status in ("completed", "IN_PROGRESS", "COMPLETED"):
        await set_faults(control, batch_status=status)
        answer = (await client.get(f"/contacts/batch/{held['batch_id']}")).json()
        assert answer == {"status": status}
    await asyncio.sleep(0.1)
    assert sandbox.store.find_contact(email="held@example.com") is None

    await set_faults(control, batch_status=None)  # the batch resumes and completes
    seen = await poll_batch(client, held["batch_id"])
    assert seen[-1]["imported_contacts"] == 1
    assert [e["index"] for e in seen[-1]["errors"]] == [1]
    assert sandbox.store.find_contact(email="held@example.com") is not None
    assert (await client.get(f"/contacts/batch/{done['batch_id']}")).json()[
        "imported_contacts"
    ] == 1


@config(batch_delay=0.02)
async def test_batch_stuck_never_completes_until_cleared(
    client: httpx.AsyncClient, control: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    assert (await set_faults(control, batch_stuck=True))["batch_stuck"] is True
    first = await queue(client, {"email": "s1@example.com"})
    second = await queue(client, {"email": "s2@example.com"})
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.4):
            await sandbox.wait_for_batches()
    statuses = [
        (await client.get(f"/contacts/batch/{b['batch_id']}")).json() for b in (first, second)
    ]
    assert statuses == [{"status": "IN_PROGRESS"}, {"status": "QUEUED"}]
    assert sandbox.store.contacts == {}

    await set_faults(control, batch_stuck=False)
    async with asyncio.timeout(5):
        await sandbox.wait_for_batches()
    for batch in (first, second):
        answer = (await client.get(f"/contacts/batch/{batch['batch_id']}")).json()
        assert answer == {"status": "COMPLETED", "imported_contacts": 1, "errors": []}


@pytest.mark.parametrize("style", ["objects", "strings", "anonymous", "omitted"])
async def test_batch_errors_styles(
    client: httpx.AsyncClient, control: httpx.AsyncClient, sandbox: Sandbox, style: str
) -> None:
    await set_faults(control, batch_errors=style)
    contacts: list[Any] = [
        {"email": "ok@example.com", "user_id": "ok"},
        {"email": "not-an-email", "user_id": "u-bad"},
        {"user_id": "u-none"},
    ]
    batch = await queue(client, *contacts)
    assert batch["queued_contacts"] == 3
    done = (await poll_batch(client, batch["batch_id"]))[-1]
    assert done["status"] == "COMPLETED"
    assert done["imported_contacts"] == 1  # the truth, whatever the errors look like
    errors = done["errors"]
    if style == "objects":
        assert [(e["index"], e["email"], e["user_id"]) for e in errors] == [
            (1, "not-an-email", "u-bad"),
            (2, None, "u-none"),
        ]
    elif style == "strings":
        assert all(isinstance(e, str) for e in errors)
        assert errors[0].startswith("contact 1: ")
        assert "email" in errors[0]
        assert errors[1].startswith("contact 2: ")
    elif style == "anonymous":
        assert [set(e) for e in errors] == [{"message", "contact_ref"}] * 2
        refs = [e["contact_ref"] for e in errors]
        assert len(set(refs)) == 2
        for ref in refs:
            assert "not-an-email" not in ref
            assert "u-" not in ref
        again = (await client.get(f"/contacts/batch/{batch['batch_id']}")).json()
        assert [e["contact_ref"] for e in again["errors"]] == refs  # stable
    else:
        assert errors == []
        assert done["imported_contacts"] < batch["queued_contacts"]
    # the store keeps the full error objects, whatever the answers look like
    stored = sandbox.store.batches[batch["batch_id"]]
    assert [e["index"] for e in stored.errors] == [1, 2]
    assert sandbox.store.find_contact(user_id="ok") is not None
    assert sandbox.store.find_contact(user_id="u-bad") is None
    # the style is applied when answering: switching back shows the objects again
    await set_faults(control, batch_errors="objects")
    again = (await client.get(f"/contacts/batch/{batch['batch_id']}")).json()
    assert [e["index"] for e in again["errors"]] == [1, 2]


async def test_batch_id_missing_still_queues_and_applies(
    client: httpx.AsyncClient, control: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    await set_faults(control, batch_id_missing=True)
    response = await client.post(
        "/contacts/batch",
        json={"contacts": [{"email": "m1@example.com"}, {"email": "m2@example.com"}]},
    )
    assert response.status_code == 200
    assert response.json() == {"status": "QUEUED", "queued_contacts": 2}
    async with asyncio.timeout(5):
        await sandbox.wait_for_batches()
    assert sandbox.store.find_contact(email="m1@example.com") is not None
    assert sandbox.store.find_contact(email="m2@example.com") is not None
    state = (await control.get("/_sandbox/state")).json()
    [batch] = state["batches"].values()
    assert batch == {
        "queued_contacts": 2,
        "status": "COMPLETED",
        "imported_contacts": 2,
        "errors": [],
    }
    await set_faults(control, batch_id_missing=False)
    assert "batch_id" in await queue(client, {"email": "m3@example.com"})


@pytest.mark.parametrize(
    ("status", "code"), [(400, "bad_request"), (404, "batch_not_found"), (500, "server_error")]
)
async def test_batch_poll_status_fails_polls_while_the_batch_completes(
    client: httpx.AsyncClient,
    control: httpx.AsyncClient,
    sandbox: Sandbox,
    status: int,
    code: str,
) -> None:
    await set_faults(control, batch_poll_status=status)
    before = time.monotonic()
    batch = await queue(client, {"email": "p@example.com"})
    for _ in range(2):
        answer = await client.get(f"/contacts/batch/{batch['batch_id']}")
        assert answer.status_code == status
        assert error_code(answer) == code
    async with asyncio.timeout(5):
        await sandbox.wait_for_batches()  # the batch carried on underneath
    assert sandbox.store.find_contact(email="p@example.com") is not None
    assert (await client.get(f"/contacts/batch/{batch['batch_id']}")).status_code == status
    log = (await control.get("/_sandbox/requests", params={"since": before})).json()
    assert [(r["method"], r["status"]) for r in log] == [("POST", 200)] + [("GET", status)] * 3
    await set_faults(control, batch_poll_status=None)
    answer = await client.get(f"/contacts/batch/{batch['batch_id']}")
    assert answer.status_code == 200
    assert answer.json()["status"] == "COMPLETED"


async def test_non_json_rate_answers_html_after_applying(
    client: httpx.AsyncClient, control: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    await set_faults(control, non_json_rate=1.0)
    before = time.monotonic()
    responses = [
        await client.post("/contacts", json={"email": "n@example.com", "user_id": "n"}),
        await client.post("/events", json={"event_name": "e", "user_id": "n"}),
        await client.post("/contacts/batch", json={"contacts": [{"email": "b@example.com"}]}),
        await client.get("/contacts", params={"email": "n@example.com"}),
        await client.post("/tags", json={"name": "T", "contacts": [{"user_id": "n"}]}),
    ]
    for response in responses:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        with pytest.raises(json.JSONDecodeError):
            response.json()
    # applied all the same
    contact = sandbox.store.find_contact(user_id="n")
    assert contact is not None
    assert [t["name"] for t in sandbox.store.contact_json(contact)["tags"]] == ["T"]
    assert [e.name for e in sandbox.store.events] == ["e"]
    [batch] = sandbox.store.batches.values()
    async with asyncio.timeout(5):
        await sandbox.wait_for_batches()
    assert sandbox.store.find_contact(email="b@example.com") is not None
    html_poll = await client.get(f"/contacts/batch/{batch.id}")
    assert html_poll.headers["content-type"].startswith("text/html")
    # /token/info and error answers stay JSON
    assert (await client.get("/token/info")).json()["workspace_id"] == "sandbox-workspace"
    missing = await client.get("/contacts", params={"email": "ghost@example.com"})
    assert missing.status_code == 404
    assert error_code(missing) == "contact_not_found"
    log = (await control.get("/_sandbox/requests", params={"since": before})).json()
    assert [r["status"] for r in log] == [200] * 7 + [404]
    await set_faults(control, non_json_rate=0.0)
    assert (await client.get("/tags")).json()["tags"][0]["name"] == "T"


async def test_non_json_rate_is_seeded() -> None:
    async def pattern(seed: int) -> list[bool]:
        async with (
            running_sandbox(SandboxConfig(non_json_rate=0.5, seed=seed)) as box,
            httpx.AsyncClient(base_url=box.url, headers=AUTH) as http,
        ):
            answers = [await http.get("/tags") for _ in range(40)]
            return [r.headers["content-type"].startswith("text/html") for r in answers]

    first = await pattern(11)
    assert first == await pattern(11)
    assert 5 < sum(first) < 35
    assert first != await pattern(12)


# -- protocol -----------------------------------------------------------------------------


async def test_unknown_path_404_wrong_method_405_bad_json_400(client: httpx.AsyncClient) -> None:
    unknown = await client.get("/campaigns")
    assert unknown.status_code == 404
    assert error_code(unknown) == "not_found"

    wrong = await client.put("/contacts", json={})
    assert wrong.status_code == 405
    assert error_code(wrong) == "method_not_allowed"
    assert {m.strip() for m in wrong.headers["Allow"].split(",")} == {"GET", "POST", "DELETE"}
    batch_get = await client.get("/contacts/batch")
    assert batch_get.status_code == 405
    assert batch_get.headers["Allow"] == "POST"

    for content in (b"{not json", b"", b"[1, 2]"):
        bad = await client.post("/contacts", content=content)
        assert bad.status_code == 400
    assert error_code(await client.post("/events", content=b"{")) == "json_parse_error"


async def test_running_sandbox_reports_where_it_listens(sandbox: Sandbox) -> None:
    assert sandbox.url == f"http://127.0.0.1:{sandbox.port}"
    assert sandbox.port > 0
    assert sandbox.store is not None
    assert sandbox.config.api_keys == frozenset({"sandbox-key"})


# -- the command --------------------------------------------------------------------------


def test_command_flags_build_the_config() -> None:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    defaults = command.config_from_args(parser.parse_args([]))
    assert defaults.api_keys == frozenset({"sandbox-key"})
    assert defaults.rate_limit == 100
    args = parser.parse_args(
        [
            "--port",
            "0",
            "--api-key",
            "a",
            "--api-key",
            "b",
            "--rate-limit",
            "0",
            "--rate-window",
            "2",
            "--batch-delay",
            "0.1",
            "--error-rate",
            "0.25",
            "--latency",
            "0.01",
            "--no-retry-after",
        ]
    )
    config = command.config_from_args(args)
    assert (args.host, args.port) == ("127.0.0.1", 0)
    assert config.api_keys == frozenset({"a", "b"})
    assert (config.rate_limit, config.rate_window, config.batch_delay) == (0, 2.0, 0.1)
    assert (config.error_rate, config.latency, config.retry_after) == (0.25, 0.01, False)


def test_command_fault_flags_build_the_config() -> None:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    defaults = command.config_from_args(parser.parse_args([]))
    assert (defaults.batch_status, defaults.batch_stuck, defaults.batch_errors) == (
        None,
        False,
        "objects",
    )
    assert (defaults.batch_id_missing, defaults.batch_poll_status, defaults.non_json_rate) == (
        False,
        None,
        0.0,
    )
    config = command.config_from_args(
        parser.parse_args(
            [
                "--batch-status",
                "FAILED",
                "--batch-stuck",
                "--batch-errors",
                "anonymous",
                "--batch-id-missing",
                "--batch-poll-status",
                "404",
                "--non-json-rate",
                "0.1",
                "--seed",
                "7",
            ]
        )
    )
    assert (config.batch_status, config.batch_stuck, config.batch_errors) == (
        "FAILED",
        True,
        "anonymous",
    )
    assert (config.batch_id_missing, config.batch_poll_status, config.non_json_rate) == (
        True,
        404,
        0.1,
    )
    assert config.seed == 7
    with pytest.raises(SystemExit):
        parser.parse_args(["--batch-errors", "xml"])
    with pytest.raises(ValueError, match="batch_poll_status"):
        command.config_from_args(parser.parse_args(["--batch-poll-status", "200"]))


async def test_command_serves_until_sigterm_and_exits_0() -> None:
    script = (
        "import argparse, sys\n"
        "from destination.devtools.sandbox import command\n"
        "p = argparse.ArgumentParser(); command.add_arguments(p)\n"
        "sys.exit(command.run(p.parse_args(sys.argv[1:])))\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        "--port",
        "0",
        "--api-key",
        "secret-key-1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(15):
            line = (await proc.stdout.readline()).decode()
        assert "listening on http://127.0.0.1:" in line
        assert "secret-key-1" not in line
        url = line.split("listening on ", 1)[1].split()[0]
        async with httpx.AsyncClient(base_url=url) as http:
            info = await http.get("/token/info", headers={"Authorization": "Bearer secret-key-1"})
        assert info.status_code == 200
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            _, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
