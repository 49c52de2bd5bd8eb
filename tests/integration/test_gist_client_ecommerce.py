"""``GistClient``'s e-commerce and subscription-type calls against the Gist sandbox over
real HTTP: what each sends and returns, how a 404 reads, what is retried and what is not,
and that each takes its limiter slot in its lane and honours a ``Dispatch``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from prometheus_client import REGISTRY

from destination.devtools.sandbox import Sandbox, SandboxConfig
from destination.gist import (
    CartPayload,
    CustomerPayload,
    Dispatch,
    EcommerceStore,
    GistClient,
    Grant,
    OrderPayload,
    PermanentError,
    Priority,
    ProductPayload,
    RateLimiter,
    RetryPolicy,
    StorePayload,
    SubscriptionType,
    VariantPayload,
    Withdrawn,
)

KEY = "sk-live-do-not-leak-ecom-51c2"
FAST = RetryPolicy(base=0.01, cap=0.05, max_elapsed=10.0)

STORE: StorePayload = {
    "name": "Voice Out",
    "domain": "https://example.com",
    "currency_code": "USD",
    "abandon_cart_interval": 1,
}
CUSTOMER: CustomerPayload = {
    "customer_id": "1234",
    "email_address": "ada@example.com",
    "first_name": "Ada",
    "last_name": "Lovelace",
    "billing_address": {"address1": "969 Market", "postcode": "94103", "country": "US"},
}
PRODUCT: ProductPayload = {"product_id": "12", "title": "Washer", "price": 300}
VARIANT: VariantPayload = {"product_variant_id": "24", "title": "Washer, white", "price": "310.5"}
CART: CartPayload = {
    "currency_code": "USD",
    "order_total": 310.5,
    "line_items": [{"product_id": "12", "product_variant_id": "24", "quantity": 1, "price": 310.5}],
}
ORDER: OrderPayload = {
    "order_id": "o-1",
    "customer_id": "1234",
    "currency_code": "USD",
    "order_total": 100,
    "processed_at": "2017-03-22T16:28:02",
    "line_items": [{"product_id": "12", "quantity": 1, "price": 100}],
}


class LaneRecorder(RateLimiter):
    """A real limiter that also keeps the priority of every slot asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.lanes: list[Priority] = []

    async def acquire(self, priority: Priority = Priority.NORMAL) -> Grant:
        self.lanes.append(priority)
        return await super().acquire(priority)


@pytest.fixture
def sandbox_config() -> SandboxConfig:
    return SandboxConfig(api_keys=frozenset({KEY}), batch_delay=0.05, seed=0)


@pytest.fixture
async def gist(sandbox: Sandbox) -> AsyncIterator[GistClient]:
    async with GistClient(KEY, base_url=sandbox.url, retry=FAST, limiter=LaneRecorder()) as client:
        yield client


def requests(sandbox: Sandbox) -> list[tuple[str, str, int]]:
    """Method, path and status of every API request the sandbox answered, in order."""
    return [(method, path, status) for _, method, path, status in sandbox.store.requests]


def lanes(gist: GistClient) -> list[Priority]:
    assert isinstance(gist.limiter, LaneRecorder)
    return gist.limiter.lanes


async def seeded(gist: GistClient, sandbox: Sandbox, *, orders: bool = False) -> str:
    """A store with a customer, a product and its variant (and, with ``orders``, a cart
    and an order); the store's id. The requests and lanes so far are forgotten."""
    store = await gist.create_store(STORE)
    await gist.create_customer(store.store_id, CUSTOMER)
    await gist.create_product(store.store_id, PRODUCT)
    await gist.create_variant(store.store_id, "12", VARIANT)
    if orders:
        await gist.upsert_cart(store.store_id, "1234", CART)
        await gist.create_order(store.store_id, ORDER)
    sandbox.store.requests.clear()
    lanes(gist).clear()
    return store.store_id


def ltv(sandbox: Sandbox, email: str = "ada@example.com") -> dict[str, float]:
    contact = sandbox.store.find_contact(email=email)
    assert contact is not None
    return {
        currency: float(value) for currency, value in sandbox.store.lifetime_value(contact).items()
    }


