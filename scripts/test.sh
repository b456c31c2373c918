#!/usr/bin/env bash
# README's test command: sets up what the tests need on a fresh machine, then runs them.
#
#   bash scripts/test.sh                 # the whole suite (what .ci/run runs)
#   bash scripts/test.sh -k dashboard    # arguments go to pytest
#
# 1. PostgreSQL on 127.0.0.1:5432 with trust auth (the storage tests talk to a real server):
#    the machine's cluster is started when it is installed but down; with no cluster but the
#    server's binaries, a throwaway one is made in a temporary folder and stopped at the end.
#    The tests fail, never skip, when it cannot be had; $HPO_TEST_POSTGRES names another server.
# 2. Debian's chromium and chromium-driver for the dashboard browser test, installed when missing.
# 3. The package with its test extras, on the CPU build of torch (an unpinned torch may pull a
#    multi-GB CUDA build).
# 4. pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export TZ=UTC  # Optuna stores naive UTC datetimes; every process must agree

say() { echo "test.sh: $*"; }
die() { echo "test.sh: error: $*" >&2; exit 1; }
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else die "'$*' needs root (or sudo)"; fi
}
ready() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
wait_ready() {
    for _ in $(seq 1 30); do ready && return 0; sleep 1; done
    return 1
}

throwaway=
stop_throwaway() {
    [ -n "$throwaway" ] || return 0
    "$PG_BIN/pg_ctl" -D "$throwaway/data" -m fast -w stop >/dev/null 2>&1 \
        || runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$throwaway/data" -m fast -w stop \
            >/dev/null 2>&1 || true
    rm -rf "$throwaway"
}

if [ -z "${HPO_TEST_POSTGRES:-}" ] && ! ready; then
    PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [ -n "$PG_BIN" ] || die "PostgreSQL is not running on 127.0.0.1:5432 and its server is not \
installed (Debian: apt-get install postgresql); the storage tests need it"
    PATH="$PG_BIN:$PATH"
    clusters=$(ls /etc/postgresql 2>/dev/null || true)
    if [ -n "$clusters" ] && command -v pg_ctlcluster >/dev/null; then
        say "PostgreSQL is down; starting the machine's cluster"
        for version in $clusters; do
            as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
        done
    fi
    if ! wait_ready; then
        say "starting a throwaway PostgreSQL cluster on 127.0.0.1:5432 (trust auth)"
        throwaway=$(mktemp -d /tmp/ris-hpo-pg.XXXXXX)
        trap stop_throwaway EXIT
        run_pg=()
        if [ "$(id -u)" = 0 ]; then  # the server refuses to run as root
            chown postgres: "$throwaway" 2>/dev/null || die "no 'postgres' user to run the server"
            run_pg=(runuser -u postgres --)
        fi
        "${run_pg[@]}" "$PG_BIN/initdb" -D "$throwaway/data" -U postgres --auth=trust \
            >"$throwaway/initdb.log" 2>&1 || die "initdb failed: $(tail -n 1 "$throwaway/initdb.log")"
        "${run_pg[@]}" "$PG_BIN/pg_ctl" -D "$throwaway/data" -l "$throwaway/server.log" -w \
            -o "-h 127.0.0.1 -p 5432 -k $throwaway -c max_connections=200" start >/dev/null \
            || die "the throwaway cluster did not start: $(tail -n 1 "$throwaway/server.log")"
    fi
    wait_ready || die "PostgreSQL at 127.0.0.1:5432 is not reachable; the storage tests need it"
fi

if ! [ -x /usr/bin/chromium ] || ! [ -x /usr/bin/chromedriver ]; then
    say "installing Debian's chromium and chromium-driver for the dashboard browser test"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -q
    as_root apt-get install -y -q chromium chromium-driver
fi

say "installing the package (torch 2.13.0, CPU build) with its test extras"
python -m pip install -q torch==2.13.0 -e '.[test]'

# Not exec: the throwaway cluster, if any, is stopped when pytest is done.
python -m pytest -q "$@"
