#!/bin/sh
# Starts etcd (the arguments are its flags) with authentication on: only the user root, whose password is
# ROOT_PASSWORD, may read or write, so that nobody else on the network can delete Patroni's leader key or
# turn synchronous replication off. While authentication is off (the first start, or one interrupted
# before it was on), etcd runs first on a loopback port only (which neither the network nor the
# healthcheck reaches) while this makes the user and turns authentication on.
set -eu
: "${ROOT_PASSWORD:?set ETCD_ROOT_PASSWORD, the password of etcd's root user (profile ha)}"
setup=http://127.0.0.1:12379
etcd "$@" --listen-client-urls="$setup" --advertise-client-urls="$setup" &
etcd_pid=$!
ctl() { etcdctl --endpoints="$setup" "$@" >/dev/null; }
tries=0
# Up (`endpoint health` would need credentials once authentication is on).
until ctl endpoint status 2>/dev/null; do
    tries=$((tries + 1))
    [ "$tries" -lt 150 ] && kill -0 "$etcd_pid" 2>/dev/null || { echo "entrypoint: etcd did not start" >&2; exit 1; }
    sleep 0.2
done
# Without credentials this answers while authentication is off, and is refused once it is on; anything
# else stops here rather than serve without authentication.
if ! refusal=$(ctl user list 2>&1); then
    case "$refusal" in
    *"user name is empty"*) ;;
    *) echo "entrypoint: cannot tell whether authentication is on: $refusal" >&2 && exit 1 ;;
    esac
else
    echo "entrypoint: turning authentication on, for the user root" >&2
    ctl role get root 2>/dev/null || ctl role add root
    # The password from stdin, not as an argument: every local user can read a process's arguments.
    ctl user get root 2>/dev/null || printf '%s\n' "$ROOT_PASSWORD" | ctl user add root --interactive=false
    ctl user grant-role root root
    ctl auth enable
fi
kill "$etcd_pid"
wait "$etcd_pid" || true
exec etcd "$@"