# --- stores ---------------------------------------------------------------------------


async def test_find_store_lists_the_stores_and_matches_the_domain(
    gist: GistClient, sandbox: Sandbox
) -> None:
    assert await gist.find_store("example.com") is None
    created = await gist.create_store(STORE)
    assert isinstance(created, EcommerceStore)
    assert created.store_id == str(sandbox.store.ecommerce.stores[1].id)
    assert (created.domain, created.name, created.currency_code, created.status) == (
        "https://example.com",
        "Voice Out",
        "USD",
        "disconnected",
    )
    await gist.create_store({**STORE, "name": "Other", "domain": "shop.example.org"})
    for spelling in ("example.com", "HTTP://www.example.com/", "https://Example.com"):
        found = await gist.find_store(spelling)
        assert found is not None, spelling
        assert found.store_id == created.store_id
        assert found.raw["abandon_cart_interval"] == 1
    assert await gist.find_store("example.co") is None
    other = await gist.find_store("https://shop.example.org")
    assert other is not None
    assert other.name == "Other"
    assert [(m, p) for m, p, _ in requests(sandbox)].count(("GET", "/ecommerce/stores")) == 6


async def test_creating_a_store_whose_domain_is_taken_is_permanent_and_not_retried(
    gist: GistClient, sandbox: Sandbox
) -> None:
    await gist.create_store(STORE)
    with pytest.raises(PermanentError) as caught:
        await gist.create_store({**STORE, "domain": "www.example.com"})
    assert caught.value.status == 422
    assert "store_exists" in caught.value.body_excerpt
    assert caught.value.attempts == 1
    assert [s for _, _, s in requests(sandbox)] == [200, 422]


async def test_a_lost_store_answer_ends_in_a_refused_retry_and_find_store_finds_it(
    gist: GistClient, sandbox: Sandbox
) -> None:
    """The first create is applied but its answer is not JSON (no store_id): the client
    tries again, and Gist refuses the domain it already has."""
    sandbox.config.non_json_rate = 1.0
    with pytest.raises(PermanentError) as caught:
        await gist.create_store(STORE)
    assert caught.value.status == 422
    assert "store_exists" in caught.value.body_excerpt
    assert caught.value.attempts == 2
    assert [s for _, _, s in requests(sandbox)] == [200, 422]
    assert len(sandbox.store.ecommerce.stores) == 1
    sandbox.config.non_json_rate = 0.0
    found = await gist.find_store("example.com")
    assert found is not None
    assert found.store_id == "1"


# --- customers, products, variants ------------------------------------------------------


async def test_customers_are_created_and_updated_and_tie_their_contact(
    gist: GistClient, sandbox: Sandbox
) -> None:
    store = await gist.create_store(STORE)
    customer = await gist.create_customer(store.store_id, CUSTOMER)
    assert customer == {**CUSTOMER, "shipping_address": None}
    contact = sandbox.store.find_contact(email="ada@example.com")
    assert contact is not None
    assert contact.name == "Ada Lovelace"

    updated = await gist.update_customer(store.store_id, "1234", {"first_name": "Augusta"})
    assert updated is not None
    assert (updated["first_name"], updated["email_address"]) == ("Augusta", "ada@example.com")
    assert contact.name == "Augusta Lovelace"
    assert await gist.update_customer(store.store_id, "nobody", {"first_name": "X"}) is None
    assert await gist.update_customer("999", "1234", {"first_name": "X"}) is None

    with pytest.raises(PermanentError) as unknown_store:
        await gist.create_customer("999", {**CUSTOMER, "customer_id": "2"})
    assert unknown_store.value.status == 404
    assert "store_not_found" in unknown_store.value.body_excerpt
    with pytest.raises(PermanentError) as missing:
        await gist.create_customer(store.store_id, {"customer_id": "3"})  # type: ignore[typeddict-item]
    assert missing.value.status == 400
    assert "email_address is required" in missing.value.body_excerpt


