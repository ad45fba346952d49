"""Reading a real process's /metrics: samples by name and labels, and the exported names."""

from __future__ import annotations

import ssl
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

# The series names a family of each type exports (the text parser strips `_total` from a
# counter's family name).
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
    "unknown": ("",),
}


@dataclass(frozen=True)
class Scrape:
    text: str

    @property
    def samples(self) -> list[Sample]:
        return [s for f in text_string_to_metric_families(self.text) for s in f.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples whose labels include ``labels`` (0 when none)."""
        return sum(
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def series_names(self) -> set[str]:
        """Every series name the process exports, samples or not (a labelled family without a
        child yet still declares its TYPE)."""
        names: set[str] = set()
        for family in text_string_to_metric_families(self.text):
            names.update(family.name + suffix for suffix in SUFFIXES[family.type])
            names.update(s.name for s in family.samples)
        return names


def scrape(url: str, context: ssl.SSLContext | None = None) -> Scrape:
    with urllib.request.urlopen(url, timeout=5, context=context) as resp:
        return Scrape(resp.read().decode())
