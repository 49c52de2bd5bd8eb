"""Kafka security settings into aiokafka's options: TLS with a CA and a client certificate
(mutual TLS), SASL PLAIN / SCRAM, and OAUTHBEARER with the client-credentials token
provider."""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from aiokafka.abc import AbstractTokenProvider
from aiokafka.conn import OAuthAuthenticator
from aiokafka.errors import KafkaConnectionError

from destination import kafka_security as kafka_security_module
from destination import worker
from destination.kafka_security import (
    ClientCredentialsTokenProvider,
    OAuthTokenError,
    kafka_security,
)
from destination.settings import SettingsError, load_settings

BASE = {"gist_api_key": "k", "kafka_topics": ["t"]}


def test_plaintext_by_default() -> None:
    assert kafka_security(load_settings(**BASE)) == {"security_protocol": "PLAINTEXT"}


def test_sasl_scram_over_tls_with_a_ca_file(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text(_ca_pem())
    settings = load_settings(
        **BASE,
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="svc",
        kafka_sasl_password="pw-123",
        kafka_ssl_cafile=ca,
    )
    options = kafka_security(settings)
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_username"] == "svc"
    assert options["sasl_plain_password"] == "pw-123"
    assert isinstance(options["ssl_context"], ssl.SSLContext)
    assert "pw-123" not in repr(settings)


def test_sasl_plaintext_has_no_tls_context() -> None:
    settings = load_settings(
        **BASE,
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_username="u",
        kafka_sasl_password="p",
    )
    options = kafka_security(settings)
    assert "ssl_context" not in options
    assert options["sasl_mechanism"] == "PLAIN"


def test_a_missing_ca_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="KAFKA_SSL_CAFILE"):
        load_settings(**BASE, kafka_security_protocol="SSL", kafka_ssl_cafile=tmp_path / "no")


def _ca_pem() -> str:
    """A CA bundle that exists on the machine, else a throwaway self-signed one."""
    for candidate in (ssl.get_default_verify_paths().cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate).read_text()
    pytest.skip("no CA bundle on this machine to build a TLS context from")


def test_the_worker_uses_this_module() -> None:
    assert worker.kafka_security is kafka_security


# Mutual TLS ---------------------------------------------------------------------------

# A throwaway self-signed client certificate (P-256, valid to 2126), its key, the same
# key encrypted with the password "key-pw-1", and a key of another certificate.
CLIENT_CERT = """\
-----BEGIN CERTIFICATE-----
MIIBpTCCAUugAwIBAgIUGV/FpR05t5ilaToJY35F5u3On/QwCgYIKoZIzj0EAwIw
JzElMCMGA1UEAwwcZ2lzdC1kZXN0aW5hdGlvbi10ZXN0LWNsaWVudDAgFw0yNjEx
MzAwODQxMTdaGA8yMTI2MTEwNjA4NDExN1owJzElMCMGA1UEAwwcZ2lzdC1kZXN0
aW5hdGlvbi10ZXN0LWNsaWVudDBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABAqN
S/CjTFDbRpxKoD+lvXGPukZvkmZXksC3TAOOCrwd1ga02CweZMaxVB+OXFMB02BP
V9qE47qYuSYgIQRrJm2jUzBRMB0GA1UdDgQWBBQZ2O4D+zBgvIyCc6kkEi0unomk
dDAfBgNVHSMEGDAWgBQZ2O4D+zBgvIyCc6kkEi0unomkdDAPBgNVHRMBAf8EBTAD
AQH/MAoGCCqGSM49BAMCA0gAMEUCIQCSCRI3aOUalfCGzcTYvzTuHD29ri8JbeU/
T0lTcr4EaQIgcHslviCPrM4rUgSMwTH6vIWifPYWoyvMzJcDbeIWvfA=
-----END CERTIFICATE-----
"""
CLIENT_KEY = """\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgm4lEtz/uUPw3OjW3
qqd9OdZRUA9Tm7WBtq7mmOVLuVehRANCAAQKjUvwo0xQ20acSqA/pb1xj7pGb5Jm
V5LAt0wDjgq8HdYGtNgsHmTGsVQfjlxTAdNgT1fahOO6mLkmICEEayZt
-----END PRIVATE KEY-----
"""
CLIENT_KEY_ENCRYPTED = """\
-----BEGIN ENCRYPTED PRIVATE KEY-----
MIHsMFcGCSqGSIb3DQEFDTBKMCkGCSqGSIb3DQEFDDAcBAgirLIHr76FeQICCAAw
DAYIKoZIhvcNAgkFADAdBglghkgBZQMEASoEEBhj3Bqn2tRBUO6fotAbZ9YEgZD1
+Qq8KDmXD9aibp3Ykg9OR2iANiALJ1UwMaqZISLGjIn58IDZ/FZAygRzawXUA8Lc
psFgwemPt4gM+oVHQ2TOqi38pov6aO1FiSvbnRdct555trmn6CJ9qOfGvJT//50h
Y1EnhtAKnlFwZVrpEBGIWTATKFVuJrYM0yUgP9bhTnRUbwe8oRphOc96YHnpvq0=
-----END ENCRYPTED PRIVATE KEY-----
"""
KEY_PASSWORD = "key-pw-1"
OTHER_KEY = """\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgVhVZ+2G/xJZu8fKY
EikyclcGb0Qx/BKysIPQM42VBDKhRANCAAR2VVL6zFT3bPLUvUOiMTO28HSGrwcO
icA5kmSLKhGq2pFxr2b+G6wNGEKObd8nvDiN9qU68/3EpriYCeIjK1sD
-----END PRIVATE KEY-----
"""