async def test_products_and_variants_are_created_and_updated(
    gist: GistClient, sandbox: Sandbox
) -> None:
    store = await gist.create_store(STORE)
    product = await gist.create_product(store.store_id, PRODUCT)
    assert (product["product_id"], product["title"], product["price"]) == ("12", "Washer", 300)
    updated = await gist.update_product(store.store_id, "12", {"inventory_quantity": 4})
    assert updated is not None
    assert (updated["inventory_quantity"], updated["title"]) == (4, "Washer")
    assert await gist.update_product(store.store_id, "13", {"title": "x"}) is None

    variant = await gist.create_variant(store.store_id, "12", VARIANT)
    assert (variant["product_id"], variant["product_variant_id"]) == ("12", "24")
    assert variant["price"] == "310.5"  # as sent
    changed = await gist.update_variant(store.store_id, "12", "24", {"sku": "W-24"})
    assert changed is not None
    assert changed["sku"] == "W-24"
    assert await gist.update_variant(store.store_id, "12", "25", {"sku": "x"}) is None
    assert await gist.update_variant(store.store_id, "13", "24", {"sku": "x"}) is None
    with pytest.raises(PermanentError) as no_product:
        await gist.create_variant(store.store_id, "13", VARIANT)
    assert no_product.value.status == 404
    assert "product_not_found" in no_product.value.body_excerpt
    stored = sandbox.store.ecommerce.stores[int(store.store_id)].products["12"]
    assert stored.variants["24"].fields["sku"] == "W-24"


async def test_ids_are_escaped_in_paths(gist: GistClient, sandbox: Sandbox) -> None:
    store = await gist.create_store(STORE)
    odd = "a b?c#d%e"
    await gist.create_customer(store.store_id, {**CUSTOMER, "customer_id": odd})
    updated = await gist.update_customer(store.store_id, odd, {"last_name": "L"})
    assert updated is not None
    assert updated["customer_id"] == odd
    assert await gist.upsert_cart(store.store_id, odd, {**CART, "line_items": []})
    assert await gist.delete_cart(store.store_id, odd) is True


# --- carts ------------------------------------------------------------------------------


async def test_a_cart_is_sent_whole_and_deleted(gist: GistClient, sandbox: Sandbox) -> None:
    store_id = await seeded(gist, sandbox)
    cart = await gist.upsert_cart(store_id, "1234", {**CART, "checkout_url": "https://x/c/1"})
    assert cart["customer"]["customer_id"] == "1234"
    assert cart["checkout_url"] == "https://x/c/1"
    replaced = await gist.upsert_cart(store_id, "1234", CART)
    assert replaced["checkout_url"] is None  # the whole cart: what is left out is gone
    customer = sandbox.store.ecommerce.stores[int(store_id)].customers["1234"]
    assert customer.cart is not None
    assert customer.cart.fields["line_items"] == CART["line_items"]

    assert await gist.delete_cart(store_id, "1234") is True
    assert customer.cart is None
    assert await gist.delete_cart(store_id, "1234") is False  # already gone
    assert await gist.delete_cart(store_id, "nobody") is False
    assert [(m, s) for m, _, s in requests(sandbox)] == [
        ("POST", 200),
        ("POST", 200),
        ("DELETE", 200),
        ("DELETE", 404),
        ("DELETE", 404),
    ]


async def test_a_cart_for_an_unknown_customer_is_a_permanent_404(
    gist: GistClient, sandbox: Sandbox
) -> None:
    store_id = await seeded(gist, sandbox)
    with pytest.raises(PermanentError) as caught:
        await gist.upsert_cart(store_id, "nobody", CART)
    assert caught.value.status == 404
    assert "customer_not_found" in caught.value.body_excerpt
    with pytest.raises(PermanentError) as unknown_product:
        await gist.upsert_cart(
            store_id, "1234", {**CART, "line_items": [{"product_id": "99", "quantity": 1}]}
        )
    assert unknown_product.value.status == 404
    assert "product_not_found" in unknown_product.value.body_excerpt
    assert [s for _, _, s in requests(sandbox)] == [404, 404]  # neither retried


