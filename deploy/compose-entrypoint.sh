#!/bin/sh
# Roles of the compose testnet's containers (one image, see deploy/Dockerfile):
#   relay              the public bootstrap + circuit relay node; writes its address to /shared
#   router LAN_CIDR    a home router: forwards and masquerades LAN_CIDR (NAT_FLAGS, e.g.
#                      --random-fully, makes it port-randomizing); drops unsolicited inbound
#   node GATEWAY       a home node behind GATEWAY, bootstrapping from the relay
set -eu
role="${1:?role: relay, router or node}"
shift

case "$role" in
relay)
    # The relay learns its peer id on first start; home nodes read the address from here.
    rm -f /shared/relay.addr
    (
        until [ -s /data/daemon.json ]; do sleep 0.5; done  # written once the daemon listens
        ip4=$(hostname -i | awk '{print $1}')
        peer=$(python -c 'import json; print(json.load(open("/data/daemon.json"))["peer_id"])')
        echo "/ip4/$ip4/tcp/4001/p2p/$peer" >/shared/relay.addr.tmp && mv /shared/relay.addr.tmp /shared/relay.addr
    ) &
    exec knexa-node start --data-dir /data --listen /ip4/0.0.0.0/tcp/4001 --model none \
        --relay-service on "$@"
    ;;
router)
    lan="${1:?router LAN_CIDR}"
    # net.ipv4.ip_forward=1 comes from the compose file's sysctls.
    # shellcheck disable=SC2086  # NAT_FLAGS is a list of iptables flags
    iptables -t nat -A POSTROUTING -s "$lan" ! -d "$lan" -j MASQUERADE ${NAT_FLAGS:-}
    iptables -A INPUT -m conntrack --ctstate NEW,INVALID ! -s "$lan" -j DROP
    echo "router for $lan ready (MASQUERADE ${NAT_FLAGS:-port-preserving})"
    exec sleep infinity
    ;;
node)
    gateway="${1:?node GATEWAY}"
    shift
    ip route replace default via "$gateway"
    until [ -s /shared/relay.addr ]; do sleep 0.5; done
    exec knexa-node start --data-dir /data --listen /ip4/0.0.0.0/tcp/4001 --model none \
        --bootstrap "$(cat /shared/relay.addr)" "$@"
    ;;
*)
    echo "unknown role $role" >&2
    exit 2
    ;;
esac