def _files(tmp_path: Path, **texts: str) -> dict[str, Path]:
    paths = {}
    for name, text in texts.items():
        paths[name] = tmp_path / f"{name}.pem"
        paths[name].write_text(text)
    return paths


def test_mutual_tls_loads_the_client_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = _files(tmp_path, ca=_ca_pem(), cert=CLIENT_CERT, key=CLIENT_KEY)
    settings = load_settings(
        **BASE,
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=files["ca"],
        kafka_ssl_certfile=files["cert"],
        kafka_ssl_keyfile=files["key"],
    )
    options = kafka_security(settings)
    assert set(options) == {"security_protocol", "ssl_context"}
    assert isinstance(options["ssl_context"], ssl.SSLContext)

    calls: list[dict[str, Any]] = []
    real = kafka_security_module.create_ssl_context
    monkeypatch.setattr(
        kafka_security_module,
        "create_ssl_context",
        lambda **kwargs: calls.append(kwargs) or real(**kwargs),
    )
    kafka_security(settings)
    (call,) = calls
    assert call["cafile"] == str(files["ca"])
    assert (call["certfile"], call["keyfile"]) == (str(files["cert"]), str(files["key"]))


@pytest.mark.parametrize("from_file", [False, True], ids=["password", "password-file"])
def test_an_encrypted_key_with_its_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, from_file: bool
) -> None:
    files = _files(tmp_path, cert=CLIENT_CERT, key=CLIENT_KEY_ENCRYPTED)
    password: dict[str, Any] = {"kafka_ssl_key_password": KEY_PASSWORD}
    if from_file:
        (tmp_path / "pw").write_text(KEY_PASSWORD + "\n")
        password = {"kafka_ssl_key_password_file": tmp_path / "pw"}
    settings = load_settings(
        **BASE,
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_username="u",
        kafka_sasl_password="p",
        kafka_ssl_certfile=files["cert"],
        kafka_ssl_keyfile=files["key"],
        **password,
    )
    assert KEY_PASSWORD not in repr(settings)
    calls: list[dict[str, Any]] = []
    real = kafka_security_module.create_ssl_context
    monkeypatch.setattr(
        kafka_security_module,
        "create_ssl_context",
        lambda **kwargs: calls.append(kwargs) or real(**kwargs),
    )
    options = kafka_security(settings)
    assert isinstance(options["ssl_context"], ssl.SSLContext)
    assert options["sasl_mechanism"] == "PLAIN"
    assert calls[0]["password"] == KEY_PASSWORD