# --- orders and lifetime value -------------------------------------------------------


async def test_orders_move_the_lifetime_value_up_and_down(
    gist: GistClient, sandbox: Sandbox
) -> None:
    store_id = await seeded(gist, sandbox)
    order = await gist.create_order(store_id, ORDER)
    assert (order["order_id"], order["financial_status"]) == ("o-1", "pending")
    assert ltv(sandbox) == {"USD": 100}

    paid = await gist.update_order(
        store_id, "o-1", {"order_total": 105, "financial_status": "paid"}
    )
    assert paid is not None
    assert (paid["order_total"], paid["financial_status"]) == (105, "paid")
    assert ltv(sandbox) == {"USD": 105}

    refunded = await gist.update_order(
        store_id, "o-1", {"refund_amount": 105, "financial_status": "refunded"}
    )
    assert refunded is not None
    assert refunded["refund_amount"] == 105
    assert ltv(sandbox) == {"USD": 0}

    cancelled = await gist.update_order(
        store_id, "o-1", {"cancelled_at": "2017-03-23T10:00:00", "financial_status": "cancelled"}
    )
    assert cancelled is not None
    assert cancelled["cancelled_at"] == "2017-03-23T10:00:00"
    assert await gist.update_order(store_id, "o-2", {"order_total": 1}) is None
    assert ltv(sandbox) == {"USD": 0}


async def test_a_bad_order_is_permanent_with_gists_answer(
    gist: GistClient, sandbox: Sandbox
) -> None:
    store_id = await seeded(gist, sandbox)
    with pytest.raises(PermanentError) as amount:
        await gist.create_order(store_id, {**ORDER, "order_total": 19.999})
    assert amount.value.status == 422
    assert "invalid_amount" in amount.value.body_excerpt
    with pytest.raises(PermanentError) as customer:
        await gist.create_order(store_id, {**ORDER, "customer_id": "ghost"})
    assert customer.value.status == 404
    assert "customer_not_found" in customer.value.body_excerpt
    await gist.create_order(store_id, ORDER)
    with pytest.raises(PermanentError) as twice:
        await gist.create_order(store_id, ORDER)
    assert twice.value.status == 422
    assert "order_exists" in twice.value.body_excerpt
    assert [s for _, _, s in requests(sandbox)] == [422, 404, 200, 422]
    assert ltv(sandbox) == {"USD": 100}


async def test_a_create_answered_2xx_is_done_whatever_its_body(
    gist: GistClient, sandbox: Sandbox
) -> None:
    store_id = await seeded(gist, sandbox)
    sandbox.config.non_json_rate = 1.0
    assert await gist.create_order(store_id, ORDER) == {}
    assert await gist.update_order(store_id, "o-1", {"order_total": 90}) == {}
    assert await gist.upsert_cart(store_id, "1234", CART) == {}
    assert [s for _, _, s in requests(sandbox)] == [200, 200, 200]  # none sent twice
    assert ltv(sandbox) == {"USD": 90}


async def test_server_errors_on_an_update_are_retried(gist: GistClient, sandbox: Sandbox) -> None:
    store_id = await seeded(gist, sandbox)
    await gist.create_order(store_id, ORDER)
    sandbox.config.force_429 = 2
    updated = await gist.update_order(store_id, "o-1", {"order_total": 120})
    assert updated is not None
    assert [s for _, _, s in requests(sandbox)] == [200, 429, 429, 200]
    assert ltv(sandbox) == {"USD": 120}


# --- subscription types ---------------------------------------------------------------


async def test_list_subscription_types(gist: GistClient) -> None:
    types = await gist.list_subscription_types()
    assert types == [
        SubscriptionType(1, "Announcements", "", "published", 0, 1),
        SubscriptionType(2, "Newsletter", "", "published", 0, 2),
    ]


