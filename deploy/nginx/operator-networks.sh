#!/bin/sh
# Prints the operator's networks for the site config's geo block (nginx/default.conf includes
# /etc/nginx/operator-networks.conf) from FLEET_OPERATOR_NETWORKS: comma-separated addresses or CIDR
# ranges, one `<network> 1;` line each, as fleet_local::nginx::operator_networks_conf renders the
# image's default. Exits non-zero, naming it, on an entry that is not an address or a range.
set -euf
echo "# The operator's networks, for the site config's geo block: one address or CIDR range a line."
for network in $(echo "${FLEET_OPERATOR_NETWORKS:?}" | tr ',' ' '); do
    case "$network" in
    */*/* | *[!0-9A-Fa-f.:/]* | */ | /*)
        echo "operator-networks: FLEET_OPERATOR_NETWORKS: \"$network\" is not an IP address or CIDR range" >&2
        exit 1
        ;;
    esac
    echo "$network 1;"
done
