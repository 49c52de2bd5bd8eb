"""The Gist sandbox's e-commerce and subscription types, over real HTTP: every endpoint,
every required field, the 404s and 422s, lifetime value up and down, carts replaced
whole and deleted, and that these requests pass auth, the rate limit and the faults."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from destination.devtools.sandbox import Sandbox, SandboxConfig, command

AUTH = {"Authorization": "Bearer sandbox-key"}
STORES = "/ecommerce/stores"

STORE: dict[str, Any] = {
    "name": "Voice Out",
    "domain": "https://example.com",
    "currency_code": "USD",
    "abandon_cart_interval": 1,
    "status": "connected",
    "contact_tags": "ecommerce contact,first store contact",
}
ADDRESS: dict[str, Any] = {
    "address1": "969 Market",
    "address2": "",
    "city": "San Francisco",
    "state": "California",
    "postcode": "94103",
    "country": "US",
    "phone": "(555) 555-5555",
}
CUSTOMER: dict[str, Any] = {
    "customer_id": "1234",
    "email_address": "John.Doe@Example.com",
    "first_name": "John",
    "last_name": "Doe",
    "billing_address": ADDRESS,
    "shipping_address": ADDRESS,
}
CATEGORY: dict[str, Any] = {"category_id": 1, "name": "Shoes"}
PRODUCT: dict[str, Any] = {
    "product_id": "12",
    "title": " LG - Washing Machine BT12",
    "description": "Fully Automatic Front Load",
    "product_url": "https://example.com/product/premium-quality-19/",
    "vendor": "LG",
    "image_url": "https://store.example.com/image/1234/1234",
    "price": 30000,
    "sku": "WAS-F12",
    "inventory_quantity": 8,
    "backorders": "true",
    "categories": [1],
    "product_published_at": "2017-03-22T16:28:02",
}
VARIANT: dict[str, Any] = {
    "product_variant_id": "24",
    "title": "BT12, white",
    "price": "299.99",
    "sku": "WAS-F12-W",
    "inventory_quantity": 3,
}
LINE_ITEMS: list[dict[str, Any]] = [
    {"product_id": "12", "product_variant_id": "24", "quantity": 3, "price": 2000},
    {"product_id": "12", "quantity": 1, "price": 30000},
]
CART: dict[str, Any] = {
    "checkout_url": "https://example.com/cart/690933842",
    "currency_code": "USD",
    "order_total": 234,
    "discount_total": 12,
    "created_at": "2017-03-22T16:28:02",
    "updated_at": "2017-03-22T16:28:02",
    "line_items": LINE_ITEMS,
}
ORDER: dict[str, Any] = {
    "order_id": "o-1",
    "customer_id": "1234",
    "currency_code": "USD",
    "order_total": 100,
    "discount_total": 12,
    "tax_total": 1,
    "shipping_total": 1,
    "financial_status": "pending",
    "fulfillment_status": "fulfilled",
    "order_url": "https://store.example.com/690933842/orders/b1946ac",
    "tracking_number": "12345678",
    "tracking_carrier": "FedEx",
    "tracking_url": "https://www.aftership.com/track/12345678",
    "processed_at": "2017-03-22T16:28:02",
    "updated_at": "2017-03-22T16:28:02",
    "billing_address": {**ADDRESS, "name": "John Doe", "company_name": ""},
    "line_items": LINE_ITEMS,
}


@pytest.fixture
async def client(sandbox: Sandbox) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sandbox.url, headers=AUTH, timeout=10) as http:
        yield http


@pytest.fixture
async def control(sandbox: Sandbox) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sandbox.url, timeout=10) as http:
        yield http


def config(**changes: Any) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("sandbox_config", [SandboxConfig(**changes)])


def error(response: httpx.Response) -> tuple[int, str, str]:
    """Status, code and message of a Gist-style error answer."""
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"errors"}
    first = body["errors"][0]
    return response.status_code, first["code"], first["message"]


async def ok(response: Any, key: str) -> dict[str, Any]:
    answer: httpx.Response = await response
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()[key]
    return result


def without(body: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in names}


async def state(control: httpx.AsyncClient) -> dict[str, Any]:
    response = await control.get("/_sandbox/state")
    assert response.status_code == 200
    result: dict[str, Any] = response.json()
    return result


async def shop_state(control: httpx.AsyncClient, store_id: int = 1) -> dict[str, Any]:
    stores = (await state(control))["ecommerce"]["stores"]
    found: dict[str, Any] = next(s for s in stores if s["store_id"] == store_id)
    return found


async def seed(client: httpx.AsyncClient, *, cart: bool = False) -> str:
    """A store with a customer, a category, a product and its variant; its path."""
    store = await ok(client.post(STORES, json=STORE), "ecommerce_store")
    path = f"{STORES}/{store['store_id']}"
    await ok(client.post(f"{path}/customers", json=CUSTOMER), "ecommerce_customer")
    await ok(client.post(f"{path}/categories", json=CATEGORY), "ecommerce_category")
    await ok(client.post(f"{path}/products", json=PRODUCT), "ecommerce_product")
    await ok(client.post(f"{path}/products/12/variants", json=VARIANT), "ecommerce_product_variant")
    if cart:
        await ok(client.post(f"{path}/customers/1234/cart", json=CART), "ecommerce_cart")
    return path


def ltv(sandbox: Sandbox, email: str = "john.doe@example.com") -> dict[str, Any]:
    contact = sandbox.store.find_contact(email=email)
    assert contact is not None
    return {
        currency: float(value) for currency, value in sandbox.store.lifetime_value(contact).items()
    }


# -- stores -------------------------------------------------------------------------------


async def test_store_create_retrieve_list_update(client: httpx.AsyncClient) -> None:
    created = await ok(client.post(STORES, json=without(STORE, "status")), "ecommerce_store")
    assert isinstance(created["store_id"], int)
    assert created == {
        "store_id": created["store_id"],
        **without(STORE, "status"),
        "status": "disconnected",  # the reference's default
    }
    path = f"{STORES}/{created['store_id']}"
    assert await ok(client.get(path), "ecommerce_store") == created

    other = await ok(
        client.post(STORES, json={**STORE, "name": "Flower Day", "domain": "flowerday.com"}),
        "ecommerce_store",
    )
    assert other["store_id"] != created["store_id"]
    listed = (await client.get(STORES)).json()
    assert [s["domain"] for s in listed["ecommerce_stores"]] == [
        "https://example.com",
        "flowerday.com",
    ]

    updated = await ok(
        client.patch(path, json={"status": "connected", "abandon_cart_interval": 2}),
        "ecommerce_store",
    )
    assert updated == {**created, "status": "connected", "abandon_cart_interval": 2}
    assert await ok(client.get(path), "ecommerce_store") == updated


async def test_a_store_is_found_by_domain_and_a_domain_is_taken_once(
    client: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    created = await ok(client.post(STORES, json=STORE), "ecommerce_store")
    for same in ("https://www.Example.com/", "http://example.com", "EXAMPLE.COM"):
        taken = await client.post(STORES, json={**STORE, "domain": same})
        assert error(taken)[:2] == (422, "store_exists"), same
    shop = sandbox.store.ecommerce.find_store("example.com")
    assert shop is not None
    assert shop.id == created["store_id"]
    assert sandbox.store.ecommerce.find_store("example.org") is None

    second = await ok(client.post(STORES, json={**STORE, "domain": "b.example"}), "ecommerce_store")
    moved = await client.patch(f"{STORES}/{second['store_id']}", json={"domain": "example.com"})
    assert error(moved)[:2] == (422, "store_exists")
    renamed = await client.patch(f"{STORES}/{second['store_id']}", json={"domain": "c.example"})
    assert renamed.status_code == 200
    assert sandbox.store.ecommerce.find_store("b.example") is None
    assert sandbox.store.ecommerce.find_store("c.example") is not None


@pytest.mark.parametrize(
    ("method", "suffix"),
    [
        ("GET", ""),
        ("PATCH", ""),
        ("POST", "/customers"),
        ("GET", "/customers/1234"),
        ("PATCH", "/customers/1234"),
        ("POST", "/customers/1234/cart"),
        ("DELETE", "/customers/1234/cart"),
        ("POST", "/categories"),
        ("GET", "/categories/1"),
        ("PATCH", "/categories/1"),
        ("POST", "/products"),
        ("GET", "/products/12"),
        ("PATCH", "/products/12"),
        ("POST", "/products/12/variants"),
        ("GET", "/products/12/variants/24"),
        ("PATCH", "/products/12/variants/24"),
        ("POST", "/orders"),
        ("PATCH", "/orders/o-1"),
    ],
)
async def test_an_unknown_store_is_404_on_every_endpoint(
    client: httpx.AsyncClient, method: str, suffix: str
) -> None:
    await seed(client)  # store 1 has all of these; store 99 does not exist
    for store_id in ("99", "not-a-number"):
        response = await client.request(method, f"{STORES}/{store_id}{suffix}", json={})
        assert error(response)[:2] == (404, "store_not_found"), (method, suffix)


@pytest.mark.parametrize(
    ("method", "suffix", "code"),
    [
        ("GET", "/customers/nope", "customer_not_found"),
        ("PATCH", "/customers/nope", "customer_not_found"),
        ("POST", "/customers/nope/cart", "customer_not_found"),
        ("DELETE", "/customers/nope/cart", "customer_not_found"),
        ("GET", "/categories/nope", "category_not_found"),
        ("PATCH", "/categories/nope", "category_not_found"),
        ("GET", "/products/nope", "product_not_found"),
        ("PATCH", "/products/nope", "product_not_found"),
        ("POST", "/products/nope/variants", "product_not_found"),
        ("GET", "/products/nope/variants/24", "product_not_found"),
        ("GET", "/products/12/variants/nope", "product_variant_not_found"),
        ("PATCH", "/products/12/variants/nope", "product_variant_not_found"),
        ("PATCH", "/orders/nope", "order_not_found"),
    ],
)
async def test_an_unknown_record_in_the_path_is_404_before_the_body_is_read(
    client: httpx.AsyncClient, method: str, suffix: str, code: str
) -> None:
    path = await seed(client)
    response = await client.request(method, f"{path}{suffix}", content=b"{not json")
    assert error(response)[:2] == (404, code)


async def test_paths_the_reference_does_not_give_are_not_routed(
    client: httpx.AsyncClient,
) -> None:
    path = await seed(client, cart=True)
    not_routed = await client.delete(f"{path}/carts/1234")  # the example's URL
    assert error(not_routed)[:2] == (404, "not_found")
    no_get_cart = await client.get(f"{path}/customers/1234/cart")
    assert no_get_cart.status_code == 405
    assert {m.strip() for m in no_get_cart.headers["Allow"].split(",")} == {"POST", "DELETE"}
    no_get_order = await client.get(f"{path}/orders/o-1")
    assert no_get_order.status_code == 405
    assert no_get_order.headers["Allow"] == "PATCH"
    no_put = await client.put(STORES, json=STORE)
    assert no_put.status_code == 405


# -- required fields, types, amounts and values -----------------------------------------------

REQUIRED = [
    (
        "",
        {**STORE, "domain": "other.example"},
        [
            "name",
            "domain",
            "currency_code",
            "abandon_cart_interval",
        ],
    ),
    ("/customers", {**CUSTOMER, "customer_id": "new"}, ["customer_id", "email_address"]),
    ("/categories", {**CATEGORY, "category_id": 2}, ["category_id", "name"]),
    ("/products", {**PRODUCT, "product_id": "new"}, ["product_id", "title"]),
    (
        "/products/12/variants",
        {**VARIANT, "product_variant_id": "new"},
        [
            "product_variant_id",
            "title",
        ],
    ),
    ("/customers/1234/cart", CART, ["currency_code", "order_total", "line_items"]),
    (
        "/orders",
        ORDER,
        [
            "order_id",
            "customer_id",
            "currency_code",
            "order_total",
            "processed_at",
            "line_items",
        ],
    ),
]


@pytest.mark.parametrize(
    ("suffix", "body", "field"),
    [(suffix, body, field) for suffix, body, fields in REQUIRED for field in fields],
)
async def test_every_required_field_is_400_when_absent_or_null(
    client: httpx.AsyncClient,
    control: httpx.AsyncClient,
    suffix: str,
    body: dict[str, Any],
    field: str,
) -> None:
    path = await seed(client)
    url = STORES if suffix == "" else f"{path}{suffix}"
    before = (await state(control))["ecommerce"]
    for sent in (without(body, field), {**body, field: None}):
        status, code, message = error(await client.post(url, json=sent))
        assert (status, code) == (400, "bad_request")
        assert f"{field} is required" in message
    assert (await state(control))["ecommerce"] == before  # nothing half-applied
    assert (await client.post(url, json=body)).status_code == 200  # the rest was right


@pytest.mark.parametrize(
    ("suffix", "body", "field_name"),
    [
        ("", {**STORE, "name": 5}, "name"),
        ("", {**STORE, "abandon_cart_interval": "1"}, "abandon_cart_interval"),
        ("", {**STORE, "contact_tags": ["a"]}, "contact_tags"),
        ("/customers", {**CUSTOMER, "customer_id": 1.5}, "customer_id"),
        ("/customers", {**CUSTOMER, "customer_id": "n", "email_address": "nope"}, "email_address"),
        ("/customers", {**CUSTOMER, "customer_id": "n", "billing_address": "969"}, "billing"),
        (
            "/customers",
            {**CUSTOMER, "customer_id": "n", "shipping_address": {"city": 3}},
            "shipping_address.city",
        ),
        ("/products", {**PRODUCT, "product_id": "n", "inventory_quantity": "8"}, "inventory"),
        ("/products", {**PRODUCT, "product_id": "n", "backorders": True}, "backorders"),
        ("/products", {**PRODUCT, "product_id": "n", "categories": "1"}, "categories"),
        ("/products", {**PRODUCT, "product_id": "n", "categories": [{"id": 1}]}, "categories[0]"),
        ("/customers/1234/cart", {**CART, "line_items": {"a": 1}}, "line_items"),
        ("/customers/1234/cart", {**CART, "line_items": [3]}, "line_items[0]"),
        (
            "/customers/1234/cart",
            {**CART, "line_items": [{"product_variant_id": "24", "quantity": 1}]},
            "line_items[0].product_variant_id",
        ),
        (
            "/customers/1234/cart",
            {**CART, "line_items": [{"product_id": "12", "quantity": "3"}]},
            "line_items[0].quantity",
        ),
        ("/customers/1234/cart", {**CART, "customer_id": "other"}, "customer_id"),
        ("/orders", {**ORDER, "tracking_number": 12345678}, "tracking_number"),
        ("/orders", {**ORDER, "processed_at": 1490200082}, "processed_at"),
        ("/products/12/variants", {**VARIANT, "product_id": "13"}, "product_id"),
    ],
)
async def test_a_field_of_the_wrong_type_is_400_naming_it(
    client: httpx.AsyncClient, suffix: str, body: dict[str, Any], field_name: str
) -> None:
    path = await seed(client)
    url = STORES if suffix == "" else f"{path}{suffix}"
    status, code, message = error(await client.post(url, json=body))
    assert (status, code) == (400, "bad_request")
    assert field_name in message


@pytest.mark.parametrize(
    ("suffix", "body", "field_name"),
    [
        ("/orders", {**ORDER, "order_total": -1}, "order_total"),
        ("/orders", {**ORDER, "order_total": "100"}, "order_total"),
        ("/orders", {**ORDER, "order_total": True}, "order_total"),
        ("/orders", {**ORDER, "order_total": 10.001}, "order_total"),
        ("/orders", {**ORDER, "order_total": 0.1 + 0.2}, "order_total"),  # a float sum
        ("/orders", {**ORDER, "currency_code": "JPY", "order_total": 100.5}, "order_total"),
        ("/orders", {**ORDER, "tax_total": -0.01}, "tax_total"),
        ("/orders", {**ORDER, "shipping_total": [1]}, "shipping_total"),
        ("/orders", {**ORDER, "discount_total": "12"}, "discount_total"),
        ("/orders", {**ORDER, "refund_amount": -5}, "refund_amount"),
        ("/orders", {**ORDER, "refund_amount": 100.01}, "refund_amount"),  # above the total
        (
            "/orders",
            {**ORDER, "line_items": [{"product_id": "12", "quantity": 1, "price": -3}]},
            "line_items[0].price",
        ),
        ("/customers/1234/cart", {**CART, "order_total": "234"}, "order_total"),
        ("/customers/1234/cart", {**CART, "discount_total": -12}, "discount_total"),
        (
            "/customers/1234/cart",
            {**CART, "line_items": [{"product_id": "12", "price": 1.999}]},
            "line_items[0].price",
        ),
        ("/products", {**PRODUCT, "product_id": "n", "price": "19,99"}, "price"),
        ("/products", {**PRODUCT, "product_id": "n", "price": "-1"}, "price"),
        ("/products", {**PRODUCT, "product_id": "n", "price": 19.999}, "price"),
        ("/products/12/variants", {**VARIANT, "product_variant_id": "n", "price": "abc"}, "price"),
    ],
)
async def test_a_bad_amount_is_422_invalid_amount(
    client: httpx.AsyncClient,
    control: httpx.AsyncClient,
    suffix: str,
    body: dict[str, Any],
    field_name: str,
) -> None:
    path = await seed(client)
    before = (await state(control))["ecommerce"]
    status, code, message = error(await client.post(f"{path}{suffix}", json=body))
    assert (status, code) == (422, "invalid_amount")
    assert field_name in message
    assert (await state(control))["ecommerce"] == before


@pytest.mark.parametrize(
    ("suffix", "body"),
    [
        ("/orders", {**ORDER, "order_total": 99.99, "discount_total": 0.5}),
        ("/orders", {**ORDER, "currency_code": "JPY", "order_total": 12000, "tax_total": 0}),
        ("/orders", {**ORDER, "currency_code": "KWD", "order_total": 1.125, "tax_total": 0.5}),
        ("/orders", {**ORDER, "refund_amount": 100}),
        ("/products", {**PRODUCT, "product_id": "n", "price": "19.99"}),
        ("/products", {**PRODUCT, "product_id": "n", "price": 0}),
        ("/customers/1234/cart", {**CART, "order_total": 0, "line_items": []}),
    ],
)
async def test_amounts_of_the_currency_are_accepted_and_stored_as_sent(
    client: httpx.AsyncClient, suffix: str, body: dict[str, Any]
) -> None:
    path = await seed(client)
    response = await client.post(f"{path}{suffix}", json=body)
    assert response.status_code == 200, response.text
    answer = next(iter(response.json().values()))
    for name in ("order_total", "tax_total", "discount_total", "price", "refund_amount"):
        if name in body:
            assert answer[name] == body[name]
            assert type(answer[name]) is type(body[name])  # not converted


@pytest.mark.parametrize(
    ("suffix", "body", "field_name"),
    [
        ("", {**STORE, "currency_code": "usd"}, "currency_code"),
        ("", {**STORE, "currency_code": "DOLLAR"}, "currency_code"),
        ("", {**STORE, "status": "on"}, "status"),
        ("", {**STORE, "abandon_cart_interval": 0}, "abandon_cart_interval"),
        ("", {**STORE, "domain": "exa mple.com"}, "domain"),
        ("", {**STORE, "domain": "https://"}, "domain"),
        ("/orders", {**ORDER, "financial_status": "done"}, "financial_status"),
        ("/orders", {**ORDER, "fulfillment_status": "shipped"}, "fulfillment_status"),
        ("/orders", {**ORDER, "processed_at": "yesterday"}, "processed_at"),
        ("/orders", {**ORDER, "processed_at": ""}, "processed_at"),
        ("/orders", {**ORDER, "cancelled_at": "2017-13-01"}, "cancelled_at"),
        (
            "/orders",
            {**ORDER, "line_items": [{"product_id": "12", "quantity": 0}]},
            "line_items[0].quantity",
        ),
        (
            "/orders",
            {**ORDER, "line_items": [{"product_id": "12", "quantity": 1.5}]},
            "line_items[0].quantity",
        ),
        ("/customers/1234/cart", {**CART, "currency_code": "US"}, "currency_code"),
        ("/customers/1234/cart", {**CART, "created_at": "22/03/2017"}, "created_at"),
        ("/products", {**PRODUCT, "product_id": "n", "product_published_at": "x"}, "published"),
    ],
)
async def test_a_value_the_reference_does_not_allow_is_422_invalid_value(
    client: httpx.AsyncClient, suffix: str, body: dict[str, Any], field_name: str
) -> None:
    path = await seed(client)
    url = STORES if suffix == "" else f"{path}{suffix}"
    status, code, message = error(await client.post(url, json=body))
    assert (status, code) == (422, "invalid_value")
    assert field_name in message


@pytest.mark.parametrize(
    ("suffix", "body", "code"),
    [
        ("/customers", CUSTOMER, "customer_exists"),
        ("/customers", {**CUSTOMER, "customer_id": 1234}, "customer_exists"),  # same id
        ("/categories", {"category_id": "1", "name": "Other"}, "category_exists"),
        ("/products", PRODUCT, "product_exists"),
        ("/products/12/variants", VARIANT, "product_variant_exists"),
        ("/orders", ORDER, "order_exists"),
    ],
)
async def test_creating_an_id_twice_is_422_and_changes_nothing(
    client: httpx.AsyncClient,
    control: httpx.AsyncClient,
    suffix: str,
    body: dict[str, Any],
    code: str,
) -> None:
    path = await seed(client)
    await ok(client.post(f"{path}/orders", json=ORDER), "ecommerce_order")
    before = await state(control)
    again = await client.post(f"{path}{suffix}", json={**body, "title": "changed?"})
    assert error(again)[:2] == (422, code)
    after = await state(control)
    assert after["ecommerce"] == before["ecommerce"]
    assert after["contacts"] == before["contacts"]


@pytest.mark.parametrize(
    ("suffix", "body", "code"),
    [
        ("/orders", {**ORDER, "customer_id": "ghost"}, "customer_not_found"),
        (
            "/orders",
            {**ORDER, "line_items": [{"product_id": "ghost", "quantity": 1}]},
            "product_not_found",
        ),
        (
            "/orders",
            {**ORDER, "line_items": [{"product_id": "12", "product_variant_id": "ghost"}]},
            "product_variant_not_found",
        ),
        (
            "/customers/1234/cart",
            {**CART, "line_items": [{"product_id": "ghost", "quantity": 1}]},
            "product_not_found",
        ),
        (
            "/customers/1234/cart",
            {**CART, "line_items": [{"product_id": "12", "product_variant_id": "99"}]},
            "product_variant_not_found",
        ),
        ("/products", {**PRODUCT, "product_id": "n", "categories": [1, 7]}, "category_not_found"),
    ],
)
async def test_a_record_the_body_names_must_exist(
    client: httpx.AsyncClient,
    control: httpx.AsyncClient,
    suffix: str,
    body: dict[str, Any],
    code: str,
) -> None:
    path = await seed(client)
    before = (await state(control))["ecommerce"]
    assert error(await client.post(f"{path}{suffix}", json=body))[:2] == (404, code)
    assert (await state(control))["ecommerce"] == before


async def test_the_shape_of_the_body_is_checked_before_what_it_names(
    client: httpx.AsyncClient,
) -> None:
    path = await seed(client)
    body = {**ORDER, "customer_id": "ghost", "line_items": [{"product_id": "x", "quantity": 0}]}
    assert error(await client.post(f"{path}/orders", json=body))[:2] == (422, "invalid_value")
    body = {**ORDER, "customer_id": "ghost", "tracking_url": 5}
    assert error(await client.post(f"{path}/orders", json=body))[:2] == (400, "bad_request")


async def test_a_body_that_is_not_a_json_object_is_400(client: httpx.AsyncClient) -> None:
    path = await seed(client)
    for url in (STORES, f"{path}/customers", f"{path}/orders", f"{path}/customers/1234/cart"):
        for content in (b"[1, 2]", b'"order"', b"{not json", b""):
            response = await client.post(url, content=content)
            assert response.status_code == 400, (url, content)
    assert error(await client.post(STORES, content=b"{"))[1] == "json_parse_error"


# -- customers and their contacts ------------------------------------------------------------


async def test_a_customer_adds_its_contact_and_keeps_what_was_sent(
    client: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    store = await ok(client.post(STORES, json=STORE), "ecommerce_store")
    path = f"{STORES}/{store['store_id']}"
    customer = await ok(client.post(f"{path}/customers", json=CUSTOMER), "ecommerce_customer")
    assert customer == CUSTOMER  # as sent: the e-mail's case, the address's empty address2
    assert await ok(client.get(f"{path}/customers/1234"), "ecommerce_customer") == customer
    contact = sandbox.store.find_contact(email="john.doe@example.com")
    assert contact is not None
    assert (contact.name, contact.type) == ("John Doe", "lead")
    assert len(sandbox.store.contacts) == 1
    assert contact.tag_ids == {}  # contact_tags are stored, not applied


async def test_a_customer_updates_an_existing_contact_and_follows_its_email(
    client: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    existing = await client.post(
        "/contacts", json={"email": "john.doe@example.com", "user_id": "u-1", "name": "J"}
    )
    store = await ok(client.post(STORES, json=STORE), "ecommerce_store")
    path = f"{STORES}/{store['store_id']}"
    await ok(client.post(f"{path}/customers", json=CUSTOMER), "ecommerce_customer")
    contact = sandbox.store.find_contact(user_id="u-1")
    assert contact is not None
    assert contact.id == existing.json()["contact"]["id"]
    assert contact.name == "John Doe"
    assert len(sandbox.store.contacts) == 1

    updated = await ok(
        client.patch(f"{path}/customers/1234", json={"email_address": "jd@example.org"}),
        "ecommerce_customer",
    )
    assert updated == {**CUSTOMER, "email_address": "jd@example.org"}  # the rest stays
    moved = sandbox.store.find_contact(email="jd@example.org")
    assert moved is not None
    assert moved.id != contact.id
    assert moved.name is None  # no name was sent with this update

    renamed = await ok(
        client.patch(f"{path}/customers/1234", json={"last_name": None}), "ecommerce_customer"
    )
    assert renamed["last_name"] is None
    assert moved.name == "John"  # from the first name it kept and the last it lost

    clash = await client.patch(f"{path}/customers/1234", json={"customer_id": "999"})
    assert error(clash)[:2] == (400, "bad_request")
    same = await client.patch(f"{path}/customers/1234", json={"customer_id": 1234})
    assert same.status_code == 200
    assert same.json()["ecommerce_customer"]["customer_id"] == "1234"  # as first sent


# -- categories, products and variants -------------------------------------------------------


async def test_categories_create_retrieve_update(client: httpx.AsyncClient) -> None:
    store = await ok(client.post(STORES, json=STORE), "ecommerce_store")
    path = f"{STORES}/{store['store_id']}"
    created = await ok(client.post(f"{path}/categories", json=CATEGORY), "ecommerce_category")
    assert created == CATEGORY  # the id keeps its JSON type
    assert await ok(client.get(f"{path}/categories/1"), "ecommerce_category") == created
    renamed = await ok(
        client.patch(f"{path}/categories/1", json={"name": "Sneakers"}), "ecommerce_category"
    )
    assert renamed == {"category_id": 1, "name": "Sneakers"}
    blank = await client.patch(f"{path}/categories/1", json={"name": ""})
    assert error(blank)[:2] == (400, "bad_request")


async def test_products_show_their_categories_and_update_in_part(
    client: httpx.AsyncClient,
) -> None:
    path = await seed(client)
    product = await ok(client.get(f"{path}/products/12"), "ecommerce_product")
    assert product == {**PRODUCT, "categories": [{"category_id": 1, "name": "Shoes"}]}

    await ok(
        client.post(f"{path}/categories", json={"category_id": "2", "name": "Tops"}),
        "ecommerce_category",
    )
    updated = await ok(
        client.patch(f"{path}/products/12", json={"price": "279.50", "categories": ["2", 1]}),
        "ecommerce_product",
    )
    assert updated["price"] == "279.50"
    assert updated["title"] == PRODUCT["title"]  # left alone
    assert updated["categories"] == [
        {"category_id": "2", "name": "Tops"},
        {"category_id": 1, "name": "Shoes"},
    ]
    cleared = await ok(
        client.patch(f"{path}/products/12", json={"description": None}), "ecommerce_product"
    )
    assert cleared["description"] is None
    no_title = await client.patch(f"{path}/products/12", json={"title": None})
    assert error(no_title)[:2] == (400, "bad_request")
    other_id = await client.patch(f"{path}/products/12", json={"product_id": "13"})
    assert error(other_id)[:2] == (400, "bad_request")


async def test_variants_create_retrieve_update(client: httpx.AsyncClient) -> None:
    path = await seed(client)
    variant = await ok(client.get(f"{path}/products/12/variants/24"), "ecommerce_product_variant")
    assert variant == {
        "product_id": "12",
        "description": None,
        "product_url": None,
        "vendor": None,
        "image_url": None,
        "backorders": None,
        **VARIANT,
    }
    same_as_product = await ok(
        client.post(
            f"{path}/products/12/variants",
            json={"product_id": "12", "product_variant_id": "12", "title": "only one"},
        ),
        "ecommerce_product_variant",
    )
    assert same_as_product["product_variant_id"] == "12"
    updated = await ok(
        client.patch(f"{path}/products/12/variants/24", json={"inventory_quantity": -2}),
        "ecommerce_product_variant",
    )
    assert updated == {**variant, "inventory_quantity": -2}  # backorders: may go below 0
    renamed = await client.patch(
        f"{path}/products/12/variants/24", json={"product_variant_id": "25"}
    )
    assert error(renamed)[:2] == (400, "bad_request")


# -- carts ---------------------------------------------------------------------------------------


async def test_a_cart_is_replaced_whole_and_deleted(
    client: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    path = await seed(client)
    cart = await ok(client.post(f"{path}/customers/1234/cart", json=CART), "ecommerce_cart")
    assert cart == {"customer": CUSTOMER, **CART}

    smaller = {
        "currency_code": "USD",
        "order_total": 20,
        "line_items": [{"product_id": "12", "product_variant_id": "24", "quantity": 1}],
    }
    replaced = await ok(client.post(f"{path}/customers/1234/cart", json=smaller), "ecommerce_cart")
    assert replaced["line_items"] == smaller["line_items"]
    for gone in ("checkout_url", "discount_total", "created_at", "updated_at"):
        assert replaced[gone] is None, gone  # not merged with the cart before
    customer = (await shop_state(control))["customers"][0]
    assert customer["cart"] == {**dict.fromkeys(CART), **smaller}

    deleted = await client.delete(f"{path}/customers/1234/cart")
    assert deleted.status_code == 200
    assert deleted.json()["ecommerce_cart"] == replaced
    assert (await shop_state(control))["customers"][0]["cart"] is None
    again = await client.delete(f"{path}/customers/1234/cart")
    assert error(again)[:2] == (404, "cart_not_found")
    activity = (await state(control))["ecommerce"]["activity"]
    assert [a["name"] for a in activity] == ["Created a cart", "Updated a cart"]
    assert {a["email"] for a in activity} == {"john.doe@example.com"}


async def test_a_cart_may_be_empty_and_an_order_leaves_it_alone(
    client: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    path = await seed(client, cart=True)
    await ok(client.post(f"{path}/orders", json=ORDER), "ecommerce_order")
    assert (await shop_state(control))["customers"][0]["cart"]["order_total"] == 234
    empty = {"currency_code": "USD", "order_total": 0, "line_items": []}
    assert (await ok(client.post(f"{path}/customers/1234/cart", json=empty), "ecommerce_cart"))[
        "line_items"
    ] == []


# -- orders and lifetime value ------------------------------------------------------------------


async def test_lifetime_value_follows_order_totals_and_refunds(
    client: httpx.AsyncClient, control: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    """The reference's example: +$100 placed, +$5 when updated to $105, -$105 refunded."""
    path = await seed(client)
    order = await ok(client.post(f"{path}/orders", json=ORDER), "ecommerce_order")
    assert order == {
        **dict.fromkeys(("refund_amount", "cancelled_at", "shipping_address", "cart_id")),
        **ORDER,
    }
    assert ltv(sandbox) == {"USD": 100}

    paid = await ok(
        client.patch(f"{path}/orders/o-1", json={"order_total": 105, "financial_status": "paid"}),
        "ecommerce_order",
    )
    assert (paid["order_total"], paid["financial_status"]) == (105, "paid")
    assert paid["line_items"] == LINE_ITEMS  # left alone
    assert ltv(sandbox) == {"USD": 105}

    refund = {"refund_amount": 105, "financial_status": "refunded"}
    await ok(client.patch(f"{path}/orders/o-1", json=refund), "ecommerce_order")
    assert ltv(sandbox) == {"USD": 0}
    await ok(client.patch(f"{path}/orders/o-1", json=refund), "ecommerce_order")
    assert ltv(sandbox) == {"USD": 0}  # the same refund sent again: not twice

    second = {**ORDER, "order_id": "o-2", "order_total": 50.25, "financial_status": "paid"}
    await ok(client.post(f"{path}/orders", json=second), "ecommerce_order")
    assert ltv(sandbox) == {"USD": 50.25}
    partial = {"refund_amount": 10.25, "financial_status": "partially_refunded"}
    await ok(client.patch(f"{path}/orders/o-2", json=partial), "ecommerce_order")
    assert ltv(sandbox) == {"USD": 40}
    cancelled = {"cancelled_at": "2017-03-23T10:00:00", "financial_status": "cancelled"}
    await ok(client.patch(f"{path}/orders/o-2", json=cancelled), "ecommerce_order")
    assert ltv(sandbox) == {"USD": 40}  # cancelled without a refund_amount: LTV stays
    await ok(client.patch(f"{path}/orders/o-2", json={"refund_amount": 50.25}), "ecommerce_order")
    assert ltv(sandbox) == {"USD": 0}

    state_now = await state(control)
    assert state_now["ecommerce"]["lifetime_values"] == {"john.doe@example.com": {"USD": 0}}
    orders = (await shop_state(control))["orders"]
    assert [(o["order_id"], o["lifetime_value"]) for o in orders] == [("o-1", 0), ("o-2", 0)]
    assert (await shop_state(control))["customers"][0]["order_ids"] == ["o-1", "o-2"]
    assert [a["name"] for a in state_now["ecommerce"]["activity"]] == [
        "Placed an order",
        "Paid an order",
        "Order refunded",
        "Paid an order",
        "Order partially_refunded",
        "Order cancelled",
    ]
    assert "lifetime_value" not in state_now["contacts"][0]  # not in Gist's contact object


