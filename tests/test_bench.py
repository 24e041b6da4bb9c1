"""The benches' workloads: each counts on its events being what it says (so many unique
keys, so many re-sends), or its assertions on the stored counts fail mid-run."""

from __future__ import annotations

import sqlite3
import uuid
from collections import Counter
from contextlib import closing

import pytest

from bench.common import make_events
from bench.growth import fill
from bench.ingest import REFERENCE_UNIQUE, reference, reference_rows


@pytest.mark.parametrize("ids", ["sequential", "uuid"])
def test_a_workload_has_its_unique_events_and_resends(ids):
    events = make_events(3000, 0.25, seed=11, ids=ids)
    keys = Counter((e["topic"], e["event_id"]) for e in events)
    assert len(events) == 3750
    assert len(keys) == 3000
    assert sum(keys.values()) - len(keys) == 750
    # The same seed makes the same workload.
    assert make_events(3000, 0.25, seed=11, ids=ids) == events


def _in_order_made(events: list[dict]) -> list[str]:
    """The ids of a workload's events in the order they were made (before the shuffle)."""
    return [e["event_id"] for e in
            sorted(events, key=lambda e: int(e["payload"]["msg"].split()[1]))]


def test_uuid_ids_are_random_v4s_and_sequential_ones_keep_their_names():
    ids = _in_order_made(make_events(500, 0.0, seed=3, ids="uuid"))
    assert all(uuid.UUID(i).version == 4 for i in ids)
    # Random: ids made one after the other do not sort in that order, as time-ordered do.
    assert ids != sorted(ids)
    sequential = make_events(500, 0.0, seed=3)
    in_order = _in_order_made(sequential)
    assert in_order == sorted(in_order)
    assert in_order[:2] == ["evt-3-000000000", "evt-3-000000001"]
    # The other fields do not depend on the kind of id.
    assert [{**e, "event_id": None} for e in make_events(500, 0.0, seed=3, ids="uuid")] == \
        [{**e, "event_id": None} for e in sequential]


@pytest.mark.parametrize("ids", ["sequential", "uuid"])
def test_the_growth_fill_shares_no_id_with_the_probes_of_the_same_seed(tmp_path, ids):
    db = tmp_path / "g.db"
    fill(db, 0, 2000, 5, ids)
    with closing(sqlite3.connect(db)) as conn:
        stored = {row[0] for row in conn.execute("SELECT event_id FROM events")}
    assert len(stored) == 2000
    probe = {e["event_id"] for seed in (4, 5, 6)
             for e in make_events(2000, 0.0, seed=seed, ids=ids)}
    assert not stored & probe


def test_the_growth_fill_differs_only_in_its_ids_by_their_kind(tmp_path):
    filled = {}
    for ids in ("sequential", "uuid"):
        db = tmp_path / f"{ids}.db"
        fill(db, 0, 500, 5, ids)
        with closing(sqlite3.connect(db)) as conn:
            filled[ids] = conn.execute("SELECT topic, event_id, ts, source, payload FROM events"
                                       " ORDER BY seq").fetchall()
    assert [row[:1] + row[2:] for row in filled["uuid"]] == \
        [row[:1] + row[2:] for row in filled["sequential"]]
    assert {row[1] for row in filled["uuid"]}.isdisjoint(row[1] for row in filled["sequential"])


def test_the_reference_loop_stores_each_key_once(tmp_path):
    events = make_events(3000, 0.25, seed=5)
    rows = [(e["topic"], e["event_id"], e["timestamp"], e["source"], "{}") for e in events]
    rate, stored = reference(rows, tmp_path / "r.db")
    assert stored == 3000 and rate > 0
    with closing(sqlite3.connect(tmp_path / "r.db")) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_the_reference_workload_is_measureds_and_the_same_every_run():
    rows = reference_rows()
    assert len(rows) == 200_000
    assert len({row[:2] for row in rows}) == REFERENCE_UNIQUE == 150_000
    assert reference_rows() == rows
