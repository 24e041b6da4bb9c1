"""Prometheus metrics: counters read from the database, histograms shared across workers."""

from __future__ import annotations

import contextlib
import glob
import os
import platform
import time
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from .store import Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
EVENT_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 20000)
SECOND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class DatabaseCollector:
    """Collect the persisted counters at scrape time: exact whichever worker answers.

    By topic for the largest topics only: publishers name topics, and a series each made
    a scrape of 100,000 topics 6 MB and 1.5 s long (Prometheus' sample_limit, where set,
    then fails the whole scrape). /stats has them all.
    """

    def __init__(self, store: Store, version: str, topics: int):
        self.store = store
        self.version = version
        self.topics = topics

    def collect(self):
        counters = self.store.counters(largest=self.topics)
        for name, value, text in (
                ("received", counters.received, "Valid events received (stored or duplicate)."),
                ("stored", counters.unique_processed, "Events stored for the first time."),
                ("duplicate", counters.duplicate_dropped, "Events dropped as duplicates."),
                ("rejected", counters.rejected, "Events refused by validation."),
                ("expired", counters.expired, "Events deleted by retention.")):
            yield CounterMetricFamily(f"aggregator_events_{name}", text, value=value)
        topics = CounterMetricFamily(
            "aggregator_topic_events_stored",
            "Events stored, by topic, for the largest AGGREGATOR_METRICS_TOPICS topics.",
            labels=["topic"])
        last = GaugeMetricFamily(
            "aggregator_topic_last_stored_timestamp_seconds",
            "When the newest event of the topic was stored (Unix time), for the same topics: "
            "time() minus it is how long the topic has been silent.", labels=["topic"])
        for topic, count in counters.topics.items():
            topics.add_metric([topic], count)
            if (stored_at := counters.last_stored.get(topic)) is not None:
                last.add_metric([topic], datetime.fromisoformat(stored_at).timestamp())
        yield topics
        yield last
        yield GaugeMetricFamily("aggregator_topics", "Topics with events stored.",
                                value=counters.topics_in_all)
        info = GaugeMetricFamily("aggregator_build_info", "Version of the running aggregator.",
                                 labels=["version", "python"])
        info.add_metric([self.version, platform.python_version()], 1)
        yield info


class SettledFilesCollector(MultiProcessCollector):
    """prometheus-client's MultiProcessCollector, skipping the sample files still empty.

    A process creates its file empty, then sizes it (MmapedDict). Reading it in between
    fails (struct.error), which made a scrape a 500 while a worker was starting. An empty
    file holds no sample yet, so skipping it loses nothing.
    """

    def collect(self):
        files = []
        for path in glob.glob(os.path.join(self._path, "*.db")):
            with contextlib.suppress(FileNotFoundError):  # a dead worker's, just removed
                if os.path.getsize(path) > 0:
                    files.append(path)
        return self.merge(files, accumulate=True)


class Metrics:
    """The aggregator's metrics for one app.

    Under gunicorn, PROMETHEUS_MULTIPROC_DIR (set by app/gunicorn.conf.py) makes every
    worker write its samples to files that any worker aggregates at scrape time.
    """

    def __init__(self, store: Store, version: str, multiprocess_dir: str | None,
                 topics: int):
        """topics: how many topics (the largest) get a series of their own."""
        self._multiprocess_dir = multiprocess_dir
        # In multiprocess mode samples live in files: the objects are not registered,
        # the scrape reads every worker's files instead.
        own = None if multiprocess_dir else CollectorRegistry()
        self._registry = own
        self.queue_depth = Gauge("aggregator_ingest_queue_depth",
                                 "Batches waiting for a writer (all live workers).",
                                 registry=own, multiprocess_mode="livesum")
        self.commit_events = Histogram("aggregator_commit_events",
                                       "Events in one group commit.", registry=own,
                                       buckets=EVENT_BUCKETS)
        self.commit_seconds = Histogram("aggregator_commit_duration_seconds",
                                        "Time to commit one group.", registry=own,
                                        buckets=SECOND_BUCKETS)
        self.commit_failures = Counter("aggregator_commit_failures",
                                       "Group commits that failed.", registry=own)
        self.write_lock_wait = Counter(
            "aggregator_write_lock_wait_seconds",
            "Time writers waited for the write lock (one writer at a time, every process).",
            registry=own)
        self.write_lock_held = Counter(
            "aggregator_write_lock_held_seconds",
            "Time writers held the write lock. Its rate near 1 (s/s) means the single writer "
            "is the limit: more workers or replicas will not ingest faster.", registry=own)
        self.publish_seconds = Histogram("aggregator_publish_request_duration_seconds",
                                         "POST /publish duration, by status.", ["status"],
                                         registry=own, buckets=SECOND_BUCKETS)
        self.body_bytes = Counter(
            "aggregator_publish_body_bytes",
            "Bytes of POST /publish bodies read, as received, by Content-Encoding.",
            ["encoding"], registry=own)
        self.decoded_bytes = Counter(
            "aggregator_publish_decoded_bytes",
            "Bytes of POST /publish bodies read, once decompressed, by Content-Encoding.",
            ["encoding"], registry=own)
        self.read_seconds = Histogram(
            "aggregator_read_request_duration_seconds",
            "GET /events (JSON or the page) and GET /stats duration, by path and status.",
            ["path", "status"], registry=own, buckets=SECOND_BUCKETS)
        self._database = DatabaseCollector(store, version, topics)
        if own is not None:
            own.register(self._database)

    def observe_body(self, encoding: str, received: int, decoded: int) -> None:
        """Count one body read whole: its size as received and once decompressed."""
        self.body_bytes.labels(encoding).inc(received)
        self.decoded_bytes.labels(encoding).inc(decoded)

    def observe_commit(self, events: int, started: float, ok: bool,
                       lock_wait: float = 0.0, lock_held: float = 0.0) -> None:
        """Record one group commit, and its time waiting for and holding the write lock."""
        self.write_lock_wait.inc(lock_wait)
        self.write_lock_held.inc(lock_held)
        if ok:
            self.commit_events.observe(events)
            self.commit_seconds.observe(time.perf_counter() - started)
        else:
            self.commit_failures.inc()

    def render(self) -> bytes:
        """Return the exposition text of every metric."""
        if self._registry is not None:
            return generate_latest(self._registry)
        registry = CollectorRegistry()
        SettledFilesCollector(registry, path=self._multiprocess_dir)
        registry.register(self._database)
        return generate_latest(registry)


def prepare_multiprocess_dir(path: str) -> None:
    """Empty the directory of a previous run's sample files (call before workers start)."""
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.remove(os.path.join(path, name))
