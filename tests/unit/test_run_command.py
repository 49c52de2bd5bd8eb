"""``gist-destination run`` refuses to start on bad settings or rules, naming them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("GIST_", "KAFKA_"))}
    clean.pop("MAPPING_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "destination", "run"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_missing_settings_are_named() -> None:
    result = run({})
    assert result.returncode == 2
    assert "KAFKA_TOPICS" in result.stderr


def test_an_unreadable_rules_file_is_named(tmp_path: Path) -> None:
    result = run(
        {"GIST_API_KEY": "k", "KAFKA_TOPICS": "t", "MAPPING_CONFIG": str(tmp_path / "missing.yaml")}
    )
    assert result.returncode == 2
    assert "MAPPING_CONFIG: cannot read" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_invalid_rules_file_is_reported_with_its_line(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("version: 1\ntrack:\n  enabled: maybe\n")
    result = run(
        {"GIST_API_KEY": "secret-key-123", "KAFKA_TOPICS": "t", "MAPPING_CONFIG": str(rules)}
    )
    assert result.returncode == 2
    assert "MAPPING_CONFIG" in result.stderr
    assert ":3" in result.stderr
    assert "secret-key-123" not in result.stderr + result.stdout
