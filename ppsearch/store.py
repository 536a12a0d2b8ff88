"""ppsearch's own tables beside Optuna's, in the study's database: one row per trial with what
Optuna does not keep (schedule text, GMACs, FID noise and details, timings, checkpoint, error),
and each study's current Pareto front. The schema carries a version number so an old or newer
ppsearch fails with a clear message instead of misreading rows."""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import pandas as pd
from sqlalchemy import (JSON, DateTime, ForeignKeyConstraint, String, Text, create_engine, delete, event, func,
                        inspect, select)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

SCHEMA_VERSION = 1
STATES = ("RUNNING", "COMPLETE", "FAIL")
SQLITE_BUSY_TIMEOUT_S = 60  # a reader waits this long for the driver's write to finish


class StoreError(ValueError):
    """A database ppsearch cannot use: bad URL, unreachable server, another schema version."""


@dataclass
class TrialRecord:
    """What ppsearch keeps about one trial; ``gmacs`` is per generated sample and
    ``relative_gmacs`` is over the base schedule."""

    study_name: str
    trial_number: int
    trial_id: int  # Optuna's
    schedule: str  # canonical text, e.g. 4x4@0.5,2x4@0.75,2x2
    state: str  # RUNNING | COMPLETE | FAIL
    baseline: str | None = None  # "base", "PPF-2", "PPF-3" for the enqueued baselines
    gmacs: float | None = None
    relative_gmacs: float | None = None
    fid: float | None = None  # only when COMPLETE
    fid_std: float | None = None  # the FID's noise estimate
    fid_details: dict = field(default_factory=dict)  # extractor, reference key, samples, sampler, split FIDs
    timings: dict = field(default_factory=dict)  # seconds: train, sampling, fid, total
    checkpoint: str | None = None
    error: str | None = None  # the message of a failed trial
    attempts: int = 1
    worker: str | None = None


def _now() -> datetime:
    return datetime.now(timezone.utc)


class _Base(DeclarativeBase):
    pass


class _Schema(_Base):
    __tablename__ = "ppsearch_schema"
    version: Mapped[int] = mapped_column(primary_key=True)


class _Trial(_Base):
    __tablename__ = "ppsearch_trials"
    study_name: Mapped[str] = mapped_column(String(512), primary_key=True)
    trial_number: Mapped[int] = mapped_column(primary_key=True)
    trial_id: Mapped[int]
    schedule: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16))
    baseline: Mapped[str | None] = mapped_column(String(64))
    gmacs: Mapped[float | None]
    relative_gmacs: Mapped[float | None]
    fid: Mapped[float | None]
    fid_std: Mapped[float | None]
    fid_details: Mapped[dict] = mapped_column(JSON)
    timings: Mapped[dict] = mapped_column(JSON)
    checkpoint: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int]
    worker: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, onupdate=_now)


class _Front(_Base):
    __tablename__ = "ppsearch_front"
    study_name: Mapped[str] = mapped_column(String(512), primary_key=True)
    trial_number: Mapped[int] = mapped_column(primary_key=True)
    __table_args__ = (ForeignKeyConstraint(["study_name", "trial_number"],
                                           ["ppsearch_trials.study_name", "ppsearch_trials.trial_number"]),)


_COLUMNS = [c.name for c in _Trial.__table__.columns if c.name != "study_name"]


def hidden_password(url: str) -> str:
    """``url`` as text with its password (if any) replaced by ``***``."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):  # not a URL SQLAlchemy reads; hide what looks like user:password@
        return re.sub(r"(//[^/:@]*:)[^/@]*@", r"\1***@", url)


def non_dominated(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates, both coordinates minimised, in order of
    increasing first then second coordinate. Exact duplicates of a non-dominated point are all
    kept (as Optuna's ``best_trials`` does): none is better than the others."""
    order = sorted(range(len(points)), key=lambda i: tuple(points[i]))
    front, lowest = [], math.inf  # lowest: second coordinate over the points already passed
    for i in order:
        y = points[i][1]
        if y < lowest or (front and tuple(points[front[-1]]) == tuple(points[i])):
            front.append(i)
        lowest = min(lowest, y)
    return front


