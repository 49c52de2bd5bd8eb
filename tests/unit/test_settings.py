from __future__ import annotations

from pathlib import Path

import pytest

from destination.settings import (
    SettingsError,
    kafka_sasl_oauth_client_secret,
    kafka_ssl_key_password,
    load_settings,
)

BASE = {"GIST_API_KEY": "k-secret-1", "KAFKA_TOPICS": "a, b"}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "GIST_API_KEY",
        "GIST_API_KEY_FILE",
        "KAFKA_TOPICS",
        "KAFKA_DLQ_TOPIC",
        "GIST_BATCH_SIZE",
        "KAFKA_SECURITY_PROTOCOL",
        "METRICS_PORT",
    ):
        monkeypatch.delenv(name, raising=False)


def _env(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def test_the_public_names_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    _env(monkeypatch, **BASE, KAFKA_DLQ_TOPIC="dead", METRICS_PORT="9000")
    settings = load_settings()
    assert settings.kafka_topics == ["a", "b"]
    assert settings.kafka_dlq_topic == "dead"
    assert settings.metrics_port == 9000
    assert settings.api_key() == "k-secret-1"
    assert "k-secret-1" not in repr(settings)


def test_missing_topics_and_key_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError, match="KAFKA_TOPICS"):
        load_settings()
    _env(monkeypatch, KAFKA_TOPICS="a")
    with pytest.raises(SettingsError, match="GIST_API_KEY"):
        load_settings()


def test_every_missing_setting_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert [p.split(":")[0] for p in caught.value.problems] == ["KAFKA_TOPICS", "GIST_API_KEY"]
    # With a bad value beside them, which stops pydantic before the checks across settings.
    _env(monkeypatch, GIST_BATCH_SIZE="lots", KAFKA_SECURITY_PROTOCOL="SASL_SSL")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    named = [p.split(":")[0] for p in caught.value.problems]
    assert named == ["GIST_BATCH_SIZE", "KAFKA_TOPICS", "GIST_API_KEY", "KAFKA_SASL_USERNAME",
                     "KAFKA_SASL_PASSWORD"]  # fmt: skip
    assert str(caught.value).count("\n") == len(named)  # one line each


def test_a_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    _env(monkeypatch, **BASE, GIST_BATCH_SIZE="lots")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert caught.value.problems[0].startswith("GIST_BATCH_SIZE:")


def test_sasl_needs_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    _env(monkeypatch, **BASE, KAFKA_SECURITY_PROTOCOL="SASL_SSL")
    with pytest.raises(SettingsError, match="KAFKA_SASL_USERNAME"):
        load_settings()


def test_key_from_file_and_settings_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    env_file = tmp_path / "settings.env"
    env_file.write_text(f"KAFKA_TOPICS=x\nGIST_API_KEY_FILE={key_file}\nGIST_BATCH_SIZE=7\n")
    settings = load_settings(env_file)
    assert settings.api_key() == "from-file"
    assert settings.gist_batch_size == 7
    _env(monkeypatch, GIST_BATCH_SIZE="9")
    assert load_settings(env_file).gist_batch_size == 9  # the environment wins


def test_unreadable_key_file_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _env(monkeypatch, KAFKA_TOPICS="a", GIST_API_KEY_FILE=str(tmp_path / "nope"))
    with pytest.raises(SettingsError, match="GIST_API_KEY_FILE"):
        load_settings().api_key()


def test_kafka_oauthbearer_and_mutual_tls_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.unit.test_kafka_security import CLIENT_CERT, CLIENT_KEY_ENCRYPTED, KEY_PASSWORD

    (tmp_path / "cert.pem").write_text(CLIENT_CERT)
    (tmp_path / "key.pem").write_text(CLIENT_KEY_ENCRYPTED)
    (tmp_path / "key-password").write_text(KEY_PASSWORD + "\n")
    (tmp_path / "client-secret").write_text("oauth-secret-1\n")
    _env(
        monkeypatch,
        **BASE,
        KAFKA_SECURITY_PROTOCOL="SASL_SSL",
        KAFKA_SASL_MECHANISM="OAUTHBEARER",
        KAFKA_SASL_OAUTH_TOKEN_URL="https://idp.example/token",
        KAFKA_SASL_OAUTH_CLIENT_ID="client-1",
        KAFKA_SASL_OAUTH_CLIENT_SECRET_FILE=str(tmp_path / "client-secret"),
        KAFKA_SASL_OAUTH_SCOPE="kafka",
        KAFKA_SSL_CERTFILE=str(tmp_path / "cert.pem"),
        KAFKA_SSL_KEYFILE=str(tmp_path / "key.pem"),
        KAFKA_SSL_KEY_PASSWORD_FILE=str(tmp_path / "key-password"),
    )
    settings = load_settings()
    assert settings.kafka_sasl_mechanism == "OAUTHBEARER"
    assert settings.kafka_sasl_oauth_client_id == "client-1"
    assert settings.kafka_sasl_oauth_scope == "kafka"
    assert kafka_sasl_oauth_client_secret(settings) == "oauth-secret-1"
    assert kafka_ssl_key_password(settings) == KEY_PASSWORD
    assert settings.kafka_ssl_certfile == tmp_path / "cert.pem"


def test_an_empty_oauth_secret_is_named(tmp_path: Path) -> None:
    oauth = {
        "kafka_security_protocol": "SASL_SSL",
        "kafka_sasl_mechanism": "OAUTHBEARER",
        "kafka_sasl_oauth_token_url": "https://idp.example/token",
        "kafka_sasl_oauth_client_id": "client-1",
    }
    (tmp_path / "secret").write_text("\n")
    with pytest.raises(SettingsError, match=r"KAFKA_SASL_OAUTH_CLIENT_SECRET_FILE: .* is empty"):
        load_settings(
            gist_api_key="k",
            kafka_topics=["a"],
            kafka_sasl_oauth_client_secret_file=tmp_path / "secret",
            **oauth,
        )
    with pytest.raises(SettingsError, match="KAFKA_SASL_OAUTH_CLIENT_SECRET: is empty"):
        load_settings(
            gist_api_key="k", kafka_topics=["a"], kafka_sasl_oauth_client_secret=" ", **oauth
        )
