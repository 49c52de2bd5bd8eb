"""The README states what the code does: its table of reasons is the catalogue, its
settings table names every setting, its metrics table every metric exported."""

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


def _exported_metric_names() -> set[str]:
    """Every metric ``observability.metrics`` declares, as ``/metrics`` names it without
    the prefix: counters with ``_total``, an info with ``_info``, histograms by their base."""
    from prometheus_client import Counter, Info
    from prometheus_client.metrics import MetricWrapperBase

    from destination.observability import metrics

    names = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            name = value._name.removeprefix("gist_destination_")
            if isinstance(value, Counter):
                name += "_total"
            elif isinstance(value, Info):
                name += "_info"
            names.add(name)
    return names


def test_the_metrics_table_lists_every_exported_metric() -> None:
    section = README.split("\n## Metrics", 1)[1].split("\n## ", 1)[0]
    first_cells = re.findall(r"^\| (.+?) \| ", section, re.M)
    listed = {re.sub(r"\{.*", "", name) for cell in first_cells
              for name in re.findall(r"`([a-z_]+(?:\{[^`]*\})?)`", cell)}  # fmt: skip
    exported = _exported_metric_names()
    assert len(exported) > 40, "the metrics module was read"
    assert sorted(exported - listed) == []
    assert sorted(listed - exported) == []
