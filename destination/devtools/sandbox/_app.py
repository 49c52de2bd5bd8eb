"""The sandbox's HTTP side: an aiohttp application that answers like the Gist API.

One middleware does, for every API request and in this order: the configured latency,
authentication (401), the disabled workspace (403), forced 429s, the sliding-window rate
limit (429), random server errors (5xx), then the handler, then (``non_json_rate``)
the swap of a successful answer for a non-JSON one; and it records the request with the
status it was answered. ``/_sandbox/*`` (inspection and control) skips all of that.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

import orjson
from aiohttp import web

from destination.devtools.sandbox._config import SandboxConfig
from destination.devtools.sandbox._ecommerce import EcommerceStore
from destination.devtools.sandbox._ratelimit import SlidingWindow, retry_after_header
from destination.devtools.sandbox._store import JSON, ApiError, Batch, Contact, Store, bad_request
from destination.devtools.sandbox._subscriptions import check_subscription_type

log = logging.getLogger(__name__)

CONTROL_PREFIX: Final = "/_sandbox/"
_BATCH_CHUNK: Final = 500
_SERVER_ERRORS: Final = (500, 502, 503)
_SCOPE: Final = (
    "read_contact write_contact read_event write_event read_tag write_tag "
    "read_subscription_type write_subscription_type read_ecommerce write_ecommerce"
)
_JSON_CT: Final = "application/json"
_TOKEN_INFO: Final = "/token/info"
_NOT_JSON: Final = b"<html><body>oops</body></html>"
_HOLD_POLL: Final = 0.02
"""Seconds between looks at the knobs while ``batch_status``/``batch_stuck`` hold batches."""
_POLL_ERROR_CODES: Final = {
    400: "bad_request",
    401: "api_key_invalid",
    403: "forbidden",
    404: "batch_not_found",
    405: "method_not_allowed",
    429: "rate_limited",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class _Runtime:
    """What the app needs besides the config and the data."""

    config: SandboxConfig
    store: Store
    rng: random.Random
    limiters: dict[str, SlidingWindow] = field(default_factory=dict)
    created_at: int = field(default_factory=lambda: int(time.time()))
    wake_worker: asyncio.Event = field(default_factory=asyncio.Event)

    def reset(self) -> None:
        """Forget data, stats and the rate-limit history (the knobs stay as they are)."""
        self.store.reset()
        for limiter in self.limiters.values():
            limiter.clear()

    def limiter(self, workspace_id: str) -> SlidingWindow:
        limiter = self.limiters.get(workspace_id)
        if limiter is None:
            limiter = self.limiters[workspace_id] = SlidingWindow()
        return limiter


RUNTIME: Final = web.AppKey("gist_sandbox_runtime", _Runtime)


def json_response(
    body: JSON, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type=_JSON_CT, headers=headers
    )


def error_response(error: ApiError, headers: dict[str, str] | None = None) -> web.Response:
    return json_response(error.body(), error.status, headers)


def _http_error_response(exc: web.HTTPException) -> web.Response:
    """aiohttp's own errors (404, 405, 413, ...) as Gist-style JSON, keeping ``Allow``."""
    codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    message = exc.reason
    if exc.status == 404:
        message = "no such resource"
    return error_response(
        ApiError(exc.status, codes.get(exc.status, "bad_request"), message), headers
    )


async def _json_body(request: web.Request) -> JSON:
    raw = await request.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "json_parse_error", "the request body is not valid JSON") from None


async def _json_object(request: web.Request) -> dict[str, JSON]:
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def _bearer_key(request: web.Request) -> str | None:
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return key.strip() or None


# -- the middleware ---------------------------------------------------------------------


@web.middleware
async def _middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith(CONTROL_PREFIX):
        return await _answer(request, handler)
    rt = request.app[RUNTIME]
    config = rt.config
    if config.latency > 0:
        await asyncio.sleep(config.latency)
    now = time.monotonic()
    response: web.StreamResponse | None = await _gate(request, rt, now)
    if response is None:
        response = _maybe_not_json(request, rt, await _answer(request, handler))
    rt.store.record_request(now, request.method, request.path, response.status)
    return response


