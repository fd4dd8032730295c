#!/bin/sh
# Starts PostgreSQL on the data volume; the first time it is empty, makes the cluster first: the superuser
# `postgres` with POSTGRES_PASSWORD, password logins (scram-sha-256) from the network, and the app's role
# and database (create-app-role.sh). Arguments go to `postgres` (`-c name=value`).
set -eu
: "${POSTGRES_PASSWORD:?set POSTGRES_SUPERUSER_PASSWORD, the database superuser password}"
: "${APP_DB_PASSWORD:?set APP_DB_PASSWORD, the app role password}"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    echo "entrypoint: a new cluster in $PGDATA" >&2
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    initdb --pgdata="$PGDATA" --username=postgres --pwfile="$pwfile" --encoding=UTF8 --locale=C \
        --auth-local=peer --auth-host=scram-sha-256 >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    # Without TCP while the role is made: nothing else can connect yet.
    pg_ctl --pgdata="$PGDATA" --silent --wait -o "-c listen_addresses=''" start
    POSTGRES_USER=postgres create-app-role.sh
    pg_ctl --pgdata="$PGDATA" --silent --wait --mode=fast stop
fi
exec postgres -c listen_addresses='*' "$@"
