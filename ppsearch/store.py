"""The study database. Every trial lives in the Optuna study (values, schedule, timings, noise,
errors, files: its user attributes); ppsearch adds one table, ``ppsearch_studies``, for what
Optuna cannot hold or should not show: the driver's lease on a study (one live driver per
study; a stale lease is taken over), the study's unique id (which keys its trial folders) and
its configuration (kept out of Optuna's study listing).

Both Optuna's engine and ppsearch's pre-ping their connections, and :class:`Retry` retries a
write that failed for a transient reason (a server restart, a locked or full SQLite file) for a
configurable time, so a database blip does not stop a study. URLs are shown only through
:func:`hidden_password`, which masks every credential form SQLAlchemy accepts.
"""
from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, TypeVar

from sqlalchemy import JSON, Float, Integer, String, Text, create_engine, event, func, inspect, insert, or_, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (ArgumentError, DBAPIError, DisconnectionError, IntegrityError, InterfaceError,
                            NoSuchModuleError, OperationalError)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .errors import PPSearchError

SCHEMA_VERSION = 2
SQLITE_BUSY_TIMEOUT_S = 60  # a reader waits this long for the driver's write to finish
T = TypeVar("T")


class StoreError(PPSearchError):
    """A database ppsearch cannot use: bad URL, unreachable server, another schema version."""


class DatabaseUnreachable(StoreError):
    """The database did not answer, after retries where the caller retries."""


class LeaseHeld(StoreError):
    """Another live driver runs the study."""


class LeaseLost(StoreError):
    """This driver's lease was taken over (its heartbeat went stale)."""


# -- URLs and their credentials ------------------------------------------------------------------

_SECRET_KEY = re.compile(r"pass|pwd|secret|token|credential|auth", re.IGNORECASE)


def _secrets(url: str) -> list[str]:
    """Every credential in ``url``: the password, and the values of query parameters named like
    one (password=, passwd=, sslpassword=, secret=, token=, ...)."""
    found = []
    try:
        parsed = make_url(url)
        if parsed.password:
            found.append(str(parsed.password))
        for key, value in parsed.query.items():
            if _SECRET_KEY.search(key):
                found += [value] if isinstance(value, str) else list(value)
    except (ArgumentError, ValueError):
        pass
    found += re.findall(r"//[^/:@?#]*:([^/@?#]+)@", url)
    found += [m[1] for m in re.finditer(r"(?:^|[?&;\s])[^=&;\s]*(?:pass|pwd|secret|token|credential|auth)[^=&;\s]*"
                                        r"=([^&;\s]+)", url, re.IGNORECASE)]
    # Shorter ones would mask innocent text too (an error message shows the URL masked anyway).
    return sorted({s for s in found if len(s) >= 3}, key=len, reverse=True)


def hidden_password(url: str) -> str:
    """``url`` as text with every credential replaced by ``***``: ``user:password@`` (an unencoded
    ``@`` in the password included) and query parameters named like one (``?password=``,
    ``&sslpassword=``, ``&secret=``, ...), whether SQLAlchemy can parse the URL or not."""
    text = re.sub(r"(//[^/:@?#]*:)[^/?#]*@", r"\1***@", url)
    return re.sub(r"((?:^|[?&;\s])[^=&;\s]*(?:pass|pwd|secret|token|credential|auth)[^=&;\s]*=)[^&;#\s]*",
                  r"\1***", text, flags=re.IGNORECASE)


def scrub(text: str, url: str) -> str:
    """``text`` (an error message, say) with every credential of ``url`` replaced by ``***``."""
    for secret in _secrets(url):
        text = text.replace(secret, "***")
    return text


def _first_line(err: BaseException, url: str) -> str:
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return scrub(line, url)


def engine_options(url: str) -> dict:
    """Engine settings for ppsearch's and Optuna's engines: a liveness check before each use of
    a pooled connection (a search runs for days; servers restart and drop idle connections),
    and a long busy timeout on SQLite."""
    options = {"pool_pre_ping": True}
    if make_url(url).get_backend_name() == "sqlite":
        options["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
    return options


def _sqlite_wal(dbapi_connection, connection_record):
    # WAL lets the `front` command read while the driver writes; the mode is kept in the file,
    # so Optuna's own connections to it get it too.
    dbapi_connection.execute("PRAGMA journal_mode=WAL")


# -- retries -------------------------------------------------------------------------------------

def transient(err: BaseException) -> bool:
    """Whether a database error may pass if tried again: a dropped or refused connection, a
    restarting server, a locked or full SQLite file (Optuna wraps them in StorageInternalError)."""
    from optuna.exceptions import StorageInternalError

    if isinstance(err, (OperationalError, InterfaceError, DisconnectionError, PoolTimeout, StorageInternalError)):
        return True
    return isinstance(err, DBAPIError) and err.connection_invalidated


class Retry:
    """Runs database actions, retrying transient failures with exponential backoff (0.5 s
    doubling to 30 s) for up to ``seconds``; a failure that is not transient, or that lasts
    longer, raises DatabaseUnreachable in one line. Logs one line when a retry starts and one
    when the database answers again."""

    def __init__(self, url: str, seconds: float, log: Callable[[str], None] = print):
        self.url, self.seconds, self.log = url, seconds, log

    def __call__(self, action: Callable[[], T], what: str) -> T:
        deadline, delay, failing = time.monotonic() + self.seconds, 0.5, False
        while True:
            try:
                result = action()
            except Exception as err:  # noqa: BLE001 - sorted out just below
                if not transient(err):
                    raise
                if time.monotonic() + delay > deadline:
                    raise DatabaseUnreachable(
                        f"database {hidden_password(self.url)} unreachable for {what} (retried for "
                        f"{self.seconds:g} s): {_first_line(err, self.url)}") from None
                if not failing:
                    self.log(f"database unreachable ({what}): {_first_line(err, self.url)}; retrying for up to "
                             f"{self.seconds:g} s")
                    failing = True
                time.sleep(delay)
                delay = min(2 * delay, 30.0)
                continue
            if failing:
                self.log(f"database answers again ({what})")
            return result


# -- ppsearch's table ----------------------------------------------------------------------------

class _Base(DeclarativeBase):
    pass


class _Schema(_Base):
    __tablename__ = "ppsearch_schema"
    version: Mapped[int] = mapped_column(primary_key=True)


class _Study(_Base):
    __tablename__ = "ppsearch_studies"
    study_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)  # Optuna's
    study_name: Mapped[str] = mapped_column(String(512))
    study_uid: Mapped[str | None] = mapped_column(String(64))
    config: Mapped[dict | None] = mapped_column(JSON)
    holder: Mapped[str | None] = mapped_column(String(64))
    host: Mapped[str | None] = mapped_column(String(256))
    pid: Mapped[int | None]
    since: Mapped[float | None] = mapped_column(Float)
    heartbeat: Mapped[float | None] = mapped_column(Float)
    command: Mapped[str | None] = mapped_column(Text)