def _tls(tmp_path: Path, **overrides: Any) -> Any:
    files = _files(tmp_path, cert=CLIENT_CERT, key=CLIENT_KEY, enc=CLIENT_KEY_ENCRYPTED)
    values: dict[str, Any] = {
        "kafka_security_protocol": "SSL",
        "kafka_ssl_certfile": files["cert"],
        "kafka_ssl_keyfile": files["key"],
    }
    values.update(
        {k: files[v] if isinstance(v, str) and v in files else v for k, v in overrides.items()}
    )
    return load_settings(**BASE, **{k: v for k, v in values.items() if v is not None})


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"kafka_ssl_keyfile": None}, "KAFKA_SSL_KEYFILE: required with KAFKA_SSL_CERTFILE"),
        ({"kafka_ssl_certfile": None}, "KAFKA_SSL_CERTFILE: required with KAFKA_SSL_KEYFILE"),
        ({"kafka_ssl_certfile": Path("/no/cert.pem")}, "KAFKA_SSL_CERTFILE: no such file"),
        ({"kafka_ssl_keyfile": Path("/no/key.pem")}, "KAFKA_SSL_KEYFILE: no such file"),
        ({"kafka_security_protocol": "PLAINTEXT"}, "KAFKA_SSL_CERTFILE: .* needs .*SSL"),
        ({"kafka_ssl_keyfile": "enc"}, "KAFKA_SSL_KEY_PASSWORD: required: the key .* is encrypted"),
        (
            {"kafka_ssl_keyfile": "enc", "kafka_ssl_key_password": "wrong-pw"},
            "KAFKA_SSL_KEYFILE: cannot load",
        ),
        (
            {"kafka_ssl_keyfile": "enc", "kafka_ssl_key_password_file": Path("/no/pw")},
            "KAFKA_SSL_KEY_PASSWORD_FILE: no such file",
        ),
        ({"kafka_ssl_keyfile": "cert"}, "KAFKA_SSL_KEYFILE: cannot load"),
        ({"kafka_ssl_keyfile": "other"}, "KAFKA_SSL_KEYFILE: cannot load"),
        (
            {"kafka_ssl_certfile": None, "kafka_ssl_keyfile": None, "kafka_ssl_key_password": "x"},
            "KAFKA_SSL_KEY_PASSWORD: a password for no key",
        ),
    ],
    ids=[
        "cert-without-key",
        "key-without-cert",
        "missing-cert",
        "missing-key",
        "without-tls",
        "encrypted-key-without-password",
        "wrong-password",
        "missing-password-file",
        "not-a-key",
        "key-of-another-certificate",
        "password-without-key",
    ],
)
def test_client_certificate_problems_stop_start_up(
    tmp_path: Path, overrides: dict[str, Any], named: str
) -> None:
    (tmp_path / "other.pem").write_text(OTHER_KEY)
    if overrides.get("kafka_ssl_keyfile") == "other":
        overrides["kafka_ssl_keyfile"] = tmp_path / "other.pem"
    with pytest.raises(SettingsError, match=named) as caught:
        _tls(tmp_path, **overrides)
    assert "wrong-pw" not in str(caught.value)


# SASL OAUTHBEARER ---------------------------------------------------------------------

OAUTH = {
    "kafka_security_protocol": "SASL_SSL",
    "kafka_sasl_mechanism": "OAUTHBEARER",
    "kafka_sasl_oauth_token_url": "https://idp.example/oauth2/token",
    "kafka_sasl_oauth_client_id": "gist-destination",
    "kafka_sasl_oauth_client_secret": "s3cret-value",
}


def test_oauthbearer_options_carry_a_token_provider() -> None:
    settings = load_settings(**BASE, **OAUTH, kafka_sasl_oauth_scope="kafka")
    options = kafka_security(settings)
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "OAUTHBEARER"
    provider = options["sasl_oauth_token_provider"]
    assert isinstance(provider, ClientCredentialsTokenProvider)
    assert isinstance(provider, AbstractTokenProvider)  # what aiokafka checks
    assert "sasl_plain_username" not in options
    assert "s3cret-value" not in repr(settings) + repr(provider)