async def _gate(request: web.Request, rt: _Runtime, now: float) -> web.Response | None:
    """The answer for a request stopped before its handler, or None to let it through."""
    config = rt.config
    key = _bearer_key(request)
    if key is None:
        return error_response(
            ApiError(401, "api_key_invalid", "no API key: send 'Authorization: Bearer <key>'")
        )
    if key not in config.api_keys:
        return error_response(ApiError(401, "api_key_invalid", "the API key is not valid"))
    if config.disabled:
        return error_response(ApiError(403, "workspace_disabled", "this workspace is disabled"))
    if config.force_429 > 0:
        config.force_429 -= 1
        return _rate_limited(config, 1.0)
    wait = rt.limiter(config.workspace_id).try_acquire(now, config.rate_limit, config.rate_window)
    if wait is not None:
        return _rate_limited(config, wait)
    if config.error_rate > 0 and rt.rng.random() < config.error_rate:
        status = rt.rng.choice(_SERVER_ERRORS)
        return error_response(ApiError(status, "server_error", "injected server error"))
    return None


def _maybe_not_json(
    request: web.Request, rt: _Runtime, response: web.StreamResponse
) -> web.StreamResponse:
    """``non_json_rate``: a successful answer, already applied, swapped for HTML."""
    rate = rt.config.non_json_rate
    if (
        rate > 0
        and 200 <= response.status < 300
        and request.path != _TOKEN_INFO
        and rt.rng.random() < rate
    ):
        return web.Response(body=_NOT_JSON, status=200, content_type="text/html")
    return response


def _rate_limited(config: SandboxConfig, wait: float) -> web.Response:
    headers = {"Retry-After": retry_after_header(wait)} if config.retry_after else None
    error = ApiError(
        429,
        "rate_limited",
        f"more than {config.rate_limit} requests in {config.rate_window:g} seconds",
    )
    return error_response(error, headers)


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as error:
        return error_response(error)
    except web.HTTPException as exc:
        return _http_error_response(exc)
    except Exception as exc:  # an error in the sandbox itself: say so, as JSON
        log.exception("gist sandbox: unhandled error on %s %s", request.method, request.path)
        return error_response(ApiError(500, "internal_error", f"sandbox bug: {exc!r}"))


# -- API handlers -----------------------------------------------------------------------