@pytest.mark.parametrize(
    "sandbox_config",
    [
        SandboxConfig(
            api_keys=frozenset({KEY}), subscription_types=tuple(f"T{n}" for n in range(1, 121))
        )
    ],
)
async def test_list_subscription_types_follows_the_pages(
    gist: GistClient, sandbox: Sandbox
) -> None:
    types = await gist.list_subscription_types()
    assert [t.id for t in types] == list(range(1, 121))
    assert [t.name for t in types][-1] == "T120"
    assert [p for _, p, _ in requests(sandbox)] == ["/subscription_types"] * 3  # 50 a page


async def test_set_subscription_subscribes_and_unsubscribes(
    gist: GistClient, sandbox: Sandbox
) -> None:
    await gist.upsert_contact({"email": "ada@example.com", "user_id": "u-1"})
    contact = await gist.set_subscription(1, subscribed=True, email="ada@example.com")
    assert contact is not None
    assert contact["subscription_types"] == [{"id": 1, "name": "Announcements"}]
    contact = await gist.set_subscription("2", subscribed=True, user_id="u-1")
    assert contact is not None
    assert [t["id"] for t in contact["subscription_types"]] == [1, 2]
    contact = await gist.set_subscription(1, subscribed=False, contact_id=str(contact["id"]))
    assert contact is not None
    assert [t["id"] for t in contact["subscription_types"]] == [2]
    stored = sandbox.store.find_contact(user_id="u-1")
    assert stored is not None
    assert [
        t.id for t in sandbox.store.subscription_types.values() if stored.id in t.contact_ids
    ] == [2]

    assert await gist.set_subscription(1, subscribed=True, email="ghost@example.com") is None
    assert await gist.set_subscription(99, subscribed=True, email="ada@example.com") is None
    assert sandbox.store.find_contact(email="ghost@example.com") is None
    requests_before = len(requests(sandbox))
    with pytest.raises(ValueError, match="user_id, email or contact_id"):
        await gist.set_subscription(1, subscribed=True)
    assert len(requests(sandbox)) == requests_before  # nothing sent


