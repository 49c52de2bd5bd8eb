"""Every setting of ``gist-destination run``, declared once, typed and checked at start-up.

Settings come from the environment; ``--settings FILE`` (dotenv format: ``NAME=value``
lines) may supply them too, the environment winning. The variable names are the public
interface. A bad or missing value stops start-up with a message naming the variable.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1024 * 1024


class SettingsError(Exception):
    """Start-up settings are invalid; ``problems`` names each variable and what is wrong."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid settings:\n" + "\n".join(f"  {p}" for p in problems))
        self.problems = problems


class SettingsProblems(ValueError):
    """The problems across settings, all of them: raised inside validation, read back out
    of pydantic's error by ``load_settings``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        case_sensitive=False, extra="ignore", env_file_encoding="utf-8", frozen=True
    )

    # --- Gist ---
    gist_api_key: SecretStr | None = Field(None, description="the workspace's API key")
    gist_api_key_file: Path | None = Field(None, description="a file holding the API key")
    gist_api_url: str = "https://api.getgist.com"
    gist_rate_limit: int = Field(100, ge=1, description="requests per window per workspace")
    gist_rate_window: float = Field(10.0, gt=0, description="seconds")
    gist_rate_margin: float = Field(0.05, ge=0, description="seconds added to the window")
    gist_batch_size: int = Field(500, ge=1, le=10_000, description="contacts per batch import")
    gist_batch_wait: float = Field(1.0, ge=0, description="longest wait to fill a batch, s")
    gist_max_concurrent_requests: int = Field(32, ge=1)
    gist_request_timeout: float = Field(30.0, gt=0, description="seconds")
    gist_retry_max_duration: float = Field(
        6 * 3600.0, ge=0, description="how long a transient failure is retried, s"
    )
    gist_retry_base: float = Field(0.5, gt=0)
    gist_retry_cap: float = Field(60.0, gt=0)
    gist_batch_poll_interval: float = Field(1.0, gt=0)
    gist_batch_poll_max_interval: float = Field(30.0, gt=0)
    gist_batch_deadline: float = Field(
        3600.0, gt=0, description="longest wait for a batch import to complete, s"
    )
    gist_late_import_watch: float = Field(
        600.0,
        ge=0,
        description="how long after giving up on an import a delete of one of its "
        "contacts waits for its fate (sent again if it lands), s; 0: no wait",
    )

    # --- the shared budget (optional) ---
    redis_url: str | None = Field(
        None, description="redis:// or rediss:// URL of the Redis that holds the shared budget"
    )
    redis_password: SecretStr | None = None
    redis_password_file: Path | None = None
    redis_timeout: float = Field(0.5, gt=0, description="longest wait for Redis, s")
    redis_key_prefix: str = "gist-destination"

    # --- Kafka ---
    kafka_bootstrap_servers: str = "localhost:9092"
    kafka_topics: Annotated[list[str], NoDecode] = Field(default_factory=list)
    kafka_group_id: str = "gist-destination"
    kafka_dlq_topic: str = "gist-destination-dlq"
    kafka_suppression_topic: str = Field(
        "gist-destination-suppressions",
        description="compacted topic of deleted people's identities (SUPPRESS_DELETED_DAYS)",
    )
    kafka_dlq_max_bytes: int = Field(
        1024 * 1024, ge=1024, description="largest dead letter the producer sends"
    )
    kafka_client_id: str = "gist-destination"
    kafka_auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] = (
        "PLAIN"
    )
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_sasl_oauth_token_url: str | None = Field(
        None, description="OAUTHBEARER: the OIDC provider's token endpoint"
    )
    kafka_sasl_oauth_client_id: str | None = None
    kafka_sasl_oauth_client_secret: SecretStr | None = None
    kafka_sasl_oauth_client_secret_file: Path | None = None
    kafka_sasl_oauth_scope: str | None = Field(None, description="space-separated scopes")
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = Field(None, description="client certificate (PEM)")
    kafka_ssl_keyfile: Path | None = Field(None, description="the certificate's key (PEM)")
    kafka_ssl_key_password: SecretStr | None = None
    kafka_ssl_key_password_file: Path | None = None
    kafka_max_poll_records: int = Field(500, ge=1)
    kafka_session_timeout_ms: int = Field(10_000, ge=1000)

    # --- spending the budget only on changes ---
    dedup_window: float = Field(
        86_400.0, ge=0, description="seconds a delivered messageId is remembered; 0: off"
    )
    dedup_max_ids: int = Field(1_000_000, ge=1, description="ids remembered in this process")
    suppress_deleted_days: float = Field(
        30.0, ge=0, description="days a deleted person's messages are skipped; 0: off"
    )
    contact_memory: bool = Field(True, description="leave out fields Gist already holds")
    contact_memory_ttl: float = Field(86_400.0, gt=0, description="seconds a value is trusted")
    contact_memory_max: int = Field(200_000, ge=1, description="contacts remembered here")
    contact_memory_max_bytes: int = Field(
        64 * MiB, ge=1024, description="bytes of contact memory in this process at most"
    )

    # --- flow control ---
    read_ahead_seconds: float = Field(
        10.0, gt=0, description="hold what the budget can send (and Gist import) in this long"
    )
    max_inflight_messages: int = Field(20_000, ge=1)
    max_inflight_bytes: int = Field(64 * MiB, ge=1024)
    max_inflight_per_partition: int = Field(5_000, ge=1)
    max_awaiting_import: int = Field(
        100_000, ge=1, description="messages whose contacts wait only for Gist's import"
    )
    max_uncommitted_per_partition: int = Field(
        200_000, ge=1, description="records read past a partition's committable offset"
    )
    max_uncommitted_total: int = Field(
        1_000_000, ge=1, description="records read past the committable offsets, all partitions"
    )
    commit_interval: float = Field(1.0, gt=0, description="seconds between offset commits")
    shutdown_timeout: float = Field(
        20.0, ge=0, description="seconds from SIGTERM to exit: drain, commit, hand over"
    )
    rebalance_timeout: float = Field(
        5.0, ge=0, description="seconds a revocation waits for requests on the wire to answer"
    )
    rebalance_send_through: float = Field(
        20.0,
        ge=0,
        le=600,
        description="seconds opened work goes on being sent while the group rejoins",
    )

    # --- operation ---
    metrics_host: str = "0.0.0.0"
    metrics_port: int = Field(9464, ge=0, le=65535)
    mapping_config: Path | None = None
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_emails: bool = Field(False, description="log raw e-mail addresses (off: redacted)")

    @field_validator("kafka_topics", mode="before")
    @classmethod
    def _split_topics(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [t.strip() for t in value.split(",") if t.strip()]
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("gist_api_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _complete(self) -> Settings:
        """Every problem across settings at once (``SettingsProblems``), not the first."""
        problems = [*self._required(), *self._kafka_sasl_problems(), *self._kafka_tls_problems()]
        if self.redis_url is not None and not self.redis_url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            problems.append("REDIS_URL: must start with redis://, rediss:// or unix://")
        if self.redis_password_file is not None and not self.redis_password_file.is_file():
            problems.append(f"REDIS_PASSWORD_FILE: no such file: {self.redis_password_file}")
        if self.max_inflight_per_partition > self.max_inflight_messages:
            problems.append("MAX_INFLIGHT_PER_PARTITION: must not exceed MAX_INFLIGHT_MESSAGES")
        if problems:
            raise SettingsProblems(problems)
        return self

    def _required(self) -> list[str]:
        problems = []
        if not self.kafka_topics:
            problems.append("KAFKA_TOPICS: required: the comma-separated topics to consume")
        if self.gist_api_key is None and self.gist_api_key_file is None:
            problems.append("GIST_API_KEY: required (or GIST_API_KEY_FILE)")
        if self.kafka_dlq_topic in self.kafka_topics:
            problems.append("KAFKA_DLQ_TOPIC: must not be one of KAFKA_TOPICS")
        if self.suppress_deleted_days > 0 and self.kafka_suppression_topic in (
            *self.kafka_topics,
            self.kafka_dlq_topic,
        ):
            problems.append(
                "KAFKA_SUPPRESSION_TOPIC: must be a topic of its own (not an input or the DLQ)"
            )
        return problems

    def _kafka_sasl_problems(self) -> list[str]:
        protocol = self.kafka_security_protocol
        problems = []
        if self.kafka_sasl_mechanism == "OAUTHBEARER":
            if not protocol.startswith("SASL"):
                problems.append(
                    "KAFKA_SASL_MECHANISM: OAUTHBEARER needs KAFKA_SECURITY_PROTOCOL=SASL_SSL "
                    f"(or SASL_PLAINTEXT), not {protocol}"
                )
            url = self.kafka_sasl_oauth_token_url
            if not url:
                problems.append(
                    "KAFKA_SASL_OAUTH_TOKEN_URL: required with KAFKA_SASL_MECHANISM=OAUTHBEARER"
                )
            elif not url.startswith(("https://", "http://")):
                problems.append(
                    "KAFKA_SASL_OAUTH_TOKEN_URL: must start with https:// or http://"
                )
            if not self.kafka_sasl_oauth_client_id:
                problems.append(
                    "KAFKA_SASL_OAUTH_CLIENT_ID: required with KAFKA_SASL_MECHANISM=OAUTHBEARER"
                )
            try:
                _oauth_client_secret(
                    self.kafka_sasl_oauth_client_secret, self.kafka_sasl_oauth_client_secret_file
                )
            except ValueError as error:
                problems.append(str(error))
        elif protocol.startswith("SASL"):
            for name, value in (
                ("KAFKA_SASL_USERNAME", self.kafka_sasl_username),
                ("KAFKA_SASL_PASSWORD", self.kafka_sasl_password),
            ):
                if not value:
                    problems.append(
                        f"{name}: required with KAFKA_SECURITY_PROTOCOL={protocol} "
                        f"(KAFKA_SASL_MECHANISM={self.kafka_sasl_mechanism})"
                    )
        return problems

    def _kafka_tls_problems(self) -> list[str]:
        problems = []
        if self.kafka_ssl_cafile is not None and not self.kafka_ssl_cafile.is_file():
            problems.append(f"KAFKA_SSL_CAFILE: no such file: {self.kafka_ssl_cafile}")
        cert, key = self.kafka_ssl_certfile, self.kafka_ssl_keyfile
        if cert is None and key is None:
            if self.kafka_ssl_key_password or self.kafka_ssl_key_password_file:
                problems.append(
                    "KAFKA_SSL_KEY_PASSWORD: a password for no key: set KAFKA_SSL_CERTFILE and "
                    "KAFKA_SSL_KEYFILE too"
                )
            return problems
        if cert is None or key is None:
            given, missing = (
                ("KAFKA_SSL_KEYFILE", "KAFKA_SSL_CERTFILE")
                if cert is None
                else ("KAFKA_SSL_CERTFILE", "KAFKA_SSL_KEYFILE")
            )
            problems.append(f"{missing}: required with {given} (a client certificate and its key)")
            return problems
        if self.kafka_security_protocol not in ("SSL", "SASL_SSL"):
            problems.append(
                "KAFKA_SSL_CERTFILE: a client certificate needs KAFKA_SECURITY_PROTOCOL=SSL or "
                f"SASL_SSL, not {self.kafka_security_protocol}"
            )
        unreadable = [
            f"{name}: no such file: {path}"
            for name, path in (("KAFKA_SSL_CERTFILE", cert), ("KAFKA_SSL_KEYFILE", key))
            if not path.is_file()
        ]
        password_file = self.kafka_ssl_key_password_file
        if (
            self.kafka_ssl_key_password is None
            and password_file is not None
            and not password_file.is_file()
        ):
            unreadable.append(f"KAFKA_SSL_KEY_PASSWORD_FILE: no such file: {password_file}")
        if unreadable:
            return problems + unreadable
        try:
            _check_client_certificate(
                cert,
                key,
                _secret_or_file(
                    self.kafka_ssl_key_password, password_file, "KAFKA_SSL_KEY_PASSWORD_FILE"
                ),
            )
        except ValueError as error:
            problems.append(str(error))
        return problems

    def api_key(self) -> str:
        """The key itself, read from GIST_API_KEY or the file GIST_API_KEY_FILE names."""
        if self.gist_api_key is not None:
            key = self.gist_api_key.get_secret_value().strip()
            if not key:
                raise SettingsError(["GIST_API_KEY: is empty"])
            return key
        assert self.gist_api_key_file is not None
        try:
            key = self.gist_api_key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SettingsError(
                [f"GIST_API_KEY_FILE: cannot read {self.gist_api_key_file}: {exc.strerror}"]
            ) from None
        if not key:
            raise SettingsError([f"GIST_API_KEY_FILE: {self.gist_api_key_file} is empty"])
        return key


def redis_password(settings: Settings) -> str | None:
    """The Redis password from REDIS_PASSWORD or the file REDIS_PASSWORD_FILE names (a
    password in REDIS_URL is used as it is)."""
    if settings.redis_password is not None:
        return settings.redis_password.get_secret_value()
    if settings.redis_password_file is not None:
        try:
            return settings.redis_password_file.read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            raise SettingsError(
                [f"REDIS_PASSWORD_FILE: cannot read {settings.redis_password_file}: "
                 f"{exc.strerror}"]
            ) from None  # fmt: skip
    return None


def kafka_ssl_key_password(settings: Settings) -> str | None:
    """The client key's password from KAFKA_SSL_KEY_PASSWORD or the file
    KAFKA_SSL_KEY_PASSWORD_FILE names; ``None`` when the key is not encrypted."""
    try:
        return _secret_or_file(
            settings.kafka_ssl_key_password,
            settings.kafka_ssl_key_password_file,
            "KAFKA_SSL_KEY_PASSWORD_FILE",
        )
    except ValueError as exc:
        raise SettingsError([str(exc)]) from None


def kafka_sasl_oauth_client_secret(settings: Settings) -> str:
    """The OAuth client secret from KAFKA_SASL_OAUTH_CLIENT_SECRET or the file
    KAFKA_SASL_OAUTH_CLIENT_SECRET_FILE names (read again: a rotated file is seen)."""
    try:
        return _oauth_client_secret(
            settings.kafka_sasl_oauth_client_secret, settings.kafka_sasl_oauth_client_secret_file
        )
    except ValueError as exc:
        raise SettingsError([str(exc)]) from None


def _oauth_client_secret(value: SecretStr | None, file: Path | None) -> str:
    if value is not None:
        if not value.get_secret_value().strip():
            raise ValueError("KAFKA_SASL_OAUTH_CLIENT_SECRET: is empty")
        return value.get_secret_value()
    if file is None:
        raise ValueError(
            "KAFKA_SASL_OAUTH_CLIENT_SECRET: required (or KAFKA_SASL_OAUTH_CLIENT_SECRET_FILE) "
            "with KAFKA_SASL_MECHANISM=OAUTHBEARER"
        )
    if not file.is_file():
        raise ValueError(f"KAFKA_SASL_OAUTH_CLIENT_SECRET_FILE: no such file: {file}")
    secret = _secret_or_file(None, file, "KAFKA_SASL_OAUTH_CLIENT_SECRET_FILE")
    if not secret:
        raise ValueError(f"KAFKA_SASL_OAUTH_CLIENT_SECRET_FILE: {file} is empty")
    return secret


def _secret_or_file(value: SecretStr | None, file: Path | None, file_name: str) -> str | None:
    """A secret given as it is, else read (stripped) from a file; ``ValueError`` naming the
    file's variable when it cannot be read."""
    if value is not None:
        return value.get_secret_value()
    if file is None:
        return None
    try:
        return file.read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ValueError(f"{file_name}: cannot read {file}: {reason}") from None


