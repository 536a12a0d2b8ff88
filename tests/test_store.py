"""ppsearch's tables: upserts, the schema version, the front against a brute-force filter, and
errors that never show a password. Each database test runs on a SQLite file and on PostgreSQL."""
import random
import sqlite3
from dataclasses import replace

import pytest
from hypothesis import given, strategies as st
from sqlalchemy import create_engine, text

from ppsearch.store import Store, StoreError, TrialRecord, hidden_password, non_dominated
from postgres import PASSWORD


def brute_force_front(points):
    """Indices of the points that no other point dominates (both coordinates minimised)."""
    return sorted(i for i, (x, y) in enumerate(points)
                  if not any(a <= x and b <= y and (a, b) != (x, y) for a, b in points))


def record(number, gmacs=1.0, fid=10.0, state="COMPLETE", study="demo", **fields):
    return TrialRecord(study_name=study, trial_number=number, trial_id=100 + number, schedule="4x4@0.5,2x2",
                       state=state, gmacs=gmacs, relative_gmacs=gmacs, fid=fid if state == "COMPLETE" else None,
                       fid_std=0.1, **fields)


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), max_size=30))
def test_non_dominated_is_the_brute_force_front(points):
    # Small integer grids make ties in one coordinate and exact duplicates common.
    front = non_dominated(points)
    assert sorted(front) == brute_force_front(points)
    assert [points[i] for i in front] == sorted(points[i] for i in front)


def test_non_dominated_keeps_every_copy_of_a_duplicate():
    assert sorted(non_dominated([(1, 2), (2, 1), (1, 2), (2, 2), (2, 1)])) == [0, 1, 2, 4]
    assert non_dominated([]) == []


def test_save_upserts_by_study_name_and_trial_number(database_url):
    with Store(database_url) as store:
        store.save(record(0, fid=12.0, fid_details={"extractor": "digits", "splits": [11.9, 12.1]},
                          timings={"train": 3.5, "total": 5.0}, worker="node-1"))
        first = store.trials("demo").iloc[0]
        store.save(record(0, fid=11.0, attempts=2, checkpoint="runs/0/model.safetensors"))
        store.save(record(0, study="other"))
        rows = store.trials("demo")
        assert len(rows) == 1 and store.studies() == ["demo", "other"]
        row = rows.iloc[0]
        assert (row.fid, row.attempts, row.checkpoint, row.trial_id) == (11.0, 2, "runs/0/model.safetensors", 100)
        assert row.fid_details == {} and row.worker is None  # a save replaces the whole record
        assert row.created_at == first.created_at and row.updated_at > first.updated_at
        assert first.fid_details == {"extractor": "digits", "splits": [11.9, 12.1]}
        assert first.timings == {"train": 3.5, "total": 5.0}


def test_failed_and_running_trials_keep_their_message(database_url):
    with Store(database_url) as store:
        store.save(record(0, state="FAIL", error="CUDA out of memory\nTraceback ...", attempts=3))
        store.save(record(1, state="RUNNING", worker="node-2"))
        rows = store.trials("demo").set_index("trial")
        assert rows.loc[0, "error"].startswith("CUDA out of memory") and rows.loc[0, "attempts"] == 3
        assert rows.loc[1, "state"] == "RUNNING" and store.front("demo").empty
        with pytest.raises(StoreError, match="unknown trial state 'DONE'"):
            store.save(record(2, state="DONE"))


def test_front_is_the_brute_force_front_of_complete_trials(database_url):
    rng = random.Random(0)
    with Store(database_url) as store:
        for study in range(3):
            name = f"s{study}"
            points = [(rng.randint(1, 6) / 4, float(rng.randint(1, 6))) for _ in range(25)]
            states = [rng.choice(["COMPLETE", "COMPLETE", "COMPLETE", "FAIL", "RUNNING"]) for _ in points]
            for number, ((gmacs, fid), state) in enumerate(zip(points, states)):
                store.save(record(number, gmacs, fid, state, study=name))
            complete = [n for n, state in enumerate(states) if state == "COMPLETE"]
            expected = [complete[i] for i in brute_force_front([points[n] for n in complete])]
            assert sorted(store.update_front(name)) == expected
            table = store.front(name)
            assert sorted(table.trial) == expected
            assert list(table.gmacs) == sorted(table.gmacs)