async def test_set_subscription_sends_a_json_boolean(sandbox: Sandbox) -> None:
    sent: list[httpx.Request] = []

    class Recording(httpx.AsyncHTTPTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            sent.append(request)
            return await super().handle_async_request(request)

    async with GistClient(KEY, base_url=sandbox.url, transport=Recording()) as client:
        await client.upsert_contact({"email": "a@example.com"})
        await client.set_subscription(1, subscribed=False, email="a@example.com")
    assert sent[-1].url.path == "/subscription_types/1"
    assert sent[-1].content == b'{"subscribed_status":false,"email":"a@example.com"}'


# --- lanes, dispatch and metrics -----------------------------------------------------

Call = Callable[[GistClient, str, Priority, Dispatch | None], Awaitable[object]]

CALLS: dict[str, Call] = {
    "find_store": lambda g, s, p, d: g.find_store("example.com", priority=p, dispatch=d),
    "create_store": lambda g, s, p, d: g.create_store(
        {**STORE, "domain": "new.example"}, priority=p, dispatch=d
    ),
    "create_customer": lambda g, s, p, d: g.create_customer(
        s, {**CUSTOMER, "customer_id": "9"}, priority=p, dispatch=d
    ),
    "update_customer": lambda g, s, p, d: g.update_customer(
        s, "1234", {"last_name": "L"}, priority=p, dispatch=d
    ),
    "create_product": lambda g, s, p, d: g.create_product(
        s, {**PRODUCT, "product_id": "9"}, priority=p, dispatch=d
    ),
    "update_product": lambda g, s, p, d: g.update_product(
        s, "12", {"sku": "S"}, priority=p, dispatch=d
    ),
    "create_variant": lambda g, s, p, d: g.create_variant(
        s, "12", {**VARIANT, "product_variant_id": "9"}, priority=p, dispatch=d
    ),
    "update_variant": lambda g, s, p, d: g.update_variant(
        s, "12", "24", {"sku": "S"}, priority=p, dispatch=d
    ),
    "upsert_cart": lambda g, s, p, d: g.upsert_cart(s, "1234", CART, priority=p, dispatch=d),
    "delete_cart": lambda g, s, p, d: g.delete_cart(s, "1234", priority=p, dispatch=d),
    "create_order": lambda g, s, p, d: g.create_order(
        s, {**ORDER, "order_id": "o-9"}, priority=p, dispatch=d
    ),
    "update_order": lambda g, s, p, d: g.update_order(
        s, "o-1", {"order_total": 1}, priority=p, dispatch=d
    ),
    "list_subscription_types": lambda g, s, p, d: g.list_subscription_types(priority=p, dispatch=d),
    "set_subscription": lambda g, s, p, d: g.set_subscription(
        1, subscribed=True, email="ada@example.com", priority=p, dispatch=d
    ),
}


@pytest.mark.parametrize("priority", [Priority.LOW, Priority.HIGH])
@pytest.mark.parametrize("name", sorted(CALLS))
async def test_each_call_takes_one_slot_in_the_lane_it_is_given(
    gist: GistClient, sandbox: Sandbox, name: str, priority: Priority
) -> None:
    store_id = await seeded(gist, sandbox, orders=True)
    assert isinstance(gist.limiter, RateLimiter)
    granted = gist.limiter.granted
    dispatch = Dispatch()
    result = await CALLS[name](gist, store_id, priority, dispatch)
    assert result not in (None, False)  # it did what it says, not a 404
    assert lanes(gist) == [priority]
    assert gist.limiter.granted - granted == 1
    assert [status for _, _, status in requests(sandbox)] == [200]
    assert dispatch.sent
    assert not dispatch.on_wire


@pytest.mark.parametrize("name", sorted(CALLS))
async def test_a_withdrawn_dispatch_sends_nothing(
    gist: GistClient, sandbox: Sandbox, name: str
) -> None:
    store_id = await seeded(gist, sandbox, orders=True)
    dispatch = Dispatch()
    dispatch.withdraw()
    with pytest.raises(Withdrawn):
        await CALLS[name](gist, store_id, Priority.NORMAL, dispatch)
    assert requests(sandbox) == []
    assert not dispatch.sent


async def test_a_closed_gate_holds_the_request_until_it_opens(
    gist: GistClient, sandbox: Sandbox
) -> None:
    store_id = await seeded(gist, sandbox)
    gate = asyncio.Event()
    dispatch = Dispatch(gates=(gate,))
    call = asyncio.create_task(gist.create_order(store_id, ORDER, dispatch=dispatch))
    await asyncio.sleep(0.1)
    assert not call.done()
    assert requests(sandbox) == []
    assert not dispatch.sent
    gate.set()
    order = await asyncio.wait_for(call, 5)
    assert order["order_id"] == "o-1"
    assert dispatch.sent
    assert requests(sandbox) == [("POST", f"/ecommerce/stores/{store_id}/orders", 200)]


async def test_metrics_name_the_endpoint_not_its_ids(gist: GistClient, sandbox: Sandbox) -> None:
    store_id = await seeded(gist, sandbox)
    labels = {"endpoint": "PATCH /ecommerce/stores/{id}/orders/{id}", "status": "404"}
    before = REGISTRY.get_sample_value("gist_destination_gist_requests_total", labels) or 0.0
    assert await gist.update_order(store_id, "secret-order-7", {"order_total": 1}) is None
    after = REGISTRY.get_sample_value("gist_destination_gist_requests_total", labels)
    assert after == before + 1


def test_payload_types_are_exported() -> None:
    """The models the pipeline will build are importable from ``destination.gist``."""
    import destination.gist as gist_package

    for name in (
        "Address",
        "CartPayload",
        "CustomerPayload",
        "CustomerUpdate",
        "LineItem",
        "OrderPayload",
        "OrderUpdate",
        "ProductPayload",
        "ProductUpdate",
        "StorePayload",
        "VariantPayload",
        "VariantUpdate",
        "EcommerceStore",
        "SubscriptionType",
    ):
        assert name in gist_package.__all__, name
        assert getattr(gist_package, name) is not None
