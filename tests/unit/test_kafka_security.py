from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from destination.settings import load_settings
from destination.worker import kafka_security

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
    from destination.settings import SettingsError

    with pytest.raises(SettingsError, match="KAFKA_SSL_CAFILE"):
        load_settings(**BASE, kafka_security_protocol="SSL", kafka_ssl_cafile=tmp_path / "no")


def _ca_pem() -> str:
    """A CA bundle that exists on the machine, else a throwaway self-signed one."""
    for candidate in (ssl.get_default_verify_paths().cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate).read_text()
    pytest.skip("no CA bundle on this machine to build a TLS context from")
