"""Prometheus metrics for `collect`, `sink` and `run` (--metrics HOST:PORT).

Nothing on the hot path: each command already keeps counters for its own
summary line; at scrape time this module reads them through the `stats()`
callables it was given and exposes them. A scrape therefore always agrees
with what the command itself reports.

Names: fdpass_<component>_<stat>, e.g. fdpass_collect_events_total
{direction="SEND"}, fdpass_collect_kernel_ringbuf_drops_total,
fdpass_kafka_spool_bytes. Counters end in _total; everything else is a gauge.
"""

from __future__ import annotations

import logging
import re
from typing import Callable, Iterable

from fdpass.errors import UserError

log = logging.getLogger("fdpass.metrics")

StatsFn = Callable[[], dict]

# stat names that are gauges (levels), not monotonically growing counts
_GAUGES = re.compile(r"(queued|pending|bytes|spooling|lag|latency|seconds|size|backlog|in_flight|rows_per)")
# stat key -> (metric suffix, labels): the per-direction event counts share one metric
_RENAME = {
    "events_send": ("events", {"direction": "SEND"}),
    "events_recv": ("events", {"direction": "RECV"}),
}


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--metrics {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9464 or 0.0.0.0:9464")
    return host or "0.0.0.0", int(port)


def _samples(component: str, stats: dict) -> Iterable[tuple[str, dict, float, bool]]:
    for key, value in stats.items():
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, (int, float)):
            continue
        suffix, labels = _RENAME.get(key, (key, {}))
        name = re.sub(r"[^a-zA-Z0-9_]", "_", f"fdpass_{component}_{suffix}")
        yield name, labels, float(value), not _GAUGES.search(suffix)


class _StatsCollector:
    def __init__(self, sources: dict[str, StatsFn]):
        self.sources = sources

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        families: dict[str, object] = {}
        for component, fn in self.sources.items():
            try:
                stats = fn()
            except Exception:  # a source shutting down must not break the scrape of the others
                log.debug("metrics source %s failed", component, exc_info=True)
                continue
            for name, labels, value, is_counter in _samples(component, stats):
                fam = families.get(name)
                if fam is None:
                    if is_counter:
                        fam = CounterMetricFamily(name, f"fdpass {component}: {name}", labels=list(labels))
                    else:
                        fam = GaugeMetricFamily(name, f"fdpass {component}: {name}", labels=list(labels))
                    families[name] = fam
                fam.add_metric(list(labels.values()), value)
        yield from families.values()


def serve(address: str, sources: dict[str, StatsFn]):
    """Start the HTTP endpoint in a background thread; returns the server."""
    from prometheus_client import CollectorRegistry, start_http_server

    host, port = parse_address(address)
    registry = CollectorRegistry()
    registry.register(_StatsCollector(sources))
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise UserError(f"--metrics {address}: cannot listen there ({e.strerror})") from None
    return server
