"""``clipstream status``: what is deployed, who serves it, and how it is doing.

Three sources, each the authority for its part:
- the control topic (the registry): apps, models, versions;
- Kafka's group coordinator (AdminClient): live replicas per model are the members of its
  consumer group ``clipstream-model-<name>``, and their lag is the group's committed offsets
  against the end of the model's requests topic;
- the Prometheus endpoints of running processes, named by the operator (``--metrics-url``
  or ``CLIPSTREAM_METRICS_URLS``): batch sizes, cache hit rate, latency quantiles, weights.
  Processes are not discovered: the same list goes into Prometheus' scrape config, and a
  process that is listed but down is reported as down rather than silently missing.
"""

from __future__ import annotations

import contextlib
import math
import socket
import time
import urllib.parse
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from clipstream.models.control.registry import current
from clipstream.streams.wire import topics
from clipstream.streams.wire.config import Settings

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]


def metrics_urls(settings: Settings, extra: Iterable[str] = ()) -> list[str]:
    """The operator's list: flags first, then ``CLIPSTREAM_METRICS_URLS`` (comma-separated)."""
    urls = [*extra, *settings.metrics_urls.split(",")]
    out = []
    for url in (u.strip() for u in urls):
        if not url:
            continue
        if "://" not in url:
            url = f"http://{url}"
        if url not in out:
            out.append(url)
    return out


def scrape(url: str, timeout: float = 5.0) -> Samples:
    """Every sample one process serves, keyed by (sample name, sorted labels)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def expand(url: str) -> list[str]:
    """A host name with several addresses (a scaled compose service) is every one of them,
    as Prometheus' DNS service discovery sees it."""
    parts = urllib.parse.urlsplit(url)
    try:
        infos = socket.getaddrinfo(parts.hostname or "", parts.port, socket.AF_INET)
    except OSError:
        return [url]  # unresolvable: scraping it reports the error
    addresses = sorted({info[4][0] for info in infos})
    if len(addresses) < 2:
        return [url]
    netloc = "{}" + (f":{parts.port}" if parts.port else "")
    return [urllib.parse.urlunsplit(parts._replace(netloc=netloc.format(a))) for a in addresses]


def scrape_all(urls: list[str]) -> tuple[Samples, list[dict[str, Any]]]:
    """Samples summed over processes, and which processes answered."""
    total: Samples = defaultdict(float)
    seen = []
    for url in (one for named in urls for one in expand(named)):
        try:
            one = scrape(url)
        except Exception as exc:  # a dead process is reported, not fatal
            seen.append({"url": url, "up": False, "error": str(exc)})
            continue
        seen.append({"url": url, "up": True, "error": None})
        for key, value in one.items():
            if key[0] == "clipstream_bandit_weight":
                # a weight is a level, not a count: two workers' gauges are not added
                total[key] = value
            else:
                total[key] += value
    return dict(total), seen


def delta(before: Samples, after: Samples) -> Samples:
    """Counters and histograms over the window; gauges as they are now."""
    out = {}
    for key, value in after.items():
        name = key[0]
        counts = name.endswith(("_total", "_bucket", "_sum", "_count"))
        out[key] = value - before.get(key, 0.0) if counts else value
    return out


def select(samples: Samples, name: str, **match: str) -> dict[Labels, float]:
    return {
        labels: v
        for (n, labels), v in samples.items()
        if n == name and all(dict(labels).get(k) == want for k, want in match.items())
    }


