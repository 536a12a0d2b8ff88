"""ppsearch's table (the lease, the study's id and configuration), the schema version, retries
of transient failures, and URLs that never show a credential. Each database test runs on a
SQLite file and on PostgreSQL."""
import sqlite3
import time

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError, OperationalError

from ppsearch.store import (DatabaseUnreachable, LeaseHeld, LeaseLost, Retry, Store, StoreError, hidden_password,
                            scrub)
from postgres import PASSWORD


def test_another_schema_version_is_refused(database_url):
    Store(database_url).close()
    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE ppsearch_schema SET version = 7"))
    engine.dispose()
    with pytest.raises(StoreError, match="schema version 7; this ppsearch reads version 2"):
        Store(database_url)


def test_the_lease_admits_one_driver_and_is_taken_over_when_stale(database_url):
    with Store(database_url) as store:
        assert store.acquire(1, "demo", "first", timeout=60) is None
        with pytest.raises(LeaseHeld, match=r"study 'demo' is being run by another driver: \S+ pid \d+"):
            store.acquire(1, "demo", "second", timeout=60)
        store.renew(1, "first")
        assert store.lease(1).pid > 0
        time.sleep(0.3)
        stale = store.acquire(1, "demo", "second", timeout=0.1)  # "first" stopped renewing
        assert stale is not None and stale.heartbeat <= time.time() - 0.1
        with pytest.raises(LeaseLost, match="lost the study's lease"):
            store.renew(1, "first")
        store.release(1, "second")
        assert store.lease(1) is None
        assert store.acquire(1, "demo", "third", timeout=60) is None


def test_two_drivers_starting_together_get_one_lease(tmp_path):
    """Both find no row and insert: one insert wins, the other is refused, never both."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    first, second = Store(url), Store(url)
    winners = []
    for holder, store in (("a", first), ("b", second)):
        try:
            store.acquire(7, "demo", holder, timeout=60)
            winners.append(holder)
        except LeaseHeld:
            pass
    assert winners == ["a"]


def test_identity_and_configuration_round_trip(database_url):
    with Store(database_url) as store:
        store.acquire(3, "demo", "me", 60)
        store.set_identity(3, "abc123", {"trainer": {"lr": 0.001}})
        assert store.study_uid(3) == "abc123" and store.config(3) == {"trainer": {"lr": 0.001}}
        assert store.config(4) is None


def test_sqlite_reader_is_not_blocked_by_a_writer(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    with Store(url) as store:
        store.acquire(1, "demo", "me", 60)
    writer = sqlite3.connect(tmp_path / "study.db")
    writer.execute("BEGIN IMMEDIATE")  # the driver, in the middle of a write
    writer.execute("UPDATE ppsearch_studies SET pid = 1")
    with Store(url) as reader:
        assert reader.lease(1).pid > 1  # WAL: reads the last committed state
    writer.rollback()
    writer.close()
    assert sqlite3.connect(tmp_path / "study.db").execute("PRAGMA journal_mode").fetchone() == ("wal",)


# Every credential form SQLAlchemy accepts, each with the secret "s3cret-x".
CREDENTIAL_FORMS = [
    "postgresql://u:s3cret-x@db:5432/x",
    "postgresql+psycopg://u:s3cret-x@db/x?sslmode=require",
    "postgresql://u@db/x?password=s3cret-x",
    "postgresql:///x?host=/run/pg&user=u&password=s3cret-x",
    "postgresql://db/x?user=u&sslpassword=s3cret-x",
    "postgresql://u:s3cret-x@db/x?password=s3cret-x",
    "mysql+pymysql://u@db/x?passwd=s3cret-x",
    "postgresql://u:s3cret-x@db:port/x",  # unparseable port
    "postgresql://u:s3cret@x@db/x",  # an unencoded @ in the password
    "postgresql://u:s3cret%40x@db/x",  # the same, encoded
    "not a url, password=s3cret-x",
]


@pytest.mark.parametrize("url", CREDENTIAL_FORMS)
def test_hidden_password_masks_every_credential_form(url):
    shown = hidden_password(url)
    assert "s3cret" not in shown and "***" in shown
    assert "s3cret" not in scrub(f"could not connect to {url}", url)


def test_hidden_password_leaves_other_urls_alone():
    assert hidden_password("sqlite:///ppsearch.db") == "sqlite:///ppsearch.db"
    assert hidden_password("postgresql://u@db/x?sslmode=require") == "postgresql://u@db/x?sslmode=require"


@pytest.mark.parametrize("url, message", [
    ("not a url", "bad database URL"),
    ("nosuchdb://u:s3cret@host/x", "bad database URL nosuchdb://u:\\*\\*\\*@host/x"),
    ("postgresql://u:s3cret@host:port/x", "bad database URL postgresql://u:\\*\\*\\*@host:port/x: invalid literal"),
    ("postgresql://u:s3cret@127.0.0.1:1/x", "cannot reach database postgresql://u:\\*\\*\\*@127.0.0.1:1/x: "),
    ("postgresql://u@127.0.0.1:1/x?password=s3cret", "cannot reach database postgresql://u@127.0.0.1:1/x\\?password=\\*\\*\\*"),
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


def test_retry_waits_out_a_transient_failure_and_gives_up_in_one_line():
    lines, calls = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))
        return "ok"

    assert Retry("postgresql://u:pw-secret@h/x", 10, lines.append)(flaky, "telling") == "ok"
    assert len(calls) == 3 and lines[0].startswith("database unreachable (telling)") and lines[-1].startswith(
        "database answers again")

    def down():
        raise OperationalError("SELECT 1", {}, Exception("connection to pw-secret refused"))

    with pytest.raises(DatabaseUnreachable, match=r"postgresql://u:\*\*\*@h/x unreachable for telling \(retried") as err:
        Retry("postgresql://u:pw-secret@h/x", 1, lines.append)(down, "telling")
    assert "pw-secret" not in str(err.value)

    def bug():
        raise IntegrityError("INSERT", {}, Exception("duplicate key"))

    with pytest.raises(IntegrityError):  # not transient: no retry
        Retry("sqlite://", 10, lines.append)(bug, "x")
