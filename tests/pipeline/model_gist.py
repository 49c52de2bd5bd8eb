"""Gist for the model test: the sandbox's workspace (``devtools.sandbox._store.Store``,
the project's reference model of Gist's data) behind an HTTP edge whose answers follow
a mode the test sets, with a record of what reached it.

Per worker, ``transport(worker)`` is that worker's ``httpx.MockTransport``: every
request is known by its sender, and a crashed worker's requests are refused (its
process is gone). Modes:

- ``healthy``: answers as the reference says; a batch import completes after 0-2 polls;
  now and then an import's answer is slow (the import is in flight for up to ~1.6 s,
  long enough for a revocation to come meanwhile);
- ``down``: every API request gets a 503;
- ``flaky``: a third of the answers are 5xx, 429, time-outs, a 2xx whose body is not
  JSON, or an answer lost *after* the request took effect (a time-out the sender
  cannot tell from one before it);
- ``odd``: batch polls answer statuses the reference does not know (``???``,
  ``completed``), completed batches report errors as plain strings or not at all,
  batch imports come back without a ``batch_id`` now and then (queued all the same),
  and some imports fail (below);
- ``imports``: many imports are slow, fail, never complete or complete late.

Each import Gist accepts gets a *fate* when it arrives: ``ok`` (completes when polled),
``failed`` (polls answer an explicit failure, ``FAILED`` or ``ERROR`` in some case; it
is never imported), ``stuck`` (never completes, never imported), ``late`` (imported
and reported COMPLETED only ``late_by`` after it arrived: past the worker's
``GIST_BATCH_DEADLINE``, whether or not anyone still polls it). Gist imports batches
in turn: importing one first imports every earlier one that will be imported
(``ok``/``late``), so an older write never lands over a newer one. A batch is queued
when the request arrives, before the (maybe slow) answer: an import cancelled by its
sender while waiting for the answer is imported all the same.

Contacts whose email starts with ``bad`` fail inside a completed batch; a batch holding
one whose email starts with ``reject`` is refused whole (400). Events carry their
message's ``messageId`` as ``properties.mid``: every arrival is logged (``arrivals``),
with whether its answer was lost.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import httpx
import orjson

from destination.devtools.sandbox._store import ApiError, Store
from tests.pipeline.harness import completed_status

FATES = {
    "healthy": {"ok": 1.0},
    "flaky": {"ok": 1.0},
    "odd": {"ok": 0.7, "failed": 0.15, "stuck": 0.05, "late": 0.1},
    "imports": {"ok": 0.35, "failed": 0.2, "stuck": 0.15, "late": 0.3},
}
SLOW_IMPORTS = {"healthy": 0.2, "flaky": 0.1, "odd": 0.1, "imports": 0.35}


@dataclass
class ModelBatch:
    batch_id: str
    contacts: list[dict[str, Any]]
    sender: int
    arrived: float
    fate: str
    polls: int  # not-completed answers still to give (ok)
    ready_at: float  # late: imported and COMPLETED from then on
    applied: bool = False
    failed_indices: list[int] = field(default_factory=list)
    completed_answered: float | None = None  # when Gist first answered COMPLETED
    failed_answered: bool = False

    def identities(self) -> set[str]:
        out = set()
        for contact in self.contacts:
            if contact.get("user_id") is not None:
                out.add("u:" + str(contact["user_id"]))
            if isinstance(contact.get("email"), str):
                out.add("e:" + contact["email"].lower())
        return out


@dataclass
class Arrival:
    message_id: str
    sender: int
    at: float
    lost: bool = False  # Gist applied it, the sender got a time-out or HTML instead


class SandboxGist:
    def __init__(self, rng: random.Random, *, late_by: tuple[float, float]) -> None:
        self.rng = rng
        self.mode = "healthy"
        self.store = Store()
        self.batches: dict[str, ModelBatch] = {}
        self.order: list[ModelBatch] = []
        self.arrivals: dict[str, list[Arrival]] = defaultdict(list)
        self.late_by = late_by
        self.slow_imports: float | None = None
        self.slow_events: float | None = None
        """When set, every import's (event's) answer takes this long (scripted programs)."""
        self.dead: set[int] = set()
        self.requests = 0
        self.journal: list[tuple[float, str]] = []
        """(time, what happened to Gist's data), for a failure's trace (MODEL_TRACE)."""
        self._ids = itertools.count()
        self._unusable: set[tuple[str, str, bytes]] = set()

    # --- the edge ---------------------------------------------------------------------
    def transport(self, worker: int) -> httpx.MockTransport:
        async def handle(request: httpx.Request) -> httpx.Response:
            if worker in self.dead:
                raise httpx.ConnectError("the worker crashed (model)", request=request)
            response = await self._handle(worker, request)
            if worker in self.dead:  # the answer has no one to go to
                raise httpx.ConnectError("the worker crashed (model)", request=request)
            return response

        return httpx.MockTransport(handle)

    async def _handle(self, worker: int, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        path = request.url.path
        self.settle()
        if path == "/token/info":
            return httpx.Response(200, json={"workspace_id": "w-model"})
        if self.mode == "down":
            return httpx.Response(503, json={"errors": [{"code": "unavailable"}]})
        if self.mode == "flaky" and self.rng.random() < 0.33:
            fault = self.rng.choice(["500", "503", "429", "timeout", "lost", "html"])
            self._note(f"{fault} for {request.method} {path} from worker {worker}")
            if fault == "timeout":
                raise httpx.ReadTimeout("model time-out", request=request)
            if fault == "429":
                return httpx.Response(429, headers={"Retry-After": "0"}, json={"errors": []})
            if fault in ("500", "503"):
                return httpx.Response(int(fault), json={"errors": [{"code": "server_error"}]})
            if (path == "/contacts/batch" or fault == "html") and not self._may_be_unusable(
                request
            ):
                return await self._answer(worker, request, path, lost=False)
            # A poll's answer the worker never gets (lost, or not JSON) did not tell it
            # COMPLETED or FAILED (seed 26: a lost COMPLETED, then Gist down past the
            # deadline: the import was rightly taken as not completed in time).
            answer = await self._answer(
                worker, request, path, lost=fault == "lost", unheard=fault in ("lost", "html")
            )
            if fault == "lost":
                raise httpx.ReadTimeout("model time-out after it took effect", request=request)
            if answer.status_code == 200:
                return httpx.Response(200, text="<html>oops</html>")
            return answer
        return await self._answer(worker, request, path, lost=False)

    def _may_be_unusable(self, request: httpx.Request) -> bool:
        """An answer the client cannot use (not JSON; an import's without a batch_id) is
        given once per request at most: the client tries such a request a few times
        only, and the model's messages must end as their content says, its workers
        start as they should, not by chance (seed 47: four pages of HTML in a row for
        ``GET /subscription_types`` ended a worker at its start)."""
        key = (request.method, str(request.url), bytes(request.content))
        if key in self._unusable:
            return False
        self._unusable.add(key)
        return True

    async def _answer(
        self, worker: int, request: httpx.Request, path: str, *, lost: bool, unheard: bool = False
    ) -> httpx.Response:
        body = orjson.loads(request.content) if request.content else None
        try:
            if path == "/contacts/batch" and request.method == "POST":
                return await self._import(worker, request, body)
            if path.startswith("/contacts/batch/"):
                return self._poll(path.rsplit("/", 1)[1], unheard=unheard)
            if path == "/events":
                if self.slow_events is not None:
                    await asyncio.sleep(self.slow_events)
                mid = ((body or {}).get("properties") or {}).get("mid")
                event = self.store.track_event(body)
                # Unheard (a time-out, or a page of HTML): the sender cannot tell that
                # Gist took it, and may send it again.
                heard = not (lost or unheard)
                if isinstance(mid, str):
                    self.arrivals[mid].append(Arrival(mid, worker, time.monotonic(), not heard))
                self._note(
                    f"event {body.get('event_name')} from worker {worker}: mid {mid}"
                    + ("" if heard else " (its answer lost)")
                )
                return httpx.Response(200, json={"event": event.to_json()})
            if path == "/tags":
                tag = self.store.tag_request(body)
                self._note(f"tags from worker {worker}: {body}")
                return httpx.Response(200, json={"tag": tag.to_json()})
            if path == "/contacts" and request.method == "DELETE":
                params = request.url.params
                contact = self.store.find_contact(
                    user_id=params.get("user_id"), email=params.get("email")
                )
                if contact is None:
                    return httpx.Response(404, json={"errors": [{"code": "not_found"}]})
                self.store.delete_contact(contact)
                self._note(f"deleted {contact.email} (worker {worker})")
                return httpx.Response(200, json={"deleted": True})
            answer = self._workspace(worker, request, path, body)
            if answer is not None:
                return answer
        except ApiError as error:
            return httpx.Response(error.status, json=error.body())
        return httpx.Response(404, json={"errors": [{"code": "not_found"}]})

    def _workspace(
        self, worker: int, request: httpx.Request, path: str, body: Any
    ) -> httpx.Response | None:
        """Contacts read by id, subscription types and the e-commerce API, as the
        sandbox's application routes them (``devtools.sandbox._app``) to the store."""
        store, method = self.store, request.method
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if path == "/contacts" and method == "GET":
            params = request.url.params
            found = store.find_contact(user_id=params.get("user_id"), email=params.get("email"))
            if found is None:
                raise ApiError(404, "contact_not_found", "no such contact")
            return httpx.Response(200, json={"contact": store.contact_json(found)})
        if path == "/contacts" and method == "POST":
            contact = store.upsert_contact(body)
            self._note(f"contact from worker {worker}: {body}")
            return httpx.Response(200, json={"contact": store.contact_json(contact)})
        if parts[0] == "subscription_types":
            if len(parts) == 1:
                types = [t.to_json() for t in store.subscription_types.values()]
                return httpx.Response(200, json={"subscription_types": types, "pages": {}})
            store.subscription_type(parts[1])
            if method == "GET":
                return httpx.Response(
                    200, json={"subscription_type": store.subscription_type(parts[1]).to_json()}
                )
            contact = store.set_subscription(parts[1], body)
            self._note(f"subscription {parts[1]} from worker {worker}: {body}")
            return httpx.Response(200, json={"contact": store.contact_json(contact)})
        if parts[:2] != ["ecommerce", "stores"]:
            return None
        commerce = store.ecommerce
        if len(parts) == 2:
            if method == "GET":
                shops = [s.to_json() for s in commerce.stores.values()]
                return httpx.Response(200, json={"ecommerce_stores": shops})
            return httpx.Response(
                200, json={"ecommerce_store": commerce.create_store(body).to_json()}
            )
        shop = commerce.store(parts[2])
        rest = parts[3:]
        self._note(f"{method} {'/'.join(rest)} from worker {worker}: {body}")
        answer: tuple[str, Any]
        if rest == ["customers"]:
            answer = ("ecommerce_customer", commerce.create_customer(shop, body).to_json())
        elif len(rest) == 2 and rest[0] == "customers":
            shop.customer(rest[1])
            updated = commerce.update_customer(shop, rest[1], body)
            answer = ("ecommerce_customer", updated.to_json())
        elif len(rest) == 3 and rest[2] == "cart" and method == "POST":
            shop.customer(rest[1])
            answer = ("ecommerce_cart", commerce.put_cart(shop, rest[1], body).cart_json())
        elif len(rest) == 3 and rest[2] == "cart":
            answer = ("ecommerce_cart", commerce.delete_cart(shop, rest[1]))
        elif rest == ["products"]:
            product = commerce.create_product(shop, body)
            answer = ("ecommerce_product", product.to_json(shop.categories))
        elif len(rest) == 2 and rest[0] == "products":
            shop.product(rest[1])
            product = commerce.update_product(shop, rest[1], body)
            answer = ("ecommerce_product", product.to_json(shop.categories))
        elif len(rest) == 3 and rest[2] == "variants":
            shop.product(rest[1])
            variant = commerce.create_variant(shop, rest[1], body)
            answer = ("ecommerce_product_variant", variant.to_json())
        elif len(rest) == 4 and rest[2] == "variants":
            shop.product(rest[1]).variant(rest[3])
            variant = commerce.update_variant(shop, rest[1], rest[3], body)
            answer = ("ecommerce_product_variant", variant.to_json())
        elif rest == ["orders"]:
            answer = ("ecommerce_order", commerce.create_order(shop, body).to_json())
        elif len(rest) == 2 and rest[0] == "orders":
            shop.order(rest[1])
            answer = ("ecommerce_order", commerce.update_order(shop, rest[1], body).to_json())
        else:
            return None
        return httpx.Response(200, json={answer[0]: answer[1]})

    async def _import(self, worker: int, request: httpx.Request, body: Any) -> httpx.Response:
        contacts = body["contacts"]
        if any(str(c.get("email", "")).startswith("reject") for c in contacts):
            return httpx.Response(400, json={"errors": [{"code": "invalid_email"}]})
        fates = FATES.get(self.mode, FATES["healthy"])
        fate = self.rng.choices(list(fates), weights=list(fates.values()))[0]
        now = time.monotonic()
        batch = ModelBatch(
            batch_id=f"b{next(self._ids)}",
            contacts=contacts,
            sender=worker,
            arrived=now,
            fate=fate,
            polls=self.rng.randint(0, 2),
            ready_at=now + self.rng.uniform(*self.late_by),
        )
        self.batches[batch.batch_id] = batch
        self.order.append(batch)
        self._note(f"import {batch.batch_id} from worker {worker} ({fate}): {contacts}")
        answer: dict[str, Any] = {"status": "QUEUED", "queued_contacts": len(contacts)}
        if not (self.mode == "odd" and self.rng.random() < 0.2) or not self._may_be_unusable(
            request
        ):
            answer["batch_id"] = batch.batch_id
        if self.slow_imports is not None:
            await asyncio.sleep(self.slow_imports)
        elif self.rng.random() < SLOW_IMPORTS.get(self.mode, 0.0):
            await asyncio.sleep(self.rng.uniform(0.3, 1.6))  # queued; the answer is slow
        return httpx.Response(200, json=answer)

    def _poll(self, batch_id: str, *, unheard: bool = False) -> httpx.Response:
        """The batch's status; ``unheard``: the answer will not reach the worker (it is
        not counted as answered)."""
        batch = self.batches.get(batch_id)
        if batch is None:
            return httpx.Response(404, json={"errors": [{"code": "not_found"}]})
        rng = self.rng
        waiting = ["QUEUED", "IN_PROGRESS"] + (["???", "completed"] if self.mode == "odd" else [])
        if batch.fate == "failed":
            self._note(f"poll {batch.batch_id}: failed" + (" (unheard)" if unheard else ""))
            batch.failed_answered = batch.failed_answered or not unheard
            return httpx.Response(
                200, json={"status": rng.choice(["FAILED", "ERROR", "failed", "Error"])}
            )
        if batch.fate == "stuck" or (batch.fate == "late" and time.monotonic() < batch.ready_at):
            return httpx.Response(200, json={"status": rng.choice(waiting)})
        if batch.fate == "ok" and (batch.polls > 0 or (self.mode == "odd" and rng.random() < 0.5)):
            batch.polls = max(0, batch.polls - 1)
            return httpx.Response(200, json={"status": rng.choice(waiting)})
        self._import_in_turn(batch)
        self._note(f"poll {batch.batch_id}: COMPLETED" + (" (unheard)" if unheard else ""))
        if batch.completed_answered is None and not unheard:
            batch.completed_answered = time.monotonic()
        return httpx.Response(200, json=self._completed(batch))

    # --- importing ----------------------------------------------------------------------
    def settle(self, now: float | None = None) -> None:
        """Import the late batches whose time has come (in turn)."""
        now = time.monotonic() if now is None else now
        for batch in self.order:
            if batch.fate == "late" and not batch.applied and batch.ready_at <= now:
                self._import_in_turn(batch)

    def _import_in_turn(self, batch: ModelBatch) -> None:
        for earlier in self.order:
            if earlier is batch:
                break
            if earlier.fate in ("ok", "late") and not earlier.applied:
                self._apply(earlier)
        if not batch.applied:
            self._apply(batch)

    def _note(self, what: str) -> None:
        self.journal.append((time.monotonic(), what))

    def _apply(self, batch: ModelBatch) -> None:
        batch.applied = True
        self._note(f"imported {batch.batch_id}")
        for index, contact in enumerate(batch.contacts):
            if str(contact.get("email", "")).startswith("bad"):
                batch.failed_indices.append(index)
                continue
            try:
                self.store.upsert_contact(contact)
            except ApiError:
                batch.failed_indices.append(index)

    def _completed(self, batch: ModelBatch) -> dict[str, Any]:
        return completed_status(self.rng, self.mode, len(batch.contacts), batch.failed_indices)

    # --- what the invariants ask ----------------------------------------------------------
    def batches_with(self, identity: str) -> list[ModelBatch]:
        return [b for b in self.order if identity in b.identities()]