def _check_client_certificate(cert: Path, key: Path, password: str | None) -> None:
    """Load the client certificate and key once, so that a bad file or a wrong password
    stops start-up with the variable named (not the first connection to Kafka)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(cert, key, password=no_prompt_password(password))
    except ssl.SSLError as exc:
        raise ValueError(
            f"KAFKA_SSL_KEYFILE: cannot load the client certificate {cert} with the key {key} "
            "(a PEM certificate and its private key; the right KAFKA_SSL_KEY_PASSWORD if the "
            f"key is encrypted): {exc.strerror or exc}"
        ) from None
    except KeyPasswordMissing:
        raise ValueError(
            f"KAFKA_SSL_KEY_PASSWORD: required: the key {key} is encrypted "
            "(or KAFKA_SSL_KEY_PASSWORD_FILE)"
        ) from None


class KeyPasswordMissing(Exception):
    """An encrypted client key and no password (OpenSSL would prompt on the terminal)."""


def no_prompt_password(password: str | None) -> str | Callable[[], str]:
    """The ``password`` argument of ``load_cert_chain``: the password, or else a callback
    that raises ``KeyPasswordMissing`` (without one OpenSSL asks on the terminal for an
    encrypted key's password, which would hang a worker)."""
    if password is not None:
        return password

    def missing() -> str:
        raise KeyPasswordMissing("the client key is encrypted and no password was given")

    return missing


def load_settings(env_file: Path | None = None, **overrides: Any) -> Settings:
    """Read and check the settings; raises ``SettingsError`` naming every bad variable,
    and every missing one, at once."""
    if env_file is not None and not env_file.is_file():
        raise SettingsError([f"--settings: no such file: {env_file}"])
    try:
        return Settings(_env_file=env_file, **overrides)  # type: ignore[call-arg]
    except ValidationError as exc:
        problems = [p for e in exc.errors() for p in _describe(e)]
        bad = {str(e["loc"][0]) for e in exc.errors() if e.get("loc")}
    if bad:
        # A bad value stops pydantic before the checks across settings (required ones
        # included): run those again with the bad values at their defaults.
        defaults = {
            name: Settings.model_fields[name].get_default(call_default_factory=True)
            for name in bad
            if name in Settings.model_fields
        }
        try:
            Settings(_env_file=env_file, **{**overrides, **defaults})  # type: ignore[call-arg]
        except ValidationError as again:
            problems += [
                p for e in again.errors() for p in _describe(e) if p not in problems
            ]
    raise SettingsError(problems)


def _describe(error: Any) -> list[str]:
    found = error.get("ctx", {}).get("error")
    if isinstance(found, SettingsProblems):
        return found.problems
    return [_describe_one(error)]


def _describe_one(error: Any) -> str:
    loc = [str(part) for part in error.get("loc", ())]
    message = str(error.get("msg", "invalid"))
    message = message.removeprefix("Value error, ")
    if not loc:
        return message
    name = loc[0].upper()
    value = error.get("input")
    shown = "" if "secret" in name.lower() or "KEY" in name or "PASSWORD" in name else value
    suffix = f" (got {shown!r})" if isinstance(shown, str | int | float) and shown != "" else ""
    return f"{name}: {message}{suffix}"
