# shellcheck shell=bash
#
# Network-namespace helpers for edgemesh's demo and test scripts.
#
# Topology built with these helpers (the same shape as tests/src/harness/topology.rs):
#
#   ns <prefix>-sw                  ns <prefix>-<host>
#   +--------------------+          +-----------------------------+
#   | br0 -- p0 ---------+--veth----+- eth0 10.250.0.N/24, lo up  |
#   |     `- p1 ---------+--veth--> (next host)                   |
#   +--------------------+          +-----------------------------+
#
# Safety rules, kept by every function here:
#   - every veth pair is created inside the switch namespace and its peer is moved straight into
#     the host namespace, so nothing ever appears in the root namespace, not even briefly;
#   - hosts get only their connected /24 and loopback: no default route, so traffic cannot leave
#     the topology;
#   - names carry a per-run prefix, so parallel runs cannot collide, and a prefix that embeds the
#     creating pid lets a later run recognise (and remove) leftovers of a run that was killed.
#
# Source this file; it defines functions only and does not change shell options.

# netns_create NAME: creates a namespace with loopback up.
netns_create() {
    ip netns add "$1" || return 1
    ip -n "$1" link set lo up
}

# netns_create_switch NAME: creates the switch namespace with bridge br0. STP is off by default,
# so ports forward as soon as they are up.
netns_create_switch() {
    netns_create "$1" || return 1
    ip -n "$1" link add br0 type bridge &&
        ip -n "$1" link set br0 up
}

# netns_wire_host SWITCH_NS HOST_NS PORT CIDR: connects an existing host namespace to br0 of the
# switch: veth PORT (switch side, enslaved to br0) <-> eth0 (host side, with address CIDR).
netns_wire_host() {
    local sw=$1 ns=$2 port=$3 cidr=$4
    ip -n "$sw" link add "$port" type veth peer name eth0 netns "$ns" &&
        ip -n "$sw" link set "$port" master br0 &&
        ip -n "$sw" link set "$port" up &&
        ip -n "$ns" addr add "$cidr" dev eth0 &&
        ip -n "$ns" link set eth0 up
}

# netns_add_pod NODE_NS POD_NS PORT GATEWAY CIDR: a pod namespace behind a node, as a container
# runtime would wire it: the node gets bridge cbr0 with GATEWAY/24 (once), the pod gets eth0 with
# CIDR and a default route via GATEWAY, so its traffic to cluster IPs passes the node's
# PREROUTING chain. PORT names the node's end of the veth pair.
netns_add_pod() {
    local node=$1 pod=$2 port=$3 gw=$4 cidr=$5
    if ! ip -n "$node" link show cbr0 >/dev/null 2>&1; then
        ip -n "$node" link add cbr0 type bridge &&
            ip -n "$node" addr add "$gw/24" dev cbr0 &&
            ip -n "$node" link set cbr0 up || return 1
    fi
    netns_create "$pod" || return 1
    ip -n "$node" link add "$port" type veth peer name eth0 netns "$pod" &&
        ip -n "$node" link set "$port" master cbr0 &&
        ip -n "$node" link set "$port" up &&
        ip -n "$pod" addr add "$cidr" dev eth0 &&
        ip -n "$pod" link set eth0 up &&
        ip -n "$pod" route add default via "$gw"
}

# netns_exists NAME: whether a namespace of that name exists.
netns_exists() {
    ip netns list 2>/dev/null | awk '{print $1}' | grep -qxF -- "$1"
}

# netns_pids NAME: pids of the processes inside the namespace (none when it does not exist).
netns_pids() {
    ip netns pids "$1" 2>/dev/null || true
}

# netns_destroy NAME: SIGKILLs whatever still runs inside, then deletes the namespace (which
# destroys its veth ends and bridge). Never fails; returns 1 if the namespace is still there.
netns_destroy() {
    local ns=$1 pids
    # Per-namespace /etc files (`ip netns exec` bind-mounts /etc/netns/NS/* over /etc).
    [ -n "$ns" ] && rm -rf "/etc/netns/$ns"
    netns_exists "$ns" || return 0
    for _ in $(seq 50); do
        pids=$(netns_pids "$ns")
        [ -z "$pids" ] && break
        # shellcheck disable=SC2086 # one pid per word
        kill -KILL $pids 2>/dev/null || true
        sleep 0.1
    done
    ip netns del "$ns" 2>/dev/null || true
    ! netns_exists "$ns"
}

# netns_resolv_conf NS NAMESERVER SEARCH...: the resolv.conf programs in NS see (as a pod's,
# pointing at its node's cluster DNS). Removed by netns_destroy.
netns_resolv_conf() {
    local ns=$1 server=$2
    shift 2
    mkdir -p "/etc/netns/$ns"
    {
        printf 'nameserver %s\n' "$server"
        [ $# -eq 0 ] || printf 'search %s\n' "$*"
        printf 'options ndots:5\n'
    } >"/etc/netns/$ns/resolv.conf"
}

# netns_list_prefix PREFIX: namespaces whose name starts with PREFIX.
netns_list_prefix() {
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$1" || true
}

# netns_remove_stale STEM: deletes namespaces named <STEM><pid>-... whose pid no longer runs
# (leftovers of a run that was SIGKILLed before it could clean up). Namespaces of live runs are
# left alone. Prints what it removes.
netns_remove_stale() {
    local stem=$1 ns pid
    for ns in $(netns_list_prefix "${stem}[0-9]+-"); do
        pid=${ns#"$stem"}
        pid=${pid%%-*}
        if [ -d "/proc/$pid" ]; then
            continue
        fi
        echo "    removing namespace $ns left behind by an earlier run (pid $pid is gone)"
        netns_destroy "$ns" || echo "    warning: could not delete namespace $ns" >&2
    done
}

# netns_shape NS DEV RATE BURST LATENCY: token-bucket shaping (tc tbf) of what DEV in NS sends,
# replacing DEV's root qdisc; RATE, BURST and LATENCY in tc's units (e.g. 1gbit 512kb 50ms).
# Shape both ends of a veth pair to limit both directions of a link.
netns_shape() {
    tc -n "$1" qdisc replace dev "$2" root tbf rate "$3" burst "$4" latency "$5"
}

# netns_unshape NS DEV: removes DEV's root qdisc (back to the device's default). Never fails.
netns_unshape() {
    tc -n "$1" qdisc del dev "$2" root 2>/dev/null || true
}
