#!/bin/sh
# Prints one of the site config's includes from a list of addresses or CIDR ranges (comma-separated), as
# fleet_local::nginx renders the image's defaults:
#   networks.sh operator-networks   from FLEET_OPERATOR_NETWORKS, one `<network> 1;` line each, for the
#                                   geo block of the operator's networks (nginx::operator_networks_conf);
#   networks.sh trusted-proxies     from FLEET_TRUSTED_PROXIES, one `set_real_ip_from <proxy>;` line each,
#                                   then X-Forwarded-For read recursively (nginx::trusted_proxies_conf).
# Exits non-zero, naming it, on an entry that is not an address or a range.
set -euf
case "${1:-}" in
operator-networks)
    variable=FLEET_OPERATOR_NETWORKS line='%s 1;\n'
    echo "# The operator's networks, for the site config's geo block: one address or CIDR range a line."
    ;;
trusted-proxies)
    variable=FLEET_TRUSTED_PROXIES line='set_real_ip_from %s;\n'
    echo "# The proxies trusted to name the client in X-Forwarded-For: one address or CIDR range a line."
    ;;
*)
    echo "networks: operator-networks or trusted-proxies, not \"${1:-}\"" >&2
    exit 2
    ;;
esac
eval "list=\${$variable:?}"
for network in $(echo "$list" | tr ',' ' '); do
    case "$network" in
    */*/* | *[!0-9A-Fa-f.:/]* | */ | /*)
        echo "networks: $variable: \"$network\" is not an IP address or CIDR range" >&2
        exit 1
        ;;
    esac
    # shellcheck disable=SC2059 # the format is one of the two above
    printf "$line" "$network"
done
if [ "$1" = trusted-proxies ]; then
    printf 'real_ip_header X-Forwarded-For;\nreal_ip_recursive on;\n'
fi