def test_the_client_secret_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("from-file\n")
    values = {**OAUTH, "kafka_sasl_oauth_client_secret": None}
    values["kafka_sasl_oauth_client_secret_file"] = tmp_path / "secret"
    settings = load_settings(**BASE, **{k: v for k, v in values.items() if v is not None})
    provider = kafka_security(settings)["sasl_oauth_token_provider"]
    assert provider._secret == "from-file"


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"kafka_security_protocol": "SSL"}, "KAFKA_SASL_MECHANISM: OAUTHBEARER needs"),
        ({"kafka_security_protocol": "PLAINTEXT"}, "KAFKA_SASL_MECHANISM: OAUTHBEARER needs"),
        ({"kafka_sasl_oauth_token_url": None}, "KAFKA_SASL_OAUTH_TOKEN_URL: required"),
        ({"kafka_sasl_oauth_token_url": "idp/token"}, "KAFKA_SASL_OAUTH_TOKEN_URL: must start"),
        ({"kafka_sasl_oauth_client_id": None}, "KAFKA_SASL_OAUTH_CLIENT_ID: required"),
        ({"kafka_sasl_oauth_client_secret": None}, "KAFKA_SASL_OAUTH_CLIENT_SECRET: required"),
        (
            {
                "kafka_sasl_oauth_client_secret": None,
                "kafka_sasl_oauth_client_secret_file": Path("/no/secret"),
            },
            "KAFKA_SASL_OAUTH_CLIENT_SECRET_FILE: no such file",
        ),
    ],
    ids=[
        "over-ssl",
        "over-plaintext",
        "no-url",
        "bad-url",
        "no-client-id",
        "no-secret",
        "missing-secret-file",
    ],
)
def test_oauthbearer_settings_are_checked(overrides: dict[str, Any], named: str) -> None:
    values = {**OAUTH, **overrides}
    with pytest.raises(SettingsError, match=named):
        load_settings(**BASE, **{k: v for k, v in values.items() if v is not None})


def test_oauthbearer_needs_no_user_name() -> None:
    values = {**OAUTH, "kafka_security_protocol": "SASL_PLAINTEXT"}
    assert load_settings(**BASE, **values).kafka_sasl_username is None


# The token provider -------------------------------------------------------------------