async def _upsert_contact(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    body = await _json_object(request)
    contact = rt.store.upsert_contact(body)
    return json_response({"contact": rt.store.contact_json(contact)})


async def _queue_batch(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    body = await _json_object(request)
    contacts = body.get("contacts")
    if not isinstance(contacts, list) or not contacts:
        raise bad_request("contacts must be a non-empty list")
    if len(contacts) > rt.config.max_batch_size:
        raise bad_request(
            f"a batch holds at most {rt.config.max_batch_size} contacts, got {len(contacts)}"
        )
    batch_id = str(uuid.UUID(int=rt.rng.getrandbits(128), version=4))
    rt.store.queue_batch(
        Batch(
            id=batch_id,
            contacts=contacts,
            queued_at=time.monotonic(),
            queued_contacts=len(contacts),
        )
    )
    rt.wake_worker.set()
    answer: dict[str, JSON] = {"status": "QUEUED", "queued_contacts": len(contacts)}
    if not rt.config.batch_id_missing:
        answer["batch_id"] = batch_id
    return json_response(answer)


async def _batch_status(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    config = rt.config
    if config.batch_poll_status is not None:
        status = config.batch_poll_status
        code = _POLL_ERROR_CODES.get(status, "server_error" if status >= 500 else "error")
        raise ApiError(status, code, "injected batch-status error")
    batch = rt.store.batches.get(request.match_info["batch_id"])
    if batch is None:
        raise ApiError(404, "batch_not_found", "no batch with this id")
    if config.batch_status is not None:
        return json_response({"status": config.batch_status})
    answer = batch.status_json()
    if "errors" in answer:
        answer["errors"] = _format_errors(batch, config.batch_errors)
    return json_response(answer)


def _format_errors(batch: Batch, style: str) -> list[JSON]:
    """A completed batch's errors in the ``batch_errors`` style of the answer."""
    if style == "omitted":
        return []
    if style == "strings":
        return [f"contact {e.get('index')}: {e.get('message')}" for e in batch.errors]
    if style == "anonymous":
        return [
            {"message": e.get("message"), "contact_ref": _contact_ref(batch.id, e.get("index"))}
            for e in batch.errors
        ]
    return list(batch.errors)


def _contact_ref(batch_id: str, index: JSON) -> str:
    """An opaque, stable token for one batch entry: no index, email or user_id in it."""
    digest = hashlib.blake2b(f"{batch_id}:{index}".encode(), digest_size=6).hexdigest()
    return f"ref_{digest}"


def _contact_from_query(request: web.Request) -> Contact | None:
    rt = request.app[RUNTIME]
    query = request.query
    if "email" in query:
        return rt.store.find_contact(email=query["email"])
    if "user_id" in query:
        return rt.store.find_contact(user_id=query["user_id"])
    raise bad_request("give an email or a user_id query parameter")


def _contact_not_found() -> ApiError:
    return ApiError(404, "contact_not_found", "no such contact")


async def _get_contacts(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    query = request.query
    if "email" not in query and "user_id" not in query:
        return _list_contacts(rt, request)
    contact = _contact_from_query(request)
    if contact is None:
        raise _contact_not_found()
    return json_response({"contact": rt.store.contact_json(contact)})


def _list_contacts(rt: _Runtime, request: web.Request) -> web.Response:
    try:
        page = max(1, int(request.query.get("page", "1")))
        per_page = min(60, max(1, int(request.query.get("per_page", "50"))))
    except ValueError:
        raise bad_request("page and per_page must be integers") from None
    contacts = list(rt.store.contacts.values())
    if request.query.get("order", "desc") != "asc":
        contacts.reverse()
    chunk = contacts[(page - 1) * per_page : page * per_page]
    return json_response(
        {
            "contacts": [rt.store.contact_json(c) for c in chunk],
            "pages": {"page": page, "per_page": per_page, "total": len(contacts)},
        }
    )


def _contact_by_path(request: web.Request) -> Contact | None:
    rt = request.app[RUNTIME]
    return rt.store.contacts.get(int(request.match_info["contact_id"]))


async def _get_contact(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    contact = _contact_by_path(request)
    if contact is None:
        raise _contact_not_found()
    return json_response({"contact": rt.store.contact_json(contact)})


async def _delete(request: web.Request, contact: Contact | None) -> web.Response:
    if contact is None:
        raise _contact_not_found()
    request.app[RUNTIME].store.delete_contact(contact)
    return json_response({"id": str(contact.id), "object": "contact", "deleted": True})


async def _delete_contacts(request: web.Request) -> web.Response:
    return await _delete(request, _contact_from_query(request))


async def _delete_contact(request: web.Request) -> web.Response:
    return await _delete(request, _contact_by_path(request))


async def _track_event(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    event = rt.store.track_event(await _json_object(request))
    return json_response({"event": event.to_json()})


async def _post_tag(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    tag = rt.store.tag_request(await _json_object(request))
    return json_response({"tag": tag.to_json()})


async def _list_tags(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    return json_response({"tags": [t.to_json() for t in rt.store.tags.values()]})


async def _token_info(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    return json_response(
        {
            "workspace_id": rt.config.workspace_id,
            "token_type": "Bearer",
            "expires_in": 0,
            "app_id": None,
            "scope": _SCOPE,
            "created_at": rt.created_at,
        }
    )


# -- subscription types -------------------------------------------------------------------


def _page_args(request: web.Request) -> tuple[int, int]:
    try:
        page = max(1, int(request.query.get("page", "1")))
        per_page = min(60, max(1, int(request.query.get("per_page", "50"))))
    except ValueError:
        raise bad_request("page and per_page must be integers") from None
    return page, per_page


async def _list_subscription_types(request: web.Request) -> web.Response:
    """A paginated list, ``pages`` as the reference's lists have it: ``first``, ``last``,
    and ``prev`` / ``next`` when there is such a page (no ``next``: the last page)."""
    rt = request.app[RUNTIME]
    page, per_page = _page_args(request)
    types = list(rt.store.subscription_types.values())
    chunk = types[(page - 1) * per_page : page * per_page]
    last = max(1, -(-len(types) // per_page))

    def url(n: int) -> str:
        return f"{request.scheme}://{request.host}/subscription_types?page={n}&per_page={per_page}"

    pages = {"first": url(1), "last": url(last)}
    if page > 1:
        pages["prev"] = url(min(page - 1, last))
    if page < last:
        pages["next"] = url(page + 1)
    return json_response({"subscription_types": [t.to_json() for t in chunk], "pages": pages})


async def _get_subscription_type(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    subscription_type = rt.store.subscription_type(request.match_info["type_id"])
    return json_response({"subscription_type": subscription_type.to_json()})


async def _set_subscription(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    type_id = request.match_info["type_id"]
    rt.store.subscription_type(type_id)  # the path before the body
    contact = rt.store.set_subscription(type_id, await _json_object(request))
    return json_response({"contact": rt.store.contact_json(contact)})


# -- e-commerce ------------------------------------------------------------------------------


async def _create_store(request: web.Request) -> web.Response:
    commerce = request.app[RUNTIME].store.ecommerce
    shop = commerce.create_store(await _json_body(request))
    return json_response({"ecommerce_store": shop.to_json()})


async def _list_stores(request: web.Request) -> web.Response:
    commerce = request.app[RUNTIME].store.ecommerce
    return json_response({"ecommerce_stores": [s.to_json() for s in commerce.stores.values()]})


async def _get_store(request: web.Request) -> web.Response:
    commerce = request.app[RUNTIME].store.ecommerce
    return json_response(
        {"ecommerce_store": commerce.store(request.match_info["store_id"]).to_json()}
    )


async def _update_store(request: web.Request) -> web.Response:
    commerce = request.app[RUNTIME].store.ecommerce
    store_id = request.match_info["store_id"]
    commerce.store(store_id)
    shop = commerce.update_store(store_id, await _json_body(request))
    return json_response({"ecommerce_store": shop.to_json()})


def _shop(request: web.Request) -> EcommerceStore:
    return request.app[RUNTIME].store.ecommerce.store(request.match_info["store_id"])


async def _create_customer(request: web.Request) -> web.Response:
    commerce = request.app[RUNTIME].store.ecommerce
    shop = _shop(request)
    customer = commerce.create_customer(shop, await _json_body(request))
    return json_response({"ecommerce_customer": customer.to_json()})


async def _get_customer(request: web.Request) -> web.Response:
    customer = _shop(request).customer(request.match_info["customer_id"])
    return json_response({"ecommerce_customer": customer.to_json()})


async def _update_customer(request: web.Request) -> web.Response:
    commerce = request.app[RUNTIME].store.ecommerce
    shop = _shop(request)
    customer_id = request.match_info["customer_id"]
    shop.customer(customer_id)
    customer = commerce.update_customer(shop, customer_id, await _json_body(request))
    return json_response({"ecommerce_customer": customer.to_json()})


async def _put_cart(request: web.Request) -> web.Response:
    commerce = request.app[RUNTIME].store.ecommerce
    shop = _shop(request)
    customer_id = request.match_info["customer_id"]
    shop.customer(customer_id)
    customer = commerce.put_cart(shop, customer_id, await _json_body(request))
    return json_response({"ecommerce_cart": customer.cart_json()})


async def _delete_cart(request: web.Request) -> web.Response:
    commerce = request.app[RUNTIME].store.ecommerce
    cart = commerce.delete_cart(_shop(request), request.match_info["customer_id"])
    return json_response({"ecommerce_cart": cart})


async def _create_category(request: web.Request) -> web.Response:
    commerce = request.app[RUNTIME].store.ecommerce
    category = commerce.create_category(_shop(request), await _json_body(request))
    return json_response({"ecommerce_category": category.to_json()})


async def _get_category(request: web.Request) -> web.Response:
    category = _shop(request).category(request.match_info["category_id"])
    return json_response({"ecommerce_category": category.to_json()})


async def _update_category(request: web.Request) -> web.Response:
    commerce = request.app[RUNTIME].store.ecommerce
    shop = _shop(request)
    category_id = request.match_info["category_id"]
    shop.category(category_id)
    category = commerce.update_category(shop, category_id, await _json_body(request))
    return json_response({"ecommerce_category": category.to_json()})


async def _create_product(request: web.Request) -> web.Response:
    commerce = request.app[RUNTIME].store.ecommerce
    shop = _shop(request)
    product = commerce.create_product(shop, await _json_body(request))
    return json_response({"ecommerce_product": product.to_json(shop.categories)})


async def _get_product(request: web.Request) -> web.Response:
    shop = _shop(request)
    product = shop.product(request.match_info["product_id"])
    return json_response({"ecommerce_product": product.to_json(shop.categories)})


async def _update_product(request: web.Request) -> web.Response:
    commerce = request.app[RUNTIME].store.ecommerce
    shop = _shop(request)
    product_id = request.match_info["product_id"]
    shop.product(product_id)
    product = commerce.update_product(shop, product_id, await _json_body(request))
    return json_response({"ecommerce_product": product.to_json(shop.categories)})


async def _create_variant(request: web.Request) -> web.Response:
    commerce = request.app[RUNTIME].store.ecommerce
    shop = _shop(request)
    product_id = request.match_info["product_id"]
    shop.product(product_id)
    variant = commerce.create_variant(shop, product_id, await _json_body(request))
    return json_response({"ecommerce_product_variant": variant.to_json()})


async def _get_variant(request: web.Request) -> web.Response:
    product = _shop(request).product(request.match_info["product_id"])
    variant = product.variant(request.match_info["variant_id"])
    return json_response({"ecommerce_product_variant": variant.to_json()})


async def _update_variant(request: web.Request) -> web.Response:
    commerce = request.app[RUNTIME].store.ecommerce
    shop = _shop(request)
    product_id, variant_id = request.match_info["product_id"], request.match_info["variant_id"]
    shop.product(product_id).variant(variant_id)
    variant = commerce.update_variant(shop, product_id, variant_id, await _json_body(request))
    return json_response({"ecommerce_product_variant": variant.to_json()})


async def _create_order(request: web.Request) -> web.Response:
    commerce = request.app[RUNTIME].store.ecommerce
    order = commerce.create_order(_shop(request), await _json_body(request))
    return json_response({"ecommerce_order": order.to_json()})


async def _update_order(request: web.Request) -> web.Response:
    commerce = request.app[RUNTIME].store.ecommerce
    shop = _shop(request)
    order_id = request.match_info["order_id"]
    shop.order(order_id)
    order = commerce.update_order(shop, order_id, await _json_body(request))
    return json_response({"ecommerce_order": order.to_json()})


# -- control endpoints ------------------------------------------------------------------

_FAULT_KNOBS: Final[dict[str, tuple[type, ...]]] = {
    "error_rate": (int, float),
    "latency": (int, float),
    "force_429": (int,),
    "retry_after": (bool,),
    "disabled": (bool,),
    "batch_delay": (int, float),
    "rate_limit": (int,),
    "rate_window": (int, float),
    "batch_status": (str, type(None)),
    "batch_stuck": (bool,),
    "batch_errors": (str,),
    "batch_id_missing": (bool,),
    "batch_poll_status": (int, type(None)),
    "non_json_rate": (int, float),
}


def _type_names(types: tuple[type, ...]) -> str:
    return "/".join("null" if t is type(None) else t.__name__ for t in types)


def _faults_json(config: SandboxConfig) -> dict[str, JSON]:
    return {name: getattr(config, name) for name in _FAULT_KNOBS}


async def _state(request: web.Request) -> web.Response:
    return json_response(request.app[RUNTIME].store.snapshot())


async def _requests(request: web.Request) -> web.Response:
    since_text = request.query.get("since")
    try:
        since = None if since_text is None else float(since_text)
    except ValueError:
        raise bad_request("since must be a number (monotonic seconds)") from None
    return json_response(request.app[RUNTIME].store.requests_json(since))


async def _get_faults(request: web.Request) -> web.Response:
    return json_response(_faults_json(request.app[RUNTIME].config))


async def _set_faults(request: web.Request) -> web.Response:
    """Change any of the fault knobs at run time; all are checked before any is set."""
    config = request.app[RUNTIME].config
    body = await _json_object(request)
    changes: dict[str, JSON] = {}
    for name, value in body.items():
        types = _FAULT_KNOBS.get(name)
        if types is None:
            raise bad_request(f"unknown knob {name!r}; knobs: {', '.join(_FAULT_KNOBS)}")
        if (bool not in types and isinstance(value, bool)) or not isinstance(value, types):
            raise bad_request(f"{name} must be of type {_type_names(types)}")
        changes[name] = value
    candidate = {**_faults_json(config), **changes}
    try:  # the config's own checks
        SandboxConfig(api_keys=config.api_keys, **candidate)
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    for name, value in changes.items():
        setattr(config, name, value)
    return json_response(_faults_json(config))


async def _add_subscription_type(request: web.Request) -> web.Response:
    """Add a subscription type (Gist's API cannot): ``{"name", "description"?, "status"?}``."""
    store = request.app[RUNTIME].store
    name, description, status = check_subscription_type(await _json_object(request))
    if any(t.name.lower() == name.lower() for t in store.subscription_types.values()):
        raise bad_request(f"a subscription type named {name!r} already exists")
    return json_response(store.add_subscription_type(name, description, status).to_json())


async def _reset(request: web.Request) -> web.Response:
    request.app[RUNTIME].reset()
    return json_response({"reset": True})


# -- the batch worker -------------------------------------------------------------------


async def _process_batches(rt: _Runtime) -> None:
    """Take queued batches in order: QUEUED for ``batch_delay`` (from when it was queued),
    then IN_PROGRESS for ``batch_delay``, then apply every contact and mark COMPLETED.

    While ``batch_status`` or ``batch_stuck`` is set, it waits before each chunk of
    contacts and before marking COMPLETED: nothing is applied, nothing completes."""
    store = rt.store
    while True:
        if not store.pending:
            rt.wake_worker.clear()
            await rt.wake_worker.wait()
            continue
        batch = store.pending[0]
        delay = rt.config.batch_delay
        await asyncio.sleep(max(0.0, batch.queued_at + delay - time.monotonic()))
        if not _current(store, batch):
            continue
        batch.status = "IN_PROGRESS"
        await asyncio.sleep(rt.config.batch_delay)
        for start in range(0, len(batch.contacts), _BATCH_CHUNK):
            if not await _unheld(rt, batch):
                break
            for index in range(start, min(start + _BATCH_CHUNK, len(batch.contacts))):
                try:
                    store.apply_batch_entry(batch, index)
                except Exception as exc:  # a sandbox bug: report it in the batch, go on
                    log.exception("gist sandbox: unhandled error applying a batch contact")
                    batch.errors.append({"index": index, "message": f"sandbox bug: {exc!r}"})
            await asyncio.sleep(0)  # let requests in between chunks
        if await _unheld(rt, batch):
            batch.status = "COMPLETED"
            batch.contacts = []  # keep only the outcome
            store.batch_done()


def _current(store: Store, batch: Batch) -> bool:
    """False once a reset dropped the batch."""
    return bool(store.pending) and store.pending[0] is batch


def _holding(config: SandboxConfig) -> bool:
    return config.batch_stuck or config.batch_status is not None


async def _unheld(rt: _Runtime, batch: Batch) -> bool:
    """Wait while a knob holds batches back; False once a reset dropped the batch.

    It polls: a test may set the knobs on the config directly, with no event to wake on."""
    while _holding(rt.config) and _current(rt.store, batch):  # noqa: ASYNC110 (see above)
        await asyncio.sleep(_HOLD_POLL)
    return _current(rt.store, batch)


async def _worker_ctx(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(_process_batches(app[RUNTIME]), name="gist-sandbox-batches")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


# -- assembling -------------------------------------------------------------------------


def create_app(config: SandboxConfig | None = None, store: Store | None = None) -> web.Application:
    """The sandbox as an aiohttp application (its batch worker runs while it is served)."""
    config = config if config is not None else SandboxConfig()
    app = web.Application(middlewares=[_middleware], client_max_size=256 * 1024 * 1024)
    if store is None:
        store = Store(subscription_types=config.subscription_types)
    app[RUNTIME] = _Runtime(config=config, store=store, rng=random.Random(config.seed))
    app.cleanup_ctx.append(_worker_ctx)
    r = app.router
    r.add_post("/contacts/batch", _queue_batch)
    r.add_get("/contacts/batch/{batch_id}", _batch_status, allow_head=False)
    r.add_post("/contacts", _upsert_contact)
    r.add_get("/contacts", _get_contacts, allow_head=False)
    r.add_delete("/contacts", _delete_contacts)
    r.add_get(r"/contacts/{contact_id:\d+}", _get_contact, allow_head=False)
    r.add_delete(r"/contacts/{contact_id:\d+}", _delete_contact)
    r.add_post("/events", _track_event)
    r.add_post("/tags", _post_tag)
    r.add_get("/tags", _list_tags, allow_head=False)
    r.add_get("/token/info", _token_info, allow_head=False)
    r.add_get("/subscription_types", _list_subscription_types, allow_head=False)
    r.add_get("/subscription_types/{type_id}", _get_subscription_type, allow_head=False)
    r.add_post("/subscription_types/{type_id}", _set_subscription)
    shops = "/ecommerce/stores"
    shop = shops + "/{store_id}"
    r.add_post(shops, _create_store)
    r.add_get(shops, _list_stores, allow_head=False)
    r.add_get(shop, _get_store, allow_head=False)
    r.add_patch(shop, _update_store)
    r.add_post(shop + "/customers", _create_customer)
    r.add_get(shop + "/customers/{customer_id}", _get_customer, allow_head=False)
    r.add_patch(shop + "/customers/{customer_id}", _update_customer)
    r.add_post(shop + "/customers/{customer_id}/cart", _put_cart)
    r.add_delete(shop + "/customers/{customer_id}/cart", _delete_cart)
    r.add_post(shop + "/categories", _create_category)
    r.add_get(shop + "/categories/{category_id}", _get_category, allow_head=False)
    r.add_patch(shop + "/categories/{category_id}", _update_category)
    r.add_post(shop + "/products", _create_product)
    r.add_get(shop + "/products/{product_id}", _get_product, allow_head=False)
    r.add_patch(shop + "/products/{product_id}", _update_product)
    r.add_post(shop + "/products/{product_id}/variants", _create_variant)
    r.add_get(shop + "/products/{product_id}/variants/{variant_id}", _get_variant, allow_head=False)
    r.add_patch(shop + "/products/{product_id}/variants/{variant_id}", _update_variant)
    r.add_post(shop + "/orders", _create_order)
    r.add_patch(shop + "/orders/{order_id}", _update_order)
    r.add_get(CONTROL_PREFIX + "state", _state, allow_head=False)
    r.add_get(CONTROL_PREFIX + "requests", _requests, allow_head=False)
    r.add_get(CONTROL_PREFIX + "faults", _get_faults, allow_head=False)
    r.add_post(CONTROL_PREFIX + "faults", _set_faults)
    r.add_post(CONTROL_PREFIX + "subscription_types", _add_subscription_type)
    r.add_post(CONTROL_PREFIX + "reset", _reset)
    return app


@dataclass
class Sandbox:
    """A running sandbox: where it listens and its live config and data."""

    url: str
    """The base URL, e.g. ``http://127.0.0.1:54321`` (no trailing slash)."""
    host: str
    port: int
    config: SandboxConfig
    store: Store
    app: web.Application

    async def wait_for_batches(self) -> None:
        """Return once every queued batch has completed (bound it with asyncio.timeout:
        while ``batch_status`` or ``batch_stuck`` holds the batches, that is never)."""
        await self.store.wait_idle()

    def reset(self) -> None:
        """The same as ``POST /_sandbox/reset``."""
        self.app[RUNTIME].reset()


@contextlib.asynccontextmanager
async def running_sandbox(
    config: SandboxConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[Sandbox]:
    """Serve a sandbox over real TCP for the duration of the ``async with`` block.

    ``port=0`` picks a free port; the yielded ``Sandbox.url`` says which."""
    config = config if config is not None else SandboxConfig()
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        yield Sandbox(
            url=f"http://{shown}:{bound_port}",
            host=bound_host,
            port=bound_port,
            config=config,
            store=app[RUNTIME].store,
            app=app,
        )
    finally:
        await runner.cleanup()
