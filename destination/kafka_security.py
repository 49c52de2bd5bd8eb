"""Kafka's security settings made into aiokafka's client options.

TLS (``SSL`` / ``SASL_SSL``): the brokers' CA (``KAFKA_SSL_CAFILE``, else the system's)
and, for mutual TLS, a client certificate and key (``KAFKA_SSL_CERTFILE`` /
``KAFKA_SSL_KEYFILE``, the key's password from ``KAFKA_SSL_KEY_PASSWORD[_FILE]``).

SASL (``SASL_PLAINTEXT`` / ``SASL_SSL``): ``PLAIN`` and ``SCRAM-SHA-*`` with a user name
and password, or ``OAUTHBEARER`` with access tokens from an OIDC provider's
client-credentials grant (``ClientCredentialsTokenProvider``).

The same options serve every client of a worker (consumer, producer, record reader), so
they share one token provider and so one cached token.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
from aiokafka.abc import AbstractTokenProvider
from aiokafka.errors import KafkaConnectionError
from aiokafka.helpers import create_ssl_context

from destination.settings import (
    Settings,
    kafka_sasl_oauth_client_secret,
    kafka_ssl_key_password,
    no_prompt_password,
)


def kafka_security(settings: Settings) -> dict[str, Any]:
    """The options that aiokafka's consumer and producer take for ``settings``' security
    protocol: ``security_protocol``, and ``ssl_context`` and the ``sasl_*`` ones as it
    needs. Raises ``SettingsError`` when a secret file cannot be read."""
    protocol = settings.kafka_security_protocol
    options: dict[str, Any] = {"security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = _ssl_context(settings)
    if protocol.startswith("SASL"):
        mechanism = settings.kafka_sasl_mechanism
        options["sasl_mechanism"] = mechanism
        if mechanism == "OAUTHBEARER":
            options["sasl_oauth_token_provider"] = token_provider(settings)
        else:
            options["sasl_plain_username"] = settings.kafka_sasl_username
            password = settings.kafka_sasl_password
            options["sasl_plain_password"] = password.get_secret_value() if password else None
    return options


def _ssl_context(settings: Settings) -> Any:
    cafile = str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
    if settings.kafka_ssl_certfile is None or settings.kafka_ssl_keyfile is None:
        return create_ssl_context(cafile=cafile)
    return create_ssl_context(
        cafile=cafile,
        certfile=str(settings.kafka_ssl_certfile),
        keyfile=str(settings.kafka_ssl_keyfile),
        password=no_prompt_password(kafka_ssl_key_password(settings)),
    )


def token_provider(settings: Settings) -> ClientCredentialsTokenProvider:
    """The OAUTHBEARER token provider of ``settings`` (KAFKA_SASL_OAUTH_*)."""
    assert settings.kafka_sasl_oauth_token_url is not None  # checked with the settings
    assert settings.kafka_sasl_oauth_client_id is not None
    return ClientCredentialsTokenProvider(
        settings.kafka_sasl_oauth_token_url,
        settings.kafka_sasl_oauth_client_id,
        kafka_sasl_oauth_client_secret(settings),
        scope=settings.kafka_sasl_oauth_scope or None,
    )


class OAuthTokenError(KafkaConnectionError):  # type: ignore[misc]  # aiokafka is untyped
    """No access token: the token endpoint refused the grant, answered something that is
    not a token, or could not be reached. The message never holds the client secret.

    A ``KafkaConnectionError``, so that aiokafka treats it as it treats a broker it cannot
    reach: it logs the message and tries again (at start-up, it fails to bootstrap)."""


class ClientCredentialsTokenProvider(AbstractTokenProvider):  # type: ignore[misc]
    """SASL/OAUTHBEARER access tokens from an OAuth 2.0 client-credentials grant.

    ``token()`` POSTs ``grant_type=client_credentials`` (and ``scope``, when given) to
    the token URL, authenticating the client with HTTP Basic (``client_secret_basic``, as
    Kafka's own Java client does), and returns the ``access_token`` of the JSON answer.
    The token is reused until shortly before its ``expires_in`` runs out (at most
    ``REFRESH_BEFORE`` seconds before, and never later than 80% of its life; a token
    without ``expires_in`` is kept ``DEFAULT_LIFETIME`` seconds). Concurrent calls wait
    for one request. If a refresh fails while the cached token is still valid, that token
    is returned and the next call tries again.
    """

    REFRESH_BEFORE = 60.0
    DEFAULT_LIFETIME = 300.0

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str,
        *,
        scope: str | None = None,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = token_url
        self._client_id = client_id
        self._secret = client_secret
        self._scope = scope
        self._timeout = timeout
        self._transport = transport
        self._clock = clock
        self._token: str | None = None
        self._refresh_at = 0.0
        self._expires_at = 0.0
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"ClientCredentialsTokenProvider({self._url!r}, client_id={self._client_id!r})"

    async def token(self) -> str:
        if self._token is not None and self._clock() < self._refresh_at:
            return self._token
        async with self._lock:
            if self._token is not None and self._clock() < self._refresh_at:
                return self._token  # another caller fetched it meanwhile
            try:
                token, lifetime, asked_at = await self._fetch()
            except OAuthTokenError:
                if self._token is not None and self._clock() < self._expires_at:
                    return self._token
                raise
            self._token = token
            self._expires_at = asked_at + lifetime
            self._refresh_at = asked_at + lifetime - min(self.REFRESH_BEFORE, lifetime * 0.2)
            return token

    async def _fetch(self) -> tuple[str, float, float]:
        """A new token, its lifetime (s) and when it was asked for (the clock's time)."""
        form = {"grant_type": "client_credentials"}
        if self._scope:
            form["scope"] = self._scope
        asked_at = self._clock()
        try:
            async with httpx.AsyncClient(transport=self._transport, timeout=self._timeout) as http:
                response = await http.post(
                    self._url,
                    data=form,
                    auth=httpx.BasicAuth(self._client_id, self._secret),
                    headers={"Accept": "application/json"},
                )
        except httpx.HTTPError as exc:
            raise self._error(f"cannot reach it: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            raise self._error(f"HTTP {response.status_code}{self._refusal(response)}")
        try:
            answer = response.json()
        except ValueError:
            answer = None
        token = answer.get("access_token") if isinstance(answer, dict) else None
        if not isinstance(token, str) or not token:
            raise self._error("the answer has no access_token")
        return token, self._lifetime(answer.get("expires_in")), asked_at

    def _lifetime(self, expires_in: Any) -> float:
        if isinstance(expires_in, str):
            try:
                expires_in = float(expires_in)
            except ValueError:
                return self.DEFAULT_LIFETIME
        if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
            return max(float(expires_in), 0.0)
        return self.DEFAULT_LIFETIME

    def _refusal(self, response: httpx.Response) -> str:
        """The OAuth error of a refusal (RFC 6749 5.2: ``error``, ``error_description``),
        else the start of the body."""
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if isinstance(answer, dict) and isinstance(answer.get("error"), str):
            text = answer["error"]
            description = answer.get("error_description")
            if isinstance(description, str) and description:
                text += f": {description}"
        else:
            text = " ".join(response.text.split())[:200]
        return f" ({text})" if text else ""

    def _error(self, problem: str) -> OAuthTokenError:
        message = (
            f"KAFKA_SASL_OAUTH_TOKEN_URL: no OAUTHBEARER token for client "
            f"{self._client_id!r} from {self._url}: {problem}"
        )
        return OAuthTokenError(message.replace(self._secret, "***"))