class Store:
    """ppsearch's tables in the database at ``url`` (any SQLAlchemy URL, the study's storage).
    Tables are created when missing; the driver is the only writer."""

    def __init__(self, url: str, must_exist: bool = False):
        """``must_exist``: for readers, a SQLite file that is not there is an error, not made."""
        self.url = hidden_password(url)
        try:
            self.engine = create_engine(url, **_engine_options(url))
        except (ArgumentError, NoSuchModuleError, ValueError) as err:
            raise StoreError(f"bad database URL {self.url}: {_first_line(err, url)}") from None
        except ImportError as err:
            raise StoreError(f"no driver for database {self.url}: {err} (install it, e.g. 'psycopg[binary]' "
                             "for postgresql://)") from None
        if self.engine.dialect.name == "sqlite":
            database = self.engine.url.database
            if must_exist and database not in (None, "", ":memory:") and not Path(database).exists():
                raise StoreError(f"no database file {database} (storage {self.url})")
            event.listen(self.engine, "connect", _sqlite_wal)
        try:
            self._check_schema()
        except DBAPIError as err:
            self.engine.dispose()
            verb = "reach" if isinstance(err, OperationalError) else "use"
            raise StoreError(f"cannot {verb} database {self.url}: {_first_line(err.orig or err, url)}") from None

    def _check_schema(self):
        if inspect(self.engine).has_table(_Schema.__tablename__):
            with Session(self.engine) as session:
                versions = session.scalars(select(_Schema.version)).all()
            if versions and versions != [SCHEMA_VERSION]:
                self.engine.dispose()
                raise StoreError(f"database {self.url} holds ppsearch tables of schema version "
                                 f"{', '.join(map(str, versions))}; this ppsearch reads version {SCHEMA_VERSION}")
        _Base.metadata.create_all(self.engine)
        with Session(self.engine) as session, session.begin():
            if session.scalar(select(func.count()).select_from(_Schema)) == 0:
                session.add(_Schema(version=SCHEMA_VERSION))

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def save(self, record: TrialRecord) -> None:
        """Insert or replace the row of (study_name, trial_number); the study's front is
        recomputed in the same transaction."""
        if record.state not in STATES:
            raise StoreError(f"unknown trial state {record.state!r}; expected one of {', '.join(STATES)}")
        with Session(self.engine) as session, session.begin():
            # merge: one SELECT then INSERT or UPDATE, the same on every backend; created_at is
            # not set here, so an update keeps the first one.
            session.merge(_Trial(**asdict(record)))
            _replace_front(session, record.study_name)

    def update_front(self, study_name: str) -> list[int]:
        """Recompute the study's front (COMPLETE trials, minimising GMACs and FID), store it
        and return its trial numbers in order of increasing GMACs."""
        with Session(self.engine) as session, session.begin():
            return _replace_front(session, study_name)

    def trials(self, study_name: str) -> pd.DataFrame:
        """All trials of the study, one row each, by trial number: the fields of TrialRecord
        (``trial`` for trial_number, without study_name), created_at and updated_at."""
        query = select(*_columns()).where(_Trial.study_name == study_name).order_by(_Trial.trial_number)
        return self._frame(query)

    def front(self, study_name: str) -> pd.DataFrame:
        """The stored front of the study, columns as in ``trials``, by increasing GMACs."""
        query = (select(*_columns()).join(_Front, (_Front.study_name == _Trial.study_name)
                                          & (_Front.trial_number == _Trial.trial_number))
                 .where(_Trial.study_name == study_name).order_by(_Trial.gmacs, _Trial.fid, _Trial.trial_number))
        return self._frame(query)

    def studies(self) -> list[str]:
        """Names of the studies with trials in this database."""
        with Session(self.engine) as session:
            return list(session.scalars(select(_Trial.study_name).distinct().order_by(_Trial.study_name)))

    def _frame(self, query) -> pd.DataFrame:
        with self.engine.connect() as connection:
            return pd.read_sql(query, connection).rename(columns={"trial_number": "trial"})


def _columns():
    return [_Trial.__table__.c[name] for name in _COLUMNS]


def _replace_front(session: Session, study_name: str) -> list[int]:
    rows = session.execute(select(_Trial.trial_number, _Trial.gmacs, _Trial.fid).where(
        _Trial.study_name == study_name, _Trial.state == "COMPLETE",
        _Trial.gmacs.is_not(None), _Trial.fid.is_not(None))).all()
    numbers = [rows[i].trial_number for i in non_dominated([(r.gmacs, r.fid) for r in rows])]
    session.execute(delete(_Front).where(_Front.study_name == study_name))
    session.add_all(_Front(study_name=study_name, trial_number=n) for n in numbers)
    return numbers


def _engine_options(url: str) -> dict:
    if make_url(url).get_backend_name() == "sqlite":
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    return {"pool_pre_ping": True}  # a search runs for days; servers drop idle connections


def _sqlite_wal(dbapi_connection, connection_record):
    # WAL lets the `front` command read while the driver writes; the mode is kept in the file,
    # so Optuna's own connections to it get it too.
    dbapi_connection.execute("PRAGMA journal_mode=WAL")


def _first_line(err: BaseException, url: str) -> str:
    """The first line of an error's message, never with the URL's password in it."""
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    try:
        password = make_url(url).password
    except (ArgumentError, ValueError):
        password = None
    return line.replace(str(password), "***") if password else line
