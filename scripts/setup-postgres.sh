#!/bin/sh
# Idempotent: start the local PostgreSQL 15 cluster and create role + database for vmshift's tests.
# Afterwards: VMSHIFT_TEST_DB_URL=postgresql+psycopg://vmshift:vmshift@127.0.0.1/vmshift_test
# Usage: scripts/setup-postgres.sh [DBNAME...]   (default: vmshift_test); run as root.
# `make test-server` also creates vmshift_test_gw0 and vmshift_test_gw1, one per pytest-xdist worker.
set -eu
VERSION="${PG_VERSION:-15}"
ROLE="${PG_ROLE:-vmshift}"
PASSWORD="${PG_PASSWORD:-vmshift}"
[ "$#" -gt 0 ] || set -- vmshift_test

if ! pg_lsclusters -h | awk -v v="$VERSION" '$1 == v && $2 == "main" && $4 == "online"' | grep -q .; then
    pg_ctlcluster "$VERSION" main start
fi
psql_admin() { su postgres -c "psql -v ON_ERROR_STOP=1 -tAq $*"; }

if [ "$(psql_admin "-c \"SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'\"")" != "1" ]; then
    psql_admin "-c \"CREATE ROLE $ROLE LOGIN PASSWORD '$PASSWORD'\""
fi
for db in "$@"; do
    if [ "$(psql_admin "-c \"SELECT 1 FROM pg_database WHERE datname = '$db'\"")" != "1" ]; then
        psql_admin "-c \"CREATE DATABASE $db OWNER $ROLE\""
    fi
done
echo "PostgreSQL ready: postgresql+psycopg://$ROLE:$PASSWORD@127.0.0.1/$1"
