#!/bin/sh
# Creates the application's role and database on the postgres image's first start (the image runs
# every script in /docker-entrypoint-initdb.d as its superuser, POSTGRES_USER, on a fresh data volume).
#
# The role APP_DB_USER logs in with APP_DB_PASSWORD and is no superuser: it cannot create roles or
# databases, nor read pg_authid. It owns its database APP_DB_NAME, so the schema it migrates
# (`fleet-app` applies migrations at start-up, as this role) is its own, and nothing outside it is.
# No other role but the superuser may connect to that database.
#
# With APP_DB_READ_STATS=true (a replicated cluster's members) the role may also read replication
# statistics (pg_read_all_stats): a replica then tells the nodes the timeline of the WAL it receives, which
# read-your-writes tokens are checked against (docs/ha.md).
#
# The values go to psql as variables (:"name" quotes an identifier, :'name' a literal), never into SQL
# text. Reading the SQL from stdin is what lets psql interpolate them. The password is no argument (every
# local user can read a process's arguments): psql reads it from its environment (\getenv, psql 15).
# Should the statement fail, the server must not log it with the password in it.
set -eu
: "${APP_DB_USER:?set APP_DB_USER}" "${APP_DB_PASSWORD:?set APP_DB_PASSWORD}" "${APP_DB_NAME:?set APP_DB_NAME}"

psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER:-postgres}" --dbname postgres \
    -v app_user="$APP_DB_USER" -v app_db="$APP_DB_NAME" <<'SQL'
\getenv app_password APP_DB_PASSWORD
SET log_min_error_statement = panic;
CREATE ROLE :"app_user" LOGIN PASSWORD :'app_password' NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
CREATE DATABASE :"app_db" OWNER :"app_user";
REVOKE ALL ON DATABASE :"app_db" FROM PUBLIC;
SQL
if [ "${APP_DB_READ_STATS:-false}" = true ]; then
    psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER:-postgres}" --dbname postgres \
        -v app_user="$APP_DB_USER" <<'SQL'
GRANT pg_read_all_stats TO :"app_user";
SQL
fi