def test_front_follows_every_save(database_url):
    saves = [record(0, 1.0, 10.0), record(1, 0.5, 15.0), record(2, 0.6, 16.0), record(3, 0.4, 20.0, "RUNNING"),
             record(3, 0.4, 14.0), record(1, 0.5, None, "FAIL", error="lost node"), record(4, 1.0, 10.0)]
    expected = [[0], [1, 0], [1, 0], [1, 0], [3, 0], [3, 0], [3, 0, 4]]
    with Store(database_url) as store:
        for saved, front in zip(saves, expected):
            store.save(saved)
            assert list(store.front("demo").trial) == front
    with Store(database_url) as reader:  # the front is stored, not recomputed on reading
        assert list(reader.front("demo").trial) == [3, 0, 4]


def test_another_schema_version_is_refused(database_url):
    Store(database_url).close()
    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE ppsearch_schema SET version = 7"))
    engine.dispose()
    with pytest.raises(StoreError, match="schema version 7; this ppsearch reads version 1"):
        Store(database_url)


def test_sqlite_reader_is_not_blocked_by_a_writer(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    with Store(url) as store:
        store.save(record(0))
    writer = sqlite3.connect(tmp_path / "study.db")
    writer.execute("BEGIN IMMEDIATE")  # the driver, in the middle of a write
    writer.execute("UPDATE ppsearch_trials SET fid = 1.0")
    with Store(url) as reader:
        assert reader.trials("demo").fid.tolist() == [10.0]  # WAL: reads the last committed state
    writer.rollback()
    writer.close()
    assert sqlite3.connect(tmp_path / "study.db").execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_hidden_password():
    assert hidden_password("postgresql://u:s3cret@db:5432/x") == "postgresql://u:***@db:5432/x"
    assert hidden_password("sqlite:///ppsearch.db") == "sqlite:///ppsearch.db"
    assert "s3cret" not in hidden_password("postgresql://u:s3cret@db:port/x")


@pytest.mark.parametrize("url, message", [
    ("not a url", "bad database URL"),
    ("nosuchdb://u:s3cret@host/x", "bad database URL nosuchdb://u:\\*\\*\\*@host/x"),
    ("postgresql://u:s3cret@host:port/x", "bad database URL postgresql://u:\\*\\*\\*@host:port/x: invalid literal"),
    ("postgresql://u:s3cret@127.0.0.1:1/x", "cannot reach database postgresql://u:\\*\\*\\*@127.0.0.1:1/x: "),
    ("sqlite:////no/such/folder/study.db", "cannot reach database sqlite:////no/such/folder/study.db: "),
])
def test_unusable_databases_fail_clearly_without_the_password(url, message):
    with pytest.raises(StoreError, match=message) as error:
        Store(url)
    assert "s3cret" not in str(error.value) and "\n" not in str(error.value)


def test_wrong_password_is_not_shown(postgres_url):
    wrong = postgres_url.replace(PASSWORD, "not-the-password")
    with pytest.raises(StoreError, match="cannot reach database .*password authentication failed") as error:
        Store(wrong)
    assert "not-the-password" not in str(error.value) and PASSWORD not in str(error.value)


def test_a_reader_does_not_make_a_sqlite_file(tmp_path):
    with pytest.raises(StoreError, match="no database file"):
        Store(f"sqlite:///{tmp_path / 'typo.db'}", must_exist=True)
    assert not (tmp_path / "typo.db").exists()


def test_record_fields_round_trip(database_url):
    full = replace(record(5), baseline="PPF-3", relative_gmacs=0.45, checkpoint="c.pt", worker="w", attempts=2)
    with Store(database_url) as store:
        store.save(full)
        row = store.trials("demo").iloc[0]
    fields = {name: row[name] for name in TrialRecord.__dataclass_fields__
              if name not in ("study_name", "trial_number")}
    assert TrialRecord(study_name="demo", trial_number=row.trial, **fields) == full
