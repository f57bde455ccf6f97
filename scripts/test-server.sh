#!/usr/bin/env bash
# The server tests on SQLite and on PostgreSQL, both passes at once. A pass mostly waits on its
# servers' heartbeats and fake agents (alone, one keeps about 1.2 of the 2 cores busy), so the two
# together take little longer than one. Each pass writes its own log and temp folder; both logs are
# printed at the end, and the exit status is non-zero when either pass failed.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
PG_URL=${PG_URL:-postgresql+psycopg://vmshift:vmshift@127.0.0.1/vmshift_test}
work=$(mktemp -d /tmp/vmshift-test-server.XXXXXX)
trap 'rm -rf "$work"' EXIT

./scripts/setup-postgres.sh vmshift_test vmshift_test_gw0 vmshift_test_gw1 || exit 1
"$BIN/pytest" -q -n 2 --basetemp="$work/sqlite-tmp" tests/server "$@" > "$work/sqlite.log" 2>&1 &
sqlite=$!
VMSHIFT_TEST_DB_URL=$PG_URL "$BIN/pytest" -q -n 2 --basetemp="$work/pg-tmp" tests/server "$@" \
    > "$work/pg.log" 2>&1 &
pg=$!
wait "$sqlite"; sqlite_rc=$?
wait "$pg"; pg_rc=$?

echo "===== server tests on SQLite (exit $sqlite_rc) ====="
cat "$work/sqlite.log"
echo "===== server tests on PostgreSQL (exit $pg_rc) ====="
cat "$work/pg.log"
[ "$sqlite_rc" -eq 0 ] && [ "$pg_rc" -eq 0 ]
