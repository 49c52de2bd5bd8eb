"""The README states what the code does: its table of reasons is the catalogue, its
settings table names every setting."""

from __future__ import annotations

import re
from pathlib import Path

from destination import reasons
from destination.settings import Settings

README = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")


def test_the_table_of_reasons_is_the_catalogue() -> None:
    rows = re.findall(r"^\| `([a-z_]+)` \| (dead letter|skipped) \| (.+) \|$", README, re.M)
    table = {code: (kind, text) for code, kind, text in rows}
    expected = {code: ("dead letter", text) for code, text in reasons.DEAD_LETTER.items()}
    expected |= {code: ("skipped", text) for code, text in reasons.SKIP.items()}
    assert table == expected


def test_every_setting_is_in_the_settings_table() -> None:
    section = README.split("## Settings", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", section))
    missing = [name.upper() for name in Settings.model_fields if name.upper() not in named]
    assert missing == []