TOKEN_URL = "https://idp.example/oauth2/token"
SECRET = "s3cret-value"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TokenEndpoint:
    """A stand-in token endpoint: answers with the next of ``answers`` (a JSON body, or a
    status and a body) and records the requests."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, tuple):
            status, body = answer
            if isinstance(body, str):
                return httpx.Response(status, text=body)
            return httpx.Response(status, json=body)
        return httpx.Response(200, json=answer)


def _provider(
    endpoint: Callable[[httpx.Request], httpx.Response], clock: Clock, scope: str | None = None
) -> ClientCredentialsTokenProvider:
    return ClientCredentialsTokenProvider(
        TOKEN_URL,
        "client-1",
        SECRET,
        scope=scope,
        transport=httpx.MockTransport(endpoint),
        clock=clock,
    )


async def test_a_token_is_fetched_with_the_client_credentials_grant() -> None:
    endpoint = TokenEndpoint({"access_token": "tok-1", "token_type": "Bearer", "expires_in": 3600})
    provider = _provider(endpoint, Clock(), scope="kafka.read kafka.write")
    assert await provider.token() == "tok-1"
    (request,) = endpoint.requests
    assert request.method == "POST"
    assert str(request.url) == TOKEN_URL
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert parse_qs(request.content.decode()) == {
        "grant_type": ["client_credentials"],
        "scope": ["kafka.read kafka.write"],
    }
    credentials = base64.b64encode(f"client-1:{SECRET}".encode()).decode()
    assert request.headers["authorization"] == f"Basic {credentials}"


async def test_no_scope_is_sent_unless_given() -> None:
    endpoint = TokenEndpoint({"access_token": "tok-1", "expires_in": 3600})
    await _provider(endpoint, Clock()).token()
    assert parse_qs(endpoint.requests[0].content.decode()) == {"grant_type": ["client_credentials"]}


async def test_the_token_is_cached_and_refreshed_shortly_before_it_expires() -> None:
    endpoint = TokenEndpoint(
        {"access_token": "tok-1", "expires_in": 3600},
        {"access_token": "tok-2", "expires_in": "60"},  # some providers send a string
        {"access_token": "tok-3", "expires_in": 60},
    )
    clock = Clock()
    provider = _provider(endpoint, clock)
    assert await provider.token() == "tok-1"
    clock.now += 3539  # up to a minute before expiry: the cached token
    assert await provider.token() == "tok-1"
    assert len(endpoint.requests) == 1
    clock.now += 2  # 59 s before it expires: a new one
    assert await provider.token() == "tok-2"
    assert len(endpoint.requests) == 2
    clock.now += 47  # a short-lived token is refreshed after 80% of its life
    assert await provider.token() == "tok-2"
    clock.now += 2
    assert await provider.token() == "tok-3"
    assert len(endpoint.requests) == 3


async def test_a_token_without_expires_in_is_kept_for_the_default_lifetime() -> None:
    endpoint = TokenEndpoint({"access_token": "tok-1"}, {"access_token": "tok-2"})
    clock = Clock()
    provider = _provider(endpoint, clock)
    assert await provider.token() == "tok-1"
    clock.now += ClientCredentialsTokenProvider.DEFAULT_LIFETIME * 0.8 - 1
    assert await provider.token() == "tok-1"
    clock.now += 2
    assert await provider.token() == "tok-2"


async def test_connections_opened_together_share_one_request() -> None:
    endpoint = TokenEndpoint({"access_token": "tok-1", "expires_in": 3600})
    provider = _provider(endpoint, Clock())
    tokens = await asyncio.gather(*(provider.token() for _ in range(5)))
    assert tokens == ["tok-1"] * 5
    assert len(endpoint.requests) == 1


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (
            (401, {"error": "invalid_client", "error_description": "Bad client credentials"}),
            "HTTP 401 (invalid_client: Bad client credentials)",
        ),
        ((400, {"error": "invalid_scope"}), "HTTP 400 (invalid_scope)"),
        ((503, f"<html>upstream down; you sent {SECRET}</html>"), "HTTP 503 (<html>upstream"),
        ({"token_type": "Bearer"}, "the answer has no access_token"),
        ((200, "not json"), "the answer has no access_token"),
        (httpx.ConnectError("connection refused"), "cannot reach it: ConnectError"),
    ],
    ids=["refused", "oauth-error-only", "not-json", "no-token", "no-json", "unreachable"],
)
async def test_a_refusal_is_a_clear_error_without_the_secret(answer: Any, expected: str) -> None:
    provider = _provider(TokenEndpoint(answer), Clock())
    with pytest.raises(OAuthTokenError) as caught:
        await provider.token()
    message = str(caught.value)
    assert expected in message
    assert "KAFKA_SASL_OAUTH_TOKEN_URL" in message
    assert TOKEN_URL in message
    assert "client-1" in message
    assert SECRET not in message
    # aiokafka takes it for a broker it cannot reach: logged, and the connection retried
    assert isinstance(caught.value, KafkaConnectionError)


async def test_a_failed_refresh_keeps_the_valid_token_until_it_expires() -> None:
    endpoint = TokenEndpoint(
        {"access_token": "tok-1", "expires_in": 3600},
        (503, "busy"),
        (503, "busy"),
        {"access_token": "tok-2", "expires_in": 3600},
    )
    clock = Clock()
    provider = _provider(endpoint, clock)
    assert await provider.token() == "tok-1"
    clock.now += 3590  # due for refresh, still valid: the endpoint's failure is absorbed
    assert await provider.token() == "tok-1"
    clock.now += 20  # expired: the failure shows
    with pytest.raises(OAuthTokenError, match="HTTP 503"):
        await provider.token()
    assert await provider.token() == "tok-2"


async def test_aiokafka_sends_the_token_as_the_oauthbearer_initial_response() -> None:
    provider = _provider(TokenEndpoint({"access_token": "tok-1", "expires_in": 3600}), Clock())
    step = await OAuthAuthenticator(sasl_oauth_token_provider=provider).step(b"")
    assert step == (b"n,,\x01auth=Bearer tok-1\x01\x01", True)
