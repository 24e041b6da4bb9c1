"""Three real gunicorn replicas on one real PostgreSQL: the scale-out the cluster profile runs."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.helpers import (
    assert_counters_match_the_table,
    assert_each_key_once_with_exact_counts,
    event,
    publish_overlapping,
    table_keys,
)

pytestmark = pytest.mark.backends("postgresql")


@pytest.fixture
def replicas(gunicorn, db):
    """Three replicas started at once on one fresh schema (they race to create it)."""
    with ThreadPoolExecutor(3) as pool:
        return list(pool.map(lambda _: gunicorn(workers=2, writers=1), range(3)))


def test_replicas_starting_at_once_share_one_schema(replicas, db):
    for number, server in enumerate(replicas):
        batch = [event(f"r{number}"), event("shared")]
        assert requests.post(server.url + "/publish", json=batch, timeout=10).status_code == 200
    assert sorted(table_keys(db)) == sorted(
        [("orders", "r0"), ("orders", "r1"), ("orders", "r2"), ("orders", "shared")])
    for server in replicas:
        stats = requests.get(server.url + "/stats", timeout=10).json()
        assert (stats["received"], stats["unique_processed"]) == (6, 4)


def test_overlapping_publishers_over_three_replicas_store_each_key_once(replicas, db):
    urls = [server.url for server in replicas]
    sent, results, errors = publish_overlapping(
        urls, [f"id-{i}" for i in range(3000)], batches=30, max_size=200, topics=("a", "b", "c"))
    assert errors == []
    assert_each_key_once_with_exact_counts(db, urls, sent, results)
    assert_counters_match_the_table(db)


def test_sigkill_of_one_replica_mid_load_loses_no_acknowledged_event(replicas, db):
    acknowledged, stop = [], threading.Event()
    lock = threading.Lock()
    down = set()

    def publisher(worker: int) -> None:
        rng = random.Random(worker)
        for n in range(2000):
            if stop.is_set():
                return
            # Overlapping ids: a batch repeats some of the last worker's ids too.
            batch = [event(f"{worker}-{n}-{i}") for i in range(50)]
            batch += [event(f"{(worker + 1) % 16}-{max(n - 1, 0)}-{i}") for i in range(5)]
            for replica in rng.sample(range(len(replicas)), len(replicas)):
                if replica in down:
                    continue
                try:
                    response = requests.post(replicas[replica].url + "/publish", json=batch,
                                             timeout=10)
                except requests.RequestException:
                    continue  # that replica is gone: the next one gets the same batch
                if response.status_code == 200:
                    with lock:
                        acknowledged.extend((e["topic"], e["event_id"]) for e in batch)
                    break

    threads = [threading.Thread(target=publisher, args=(w,)) for w in range(16)]
    for thread in threads:
        thread.start()
    time.sleep(2.0)
    os.killpg(replicas[1].proc.pid, signal.SIGKILL)
    replicas[1].proc.wait(10)
    down.add(1)
    time.sleep(1.5)  # the others keep taking load
    stop.set()
    for thread in threads:
        thread.join()
    assert len(acknowledged) >= 2000
    keys = table_keys(db)
    assert len(keys) == len(set(keys))
    assert set(acknowledged) <= set(keys)
    assert_counters_match_the_table(db)