def label_values(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(labels)[label] for labels in select(samples, name) if label in dict(labels)}


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative buckets {upper bound: count}."""
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper in bounds:
        count = buckets[upper]
        if count >= rank:
            if math.isinf(upper):
                return lower  # beyond the last finite bucket: its bound is all we know
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return bounds[-1]


def histogram(samples: Samples, name: str, **match: str) -> dict[float, float]:
    out: dict[float, float] = defaultdict(float)
    for labels, v in select(samples, f"{name}_bucket", **match).items():
        out[float(dict(labels)["le"])] += v
    return dict(out)


def mean(samples: Samples, name: str, **match: str) -> float | None:
    total = sum(select(samples, f"{name}_sum", **match).values())
    count = sum(select(samples, f"{name}_count", **match).values())
    return total / count if count else None


def group_health(settings: Settings, models: list[str]) -> dict[str, dict[str, Any]]:
    """Members and lag of each model's consumer group."""
    from confluent_kafka import Consumer
    from confluent_kafka.admin import AdminClient

    out: dict[str, dict[str, Any]] = {
        m: {"replicas": 0, "lag": None, "state": None} for m in models
    }
    if not models:
        return out
    admin = AdminClient(settings.kafka())
    groups = {topics.model_group(m): m for m in models}
    for group, future in admin.describe_consumer_groups(list(groups)).items():
        try:
            described = future.result(10)
        except Exception as exc:
            out[groups[group]]["state"] = f"unknown ({exc})"
            continue
        out[groups[group]]["replicas"] = len(described.members)
        out[groups[group]]["state"] = str(described.state).rsplit(".", 1)[-1]
    probe = Consumer(
        settings.kafka(
            **{"group.id": f"clipstream-status-{uuid.uuid4().hex}", "enable.auto.commit": False}
        )
    )
    try:
        md = probe.list_topics(timeout=10).topics
        for group, model in groups.items():
            topic = topics.model_requests(model)
            if topic not in md:
                continue
            request = [ConsumerGroupTopicPartitions(group)]
            offsets = admin.list_consumer_group_offsets(request)[group].result(10)
            committed = {
                tp.partition: tp.offset for tp in offsets.topic_partitions if tp.topic == topic
            }
            lag = 0
            for p in md[topic].partitions:
                low, high = probe.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                done = committed.get(p, -1)
                lag += high - (done if done >= 0 else low)
            out[model]["lag"] = lag
    finally:
        probe.close()
    return out


def topic_health(settings: Settings) -> list[dict[str, Any]]:
    """Replication of each clipstream topic: replicas, min.insync.replicas, and the
    partitions whose in-sync replicas are fewer than their replicas or that have no leader."""
    from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

    admin = AdminClient(settings.kafka())
    md = admin.list_topics(timeout=10).topics
    names = sorted(n for n in md if n.startswith("clipstream") and md[n].error is None)
    resources = [ConfigResource(ResourceType.TOPIC, n) for n in names]
    insync: dict[str, int | None] = dict.fromkeys(names)
    if resources:
        for resource, future in admin.describe_configs(resources).items():
            with contextlib.suppress(Exception):  # shown as unknown
                insync[resource.name] = int(future.result(10)["min.insync.replicas"].value)
    out = []
    for name in names:
        partitions = list(md[name].partitions.values())
        out.append(
            {
                "topic": name,
                "partitions": len(partitions),
                "replication": min((len(p.replicas) for p in partitions), default=0),
                "min_insync": insync[name],
                "under_replicated": sum(len(p.isrs) < len(p.replicas) for p in partitions),
                "offline": sum(p.leader < 0 for p in partitions),
            }
        )
    return out


