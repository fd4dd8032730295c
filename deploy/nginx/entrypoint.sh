#!/bin/sh
# Runs nginx (master as root, workers as www-data: deploy/nginx/nginx.conf) and keeps its upstreams current.
# nginx resolves the node names of its config once, when it loads it; compose gives a recreated or
# scaled node a new address. So every 2 s this resolves those names and, when every one resolves and an
# address changed, reloads nginx: requests in flight finish on the old workers. While a name does not
# resolve (its node is stopped) nginx keeps its config, and its passive health checks skip that node.
# SIGTERM stops nginx gracefully (SIGQUIT: open requests finish). With arguments, runs them instead.
# FLEET_OPERATOR_NETWORKS (comma-separated addresses or CIDR ranges), when set, replaces the networks
# admitted to the lab and operator endpoints (default: loopback and the private ranges);
# FLEET_TRUSTED_PROXIES, when set, the proxies whose X-Forwarded-For names the client (default: none).
set -eu
[ "$#" -eq 0 ] || exec "$@"
# /etc/nginx/<include>.conf from its variable (networks.sh), which stops the container if it is wrong.
render() {
    networks.sh "$1" > "/etc/nginx/$1.conf.new"
    mv "/etc/nginx/$1.conf.new" "/etc/nginx/$1.conf"
}
[ -z "${FLEET_OPERATOR_NETWORKS:-}" ] || render operator-networks
[ -z "${FLEET_TRUSTED_PROXIES:-}" ] || render trusted-proxies
config=/etc/nginx/conf.d/default.conf
names=$(sed -n 's/^ *server \([A-Za-z0-9.-]*\):[0-9]*.*/\1/p' "$config" | sort -u)

# Every node name with its addresses, a line each; fails when a name does not resolve.
addresses() {
    for name in $names; do
        found=$(getent ahostsv4 "$name" | awk '{ print $1 }' | sort -u | tr '\n' ' ')
        [ -n "$found" ] || return 1
        echo "$name $found"
    done
}

nginx -g 'daemon off;' &
nginx_pid=$!
trap 'kill -QUIT "$nginx_pid" 2>/dev/null; wait "$nginx_pid"; exit 0' TERM INT QUIT

known=$(addresses || true)
while kill -0 "$nginx_pid" 2>/dev/null; do
    sleep 2 &
    wait $!
    if now=$(addresses) && [ "$now" != "$known" ]; then
        echo "entrypoint: node addresses changed, reloading nginx" >&2
        nginx -s reload && known=$now
    fi
done
wait "$nginx_pid"