async def test_lifetime_value_is_kept_per_currency_and_moves_with_the_currency(
    client: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    path = await seed(client)
    await ok(client.post(f"{path}/orders", json=ORDER), "ecommerce_order")
    euros = {**ORDER, "order_id": "o-eur", "currency_code": "EUR", "order_total": 30.5}
    await ok(client.post(f"{path}/orders", json=euros), "ecommerce_order")
    assert ltv(sandbox) == {"USD": 100, "EUR": 30.5}
    to_yen = {"currency_code": "JPY", "order_total": 4000, "line_items": []}
    await ok(client.patch(f"{path}/orders/o-eur", json=to_yen), "ecommerce_order")
    assert ltv(sandbox) == {"USD": 100, "EUR": 0, "JPY": 4000}
    # amounts already stored are checked against a new currency too
    bad = await client.patch(f"{path}/orders/o-1", json={"currency_code": "JPY", "tax_total": 1.5})
    assert error(bad)[:2] == (422, "invalid_amount")
    assert ltv(sandbox) == {"USD": 100, "EUR": 0, "JPY": 4000}


async def test_a_refund_above_the_total_is_refused_on_update(
    client: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    path = await seed(client)
    await ok(client.post(f"{path}/orders", json={**ORDER, "refund_amount": 40}), "ecommerce_order")
    assert ltv(sandbox) == {"USD": 60}
    too_much = await client.patch(f"{path}/orders/o-1", json={"refund_amount": 100.01})
    assert error(too_much)[:2] == (422, "invalid_amount")
    lowered = await client.patch(f"{path}/orders/o-1", json={"order_total": 39})
    assert error(lowered)[:2] == (422, "invalid_amount")  # now below its refund
    assert ltv(sandbox) == {"USD": 60}


async def test_an_order_counts_on_the_contact_of_its_customer(
    client: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    path = await seed(client)
    await ok(client.post(f"{path}/orders", json=ORDER), "ecommerce_order")
    await ok(
        client.patch(f"{path}/customers/1234", json={"email_address": "new@example.com"}),
        "ecommerce_customer",
    )
    await ok(client.patch(f"{path}/orders/o-1", json={"order_total": 120}), "ecommerce_order")
    assert ltv(sandbox) == {"USD": 0}  # the old contact: the order moved away
    assert ltv(sandbox, "new@example.com") == {"USD": 120}

    deleted = await client.delete("/contacts", params={"email": "new@example.com"})
    assert deleted.status_code == 200
    await ok(client.patch(f"{path}/orders/o-1", json={"tax_total": 2}), "ecommerce_order")
    assert ltv(sandbox, "new@example.com") == {"USD": 120}  # a new contact, counted anew


async def test_an_order_update_keeps_its_ids_and_lists_ignored_keys(
    client: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    path = await seed(client)
    await ok(
        client.post(f"{path}/customers", json={**CUSTOMER, "customer_id": "77"}),
        "ecommerce_customer",
    )
    # the reference's own example sends "cancelled_at:" (a stray colon): ignored, shown
    created = await ok(
        client.post(
            f"{path}/orders", json={**without(ORDER, "financial_status"), "cancelled_at:": ""}
        ),
        "ecommerce_order",
    )
    assert created["financial_status"] == "pending"  # the reference's default
    assert created["cancelled_at"] is None
    for body in ({"order_id": "o-2"}, {"customer_id": "77"}):
        assert error(await client.patch(f"{path}/orders/o-1", json=body))[:2] == (
            400,
            "bad_request",
        )
    fine = await client.patch(f"{path}/orders/o-1", json={"order_id": "o-1", "cancelled_at": ""})
    assert fine.status_code == 200
    order = (await shop_state(control))["orders"][0]
    assert order["ignored_fields"] == ["cancelled_at:"]
    assert order["cancelled_at"] == ""  # an empty time is stored as sent

    lines = [{"product_id": "12", "quantity": 2, "price": 500}]
    replaced = await ok(
        client.patch(f"{path}/orders/o-1", json={"line_items": lines}), "ecommerce_order"
    )
    assert replaced["line_items"] == lines


async def test_ignored_keys_are_listed_per_record(
    client: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    store = await ok(
        client.post(STORES, json={**STORE, "store_id": 5, "plan": "pro"}), "ecommerce_store"
    )
    assert "plan" not in store
    assert store["store_id"] == 1  # generated: the body's store_id is not taken
    path = f"{STORES}/{store['store_id']}"
    await ok(
        client.post(f"{path}/customers", json={**CUSTOMER, "phone": "1"}), "ecommerce_customer"
    )
    await ok(
        client.post(f"{path}/customers/1234/cart", json={**CART, "line_items": [], "note": "x"}),
        "ecommerce_cart",
    )
    shop = await shop_state(control)
    assert shop["ignored_fields"] == ["plan"]
    assert shop["customers"][0]["ignored_fields"] == ["phone"]
    assert shop["customers"][0]["billing_address"] == ADDRESS  # an address keeps every key


# -- subscription types ---------------------------------------------------------------------------


async def test_subscription_types_list_and_retrieve(client: httpx.AsyncClient) -> None:
    listed = (await client.get("/subscription_types")).json()
    assert [(t["id"], t["name"]) for t in listed["subscription_types"]] == [
        (1, "Announcements"),
        (2, "Newsletter"),
    ]
    assert listed["subscription_types"][0] == {
        "id": 1,
        "name": "Announcements",
        "description": "",
        "people_count": 0,
        "status": "published",
        "display_order": 1,
    }
    assert "next" not in listed["pages"]
    one = await client.get("/subscription_types/2")
    assert one.status_code == 200
    assert one.json()["subscription_type"]["name"] == "Newsletter"
    for unknown in ("99", "abc"):
        response = await client.get(f"/subscription_types/{unknown}")
        assert error(response)[:2] == (404, "subscription_type_not_found")


@config(subscription_types=tuple(f"Type {n}" for n in range(1, 8)))
async def test_subscription_types_are_paginated_with_next_links(
    client: httpx.AsyncClient,
) -> None:
    first = (await client.get("/subscription_types", params={"per_page": 3})).json()
    assert [t["id"] for t in first["subscription_types"]] == [1, 2, 3]
    assert "page=2" in first["pages"]["next"]
    assert "prev" not in first["pages"]
    last = (await client.get("/subscription_types", params={"per_page": 3, "page": 3})).json()
    assert [t["id"] for t in last["subscription_types"]] == [7]
    assert "next" not in last["pages"]
    assert "page=2" in last["pages"]["prev"]


async def test_subscribe_and_unsubscribe_by_email_user_id_and_contact_id(
    client: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    a = (await client.post("/contacts", json={"email": "a@example.com", "user_id": "ua"})).json()
    await client.post("/contacts", json={"email": "b@example.com"})

    by_email = await client.post(
        "/subscription_types/1", json={"email": "A@example.com", "subscribed_status": True}
    )
    assert by_email.status_code == 200
    assert by_email.json()["contact"]["subscription_types"] == [{"id": 1, "name": "Announcements"}]
    by_user = await client.post(
        "/subscription_types/2", json={"user_id": "ua", "subscribed_status": True}
    )
    assert [t["id"] for t in by_user.json()["contact"]["subscription_types"]] == [1, 2]
    by_id = await client.post(
        "/subscription_types/1",
        json={"contact_id": str(a["contact"]["id"]), "subscribed_status": False},
    )
    assert [t["id"] for t in by_id.json()["contact"]["subscription_types"]] == [2]
    assert sandbox.store.subscription_types[1].contact_ids == {}
    assert (await client.get("/subscription_types/2")).json()["subscription_type"][
        "people_count"
    ] == 1
    again = await client.post(  # unsubscribing twice is fine
        "/subscription_types/1", json={"email": "a@example.com", "subscribed_status": False}
    )
    assert again.status_code == 200
    got = (await client.get("/contacts", params={"email": "a@example.com"})).json()
    assert got["contact"]["subscription_types"] == [{"id": 2, "name": "Newsletter"}]

    # user_id first, then email: an unknown user_id falls through to the email
    fall = await client.post(
        "/subscription_types/1",
        json={"user_id": "nobody", "email": "b@example.com", "subscribed_status": True},
    )
    assert fall.json()["contact"]["email"] == "b@example.com"


async def test_subscription_requests_are_checked(
    client: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    await client.post("/contacts", json={"email": "a@example.com"})
    cases: list[tuple[str, Any, int, str]] = [
        (
            "99",
            {"email": "a@example.com", "subscribed_status": True},
            404,
            "subscription_type_not_found",
        ),
        ("99", {"subscribed_status": "yes"}, 404, "subscription_type_not_found"),  # path first
        ("1", {"email": "a@example.com"}, 400, "bad_request"),
        ("1", {"email": "a@example.com", "subscribed_status": "true"}, 400, "bad_request"),
        ("1", {"email": "a@example.com", "subscribed_status": 1}, 400, "bad_request"),
        ("1", {"subscribed_status": True}, 400, "bad_request"),
        ("1", {"email": "not-an-email", "subscribed_status": True}, 400, "bad_request"),
        ("1", [], 400, "bad_request"),
        ("1", {"email": "ghost@example.com", "subscribed_status": True}, 404, "contact_not_found"),
        ("1", {"user_id": "ghost", "subscribed_status": True}, 404, "contact_not_found"),
        ("1", {"contact_id": "4242", "subscribed_status": True}, 404, "contact_not_found"),
    ]
    for type_id, body, status, code in cases:
        response = await client.post(f"/subscription_types/{type_id}", json=body)
        assert error(response)[:2] == (status, code), body
    assert sandbox.store.find_contact(email="ghost@example.com") is None  # not created
    assert all(not t.contact_ids for t in sandbox.store.subscription_types.values())


async def test_a_deleted_contact_leaves_its_subscriptions_and_reset_keeps_the_types(
    client: httpx.AsyncClient, control: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    await client.post("/contacts", json={"email": "a@example.com"})
    await client.post("/contacts", json={"email": "b@example.com"})
    for email in ("a@example.com", "b@example.com"):
        await client.post("/subscription_types/1", json={"email": email, "subscribed_status": True})
    await client.delete("/contacts", params={"email": "a@example.com"})
    kept = (await state(control))["subscription_types"][0]
    assert (kept["people_count"], len(kept["contact_ids"])) == (1, 1)

    added = await control.post(
        "/_sandbox/subscription_types", json={"name": "Offers", "description": "Deals"}
    )
    assert added.status_code == 200
    assert added.json()["id"] == 3
    duplicate = await control.post("/_sandbox/subscription_types", json={"name": "offers"})
    assert duplicate.status_code == 400
    assert (await control.post("/_sandbox/subscription_types", json={})).status_code == 400

    assert (await control.post("/_sandbox/reset")).status_code == 200
    after = (await state(control))["subscription_types"]
    assert [(t["id"], t["name"], t["people_count"]) for t in after] == [
        (1, "Announcements", 0),
        (2, "Newsletter", 0),
        (3, "Offers", 0),
    ]
    assert sandbox.store.contacts == {}


def test_subscription_type_names_are_checked() -> None:
    with pytest.raises(ValueError, match="subscription_types"):
        SandboxConfig(subscription_types=("A", "a"))
    with pytest.raises(ValueError, match="subscription_types"):
        SandboxConfig(subscription_types=("",))


# -- the state, reset, and the gates every API request passes -----------------------------------


async def test_the_state_shows_each_store_whole_and_reset_forgets_it(
    client: httpx.AsyncClient, control: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    path = await seed(client, cart=True)
    await ok(client.post(f"{path}/orders", json=ORDER), "ecommerce_order")
    shop = await shop_state(control)
    assert shop["name"] == "Voice Out"
    assert [c["customer_id"] for c in shop["customers"]] == ["1234"]
    contact = sandbox.store.find_contact(email="john.doe@example.com")
    assert contact is not None
    assert shop["customers"][0]["contact_id"] == contact.id
    assert shop["customers"][0]["cart"]["line_items"] == LINE_ITEMS
    assert [
        (p["product_id"], [v["product_variant_id"] for v in p["variants"]])
        for p in shop["products"]
    ] == [("12", ["24"])]
    assert shop["categories"] == [{**CATEGORY, "ignored_fields": []}]
    assert shop["orders"][0]["line_items"] == LINE_ITEMS
    assert shop["orders"][0]["order_total"] == 100
    requests = (await control.get("/_sandbox/requests")).json()
    assert {r["path"] for r in requests} >= {STORES, f"{path}/orders"}

    assert (await control.post("/_sandbox/reset")).status_code == 200
    assert (await state(control))["ecommerce"] == {
        "stores": [],
        "lifetime_values": {},
        "activity": [],
    }
    fresh = await ok(client.post(STORES, json=STORE), "ecommerce_store")
    assert fresh["store_id"] != 1  # ids keep counting: a stale id names nothing
    assert error(await client.get(f"{STORES}/1"))[:2] == (404, "store_not_found")


@config(rate_limit=3, rate_window=60.0)
async def test_ecommerce_requests_pass_the_rate_limit(client: httpx.AsyncClient) -> None:
    assert (await client.post(STORES, json=STORE)).status_code == 200
    assert (await client.get(STORES)).status_code == 200
    assert (await client.get("/subscription_types")).status_code == 200
    limited = await client.get(f"{STORES}/1")
    assert error(limited)[:2] == (429, "rate_limited")
    assert "Retry-After" in limited.headers


async def test_ecommerce_requests_pass_auth_and_the_faults(
    client: httpx.AsyncClient, control: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    async with httpx.AsyncClient(base_url=sandbox.url) as anonymous:
        assert (await anonymous.post(STORES, json=STORE)).status_code == 401
        assert (await anonymous.get("/subscription_types")).status_code == 401
    await control.post("/_sandbox/faults", json={"disabled": True})
    assert error(await client.get(STORES))[:2] == (403, "workspace_disabled")
    await control.post("/_sandbox/faults", json={"disabled": False, "error_rate": 1.0})
    failed = await client.post(STORES, json=STORE)
    assert failed.status_code in (500, 502, 503)
    assert sandbox.store.ecommerce.stores == {}  # a 5xx before the handler: not applied
    await control.post("/_sandbox/faults", json={"error_rate": 0.0, "force_429": 1})
    assert (await client.post("/subscription_types/1", json={})).status_code == 429
    await control.post("/_sandbox/faults", json={"non_json_rate": 1.0})
    html = await client.post(STORES, json=STORE)
    assert (html.status_code, html.headers["content-type"].split(";")[0]) == (200, "text/html")
    assert len(sandbox.store.ecommerce.stores) == 1  # applied, only the answer was lost


async def test_a_failed_request_changes_nothing_anywhere(
    client: httpx.AsyncClient, control: httpx.AsyncClient
) -> None:
    path = await seed(client, cart=True)
    await ok(client.post(f"{path}/orders", json=ORDER), "ecommerce_order")
    before = await state(control)
    bad_requests = [
        client.patch(f"{path}/orders/o-1", json={"order_total": 500, "refund_amount": 600}),
        client.patch(f"{path}/customers/1234", json={"email_address": "x", "first_name": "Z"}),
        client.post(f"{path}/customers/1234/cart", json={**CART, "order_total": -1}),
        client.patch(f"{path}/products/12", json={"price": "1", "categories": [9]}),
        client.patch(path, json={"name": "New", "currency_code": "dollars"}),
    ]
    for request in bad_requests:
        assert (await request).status_code in (400, 404, 422)
    after = await state(control)
    for key in ("contacts", "ecommerce", "subscription_types"):
        assert after[key] == before[key], key


def test_the_command_seeds_the_subscription_types() -> None:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    assert command.config_from_args(parser.parse_args([])).subscription_types == (
        "Announcements",
        "Newsletter",
    )
    args = parser.parse_args(["--subscription-type", "Offers", "--subscription-type", "Tips"])
    assert command.config_from_args(args).subscription_types == ("Offers", "Tips")
    with pytest.raises(ValueError, match="subscription_types"):
        command.config_from_args(parser.parse_args(["--subscription-type", "A"] * 2))
