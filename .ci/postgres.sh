# A throwaway PostgreSQL 15 server for the tests of `mamo tune` on a shared study (tests/test_tune.py).
#
# Source this file, then:
#   postgres_start   # initdb + pg_ctl in a new temporary folder, on a free loopback port; exports
#                    # MAMO_TEST_POSTGRES_URL (postgresql://mamo@127.0.0.1:PORT/mamo_test), MAMO_POSTGRES_PID
#                    # (the postmaster's PID) and MAMO_POSTGRES_DIR (the folder)
#   postgres_stop    # stops the server by its PID (fast shutdown, SIGKILL after 30 s) and removes the folder
# e.g. in .ci/run:  source .ci/postgres.sh && postgres_start && trap postgres_stop EXIT
# Run directly, `bash .ci/postgres.sh check` starts a server, connects to it once and stops it.
#
# PostgreSQL refuses to run as root, so under root the server runs as the `postgres` user (or `nobody`).
# Authentication is `trust` and the server listens on 127.0.0.1 only: it holds nothing but test studies.

MAMO_PG_BIN=${MAMO_PG_BIN:-/usr/lib/postgresql/15/bin}

_mamo_pg_as_owner() {
    # Runs a command as the server's owner, from a folder that owner can read.
    if [ "$(id -u)" = 0 ]; then
        (cd "$MAMO_POSTGRES_DIR" && runuser -u "$_MAMO_PG_USER" -- "$@")
    else
        (cd "$MAMO_POSTGRES_DIR" && "$@")
    fi
}

_mamo_pg_free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

postgres_start() {
    if [ ! -x "$MAMO_PG_BIN/initdb" ]; then
        echo "postgres.sh: no PostgreSQL at $MAMO_PG_BIN; install postgresql-15 or set MAMO_PG_BIN." >&2
        return 1
    fi
    _MAMO_PG_USER=postgres
    id -u postgres >/dev/null 2>&1 || _MAMO_PG_USER=nobody
    MAMO_POSTGRES_DIR=$(mktemp -d /tmp/mamo-postgres.XXXXXX) || return 1
    export MAMO_POSTGRES_DIR
    [ "$(id -u)" = 0 ] && chown "$_MAMO_PG_USER" "$MAMO_POSTGRES_DIR"
    if ! _mamo_pg_as_owner "$MAMO_PG_BIN/initdb" -D "$MAMO_POSTGRES_DIR/data" -U mamo --auth=trust -E UTF8 \
            >"$MAMO_POSTGRES_DIR/initdb.log" 2>&1; then
        echo "postgres.sh: initdb failed:" >&2; cat "$MAMO_POSTGRES_DIR/initdb.log" >&2
        return 1
    fi
    local port attempt
    for attempt in 1 2 3; do  # a port found free can be taken before the server binds it: try another
        port=$(_mamo_pg_free_port)
        if _mamo_pg_as_owner "$MAMO_PG_BIN/pg_ctl" -D "$MAMO_POSTGRES_DIR/data" -l "$MAMO_POSTGRES_DIR/server.log" \
                -w -t 60 -o "-c listen_addresses=127.0.0.1 -p $port -k $MAMO_POSTGRES_DIR -c fsync=off" \
                start >/dev/null; then
            break
        fi
        port=""
    done
    if [ -z "$port" ]; then
        echo "postgres.sh: the server did not start:" >&2; cat "$MAMO_POSTGRES_DIR/server.log" >&2
        return 1
    fi
    MAMO_POSTGRES_PID=$(head -n 1 "$MAMO_POSTGRES_DIR/data/postmaster.pid")
    export MAMO_POSTGRES_PID
    if ! _mamo_pg_as_owner "$MAMO_PG_BIN/createdb" -h 127.0.0.1 -p "$port" -U mamo mamo_test; then
        postgres_stop
        return 1
    fi
    export MAMO_TEST_POSTGRES_URL="postgresql://mamo@127.0.0.1:$port/mamo_test"
    echo "postgres.sh: PostgreSQL (PID $MAMO_POSTGRES_PID) at $MAMO_TEST_POSTGRES_URL" >&2
}

postgres_stop() {
    if [ -n "${MAMO_POSTGRES_PID:-}" ] && kill -0 "$MAMO_POSTGRES_PID" 2>/dev/null; then
        kill -INT "$MAMO_POSTGRES_PID"  # SIGINT is PostgreSQL's fast shutdown
        local waited=0
        while kill -0 "$MAMO_POSTGRES_PID" 2>/dev/null && [ "$waited" -lt 300 ]; do
            sleep 0.1; waited=$((waited + 1))
        done
        kill -0 "$MAMO_POSTGRES_PID" 2>/dev/null && kill -KILL "$MAMO_POSTGRES_PID"
    fi
    case "${MAMO_POSTGRES_DIR:-}" in
        /tmp/mamo-postgres.*) rm -rf "$MAMO_POSTGRES_DIR" ;;
    esac
    unset MAMO_POSTGRES_PID MAMO_POSTGRES_DIR MAMO_TEST_POSTGRES_URL
    return 0
}

if [ "${BASH_SOURCE[0]}" = "$0" ] && [ "${1:-}" = check ]; then
    set -e
    postgres_start
    trap postgres_stop EXIT
    python3 -c 'import os, psycopg2; c = psycopg2.connect(os.environ["MAMO_TEST_POSTGRES_URL"]); \
cur = c.cursor(); cur.execute("select version()"); print(cur.fetchone()[0])'
fi