@dataclass
class LeaseInfo:
    """Who holds a study's lease: host, pid, since when, last heartbeat (epoch seconds)."""

    host: str
    pid: int
    since: float
    heartbeat: float

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        since = datetime.fromtimestamp(self.since, timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M:%S")
        return f"{self.host} pid {self.pid}, since {since} (heartbeat {max(0.0, now - self.heartbeat):.0f} s ago)"


class Store:
    """ppsearch's table in the database at ``url`` (any SQLAlchemy URL, the study's storage).
    Tables are created when missing (unless ``must_exist``: then a missing SQLite file is an error)."""

    def __init__(self, url: str, must_exist: bool = False):
        self.raw_url, self.url = url, hidden_password(url)
        try:
            self.engine = create_engine(url, **engine_options(url))
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
            raise (DatabaseUnreachable if verb == "reach" else StoreError)(
                f"cannot {verb} database {self.url}: {_first_line(err.orig or err, url)}") from None

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

    # -- the study's row -----------------------------------------------------------------------
    def _row(self, study_id: int) -> _Study | None:
        with Session(self.engine) as session:
            return session.get(_Study, study_id)

    def config(self, study_id: int) -> dict | None:
        """The configuration the study was launched with (None: not a ppsearch study)."""
        row = self._row(study_id)
        return row.config if row else None

    def study_uid(self, study_id: int) -> str | None:
        row = self._row(study_id)
        return row.study_uid if row else None

    def set_identity(self, study_id: int, uid: str, config: dict) -> None:
        with self.engine.begin() as connection:
            connection.execute(update(_Study).where(_Study.study_id == study_id).values(study_uid=uid, config=config))

    def lease(self, study_id: int) -> LeaseInfo | None:
        """The live or stale lease on the study, or None when no driver holds it."""
        row = self._row(study_id)
        if row is None or row.holder is None:
            return None
        return LeaseInfo(row.host or "?", row.pid or 0, row.since or 0.0, row.heartbeat or 0.0)

    # -- the lease -----------------------------------------------------------------------------
    def acquire(self, study_id: int, study_name: str, holder: str, timeout: float) -> LeaseInfo | None:
        """Take the study's lease for ``holder`` in one statement (two drivers starting together
        cannot both win): free, or stale (no heartbeat for ``timeout`` s). Returns the stale lease
        taken over (its driver is dead), or None; raises LeaseHeld naming the live holder."""
        now = time.time()
        mine = dict(holder=holder, host=socket.gethostname(), pid=os.getpid(), since=now, heartbeat=now)
        try:
            with self.engine.begin() as connection:
                connection.execute(insert(_Study).values(study_id=study_id, study_name=study_name, **mine))
            return None
        except IntegrityError:
            pass  # the row exists: take it over if free or stale
        previous = self.lease(study_id)
        with self.engine.begin() as connection:
            taken = connection.execute(update(_Study).where(
                _Study.study_id == study_id,
                or_(_Study.holder.is_(None), _Study.holder == holder, _Study.heartbeat < now - timeout),
            ).values(study_name=study_name, **mine)).rowcount
        if taken == 1:
            return previous if previous and previous.heartbeat < now - timeout else None
        current = self.lease(study_id)
        raise LeaseHeld(f"study {study_name!r} is being run by another driver: {current.describe(now)}; "
                        f"wait for it or stop it (a lease with no heartbeat for {timeout:g} s is taken over)")

    def renew(self, study_id: int, holder: str) -> None:
        with self.engine.begin() as connection:
            kept = connection.execute(update(_Study).where(_Study.study_id == study_id, _Study.holder == holder)
                                      .values(heartbeat=time.time())).rowcount
        if kept != 1:
            current = self.lease(study_id)
            raise LeaseLost(f"this driver lost the study's lease to {current.describe() if current else 'nobody'} "
                            f"(its heartbeat went stale); stopping, the other driver goes on")

    def release(self, study_id: int, holder: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(update(_Study).where(_Study.study_id == study_id, _Study.holder == holder)
                               .values(holder=None, heartbeat=None))


def new_uid() -> str:
    return uuid.uuid4().hex


def config_json(config) -> dict:
    """A dataclass config as plain JSON data."""
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(config), default=str))
