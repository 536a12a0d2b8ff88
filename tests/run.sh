#!/usr/bin/env bash
# The project's test command, on a fresh Debian machine as root (CI) or on a set-up one: the
# PostgreSQL server binaries the database tests start a throwaway server from, the Python
# packages, then every test, slow ones included. Arguments go to pytest: tests/run.sh tests/test_store.py
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v initdb >/dev/null && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql
    else
        echo "tests/run.sh: no PostgreSQL server binaries and not root: the PostgreSQL tests will be skipped" >&2
    fi
fi
pip install torch==2.14.1 torchvision==0.29.1 -e '.[test]'
exec python -m pytest -m 'slow or not slow' --durations=40 "$@"