def collect_status(settings: Settings, urls: list[str], window_s: float = 0.0) -> dict[str, Any]:
    """Everything ``clipstream status`` shows, as one JSON-able dict."""
    registry = current(settings)
    samples, processes = scrape_all(urls)
    if window_s > 0:
        time.sleep(window_s)  # two scrapes a window apart: rates and quantiles of that window
        later, processes = scrape_all(urls)
        samples = delta(samples, later)
    health = group_health(settings, sorted(registry.models))

    models = []
    for name, spec in sorted(registry.models.items()):
        hits = sum(select(samples, "clipstream_cache_total", model=name, result="hit").values())
        misses = sum(select(samples, "clipstream_cache_total", model=name, result="miss").values())
        limits = select(samples, "clipstream_batch_max", model=name).values()
        models.append(
            {
                "model": name,
                "serving": spec["version"],
                "versions": [v["version"] for v in spec["versions"]],
                "replicas": health[name]["replicas"],
                "group_state": health[name]["state"],
                "lag": health[name]["lag"],
                "batch_mean": mean(samples, "clipstream_batch_size", model=name),
                "batch_limit": max(limits) if limits else None,
                "replica_batch_mean": mean(samples, "clipstream_replica_batch_size", model=name),
                "rows": sum(select(samples, "clipstream_replica_rows_total", model=name).values()),
                "cache_hit_rate": hits / (hits + misses) if hits + misses else None,
            }
        )

    apps = []
    for name, spec in sorted(registry.apps.items()):
        buckets = histogram(samples, "clipstream_end_to_end_seconds", app=name)
        weights: dict[str, dict[str, float]] = {}
        for labels, v in select(samples, "clipstream_bandit_weight").items():
            key, model = dict(labels)["app"], dict(labels)["model"]
            if key == name or key.startswith(f"{name}|"):
                weights.setdefault(key, {})[model] = v
        p50, p99 = quantile(0.5, buckets), quantile(0.99, buckets)
        apps.append(
            {
                "app": name,
                "policy": spec["policy"],
                "models": list(spec["models"]),
                "deadline_ms": spec["deadline_ms"],
                "predictions": sum(
                    select(samples, "clipstream_predictions_total", app=name).values()
                ),
                "defaults": sum(
                    select(samples, "clipstream_default_outputs_total", app=name).values()
                ),
                "p50_ms": None if p50 is None else p50 * 1000,
                "p99_ms": None if p99 is None else p99 * 1000,
                "weights": weights,
            }
        )
    return {
        "window_s": window_s or None,
        "processes": processes,
        "models": models,
        "apps": apps,
        "topics": topic_health(settings),
    }


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def render(status: dict[str, Any]) -> list[Any]:
    """rich tables for the terminal."""
    from rich.table import Table

    window = f"last {status['window_s']:g} s" if status["window_s"] else "since process start"
    models = Table(
        "model", "serving", "versions", "replicas", "lag", "batch (mean)", "AIMD limit",
        "cache hit", "rows", title=f"models ({window})",
    )  # fmt: skip
    for m in status["models"]:
        models.add_row(
            m["model"],
            f"v{m['serving']}",
            ", ".join(f"v{v}" for v in m["versions"]),
            str(m["replicas"]),
            _fmt(m["lag"]),
            _fmt(m["batch_mean"], ".1f"),
            _fmt(m["batch_limit"], ".0f"),
            "-" if m["cache_hit_rate"] is None else f"{m['cache_hit_rate']:.1%}",
            _fmt(m["rows"], ".0f"),
        )
    apps = Table(
        "app", "policy", "models", "predictions", "defaults", "p50 ms", "p99 ms", "weights",
        title=f"apps ({window})",
    )  # fmt: skip
    for a in status["apps"]:
        weights = "; ".join(
            f"{key}: " + ", ".join(f"{m}={w:.2f}" for m, w in sorted(ws.items()))
            for key, ws in sorted(a["weights"].items())
        )
        apps.add_row(
            a["app"],
            a["policy"],
            ", ".join(a["models"]),
            _fmt(a["predictions"], ".0f"),
            _fmt(a["defaults"], ".0f"),
            _fmt(a["p50_ms"], ".1f"),
            _fmt(a["p99_ms"], ".1f"),
            weights or "-",
        )
    kafka = Table(
        "topic", "partitions", "replication", "min in-sync", "under-replicated", "offline",
        title="topics",
    )  # fmt: skip
    for tp in status["topics"]:
        kafka.add_row(
            tp["topic"],
            str(tp["partitions"]),
            str(tp["replication"]),
            _fmt(tp["min_insync"]),
            str(tp["under_replicated"]),
            str(tp["offline"]),
        )
    procs = Table("metrics endpoint", "up", title="processes")
    for p in status["processes"]:
        procs.add_row(p["url"], "yes" if p["up"] else f"no: {p['error']}")
    return [models, apps, kafka, procs]
