"""A throwaway PostgreSQL server from the installed server binaries: ``postgres_server()`` for
any script (bench/orchestration.py uses it), ``postgres_url`` for the test session;
``database_url`` runs a test on a new SQLite file and on a new PostgreSQL schema;
``postgres_database`` is a new PostgreSQL database. The application user has a password, so
tests can check that it never leaks."""
from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

USER, PASSWORD = "ppsearch", "pp-secret-7f3a9"


def _bindir() -> Path | None:
    """Where initdb and pg_ctl live: on PATH, from pg_config, or Debian's versioned folder."""
    if shutil.which("initdb"):
        return Path(shutil.which("initdb")).resolve().parent
    if shutil.which("pg_config"):
        found = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip()
        if found and (Path(found) / "initdb").exists():
            return Path(found)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server can be started on this machine; the message says why."""


@contextmanager
def postgres_server():
    """``postgresql://USER:PASSWORD@127.0.0.1:PORT/ppsearch`` of a new server, stopped and
    deleted on exit."""
    bindir = _bindir()
    if bindir is None:
        raise PostgresUnavailable("PostgreSQL server binaries (initdb, pg_ctl) not found; install Debian's "
                                  "postgresql (tests/run.sh does) to run the PostgreSQL tests")
    server_user, as_server_user = None, []
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            server_user = pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresUnavailable("running as root and there is no 'postgres' user to run the "
                                      "PostgreSQL server as") from None
        as_server_user = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="ppsearch-postgres-"))  # not under pytest's 0700 root-owned tmp
    if server_user:
        os.chown(root, server_user.pw_uid, server_user.pw_gid)

    def run(*command):
        done = subprocess.run([*as_server_user, *command], capture_output=True, text=True)
        if done.returncode:
            log = root / "server.log"
            raise RuntimeError(f"{Path(command[0]).name} failed: {done.stderr.strip()}"
                               + (f"\nserver log:\n{log.read_text()}" if log.exists() else ""))

    data, port = root / "data", _free_port()
    try:
        # Local (socket) logins are trusted, for setting up; TCP logins need the password.
        run(bindir / "initdb", "-D", data, "-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256",
            "-E", "UTF8", "--locale=C", "--no-sync")
        run(bindir / "pg_ctl", "-D", data, "-l", root / "server.log", "-w", "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off", "start")
        _execute(f"postgresql://postgres@/postgres?host={root}&port={port}",
                 f"CREATE USER {USER} PASSWORD '{PASSWORD}' CREATEDB", f"CREATE DATABASE ppsearch OWNER {USER}")
        url = f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{port}/ppsearch"
        _restarts[port] = lambda pause: (run(bindir / "pg_ctl", "-D", data, "-m", "immediate", "stop"),
                                         time.sleep(pause),
                                         run(bindir / "pg_ctl", "-D", data, "-l", root / "server.log", "-w", "-o",
                                             f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
                                             f"-c full_page_writes=off", "start"))
        yield url
    finally:
        _restarts.pop(port, None)
        if (data / "postmaster.pid").exists():
            run(bindir / "pg_ctl", "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


_restarts = {}  # port -> restart(pause) of the servers postgres_server runs


def restart_server(url: str, pause: float = 0.2) -> None:
    """Stop the server of ``url`` at once (as a crash would), wait ``pause`` seconds, start it again."""
    from sqlalchemy.engine import make_url

    _restarts[make_url(url).port](pause)


@pytest.fixture(scope="session")
def postgres_url():
    """The URL of a server (``postgres_server``) that lives as long as the test session."""
    try:
        with postgres_server() as url:
            yield url
    except PostgresUnavailable as err:
        pytest.skip(str(err))


def _execute(url, *statements):
    # SQLAlchemy picks the driver for postgresql:// URLs, as it does for ppsearch and Optuna.
    from sqlalchemy import create_engine  # here: the GPU machine's CUDA tests run without it

    engine = create_engine(url, isolation_level="AUTOCOMMIT")  # CREATE DATABASE cannot run in a transaction
    try:
        with engine.connect() as connection:
            for statement in statements:
                connection.exec_driver_sql(statement)
    finally:
        engine.dispose()


_names = itertools.count()  # of the schemas and databases tests make
BACKENDS = ["sqlite", "postgresql"]


def new_database(request, backend: str, folder: Path) -> str:
    """A URL of an empty database: a SQLite file in ``folder``, or on the session's server a new
    schema that the URL puts first on the search path (much faster to make than a database)."""
    if backend == "sqlite":
        return f"sqlite:///{folder / 'study.db'}"
    server = request.getfixturevalue("postgres_url")
    schema = f"test_{next(_names)}"
    _execute(server, f"CREATE SCHEMA {schema}")
    return f"{server}?options=-csearch_path%3D{schema}"


@pytest.fixture(params=BACKENDS)
def database_url(request, tmp_path):
    return new_database(request, request.param, tmp_path)


@pytest.fixture
def postgres_database(postgres_url):
    """The URL of a new, empty PostgreSQL database on the session's server. It has no query
    part, so it passes as it is in a ``storage=URL`` override on a command line."""
    name = f"test_db_{next(_names)}"
    _execute(postgres_url, f"CREATE DATABASE {name}")
    return f"{postgres_url.rsplit('/', 1)[0]}/{name}"
