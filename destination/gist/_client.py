"""An async client for the Gist REST API calls the destination makes.

Every request first takes a slot from the workspace's ``RateLimiter`` (retries and
batch-status polls included) in the lane of its ``priority`` (each call takes one,
keyword-only: ``NORMAL``, except ``batch_status`` and ``token_info``, ``CRITICAL``, and
the batch imports, ``HIGH``), is retried by ``RetryPolicy`` when the failure is
transient, and ends in a typed result or one of the errors in ``_errors``.

A caller that may change its mind (the pipeline, when a partition is revoked) passes a
``Dispatch``: it says whether a request of the call is on the wire, and withdrawing it
stops every request not yet sent (``Withdrawn``), retries included; one on the wire is
left to finish, so that what Gist did is known.
"""

from __future__ import annotations

import asyncio
import email.utils
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import orjson
import structlog

from destination import __version__
from destination.gist._errors import (
    UNEXPECTED_ANSWER_ATTEMPTS,
    CredentialsError,
    GistError,
    RateLimitedError,
    RetryableError,
    UnexpectedAnswerError,
    error_for_status,
)
from destination.gist._limiter import Budget, Priority, RateLimiter
from destination.gist._models import (
    BatchAccepted,
    BatchContactError,
    BatchStatus,
    CartPayload,
    ContactPayload,
    ContactRef,
    CustomerPayload,
    CustomerUpdate,
    EcommerceStore,
    EventPayload,
    JSONValue,
    OrderPayload,
    OrderUpdate,
    ProductPayload,
    ProductUpdate,
    StorePayload,
    SubscriptionType,
    TokenInfo,
    VariantPayload,
    VariantUpdate,
)
from destination.gist._retry import RetryPolicy
from destination.observability import log_events, metrics

log = structlog.get_logger(__name__)

DEFAULT_BASE_URL = "https://api.getgist.com"
USER_AGENT = f"gist-destination/{__version__} (+https://github.com/gist-destination)"

DEFAULT_TIMEOUT = httpx.Timeout(connect=5.0, read=30.0, write=30.0, pool=60.0)
"""Batch imports of a thousand contacts are large bodies; Gist answers them quickly
(the import itself is asynchronous), so 30 s without a byte means something is wrong."""


def attempt_deadline(timeout: httpx.Timeout) -> float | None:
    """The longest one attempt may take, answer read whole: httpx's time-outs bound each
    step (a connection, one write, one read), so an answer trickling a byte at a time,
    or a transport that never gives up, could hold its contacts' partitions forever.
    The sum of the steps' time-outs (a slow but live answer fits); None when one step
    has none."""
    parts = (timeout.pool, timeout.connect, timeout.write, timeout.read)
    if any(part is None for part in parts):
        return None
    return sum(part for part in parts if part is not None)


DEFAULT_LIMITS = httpx.Limits(max_connections=32, max_keepalive_connections=32)
"""The budget (100 requests / 10 s) is the bottleneck, not connections: a few dozen
keep-alive connections cover Gist's latency at that rate with room for slow answers."""


