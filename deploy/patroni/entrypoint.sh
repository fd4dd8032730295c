#!/bin/sh
# Starts Patroni on this member's configuration, once every secret the `ha` profile needs is set: compose
# passes them even when empty (a profile's secrets are required only when it runs), so this names the
# one that is missing.
set -eu
: "${PATRONI_SUPERUSER_PASSWORD:?set POSTGRES_SUPERUSER_PASSWORD, the database superuser password}"
: "${PATRONI_REPLICATION_PASSWORD:?set REPLICATION_PASSWORD, the replication role password (profile ha)}"
: "${PATRONI_RESTAPI_PASSWORD:?set PATRONI_API_PASSWORD, the password of Patroni's REST API (profile ha)}"
: "${PATRONI_ETCD3_PASSWORD:?set ETCD_ROOT_PASSWORD, the password of etcd's root user (profile ha)}"
: "${APP_DB_PASSWORD:?set APP_DB_PASSWORD, the app role password}"
exec /opt/patroni/bin/patroni /etc/patroni/patroni.yml