class GistClient:
    """One workspace, one key, one limiter::

    async with GistClient(api_key, limiter=RateLimiter()) as gist:
        info = await gist.token_info()
        accepted = await gist.import_contacts([{"email": "ada@example.com"}])
    """

    def __init__(
        self,
        api_key: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        limiter: Budget | None = None,
        retry: RetryPolicy | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        limits: httpx.Limits = DEFAULT_LIMITS,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not api_key or not api_key.strip():
            raise ValueError("a Gist API key is required")
        self.limiter: Budget = limiter or RateLimiter()
        self.retry = retry or RetryPolicy()
        self._deadline = attempt_deadline(timeout)
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={
                "Authorization": f"Bearer {api_key.strip()}",
                "Content-Type": "application/json",
                "Accept": "application/json",
                "User-Agent": USER_AGENT,
            },
            timeout=timeout,
            limits=limits,
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"GistClient(base_url={str(self._http.base_url)!r})"

    async def __aenter__(self) -> GistClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- operations -------------------------------------------------------------------
    async def token_info(self, *, priority: Priority = Priority.CRITICAL) -> TokenInfo:
        """``GET /token/info``: checks the key and tells the workspace it belongs to."""
        data = await self._request(
            "GET", "/token/info", "GET /token/info", parse=_json_object, priority=priority
        )
        return TokenInfo(
            workspace_id=str(data.get("workspace_id", "")),
            token_type=_opt_str(data.get("token_type")),
            app_id=_opt_str(data.get("app_id")),
            scope=_opt_str(data.get("scope")),
            raw=data,
        )

    async def upsert_contact(
        self, contact: ContactPayload, *, priority: Priority = Priority.NORMAL,
        dispatch: Dispatch | None = None,
    ) -> dict[str, JSONValue]:
        """``POST /contacts``: create or update one contact; returns the stored contact."""
        body = await self._request(
            "POST",
            "/contacts",
            "POST /contacts",
            content=_encode(contact),
            parse=_json_object,
            priority=priority,
            dispatch=dispatch,
        )
        return _object(body.get("contact"))

    async def import_contacts(
        self, contacts: Sequence[ContactPayload], *, priority: Priority = Priority.HIGH
    ) -> BatchAccepted:
        """``POST /contacts/batch``: queue an asynchronous import of many contacts."""
        return await self.import_encoded([_encode(c) for c in contacts], priority=priority)

    async def import_encoded(
        self,
        contacts: Sequence[bytes] | Callable[[], Sequence[bytes]],
        *,
        priority: Priority = Priority.HIGH,
        dispatch: Dispatch | None = None,
    ) -> BatchAccepted:
        """``import_contacts`` for contacts already encoded as JSON objects (the pipeline
        encodes each one on its own, so that one that cannot be encoded fails alone).
        ``contacts`` may be a callable, asked once the request has its slot (and again
        for each retry): the contacts still wanted then; none left is ``Withdrawn``.

        A 2xx answer without a ``batch_id`` (or not JSON) may mean Gist queued the
        contacts or not: ``UnexpectedAnswerError`` after a few tries (upserts are
        idempotent, so sending them again is safe)."""
        if not callable(contacts) and not contacts:
            raise ValueError("a batch import needs at least one contact")
        sent = 0

        def content() -> bytes | None:
            nonlocal sent
            wanted = contacts() if callable(contacts) else contacts
            sent = len(wanted)
            if not wanted:
                return None
            return b'{"contacts":[' + b",".join(wanted) + b"]}"

        def accepted(raw: bytes) -> BatchAccepted:
            body = _json_object(raw)
            batch_id = body.get("batch_id")
            if isinstance(batch_id, int) and not isinstance(batch_id, bool):
                batch_id = str(batch_id)
            if not isinstance(batch_id, str) or not batch_id:
                raise UnexpectedAnswerError(
                    "Gist accepted a batch import without a batch_id",
                    status=200,
                    body_excerpt=raw.decode(errors="replace"),
                )
            queued = body.get("queued_contacts")
            return BatchAccepted(
                batch_id=batch_id,
                queued_contacts=queued if isinstance(queued, int) else sent,
                status=str(body.get("status", "QUEUED")),
            )

        return await self._request(
            "POST",
            "/contacts/batch",
            "POST /contacts/batch",
            content=content,
            parse=accepted,
            priority=priority,
            dispatch=dispatch,
        )

    async def batch_status(
        self, batch_id: str, *, priority: Priority = Priority.CRITICAL
    ) -> BatchStatus:
        """``GET /contacts/batch/{id}``: where an import stands; errors once completed.

        One attempt (the caller polls again later): a failure raises, an answer that is
        not a JSON object is status ``UNREADABLE`` (not completed)."""

        def status(raw: bytes) -> BatchStatus:
            try:
                body = orjson.loads(raw) if raw else {}
            except orjson.JSONDecodeError:
                return BatchStatus(status="UNREADABLE")
            if not isinstance(body, dict):
                return BatchStatus(status="UNREADABLE")
            value = body.get("status")
            imported = body.get("imported_contacts")
            errors = body.get("errors")
            return BatchStatus(
                status=value if isinstance(value, str) else "UNREADABLE",
                imported_contacts=(
                    imported
                    if isinstance(imported, int) and not isinstance(imported, bool)
                    else None
                ),
                errors=tuple(_batch_error(e) for e in errors)
                if isinstance(errors, list)
                else (() if errors is None else (_batch_error(errors),)),
            )

        return await self._request(
            "GET",
            f"/contacts/batch/{quote(batch_id, safe='')}",
            "GET /contacts/batch/{id}",
            parse=status,
            retry=False,
            priority=priority,
        )

    async def get_contact(
        self,
        *,
        id: str | None = None,
        user_id: str | None = None,
        email: str | None = None,
        priority: Priority = Priority.NORMAL,
        dispatch: Dispatch | None = None,
    ) -> dict[str, JSONValue] | None:
        """Look one contact up by ``id``, ``user_id`` or ``email``; None when there is none."""
        path, params = _contact_address(id=id, user_id=user_id, email=email)
        body = await self._request(
            "GET",
            path,
            "GET /contacts",
            params=params,
            missing_ok=True,
            parse=_json_object,
            priority=priority,
            dispatch=dispatch,
        )
        return None if body is None else _object(body.get("contact"))

    async def delete_contact(
        self,
        *,
        id: str | None = None,
        user_id: str | None = None,
        email: str | None = None,
        priority: Priority = Priority.NORMAL,
        dispatch: Dispatch | None = None,
    ) -> bool:
        """Delete one contact; False when Gist had no such contact (already gone)."""
        path, params = _contact_address(id=id, user_id=user_id, email=email)
        found = await self._request(
            "DELETE",
            path,
            "DELETE /contacts",
            params=params,
            missing_ok=True,
            parse=_done,
            priority=priority,
            dispatch=dispatch,
        )
        return found is not None

    async def track_event(
        self, event: EventPayload, *, priority: Priority = Priority.NORMAL,
        dispatch: Dispatch | None = None,
    ) -> dict[str, JSONValue]:
        """``POST /events``: record one event on a contact; returns the stored event ({}
        when the answer does not say). A 2xx is success whatever its body (sending the
        event again would record it twice)."""
        body = await self._request(
            "POST",
            "/events",
            "POST /events",
            content=_encode(event),
            parse=_maybe_object,
            priority=priority,
            dispatch=dispatch,
        )
        return _object(body.get("event"))

    async def tag_contacts(
        self,
        tag: str,
        contacts: Sequence[ContactRef] | Callable[[], Sequence[ContactRef]],
        *,
        priority: Priority = Priority.NORMAL,
        dispatch: Dispatch | None = None,
    ) -> dict[str, JSONValue]:
        """``POST /tags``: tag (or, per ``untag`` in each ref, untag) up to ~50 contacts;
        returns the tag ({} when the answer does not say). ``contacts`` may be a
        callable, asked once the request has its slot: none left is ``Withdrawn``."""

        def content() -> bytes | None:
            wanted = contacts() if callable(contacts) else contacts
            if not wanted:
                return None
            return _encode({"name": tag, "contacts": list(wanted)})

        body = await self._request(
            "POST",
            "/tags",
            "POST /tags",
            content=content,
            parse=_maybe_object,
            priority=priority,
            dispatch=dispatch,
        )
        return _object(body.get("tag"))

    # --- e-commerce and subscription types ---------------------------------------------
    # A create answered 2xx succeeded whatever its body (sending it again would be a
    # 422 "already exists"); an update or delete answered 404 returns None / False: the
    # record (or its store) is not in Gist. Any other 404 is a PermanentError, status 404.

    async def list_stores(
        self, *, priority: Priority = Priority.NORMAL, dispatch: Dispatch | None = None
    ) -> list[EcommerceStore]:
        """The workspace's e-commerce stores (``GET /ecommerce/stores``, one request)."""
        body = await self._request(
            "GET",
            "/ecommerce/stores",
            "GET /ecommerce/stores",
            parse=_json_object,
            priority=priority,
            dispatch=dispatch,
        )
        stores = body.get("ecommerce_stores")
        if not isinstance(stores, list):
            raise UnexpectedAnswerError(
                "Gist listed the e-commerce stores without an ecommerce_stores list",
                status=200,
                method="GET",
                endpoint="GET /ecommerce/stores",
            )
        return [_ecommerce_store(raw) for raw in stores if isinstance(raw, dict)]

    async def find_store(
        self, domain: str, *, priority: Priority = Priority.NORMAL,
        dispatch: Dispatch | None = None,
    ) -> EcommerceStore | None:
        """The workspace's e-commerce store of ``domain`` (compared without scheme,
        ``www.``, case or trailing ``/``), None when there is none. Gist has no look-up
        by domain: one ``GET /ecommerce/stores`` lists them all."""
        wanted = _domain_key(domain)
        for store in await self.list_stores(priority=priority, dispatch=dispatch):
            if _domain_key(store.domain) == wanted:
                return store
        return None

    async def create_store(
        self, store: StorePayload, *, priority: Priority = Priority.NORMAL,
        dispatch: Dispatch | None = None,
    ) -> EcommerceStore:
        """``POST /ecommerce/stores``. A domain the workspace has already is a
        ``PermanentError`` (422): ``find_store`` finds that store, also when the answer
        to a create was lost and its retry was refused."""

        def created(raw: bytes) -> EcommerceStore:
            answer = _json_object(raw).get("ecommerce_store")
            if not isinstance(answer, dict) or answer.get("store_id") in (None, ""):
                raise UnexpectedAnswerError(
                    "Gist created a store without saying its store_id",
                    status=200,
                    body_excerpt=raw.decode(errors="replace"),
                )
            return _ecommerce_store(answer)

        return await self._request(
            "POST",
            "/ecommerce/stores",
            "POST /ecommerce/stores",
            content=_encode(store),
            parse=created,
            priority=priority,
            dispatch=dispatch,
        )

    async def create_customer(
        self, store_id: str | int, customer: CustomerPayload, *,
        priority: Priority = Priority.NORMAL, dispatch: Dispatch | None = None,
    ) -> dict[str, JSONValue]:
        """``POST /ecommerce/stores/{store_id}/customers``: adds the customer, and adds
        or updates the contact of its ``email_address``; returns the stored customer."""
        return await self._ecommerce_create(
            f"{_store_path(store_id)}/customers",
            "POST /ecommerce/stores/{id}/customers", customer, "ecommerce_customer",
            priority=priority, dispatch=dispatch,
        )

    async def update_customer(
        self, store_id: str | int, customer_id: str, customer: CustomerUpdate, *,
        priority: Priority = Priority.NORMAL, dispatch: Dispatch | None = None,
    ) -> dict[str, JSONValue] | None:
        """``PATCH .../customers/{customer_id}``; None when Gist has no such customer."""
        return await self._ecommerce_update(
            f"{_store_path(store_id)}/customers/{_segment(customer_id)}",
            "PATCH /ecommerce/stores/{id}/customers/{id}", customer, "ecommerce_customer",
            priority=priority, dispatch=dispatch,
        )

    async def create_product(
        self, store_id: str | int, product: ProductPayload, *,
        priority: Priority = Priority.NORMAL, dispatch: Dispatch | None = None,
    ) -> dict[str, JSONValue]:
        """``POST /ecommerce/stores/{store_id}/products``; returns the stored product."""
        return await self._ecommerce_create(
            f"{_store_path(store_id)}/products",
            "POST /ecommerce/stores/{id}/products", product, "ecommerce_product",
            priority=priority, dispatch=dispatch,
        )

    async def update_product(
        self, store_id: str | int, product_id: str, product: ProductUpdate, *,
        priority: Priority = Priority.NORMAL, dispatch: Dispatch | None = None,
    ) -> dict[str, JSONValue] | None:
        """``PATCH .../products/{product_id}``; None when Gist has no such product."""
        return await self._ecommerce_update(
            f"{_store_path(store_id)}/products/{_segment(product_id)}",
            "PATCH /ecommerce/stores/{id}/products/{id}", product, "ecommerce_product",
            priority=priority, dispatch=dispatch,
        )

    async def create_variant(
        self, store_id: str | int, product_id: str, variant: VariantPayload, *,
        priority: Priority = Priority.NORMAL, dispatch: Dispatch | None = None,
    ) -> dict[str, JSONValue]:
        """``POST .../products/{product_id}/variants``; returns the stored variant."""
        return await self._ecommerce_create(
            f"{_store_path(store_id)}/products/{_segment(product_id)}/variants",
            "POST /ecommerce/stores/{id}/products/{id}/variants", variant,
            "ecommerce_product_variant", priority=priority, dispatch=dispatch,
        )

    async def update_variant(
        self, store_id: str | int, product_id: str, variant_id: str, variant: VariantUpdate,
        *, priority: Priority = Priority.NORMAL, dispatch: Dispatch | None = None,
    ) -> dict[str, JSONValue] | None:
        """``PATCH .../products/{product_id}/variants/{variant_id}``; None when Gist has
        no such product or variant."""
        path = (
            f"{_store_path(store_id)}/products/{_segment(product_id)}"
            f"/variants/{_segment(variant_id)}"
        )
        return await self._ecommerce_update(
            path, "PATCH /ecommerce/stores/{id}/products/{id}/variants/{id}",
            variant, "ecommerce_product_variant", priority=priority, dispatch=dispatch,
        )

    async def upsert_cart(
        self, store_id: str | int, customer_id: str, cart: CartPayload, *,
        priority: Priority = Priority.NORMAL, dispatch: Dispatch | None = None,
    ) -> dict[str, JSONValue]:
        """``POST .../customers/{customer_id}/cart``: the customer's whole cart, replacing
        the one it had; returns the stored cart. An unknown customer is a
        ``PermanentError`` with status 404 (create the customer first)."""
        return await self._ecommerce_create(
            f"{_store_path(store_id)}/customers/{_segment(customer_id)}/cart",
            "POST /ecommerce/stores/{id}/customers/{id}/cart", cart, "ecommerce_cart",
            priority=priority, dispatch=dispatch,
        )

    async def delete_cart(
        self, store_id: str | int, customer_id: str, *,
        priority: Priority = Priority.NORMAL, dispatch: Dispatch | None = None,
    ) -> bool:
        """``DELETE .../customers/{customer_id}/cart``; False when there was no cart (or
        no such customer): already gone."""
        found = await self._request(
            "DELETE",
            f"{_store_path(store_id)}/customers/{_segment(customer_id)}/cart",
            "DELETE /ecommerce/stores/{id}/customers/{id}/cart",
            missing_ok=True,
            parse=_done,
            priority=priority,
            dispatch=dispatch,
        )
        return found is not None

    async def create_order(
        self, store_id: str | int, order: OrderPayload, *,
        priority: Priority = Priority.NORMAL, dispatch: Dispatch | None = None,
    ) -> dict[str, JSONValue]:
        """``POST /ecommerce/stores/{store_id}/orders``: Gist adds ``order_total`` to the
        contact's lifetime value; returns the stored order. An unknown customer,
        product or variant is a ``PermanentError`` with status 404."""
        return await self._ecommerce_create(
            f"{_store_path(store_id)}/orders",
            "POST /ecommerce/stores/{id}/orders", order, "ecommerce_order",
            priority=priority, dispatch=dispatch,
        )

    async def update_order(
        self, store_id: str | int, order_id: str, order: OrderUpdate, *,
        priority: Priority = Priority.NORMAL, dispatch: Dispatch | None = None,
    ) -> dict[str, JSONValue] | None:
        """``PATCH .../orders/{order_id}`` (a payment, a refund with ``refund_amount``,
        a cancellation with ``cancelled_at``, ...); None when Gist has no such order."""
        return await self._ecommerce_update(
            f"{_store_path(store_id)}/orders/{_segment(order_id)}",
            "PATCH /ecommerce/stores/{id}/orders/{id}", order, "ecommerce_order",
            priority=priority, dispatch=dispatch,
        )

    async def list_subscription_types(
        self, *, priority: Priority = Priority.NORMAL, dispatch: Dispatch | None = None
    ) -> list[SubscriptionType]:
        """Every subscription type of the workspace (``GET /subscription_types``, one
        request per page, following ``pages.next``)."""
        found: list[SubscriptionType] = []
        page = 1
        for _ in range(MAX_PAGES):
            body = await self._request(
                "GET",
                "/subscription_types",
                "GET /subscription_types",
                params={"page": str(page)},
                parse=_json_object,
                priority=priority,
                dispatch=dispatch,
            )
            entries = body.get("subscription_types")
            if not isinstance(entries, list):
                raise UnexpectedAnswerError(
                    "Gist listed subscription types without a subscription_types list",
                    status=200,
                    method="GET",
                    endpoint="GET /subscription_types",
                )
            found.extend(_subscription_type(raw) for raw in entries)
            following = _next_page(body.get("pages"))
            if following is None or following <= page or not entries:
                break
            page = following
        return found

    async def set_subscription(
        self,
        subscription_type_id: int | str,
        *,
        subscribed: bool,
        user_id: str | None = None,
        email: str | None = None,
        contact_id: str | None = None,
        priority: Priority = Priority.NORMAL,
        dispatch: Dispatch | None = None,
    ) -> dict[str, JSONValue] | None:
        """``POST /subscription_types/{id}``: subscribe (``subscribed=True``) or
        unsubscribe the contact Gist finds by ``user_id``, then ``email``, then
        ``contact_id``; returns the contact ({} when the answer does not say), None when
        Gist has no such contact (or type: ``list_subscription_types`` tells which exist).
        Gist does not create the contact."""
        if user_id is None and email is None and contact_id is None:
            raise ValueError("a subscription names the contact by user_id, email or contact_id")
        payload: dict[str, JSONValue] = {"subscribed_status": subscribed}
        for key, value in (("user_id", user_id), ("email", email), ("contact_id", contact_id)):
            if value is not None:
                payload[key] = value
        body = await self._request(
            "POST",
            f"/subscription_types/{_segment(str(subscription_type_id))}",
            "POST /subscription_types/{id}",
            content=_encode(payload),
            missing_ok=True,
            parse=_maybe_object,
            priority=priority,
            dispatch=dispatch,
        )
        return None if body is None else _object(body.get("contact"))

    async def _ecommerce_create(
        self, path: str, endpoint: str, payload: Mapping[str, Any], key: str, *,
        priority: Priority, dispatch: Dispatch | None,
    ) -> dict[str, JSONValue]:
        """One e-commerce ``POST``: the record under ``key`` in the answer ({} when the
        answer does not say: a 2xx is success)."""
        body = await self._request(
            "POST",
            path,
            endpoint,
            content=_encode(payload),
            parse=_maybe_object,
            priority=priority,
            dispatch=dispatch,
        )
        return _object(body.get(key))

    async def _ecommerce_update(
        self, path: str, endpoint: str, payload: Mapping[str, Any], key: str, *,
        priority: Priority, dispatch: Dispatch | None,
    ) -> dict[str, JSONValue] | None:
        """One e-commerce ``PATCH``: as ``_ecommerce_create``, None for a 404."""
        body = await self._request(
            "PATCH",
            path,
            endpoint,
            content=_encode(payload),
            missing_ok=True,
            parse=_maybe_object,
            priority=priority,
            dispatch=dispatch,
        )
        return None if body is None else _object(body.get(key))

    # --- transport --------------------------------------------------------------------
    async def _request(
        self,
        method: str,
        path: str,
        endpoint: str,
        *,
        parse: Callable[[bytes], _T],
        content: bytes | Callable[[], bytes | None] | None = None,
        params: dict[str, str] | None = None,
        missing_ok: bool = False,
        retry: bool = True,
        priority: Priority = Priority.NORMAL,
        dispatch: Dispatch | None = None,
    ) -> _T:
        """One logical call: limiter slot (in the lane of ``priority``, retries too), send,
        classify, ``parse`` a 2xx body; retried while transient (unless ``retry`` is
        False). A 404 with ``missing_ok`` gives None. ``content`` may be a callable, made
        once the slot is granted (each attempt: the body is what is wanted at the time it
        goes); it returns None when nothing is left to send (``Withdrawn``)."""
        started = time.monotonic()
        attempt = 0
        unexpected = 0  # answers that could not be used, of the attempts
        while True:
            attempt += 1
            if dispatch is not None:
                while True:
                    if dispatch.withdrawn:
                        raise Withdrawn()
                    await dispatch.until_open()
                    if dispatch.withdrawn:
                        raise Withdrawn()
                    grant = await self.limiter.acquire(priority)
                    if dispatch.open() or dispatch.withdrawn:
                        break
                    self.limiter.release(grant)  # paused while it waited: wait again
            else:
                grant = await self.limiter.acquire(priority)
            metrics.RATE_LIMIT_WAIT.observe(grant.waited)
            try:
                try:
                    body = content() if callable(content) else content
                    if (dispatch is not None and dispatch.withdrawn) or (
                        body is None and callable(content)
                    ):
                        raise Withdrawn()
                    if dispatch is not None:
                        dispatch.on_wire = dispatch.sent = True
                    raw = await self._send(method, path, endpoint, body, params, missing_ok)
                finally:
                    if dispatch is not None:
                        dispatch.on_wire = False
                    self.limiter.release(grant)  # answered (or failed): Gist counted it
                if raw is None:
                    return None  # type: ignore[return-value]
                try:
                    return parse(raw)
                except UnexpectedAnswerError as error:
                    error.method, error.endpoint = method, endpoint
                    unexpected += 1
                    raise
            except RetryableError as error:
                error.attempts = attempt
                if isinstance(error, RateLimitedError):
                    self.limiter.on_rate_limited(error.retry_after, self.retry.delay(attempt))
                    metrics.RATE_LIMITED.inc()
                elif dispatch is not None and dispatch.sent:
                    dispatch.unanswered = True  # Gist may have acted on it (a 429 did not)
                if (
                    not retry
                    or self.retry.gives_up(attempt, time.monotonic() - started)
                    or unexpected >= UNEXPECTED_ANSWER_ATTEMPTS
                ):
                    raise
                reason = (
                    "unexpected_answer"
                    if isinstance(error, UnexpectedAnswerError)
                    else str(error.status)
                    if error.status is not None
                    else "network"
                )
                metrics.GIST_RETRIES.labels(endpoint, reason).inc()
                delay = self.retry.delay(attempt)
                if error.retry_after is not None:
                    delay = max(delay, error.retry_after)
                if attempt == 1 or attempt % 10 == 0:  # visible, not one line per try
                    log.warning(
                        log_events.GIST_RETRYING,
                        endpoint=endpoint,
                        reason=reason,
                        attempt=attempt,
                        retry_in=round(delay, 2),
                    )
                await asyncio.sleep(delay)
            except GistError as error:
                error.attempts = attempt
                if isinstance(error, CredentialsError):
                    metrics.CREDENTIALS_REJECTED.inc()
                raise

    async def _send(
        self,
        method: str,
        path: str,
        endpoint: str,
        content: bytes | None,
        params: dict[str, str] | None,
        missing_ok: bool,
    ) -> bytes | None:
        """A 2xx answer's body; None for a 404 when ``missing_ok``; else an error."""
        sent = time.monotonic()
        try:
            async with asyncio.timeout(self._deadline):
                response = await self._http.request(method, path, content=content, params=params)
        except (httpx.TimeoutException, TimeoutError) as exc:
            # TimeoutError: the whole attempt outlasted its deadline (``attempt_deadline``)
            what = type(exc).__name__ if isinstance(exc, httpx.TimeoutException) else "Deadline"
            metrics.GIST_REQUESTS.labels(endpoint, "error").inc()
            _log_request(endpoint, what, sent)
            raise RetryableError(
                f"Gist did not answer in time ({what})",
                method=method,
                endpoint=endpoint,
            ) from None
        except httpx.TransportError as exc:
            metrics.GIST_REQUESTS.labels(endpoint, "error").inc()
            _log_request(endpoint, type(exc).__name__, sent)
            raise RetryableError(
                f"could not reach Gist ({type(exc).__name__})", method=method, endpoint=endpoint
            ) from None
        try:
            status = response.status_code
            metrics.GIST_REQUESTS.labels(endpoint, str(status)).inc()
            metrics.GIST_REQUEST_DURATION.labels(endpoint).observe(time.monotonic() - sent)
            _log_request(endpoint, status, sent)
            if 200 <= status < 300:
                return response.content
            if status == 404 and missing_ok:
                return None
            raise error_for_status(
                status,
                method=method,
                endpoint=endpoint,
                body=response.text,
                retry_after=_retry_after(response.headers.get("Retry-After")),
            )
        finally:
            _release(response)


_T = TypeVar("_T")


class Withdrawn(Exception):
    """The caller withdrew the call (``Dispatch.withdraw``) before its request went out:
    Gist was not asked (a request already answered stays answered)."""


class Dispatch:
    """One call's requests, as the caller sees them::

        dispatch = Dispatch()
        task = asyncio.create_task(gist.track_event(event, dispatch=dispatch))
        ...
        dispatch.withdraw()          # nothing more goes out for it
        if dispatch.on_wire:         # a request is out: its answer tells what Gist did
            await task
        else:
            task.cancel()            # waiting for a slot or a retry: nothing was sent

    ``sent``: some request of the call went out (Gist may have acted on it);
    ``unanswered``: one went out and was tried again without an answer that says what
    Gist did (a time-out, a lost connection, a 5xx, an answer it could not use): Gist may
    have acted on that one too, whatever the call returns. ``gates``:
    events that must all be set for a request to go (each attempt waits for them before
    taking a slot of the budget, and gives an unused slot back if one was cleared
    meanwhile): the caller pauses its requests by clearing one."""

    __slots__ = ("gates", "on_wire", "sent", "unanswered", "withdrawn")

    def __init__(self, gates: tuple[asyncio.Event, ...] = ()) -> None:
        self.on_wire = False
        self.sent = False
        self.unanswered = False
        self.withdrawn = False
        self.gates = gates

    def open(self) -> bool:
        return all(gate.is_set() for gate in self.gates)

    async def until_open(self) -> None:
        for gate in self.gates:
            await gate.wait()

    def withdraw(self) -> None:
        self.withdrawn = True


def _log_request(endpoint: str, status: int | str, sent: float) -> None:
    """The DEBUG line of one request, in place of httpx's (``observability.logging``):
    the endpoint as a template (``GET /contacts``), never the path's ids or the query,
    which name the contact."""
    log.debug(
        log_events.GIST_REQUEST,
        endpoint=endpoint,
        status=status,
        seconds=round(time.monotonic() - sent, 3),
    )


def _release(response: httpx.Response) -> None:
    """Let a read response go now, not at the next full garbage collection.

    httpx 0.28 ties each response to its body stream both ways (``BoundAsyncStream``
    keeps the response; encode/httpx#3733), so a response, its request and the request's
    body are freed only by the cyclic collector. A request in flight a while outlives
    the young generations, and the worker's thresholds (``commands/run.py``) make full
    collections minutes apart: measured at the real limit, 70 batch imports of ~170 kB
    each alive at once and RSS growing 1.5 MB/s for three minutes. The body has been
    read (``request`` reads it whole), so the stream is done with."""
    response.stream = httpx.ByteStream(b"")


def _encode(payload: Any) -> bytes:
    """JSON for a request body. A value JSON cannot carry (an integer beyond 64 bits) is
    a bug upstream, not Gist's: ``TypeError`` (the pipeline dead-letters the message with
    ``internal_error``)."""
    try:
        return orjson.dumps(payload)
    except orjson.JSONEncodeError as exc:
        raise TypeError(f"cannot encode the request body: {exc}") from None


def _json_object(raw: bytes) -> dict[str, JSONValue]:
    """A 2xx body that must be a JSON object (an empty body is an empty object)."""
    if not raw:
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UnexpectedAnswerError(
            "Gist answered with a body that is not JSON",
            status=200,
            body_excerpt=raw.decode(errors="replace"),
        ) from None
    return body if isinstance(body, dict) else {}


def _maybe_object(raw: bytes) -> dict[str, JSONValue]:
    """A 2xx body read if it is a JSON object, else {}: the call succeeded either way."""
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        return {}
    return body if isinstance(body, dict) else {}


def _done(raw: bytes) -> bool:
    """A 2xx is all the call needs: the body is not read."""
    return True


def _contact_address(
    *, id: str | None, user_id: str | None, email: str | None
) -> tuple[str, dict[str, str] | None]:
    if id is not None:
        return f"/contacts/{quote(str(id), safe='')}", None
    if user_id is not None:
        return "/contacts", {"user_id": user_id}
    if email is not None:
        return "/contacts", {"email": email}
    raise ValueError("a contact is addressed by id, user_id or email")


MAX_RETRY_AFTER = 300.0
"""A longer ``Retry-After`` is taken as this: one odd header must not stop every sender
of the workspace for hours."""


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds (a number or an HTTP date), at most ``MAX_RETRY_AFTER``."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if seconds != seconds:  # NaN
        return None
    return min(MAX_RETRY_AFTER, max(0.0, seconds))


def _object(value: Any) -> dict[str, JSONValue]:
    return value if isinstance(value, dict) else {}


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _batch_error(raw: Any) -> BatchContactError:
    if not isinstance(raw, dict):
        return BatchContactError(message=str(raw)[:300])
    index = raw.get("index")
    email_value = raw.get("email")
    user_id = raw.get("user_id")
    return BatchContactError(
        message=str(raw.get("message") or raw.get("error") or "contact not imported")[:300],
        index=index if isinstance(index, int) else None,
        email=email_value if isinstance(email_value, str) else None,
        user_id=None if user_id is None else str(user_id),
    )


# --- e-commerce and subscription types --------------------------------------------------

MAX_PAGES = 100
"""A list followed page by page stops here: an answer whose ``next`` never ends must not
spend the workspace's budget."""

_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://")


def _segment(value: str) -> str:
    """One path segment: an id as text, every reserved character escaped."""
    return quote(value, safe="")


def _store_path(store_id: str | int) -> str:
    return f"/ecommerce/stores/{_segment(str(store_id))}"


def _domain_key(domain: str) -> str:
    """A store's domain as compared: no scheme, no ``www.``, no trailing ``/``, lower case
    (``https://www.Example.com/`` is ``example.com``)."""
    key = _SCHEME.sub("", domain.strip().lower()).rstrip("/")
    return key.removeprefix("www.")


def _ecommerce_store(raw: dict[str, Any]) -> EcommerceStore:
    return EcommerceStore(
        store_id=str(raw.get("store_id", "")),
        domain=str(raw.get("domain", "")),
        name=_opt_str(raw.get("name")),
        currency_code=_opt_str(raw.get("currency_code")),
        status=_opt_str(raw.get("status")),
        raw=raw,
    )


def _subscription_type(raw: Any) -> SubscriptionType:
    type_id = raw.get("id") if isinstance(raw, dict) else None
    if isinstance(type_id, str) and type_id.isdigit():
        type_id = int(type_id)
    if not isinstance(type_id, int) or isinstance(type_id, bool):
        raise UnexpectedAnswerError(
            "Gist listed a subscription type without an integer id",
            status=200,
            body_excerpt=str(raw),
            method="GET",
            endpoint="GET /subscription_types",
        )
    assert isinstance(raw, dict)
    count, order = raw.get("people_count"), raw.get("display_order")
    return SubscriptionType(
        id=type_id,
        name=str(raw.get("name", "")),
        description=_opt_str(raw.get("description")),
        status=_opt_str(raw.get("status")),
        people_count=count if isinstance(count, int) and not isinstance(count, bool) else None,
        display_order=order if isinstance(order, int) and not isinstance(order, bool) else None,
    )


def _next_page(pages: Any) -> int | None:
    """The page number of ``pages.next`` (a URL, as the reference's lists give it)."""
    if not isinstance(pages, dict) or not isinstance(pages.get("next"), str):
        return None
    values = parse_qs(urlsplit(pages["next"]).query).get("page")
    if not values or not values[0].isdigit():
        return None
    return int(values[0])
