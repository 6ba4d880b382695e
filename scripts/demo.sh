#!/usr/bin/env bash
#
# edgemesh demo: a cloud and two edge nodes on one machine, inside network namespaces.
#
#   sudo scripts/demo.sh            # install what is missing, build, run the demo, clean up
#   sudo KEEP=1 scripts/demo.sh     # ... and keep everything running until Enter is pressed
#   sudo HA=1 scripts/demo.sh       # the same tour on 3 etcd members and 3 cloudcore replicas
#   sudo scripts/demo.sh --self-test  # check the demo's own checks: the isolation check must
#                                     # fail on a topology where the nodes reach each other, and
#                                     # when ping is missing (no build, takes a few seconds)
#
# What it shows, step by step (each step checks its result and stops the demo if it fails; every
# check can fail: a missing tool fails the check, it never passes it):
#   1. prepare the host: apt packages (iproute2, iptables, curl, dnsutils, dnsmasq-base,
#      iputils-ping) and the Rust toolchain pinned in rust-toolchain.toml (only what is
#      missing), then a release build (about 4.5 minutes on 2 cores the first time);
#   2. build the topology: a switch namespace with a bridge, a "cloud" namespace and two node
#      namespaces on 10.250.0.0/24 (nothing in the root namespace, no default route anywhere);
#   3. start cloudcore in the cloud namespace, create a token per node, start edgemesh on
#      node-a (zone=a) and node-b (zone=b);
#   4. apply examples/hello.yaml and show what the cloud and each node know;
#   5. change the Service and watch the change reach both nodes;
#   6. pods behind node-a: the hello-0 server pod (the address examples/hello.yaml gives it) and
#      a client pod that calls Service hello by its cluster IP; edgemesh's iptables rules send the
#      connection to its proxy, which picks hello-0 (this node's endpoint comes first); then by
#      name: node-a's cluster DNS answers hello.default.svc.cluster.local (A, SRV, headless) and
#      `curl http://hello:8000/` works through the pod's search path;
#   7. offline autonomy: stop the cloud, restart node-a, see it serve from its SQLite copy (the
#      client pod still reaches hello), start the cloud again and see node-a reconnect and sync;
#   8. tunnels: the nodes cannot reach each other, yet client-a calls Service world (its pod on
#      node-b) and cloud-hello (an endpoint in the cloud) through streams relayed by cloudcore; a
#      cloud client calls world through a router rule on :9443; a QPS limit on world answers
#      429 beyond its burst; hello-0 stops and hello falls over to hello-1 on node-b;
#   9. UDP: a DNS server pod (dnsmasq) behind node-b serves Service site-dns on a UDP port;
#      client-a resolves a name with `dig @<its cluster IP>`, through node-a's UDP proxy and a
#      stream of datagrams relayed by cloudcore;
#  10. direct paths: node-c and node-d join on one LAN (label site=factory, not isolated), a
#      Community selects site=factory, and client-c (behind node-c) calls Service plc-status
#      (its pod on node-d): the first call is served at once over the relay while the nodes
#      form a QUIC path with their cloud-issued certificates, then calls go direct (cloudcore
#      relays none; `edgemesh status` shows the path, candidate, RTT and bytes), and keep
#      working while cloudcore is stopped (not with HA=1: candidates pass within one replica).
#
# With HA=1 the cloud is 3 etcd members and 3 cloudcore replicas (store.backend = "etcd",
# cloudcore built with --features etcd) and each node has every replica in its cloud.url. Step 7
# becomes a failover: the replica that holds node-a is killed with SIGKILL, node-a moves to
# another one and resumes by delta, calls and updates carry on, and the replica comes back.
#
# Everything the demo creates (processes, namespaces, a temp dir) is removed on exit, also on
# error or Ctrl-C. On failure the logs are kept and their last lines printed.
#
# Environment:
#   KEEP=1            keep the topology running at the end until Enter is pressed (only when
#                     stdin is a terminal; otherwise the demo never waits)
#   HA=1              a cloud of 3 etcd members and 3 cloudcore replicas (see above)
#   BIN_DIR=DIR       use cloudcore and edgemesh from DIR and skip the Rust toolchain and build
#   PYTHON=python3    interpreter used only to format JSON for display; when it is missing
#                     (or PYTHON=none) the admin API's raw JSON is shown
#   PING=ping         the reachability probe of the isolation check
#
# Exit status: 0 when every step passed ("demo finished OK"), non-zero otherwise.

set -Eeuo pipefail

if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then
    sed -n '3,/^# Exit status/p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source-path=SCRIPTDIR source=lib/netns.sh
. "$REPO/scripts/lib/netns.sh"
# shellcheck source-path=SCRIPTDIR source=lib/rust.sh
. "$REPO/scripts/lib/rust.sh"

# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------

KEEP=${KEEP:-0}
HA=${HA:-0}
PYTHON=${PYTHON:-python3}
PING=${PING:-ping}

# Namespace names: emdemo<pid>-<role>. The pid makes parallel runs distinct and lets a later run
# remove the leftovers of a run that was killed with SIGKILL.
NS_STEM=emdemo
PREFIX="${NS_STEM}$$"
NS_SWITCH="$PREFIX-sw"
NS_CLOUD="$PREFIX-cloud"

CLOUD_IP=10.250.0.1
HUB_URL="ws://$CLOUD_IP:10000"
API_URL="http://$CLOUD_IP:10002"

# HA=1: three replicas (the first is the cloud namespace above) and three etcd members.
REPLICAS=(cloud)
declare -A REPLICA_NS=([cloud]="$NS_CLOUD") REPLICA_IP=([cloud]=$CLOUD_IP)
ETCD_MEMBERS=()
declare -A ETCD_NS=() ETCD_IP=()
if [ "$HA" = 1 ]; then
    REPLICAS=(cloud cloud-2 cloud-3)
    REPLICA_NS+=([cloud-2]="$PREFIX-cloud-2" [cloud-3]="$PREFIX-cloud-3")
    REPLICA_IP+=([cloud-2]=10.250.0.2 [cloud-3]=10.250.0.3)
    ETCD_MEMBERS=(etcd-1 etcd-2 etcd-3)
    ETCD_NS=([etcd-1]="$PREFIX-etcd-1" [etcd-2]="$PREFIX-etcd-2" [etcd-3]="$PREFIX-etcd-3")
    ETCD_IP=([etcd-1]=10.250.0.21 [etcd-2]=10.250.0.22 [etcd-3]=10.250.0.23)
fi
API_TOKEN_HA=""        # HA=1: the API token every replica accepts, set by step_cloud

NODES=(node-a node-b)
declare -A NODE_IP=([node-a]=10.250.0.11 [node-b]=10.250.0.12)
declare -A NODE_ZONE=([node-a]=a [node-b]=b)
declare -A NODE_NS=([node-a]="$PREFIX-node-a" [node-b]="$PREFIX-node-b")
# Two more nodes on one LAN (site=factory), started by step_direct: a Community lets them call
# each other directly. Their pods: 10.244.3.0/24 behind node-c, 10.244.4.0/24 behind node-d.
LAN_NODES=(node-c node-d)
NODE_IP+=([node-c]=10.250.0.13 [node-d]=10.250.0.14)
NODE_ZONE+=([node-c]=factory [node-d]=factory)
NODE_NS+=([node-c]="$PREFIX-node-c" [node-d]="$PREFIX-node-d")
declare -A NODE_SITE=([node-c]=factory [node-d]=factory)
NS_CLIENT_C="$PREFIX-client-c"
CLIENT_C_IP=10.244.3.20
NS_PLC_D="$PREFIX-plc-d"
PLC_D_IP=10.244.4.10
# The admin API listens on loopback; every node namespace has its own loopback.
ADMIN_ADDR=127.0.0.1:10550

# Seconds to wait for each kind of event before the demo fails.
START_TIMEOUT=15    # a process answers its health check
SYNC_TIMEOUT=10     # objects reach a node / a node connects
UPDATE_TIMEOUT=5    # a change reaches every node (expected: well under a second)

WORK=""                 # temp dir: configs, data dirs, logs
LOG_DIR=""
HELLO_SERVER=""         # the small HTTP server run in pods, set by step_build
CLUSTER_IP=""           # hello's cluster IP, set by step_pods
NS_HELLO="$PREFIX-hello-0"
NS_CLIENT="$PREFIX-client-a"
NODE_DNS=169.254.96.16    # edgemesh's default dns.listen address, added to each node's lo
HELLO_IP=10.244.1.10    # hello-0's address in examples/hello.yaml
CLIENT_IP=10.244.1.20
POD_GATEWAY=10.244.1.1  # node-a's address on its pod bridge
NS_HELLO1="$PREFIX-hello-1"
HELLO1_IP=10.244.2.10   # hello-1's address in examples/hello.yaml (on node-b)
POD_GATEWAY_B=10.244.2.1
NS_DNS_B="$PREFIX-dns-b"
DNS_B_IP=10.244.2.11    # a DNS server pod behind node-b (step_udp)
CLOUDCORE=""            # binaries, set by step_build
EDGEMESH=""
NAMESPACES=()           # created so far, in order
declare -A PIDS=()      # name -> pid of the processes started by the demo
DEMO_STARTED=""         # seconds since epoch when the topology step began
FINISHED=0              # set when every step passed
MODE=demo               # or self-test (--self-test)
INTERRUPTED=""          # the signal that stopped the demo (Ctrl-C, kill), if one did

# ---------------------------------------------------------------------------------------------
# Output and checking helpers
# ---------------------------------------------------------------------------------------------

header() { printf '\n==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
ok() { printf '    ok: %s\n' "$*"; }
die() {
    printf '\nFAILED: %s\n' "$*" >&2
    report_exited >&2
    exit 1
}
indent() { sed 's/^/      /'; }

on_err() {
    printf '\nFAILED: command failed (line %s, exit %s): %s\n' "$1" "$2" "$3" >&2
}

# show LABEL TEXT...: prints "[LABEL] $ TEXT", the short form of a command about to run. The real
# command runs inside the namespace LABEL names (see in_ns, cloudctl, nodectl).
show() {
    local label=$1
    shift
    printf '    [%s] $ %s\n' "$label" "$*"
}

in_ns() {
    local ns=$1
    shift
    ip netns exec "$ns" "$@"
}

# cloudctl ARGS...: the cloudcore CLI, run in the cloud namespace against the demo's cloudcore.
cloudctl() {
    in_ns "$NS_CLOUD" "$CLOUDCORE" --config "$WORK/cloud/cloudcore.toml" "$@" --server "$API_URL"
}

# nodectl NODE ARGS...: the edgemesh CLI, run in the node's namespace with the node's config.
nodectl() {
    local node=$1
    shift
    in_ns "${NODE_NS[$node]}" "$EDGEMESH" --config "$WORK/$node/edgemesh.toml" "$@"
}

# admin_get NODE PATH: GET on the node's admin API (inside the node's namespace).
admin_get() {
    in_ns "${NODE_NS[$1]}" curl -fsS --max-time 2 "http://$ADMIN_ADDR$2"
}

# run_shown LABEL DISPLAY CMD...: prints "[LABEL] $ DISPLAY", runs CMD, indents its output; fails
# the demo when CMD fails.
run_shown() {
    local label=$1 display=$2 out
    shift 2
    show "$label" "$display"
    if ! out=$("$@" 2>&1); then
        printf '%s\n' "$out" | indent
        die "'$display' failed on $label"
    fi
    printf '%s\n' "$out" | indent
}

now_ms() { echo $(($(date +%s%N) / 1000000)); }

# describe_status STATUS: "exit status N" or "killed by SIGNAME".
describe_status() {
    if (($1 > 128)); then
        echo "killed by SIG$(kill -l "$(($1 - 128))" 2>/dev/null || echo "$(($1 - 128))")"
    else
        echo "exit status $1"
    fi
}

# find_exited: sets EXITED_NAME and EXITED_STATUS for a demo process that should run but has
# exited (and forgets it); returns 1 when all are running. Runs in the main shell: only the
# shell that started a process can collect its exit status.
EXITED_NAME=""
EXITED_STATUS=0
find_exited() {
    local name
    for name in "${!PIDS[@]}"; do
        if ! kill -0 "${PIDS[$name]}" 2>/dev/null; then
            EXITED_NAME=$name
            EXITED_STATUS=0
            wait "${PIDS[$name]}" 2>/dev/null || EXITED_STATUS=$?
            unset "PIDS[$name]"
            return 0
        fi
    done
    return 1
}

# report_exited: explains a failure by the demo processes that died, if any.
report_exited() {
    while find_exited; do
        echo "        note: $EXITED_NAME is not running any more ($(describe_status "$EXITED_STATUS")); log: $LOG_DIR/$EXITED_NAME.log"
    done
}

# check_running: fails the demo when a process the demo expects to be running has exited.
check_running() {
    if find_exited; then
        die "$EXITED_NAME exited unexpectedly ($(describe_status "$EXITED_STATUS")); log: $LOG_DIR/$EXITED_NAME.log"
    fi
}

# wait_until TIMEOUT DESCRIPTION CMD...: runs CMD every 0.1 s until it succeeds; fails the demo
# after TIMEOUT seconds or as soon as a demo process dies.
wait_until() {
    local timeout=$1 what=$2
    shift 2
    local deadline=$(($(now_ms) + timeout * 1000))
    while ! "$@" >/dev/null 2>&1; do
        check_running
        if (($(now_ms) >= deadline)); then
            die "timed out after ${timeout}s waiting until $what"
        fi
        sleep 0.1
    done
}

# reach NS IP: 0 when IP answers a ping from inside NS, 1 when it does not answer, 2 when the
# probe cannot tell (ping missing, or failing for another reason than "no reply").
reach() {
    local rc=0
    command -v "$PING" >/dev/null 2>&1 || return 2
    in_ns "$1" "$PING" -c 1 -W 1 "$2" >/dev/null 2>&1 || rc=$?
    case $rc in
    0) return 0 ;;
    1) return 1 ;;
    *) return 2 ;;
    esac
}

# check_isolated NS CONTROL_IP TARGET_IP: returns 0 when NS reaches CONTROL_IP (so the probe
# works from there) but not TARGET_IP; 1 when it reaches TARGET_IP; 2 when the probe cannot
# tell. Says why on stdout when it does not return 0.
check_isolated() {
    local ns=$1 control=$2 target=$3 rc=0
    reach "$ns" "$control" || rc=$?
    if ((rc != 0)); then
        echo "cannot check isolation: $PING from $ns does not reach $control either (the control)"
        return 2
    fi
    rc=0
    reach "$ns" "$target" || rc=$?
    case $rc in
    0)
        echo "$ns reaches $target"
        return 1
        ;;
    1) return 0 ;;
    *)
        echo "cannot check isolation: $PING $target from $ns failed"
        return 2
        ;;
    esac
}

# ---------------------------------------------------------------------------------------------
# JSON helpers. The demo must work on a bare Debian, so checks use grep/sed on the compact JSON
# the agents produce; python3, when present, only makes the display nicer.
# ---------------------------------------------------------------------------------------------

# json_item JSON NAMESPACE NAME: the object of that name in a compact {"items":[...]} list. The
# list is split before each "apiVersion" (the first key of every object, whether keys come in
# struct or in alphabetical order); "name" and "namespace" are adjacent in both orders.
json_item() {
    printf '%s' "$1" | sed 's/{"apiVersion"/\n&/g' |
        grep -F "\"name\":\"$3\",\"namespace\":\"$2\"" || true
}

# node_has_service NODE NAME PORT: whether the node's store has Service default/NAME with PORT.
node_has_service() {
    local json item
    json=$(admin_get "$1" /debug/services) || return 1
    item=$(json_item "$json" default "$2")
    [ -n "$item" ] && printf '%s' "$item" | grep -qE "\"port\":$3[,}]"
}

# node_link NODE connected|synced|disconnected: the node's cloud link state from /debug/sync.
node_link() {
    local json
    json=$(admin_get "$1" /debug/sync) || return 1
    case $2 in
    connected) grep -q '"connected":true' <<<"$json" ;;
    synced) grep -q '"connected":true' <<<"$json" && grep -q '"synced":true' <<<"$json" ;;
    disconnected) grep -q '"connected":false' <<<"$json" ;;
    esac
}

have_python() { command -v "$PYTHON" >/dev/null 2>&1; }

# print_services: formats an admin /debug/services answer read from stdin.
print_services() {
    if ! have_python; then
        cat
        echo
        return
    fi
    "$PYTHON" -c '
import json, sys
d = json.load(sys.stdin)
print("store version %s, %d services" % (d.get("version"), len(d.get("items", []))))
print("%-24s %-15s %s" % ("NAMESPACE/NAME", "CLUSTER-IP", "PORTS"))
for s in d.get("items", []):
    m, sp = s["metadata"], s.get("spec", {})
    ports = ",".join("%s->%s/%s" % (p["port"], p.get("targetPort", p["port"]),
                                    p.get("protocol", "TCP")) for p in sp.get("ports", []))
    print("%-24s %-15s %s" % (m.get("namespace", "") + "/" + m["name"],
                              sp.get("clusterIP", "-"), ports))
'
}

# show_node_services NODE: prints what the node's admin API says about Services.
show_node_services() {
    local json
    show "$1" "curl -s http://$ADMIN_ADDR/debug/services"
    json=$(admin_get "$1" /debug/services) || die "admin API of $1 did not answer"
    printf '%s' "$json" | print_services | indent
}

# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------

# start_proc NAME NS CMD...: starts CMD in the background inside NS, logging to LOG_DIR/NAME.log.
start_proc() {
    local name=$1 ns=$2
    shift 2
    local log="$LOG_DIR/$name.log"
    printf -- '---- %s: started: %s\n' "$(date '+%F %T')" "$*" >>"$log"
    # `ip netns exec` execs CMD, so $! is the pid of CMD itself. Background jobs of a script
    # ignore Ctrl-C; cleanup stops them.
    ip netns exec "$ns" "$@" >>"$log" 2>&1 </dev/null 3>&- 4>&- &
    PIDS[$name]=$!
}

# stop_proc NAME: SIGTERM, then SIGKILL after 10 s. Prints the exit status.
stop_proc() {
    local name=$1 pid rc=0 i
    pid=${PIDS[$name]:-}
    [ -n "$pid" ] || return 0
    unset "PIDS[$name]"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        info "$name did not stop within 10s of SIGTERM; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || rc=$?
    printf -- '---- %s: stopped, exit status %s\n' "$(date '+%F %T')" "$rc" >>"$LOG_DIR/$name.log"
    return "$rc"
}

start_cloudcore() {
    start_proc cloudcore "$NS_CLOUD" "$CLOUDCORE" --config "$WORK/cloud/cloudcore.toml"
    wait_until "$START_TIMEOUT" "cloudcore answers on $API_URL/healthz" \
        in_ns "$NS_CLOUD" curl -fsS --max-time 1 "$API_URL/healthz"
}

start_edgemesh() {
    local node=$1
    start_proc "edgemesh-$node" "${NODE_NS[$node]}" "$EDGEMESH" --config "$WORK/$node/edgemesh.toml"
    wait_until "$START_TIMEOUT" "edgemesh on $node is ready (http://$ADMIN_ADDR/readyz)" \
        admin_get "$node" /readyz
}

# ---------------------------------------------------------------------------------------------
# Cleanup: always runs on exit (success, error, Ctrl-C, SIGTERM)
# ---------------------------------------------------------------------------------------------

cleanup() {
    local rc=$?
    trap - EXIT ERR
    trap '' INT TERM    # a second Ctrl-C must not interrupt the cleanup
    set +e
    # A signal can arrive while a builtin runs with its output redirected to a file (say, a log
    # line appended by start_proc); restore the terminal saved by main so nothing is lost.
    exec 1>&3 2>&4
    if ((FINISHED == 0 && rc == 0)); then
        rc=1
    fi
    if [ -n "$INTERRUPTED" ]; then
        printf '\n%s: stopping the demo\n' "$INTERRUPTED" >&2
    elif ((rc != 0)) && [ -n "$LOG_DIR" ] && [ -d "$LOG_DIR" ]; then
        local log
        for log in "$LOG_DIR"/*.log; do
            [ -e "$log" ] || continue
            printf '\n---- last lines of %s ----\n' "$log" >&2
            tail -n 25 "$log" >&2
        done
    fi

    if ((${#NAMESPACES[@]} == 0 && ${#PIDS[@]} == 0)) && [ -z "$WORK" ]; then
        : # nothing was created yet
    else
        teardown "$rc"
    fi
    if [ -n "$INTERRUPTED" ]; then
        printf '\ndemo interrupted by %s\n' "$INTERRUPTED" >&2
    elif ((rc != 0)); then
        printf '\n%s FAILED (exit status %s)\n' "$MODE" "$rc" >&2
    else
        printf '\n%s finished OK\n' "$MODE"
    fi
    exit "$rc"
}

# teardown STATUS: stops the demo's processes, deletes its namespaces and its temp dir (keeping
# the logs when STATUS says the demo failed).
teardown() {
    local rc=$1
    header "Cleaning up"
    local name
    for name in "${!PIDS[@]}"; do
        stop_proc "$name" >/dev/null 2>&1
    done
    local i leftover=0
    for ((i = ${#NAMESPACES[@]} - 1; i >= 0; i--)); do
        netns_destroy "${NAMESPACES[i]}" || {
            echo "    could not delete namespace ${NAMESPACES[i]}" >&2
            leftover=1
        }
    done
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        if ((rc != 0)) && [ -z "$INTERRUPTED" ]; then
            # Keep the logs (and the configs, which are small) for a post-mortem.
            rm -rf "$WORK"/*/data "$WORK"/*/token
            info "logs kept in $LOG_DIR"
        else
            rm -rf "$WORK"
        fi
    fi
    if ((leftover == 0)); then
        info "processes stopped, namespaces $PREFIX-* deleted"
    fi
}

# ---------------------------------------------------------------------------------------------
# Steps. To extend the demo, add a step_* function and call it from main.
# ---------------------------------------------------------------------------------------------

# install_packages PKG...: installs the Debian packages that are missing; elsewhere, checks that
# the commands the demo runs are there.
install_packages() {
    local pkgs=("$@")
    if command -v dpkg >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
        local missing=() p
        for p in "${pkgs[@]}"; do
            dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
        done
        if ((${#missing[@]} > 0)); then
            info "installing ${missing[*]}"
            DEBIAN_FRONTEND=noninteractive apt-get update -qq ||
                die "apt-get update failed; install ${missing[*]} yourself and rerun"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null ||
                die "apt-get install ${missing[*]} failed"
        fi
        ok "packages present: ${pkgs[*]}"
    else
        local c
        for c in ip curl dig "$PING" iptables; do
            command -v "$c" >/dev/null 2>&1 ||
                die "'$c' is missing and this is not a Debian-like system: install it and rerun"
        done
        ok "ip, curl, dig, $PING and iptables present (not a Debian-like system)"
    fi
}

step_prepare_host() {
    header "Preparing the host"
    [ "$(id -u)" -eq 0 ] || die "the demo creates network namespaces and must run as root: sudo $0"

    local pkgs=(iproute2 iptables curl ca-certificates dnsutils dnsmasq-base iputils-ping)
    [ -n "${BIN_DIR:-}" ] || pkgs+=(build-essential pkg-config)
    # HA=1: etcd, its CLI, and protoc to build cloudcore's etcd store.
    [ "$HA" != 1 ] || pkgs+=(etcd-server etcd-client)
    [ "$HA" != 1 ] || [ -n "${BIN_DIR:-}" ] || pkgs+=(protobuf-compiler libprotobuf-dev)
    install_packages "${pkgs[@]}"

    [ -n "${BIN_DIR:-}" ] && return 0

    ensure_rust "$REPO"
    ok "Rust $RUST_VERSION"
}

step_build() {
    if [ -n "${BIN_DIR:-}" ]; then
        header "Using prebuilt binaries from $BIN_DIR"
        CLOUDCORE="$BIN_DIR/cloudcore"
        EDGEMESH="$BIN_DIR/edgemesh"
        HELLO_SERVER="$BIN_DIR/edgemesh-testserver"
    else
        header "Building cloudcore and edgemesh (cargo build --release)"
        local features=()
        [ "$HA" != 1 ] || features=(--features etcd)
        (cd "$REPO" && cargo build --release -p cloudcore "${features[@]}" -p edgemesh &&
            cargo build --release -p edgemesh-e2e --bin edgemesh-testserver)
        local target=${CARGO_TARGET_DIR:-$REPO/target}
        # Under sudo in a user's checkout, give the build output back to that user, so their own
        # `cargo build` does not trip over root-owned files afterwards.
        if [ -n "${SUDO_UID:-}" ] && [ "${SUDO_UID}" != 0 ] &&
            [ "$(stat -c %u "$REPO")" = "$SUDO_UID" ] && [ -d "$target" ]; then
            chown -R "$SUDO_UID:${SUDO_GID:-$SUDO_UID}" "$target"
        fi
        CLOUDCORE="$target/release/cloudcore"
        EDGEMESH="$target/release/edgemesh"
        HELLO_SERVER="$target/release/edgemesh-testserver"
    fi
    [ -x "$HELLO_SERVER" ] || die "$HELLO_SERVER (the pods' HTTP server) is missing or not executable"
    [ -x "$CLOUDCORE" ] || die "$CLOUDCORE is missing or not executable"
    [ -x "$EDGEMESH" ] || die "$EDGEMESH is missing or not executable"
    ok "$("$CLOUDCORE" --version), $("$EDGEMESH" --version)"
}

# isolate_nodes: edge nodes sit behind separate NATs: their bridge ports are isolated from each
# other, so each reaches the cloud but not the other node (tunnels go through the cloud).
isolate_nodes() {
    local p
    for p in "${NODE_PORTS[@]}"; do
        ip -n "$NS_SWITCH" link set dev "p$p" type bridge_slave isolated on ||
            die "cannot isolate bridge port p$p"
    done
}

# wire_topology: the switch, the cloud and the node namespaces, wired but not yet isolated.
wire_topology() {
    DEMO_STARTED=$(date +%s)
    header "Building the topology in network namespaces ($PREFIX-*)"
    netns_remove_stale "$NS_STEM"

    WORK=$(mktemp -d /tmp/edgemesh-demo.XXXXXX)
    LOG_DIR="$WORK/logs"
    mkdir -p "$LOG_DIR" "$WORK/cloud/data"
    chmod 700 "$WORK"

    NAMESPACES+=("$NS_SWITCH")
    netns_create_switch "$NS_SWITCH" || die "cannot create the switch namespace with a bridge"

    local hosts=() node h role ns ip port=0 r
    NODE_PORTS=()
    for r in "${REPLICAS[@]}"; do
        hosts+=("$r:${REPLICA_NS[$r]}:${REPLICA_IP[$r]}")
    done
    for r in "${ETCD_MEMBERS[@]}"; do
        hosts+=("$r:${ETCD_NS[$r]}:${ETCD_IP[$r]}")
    done
    for node in "${NODES[@]}"; do
        hosts+=("$node:${NODE_NS[$node]}:${NODE_IP[$node]}")
    done
    for h in "${hosts[@]}"; do
        IFS=: read -r role ns ip <<<"$h"
        NAMESPACES+=("$ns")
        netns_create "$ns" || die "cannot create namespace $ns"
        netns_wire_host "$NS_SWITCH" "$ns" "p$port" "$ip/24" ||
            die "cannot connect $ns to the bridge (veth)"
        [ -z "${NODE_NS[$role]:-}" ] || NODE_PORTS+=("$port")
        port=$((port + 1))
        info "$(printf '%-7s %-22s eth0 %s/24' "$role" "$ns" "$ip")"
    done

    # Check: no namespace has a default route (reachability is checked once cloudcore runs).
    local routes
    for ns in "${NAMESPACES[@]}"; do
        routes=$(ip -n "$ns" route show default) || die "cannot read the routes of $ns"
        [ -z "$routes" ] || die "namespace $ns has a default route"
    done
}

step_topology() {
    wire_topology
    isolate_nodes
    local why
    why=$(check_isolated "${NODE_NS[node-a]}" "$CLOUD_IP" "${NODE_IP[node-b]}") ||
        die "the nodes must reach the cloud but not each other: $why"
    if [ "$HA" = 1 ]; then
        ok "switch $NS_SWITCH bridges 3 replicas, 3 etcd members, node-a and node-b; no default route anywhere"
    else
        ok "switch $NS_SWITCH bridges cloud, node-a and node-b; no default route anywhere"
    fi
    ok "node-a and node-b reach the cloud but not each other (isolated bridge ports; $PING checked both)"
    info "commands below are shown as '[where] \$ command': they run inside that namespace with"
    info "'ip netns exec' (the cloudcore CLI also gets --config and --server of this demo)"
}

# HA=1: the hub URLs of every replica, as a TOML list.
hub_urls_toml() {
    local r out=""
    for r in "${REPLICAS[@]}"; do
        out+="${out:+, }\"ws://${REPLICA_IP[$r]}:10000\""
    done
    printf '[%s]' "$out"
}

start_etcd() {
    local m=$1 cluster="" x
    for x in "${ETCD_MEMBERS[@]}"; do
        cluster+="${cluster:+,}$x=http://${ETCD_IP[$x]}:2380"
    done
    start_proc "$m" "${ETCD_NS[$m]}" etcd --name "$m" --data-dir "$WORK/$m" \
        --listen-client-urls "http://${ETCD_IP[$m]}:2379" --advertise-client-urls "http://${ETCD_IP[$m]}:2379" \
        --listen-peer-urls "http://${ETCD_IP[$m]}:2380" --initial-advertise-peer-urls "http://${ETCD_IP[$m]}:2380" \
        --initial-cluster "$cluster" --initial-cluster-token "$PREFIX" --log-level warn
}

start_replica() {
    local r=$1 ip=${REPLICA_IP[$1]}
    start_proc "cloudcore-$r" "${REPLICA_NS[$r]}" "$CLOUDCORE" --config "$WORK/$r/cloudcore.toml"
    wait_until "$START_TIMEOUT" "replica $r is ready (http://$ip:10002/readyz)" \
        in_ns "${REPLICA_NS[$r]}" curl -fsS --max-time 1 "http://$ip:10002/readyz"
}

# HA=1: 3 etcd members and 3 replicas with one config apart from their addresses.
step_cloud_ha() {
    header "Starting 3 etcd members and 3 cloudcore replicas (store.backend = \"etcd\")"
    local m r endpoints=""
    for m in "${ETCD_MEMBERS[@]}"; do
        start_etcd "$m"
        endpoints+="${endpoints:+, }\"http://${ETCD_IP[$m]}:2379\""
    done
    (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$WORK/peer.key")
    API_TOKEN_HA=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
    for r in "${REPLICAS[@]}"; do
        mkdir -p "$WORK/$r/data"
        # The demo's CLI reads the token from the data dir, as with one cloudcore.
        (umask 077 && printf '%s\n' "$API_TOKEN_HA" >"$WORK/$r/data/api-token")
        cat >"$WORK/$r/cloudcore.toml" <<EOT
# cloudcore replica $r of the HA demo: the same on every replica apart from the addresses
data_dir = "$WORK/$r/data"

[store]
backend = "etcd"

[store.etcd]
endpoints = [$endpoints]

[cluster]
listen = "${REPLICA_IP[$r]}:10003"
advertise_url = "ws://${REPLICA_IP[$r]}:10003"
name = "$r"
peer_key_file = "$WORK/peer.key"

[hub]
listen = "${REPLICA_IP[$r]}:10000"

[api]
listen = "${REPLICA_IP[$r]}:10002"
token = "$API_TOKEN_HA"

[router]
listen = "${REPLICA_IP[$r]}:9443"
EOT
    done
    for r in "${REPLICAS[@]}"; do
        start_replica "$r"
    done
    ok "etcd members ${ETCD_MEMBERS[*]} and replicas ${REPLICAS[*]} are up (logs in $LOG_DIR)"
    run_shown cloud "etcdctl member list" in_ns "$NS_CLOUD" etcdctl --endpoints "http://${ETCD_IP[etcd-1]}:2379" member list
    local node
    for node in "${NODES[@]}"; do
        for r in "${REPLICAS[@]}"; do
            in_ns "${NODE_NS[$node]}" curl -fsS --max-time 2 "http://${REPLICA_IP[$r]}:10002/healthz" >/dev/null ||
                die "$node cannot reach replica $r through the bridge"
        done
    done
    ok "node-a and node-b reach every replica through the bridge"
}

step_cloud() {
    if [ "$HA" = 1 ]; then
        step_cloud_ha
        return
    fi
    header "Starting cloudcore in the cloud namespace"
    cat >"$WORK/cloud/cloudcore.toml" <<EOF
# cloudcore configuration of the demo (see examples/config/cloudcore.toml for a commented one)
data_dir = "$WORK/cloud/data"

[hub]
listen = "$CLOUD_IP:10000"

[api]
listen = "$CLOUD_IP:10002"

[router]
listen = "$CLOUD_IP:9443"
EOF
    start_cloudcore
    ok "cloudcore is up: hub $HUB_URL, REST API $API_URL (log: $LOG_DIR/cloudcore.log)"
    local node
    for node in "${NODES[@]}"; do
        in_ns "${NODE_NS[$node]}" curl -fsS --max-time 2 "$API_URL/healthz" >/dev/null ||
            die "$node cannot reach cloudcore at $API_URL through the bridge"
    done
    ok "node-a and node-b reach the cloud through the bridge"
    info "the CLI reads the API token from $WORK/cloud/data/api-token"
}

# create_node_token NODE: a token from the cloud, saved to $WORK/NODE/token.
create_node_token() {
    local node=$1 token
    mkdir -p "$WORK/$node/data"
    show cloud "cloudcore token create $node"
    token=$(cloudctl token create "$node") || die "cloudcore token create $node failed"
    [ -n "$token" ] || die "cloudcore token create $node printed no token"
    info "  -> token ${token:0:8}... saved to $WORK/$node/token"
    (umask 077 && printf '%s\n' "$token" >"$WORK/$node/token")
}

# write_node_config NODE: the node's edgemesh.toml (its token is in $WORK/NODE/token).
write_node_config() {
    local node=$1 labels
    labels="zone = \"${NODE_ZONE[$node]}\""
    [ -z "${NODE_SITE[$node]:-}" ] || labels+=", site = \"${NODE_SITE[$node]}\""
    cat >"$WORK/$node/edgemesh.toml" <<EOF
# edgemesh configuration of $node in the demo (see examples/config/edgemesh.toml)
node_name = "$node"
data_dir = "$WORK/$node/data"
labels = { $labels }

[cloud]
url = $(if [ "$HA" = 1 ]; then hub_urls_toml; else printf '"%s"' "$HUB_URL"; fi)
token_file = "$WORK/$node/token"
# Reconnect quickly once the cloud is back (default 30s), so the demo stays short.
backoff_max = "2s"

[admin]
listen = "$ADMIN_ADDR"
EOF
}

step_nodes() {
    header "Creating node tokens and starting edgemesh on node-a and node-b"
    local node
    for node in "${NODES[@]}"; do
        create_node_token "$node"
        write_node_config "$node"
    done
    for node in "${NODES[@]}"; do
        start_edgemesh "$node"
    done
    for node in "${NODES[@]}"; do
        wait_until "$SYNC_TIMEOUT" "$node is connected to the cloud and synced" node_link "$node" synced
        ok "edgemesh on $node (zone=${NODE_ZONE[$node]}) is connected and synced (log: $LOG_DIR/edgemesh-$node.log)"
    done
    run_shown cloud "cloudcore get nodes -o wide" cloudctl get nodes -o wide
}

step_apply() {
    header "Applying examples/hello.yaml (Services hello and hello-headless, with Endpoints)"
    run_shown cloud "cloudcore apply -f examples/hello.yaml" cloudctl apply -f "$REPO/examples/hello.yaml"
    run_shown cloud "cloudcore get services" cloudctl get services
    run_shown cloud "cloudcore get endpoints -o wide" cloudctl get endpoints -o wide

    local node
    for node in "${NODES[@]}"; do
        wait_until "$SYNC_TIMEOUT" "Service hello (port 80) is on $node" node_has_service "$node" hello 80
        wait_until "$SYNC_TIMEOUT" "Service hello-headless is on $node" node_has_service "$node" hello-headless 8080
    done
    ok "both Services reached node-a and node-b"
}

step_inspect() {
    header "What each node knows (edgemesh status and the admin API)"
    local node
    for node in "${NODES[@]}"; do
        run_shown "$node" "edgemesh status" nodectl "$node" status
        show_node_services "$node"
    done
}

# hello_port_8000 [LABEL]: Service hello of examples/hello.yaml on port 8000 (and LABEL, a
# "key: value" line, among its labels), as YAML.
hello_port_8000() {
    cat <<EOF
apiVersion: v1
kind: Service
metadata:
  name: hello
  namespace: default
  labels:
    app: hello
${1:+    $1
}  annotations:
    edgemesh.io/lb-policy: round-robin
spec:
  type: ClusterIP
  selector:
    app: hello
  ports:
    - name: http
      port: 8000
      targetPort: 8080
      protocol: TCP
  sessionAffinity: None
  topologyKeys:
    - zone
    - "*"
EOF
}

step_update() {
    header "Updating Service hello: port 80 -> 8000; watching it arrive on both nodes"
    local start node arrived=0 t
    declare -A at=()
    show cloud "cloudcore apply -f -   (hello with port 8000)"
    start=$(now_ms)
    # The same Service as in examples/hello.yaml, with another port.
    if ! hello_port_8000 | cloudctl apply -f - 2>&1 | indent; then
        die "applying the updated Service failed"
    fi
    while ((arrived < ${#NODES[@]})); do
        for node in "${NODES[@]}"; do
            [ -z "${at[$node]:-}" ] || continue
            if node_has_service "$node" hello 8000; then
                at[$node]=$(($(now_ms) - start))
                arrived=$((arrived + 1))
            fi
        done
        check_running
        if (($(now_ms) - start > UPDATE_TIMEOUT * 1000)); then
            die "the new port of hello did not reach every node within ${UPDATE_TIMEOUT}s"
        fi
        ((arrived == ${#NODES[@]})) || sleep 0.05
    done
    for node in "${NODES[@]}"; do
        t=${at[$node]}
        ok "$node has hello on port 8000, $t ms after the apply started"
    done
    show_node_services node-b
}

# hello_call: one call from the client pod to hello's cluster IP; prints the answer.
hello_call() {
    in_ns "$NS_CLIENT" curl -fsS --max-time 3 "http://$CLUSTER_IP:8000/"
}

step_pods() {
    header "Pods behind node-a: hello-0 serves, client-a calls hello by its cluster IP"
    NAMESPACES+=("$NS_HELLO")
    netns_add_pod "${NODE_NS[node-a]}" "$NS_HELLO" pod0 "$POD_GATEWAY" "$HELLO_IP/24" ||
        die "cannot create pod hello-0 behind node-a"
    NAMESPACES+=("$NS_CLIENT")
    netns_add_pod "${NODE_NS[node-a]}" "$NS_CLIENT" pod1 "$POD_GATEWAY" "$CLIENT_IP/24" ||
        die "cannot create pod client-a behind node-a"
    info "node-a: bridge cbr0 $POD_GATEWAY/24; hello-0 $HELLO_IP, client-a $CLIENT_IP (default route via node-a)"
    start_proc hello-0 "$NS_HELLO" "$HELLO_SERVER" http "$HELLO_IP:8080" "hello from hello-0 on node-a"
    wait_until "$START_TIMEOUT" "hello-0 answers on $HELLO_IP:8080" \
        in_ns "${NODE_NS[node-a]}" curl -fsS --max-time 1 "http://$HELLO_IP:8080/"
    ok "hello-0 serves HTTP on $HELLO_IP:8080 (log: $LOG_DIR/hello-0.log)"

    local token
    token=$(cat "$WORK/cloud/data/api-token")
    CLUSTER_IP=$(in_ns "$NS_CLOUD" curl -fsS --max-time 2 -H "Authorization: Bearer $token" \
        "$API_URL/api/v1/namespaces/default/services/hello" |
        sed -n 's/.*"clusterIP":"\([0-9.]*\)".*/\1/p')
    [ -n "$CLUSTER_IP" ] || die "cannot read hello's cluster IP from the API"
    ok "Service hello has cluster IP $CLUSTER_IP (port 8000 -> targetPort 8080)"

    run_shown node-a "iptables-save -t nat | grep edgemesh   (one REDIRECT per chain, whatever the number of Services)" \
        bash -c "ip netns exec '${NODE_NS[node-a]}' iptables-save -t nat | grep -i edgemesh"
    local nat chain redirects
    nat=$(in_ns "${NODE_NS[node-a]}" iptables-save -t nat) || die "cannot read node-a's nat table"
    for chain in EDGEMESH-PREROUTING EDGEMESH-OUTPUT; do
        redirects=$(printf '%s\n' "$nat" | grep -c -- "^-A $chain .*-j REDIRECT" || true)
        [ "$redirects" = 1 ] || die "expected one REDIRECT in $chain, found $redirects"
    done
    ok "one REDIRECT in each of edgemesh's two chains (pods: PREROUTING, host processes: OUTPUT)"
    local i answer
    for i in 1 2 3; do
        show client-a "curl http://$CLUSTER_IP:8000/"
        answer=$(hello_call) || die "client-a could not call hello through the mesh"
        printf '%s\n' "$answer" | indent
        [ "$answer" = "hello from hello-0 on node-a" ] || die "unexpected answer from hello: $answer"
    done
    ok "client-a reached hello-0 through its node's proxy (the endpoint on this node comes first)"
    run_shown node-a "curl http://$ADMIN_ADDR/metrics | grep edgemesh_proxy_connections_total" \
        bash -c "ip netns exec '${NODE_NS[node-a]}' curl -fsS http://$ADMIN_ADDR/metrics | grep '^edgemesh_proxy_connections_total'"

    header "Cluster DNS: client-a calls hello by name"
    # Like a pod's resolv.conf: node-a's cluster DNS, the Kubernetes search path.
    netns_resolv_conf "$NS_CLIENT" "$NODE_DNS" default.svc.cluster.local svc.cluster.local cluster.local
    info "client-a's /etc/resolv.conf: nameserver $NODE_DNS (node-a's edgemesh), search default.svc.cluster.local ..."
    run_shown client-a "dig +short hello.default.svc.cluster.local   (answered by node-a's edgemesh)" \
        in_ns "$NS_CLIENT" dig +short +time=2 +tries=1 hello.default.svc.cluster.local
    local named
    named=$(in_ns "$NS_CLIENT" dig +short +time=2 +tries=1 hello.default.svc.cluster.local) ||
        die "node-a's cluster DNS did not answer"
    [ "$named" = "$CLUSTER_IP" ] || die "hello.default.svc.cluster.local resolved to '$named', not $CLUSTER_IP"
    # dig exits 0 on NXDOMAIN or an empty answer: the answers themselves are checked.
    local srv headless
    show client-a "dig +short SRV _http._tcp.hello.default.svc.cluster.local"
    srv=$(in_ns "$NS_CLIENT" dig +short +time=2 +tries=1 SRV _http._tcp.hello.default.svc.cluster.local) ||
        die "node-a's cluster DNS did not answer the SRV query"
    printf '%s\n' "$srv" | indent
    grep -q " 8000 hello.default.svc.cluster.local.$" <<<"$srv" ||
        die "the SRV answer does not name hello.default.svc.cluster.local port 8000: '$srv'"
    show client-a "dig +short hello-headless.default.svc.cluster.local   (headless: the pod addresses)"
    headless=$(in_ns "$NS_CLIENT" dig +short +time=2 +tries=1 hello-headless.default.svc.cluster.local) ||
        die "node-a's cluster DNS did not answer for hello-headless"
    printf '%s\n' "$headless" | indent
    [ "$(printf '%s\n' "$headless" | sort | tr '\n' ' ')" = "$HELLO_IP $HELLO1_IP " ] ||
        die "hello-headless should resolve to $HELLO_IP and $HELLO1_IP, got '$headless'"
    show client-a "curl http://hello:8000/   (short name, through the search path)"
    answer=$(in_ns "$NS_CLIENT" curl -fsS --max-time 3 "http://hello:8000/") ||
        die "client-a could not call hello by name"
    printf '%s\n' "$answer" | indent
    [ "$answer" = "hello from hello-0 on node-a" ] || die "unexpected answer from hello: $answer"
    ok "names resolve on the node itself (no cloud round trip): A, SRV, headless"
}

# holder NODE: the replica that holds NODE's connection, as the API reports it.
holder() {
    in_ns "$NS_CLOUD" curl -fsS --max-time 2 -H "Authorization: Bearer $API_TOKEN_HA" \
        "$API_URL/api/v1/nodes/$1" | sed -n 's/.*"replica":"\([^"]*\)".*/\1/p'
}

# holder_is_live NODE DEAD: some replica holds NODE and it is not DEAD.
holder_is_live() {
    local h
    h=$(holder "$1")
    [ -n "$h" ] && [ "$h" != "$2" ]
}

# snapshots NODE: how many snapshots NODE was sent since it started.
snapshots() {
    admin_get "$1" /debug/sync | sed -n 's/.*"snapshots":\([0-9]*\).*/\1/p'
}

# node_knows_label NODE TEXT: NODE's copy of the Services mentions TEXT.
node_knows_label() {
    admin_get "$1" /debug/services | grep -q "$2"
}

# HA=1, in place of the offline step: the replica holding node-a dies; node-a moves.
step_failover() {
    header "Failover: SIGKILL of the replica that holds node-a"
    run_shown cloud "cloudcore get nodes -o wide" cloudctl get nodes -o wide
    local victim pid before after t0
    victim=$(holder node-a)
    [ -n "$victim" ] || die "no replica reports holding node-a"
    before=$(snapshots node-a)
    pid=${PIDS[cloudcore-$victim]}
    t0=$(now_ms)
    kill -KILL "$pid"
    wait "$pid" 2>/dev/null || true
    unset "PIDS[cloudcore-$victim]"
    ok "replica $victim killed (SIGKILL) while holding node-a"
    if [ "$victim" = cloud ]; then
        API_URL="http://${REPLICA_IP[cloud-2]}:10002"
        info "the CLI now talks to replica cloud-2 ($API_URL)"
    fi
    wait_until "$SYNC_TIMEOUT" "node-a is held by a live replica" holder_is_live node-a "$victim"
    wait_until "$SYNC_TIMEOUT" "node-a is synced again" node_link node-a synced
    ok "node-a is on replica $(holder node-a), $(($(now_ms) - t0)) ms after the kill"
    after=$(snapshots node-a)
    [ "$before" = "$after" ] || die "node-a was sent a snapshot after the move ($before -> $after)"
    ok "node-a resumed by delta: no snapshot (the replicas share one store and one history)"
    run_shown cloud "cloudcore get nodes -o wide" cloudctl get nodes -o wide
    show client-a "curl http://$CLUSTER_IP:8000/   (one replica down)"
    hello_call | indent || die "client-a could not call hello with a replica down"
    ok "calls carry on"

    show cloud "cloudcore apply -f -   (hello gets a label, through a live replica)"
    hello_port_8000 "failover: survived" | cloudctl apply -f - 2>&1 | indent ||
        die "applying through a live replica failed"
    local node
    for node in "${NODES[@]}"; do
        wait_until "$UPDATE_TIMEOUT" "the update reaches $node" node_knows_label "$node" survived
    done
    ok "updates carry on: the new label reached node-a and node-b"

    header "Starting replica $victim again"
    start_replica "$victim"
    API_URL="http://$CLOUD_IP:10002"
    ok "replica $victim is back and ready; it serves whatever connects to it"
}

step_offline() {
    if [ "$HA" = 1 ]; then
        step_failover
        return
    fi
    header "Offline autonomy: stopping cloudcore"
    stop_proc cloudcore || die "cloudcore did not exit cleanly on SIGTERM (status $?)"
    ok "cloudcore stopped"
    local node
    for node in "${NODES[@]}"; do
        wait_until "$SYNC_TIMEOUT" "$node notices that the cloud is gone" node_link "$node" disconnected
    done
    ok "both nodes report the cloud link down"

    header "Restarting edgemesh on node-a while the cloud is down"
    stop_proc edgemesh-node-a || die "edgemesh on node-a did not exit cleanly on SIGTERM (status $?)"
    ok "edgemesh on node-a stopped"
    run_shown node-a "edgemesh status   (agent stopped: reads the SQLite store)" nodectl node-a status
    start_edgemesh node-a
    ok "edgemesh on node-a is running again, without the cloud"
    node_link node-a disconnected || die "node-a claims a cloud connection while cloudcore is down"
    node_has_service node-a hello 8000 ||
        die "after the restart node-a does not serve Service hello (port 8000) from its store"
    node_has_service node-a hello-headless 8080 ||
        die "after the restart node-a does not serve Service hello-headless from its store"
    run_shown node-a "edgemesh status" nodectl node-a status
    show_node_services node-a
    ok "node-a serves the metadata from its SQLite copy while offline"
    show client-a "curl http://$CLUSTER_IP:8000/   (cloud down, agent restarted)"
    hello_call | indent || die "client-a could not call hello while the cloud was down"
    ok "client-a still reaches hello through node-a's proxy while the cloud is down"

    header "Starting cloudcore again"
    start_cloudcore
    ok "cloudcore is back, with the same data dir"
    run_shown cloud "cloudcore get services" cloudctl get services
    for node in "${NODES[@]}"; do
        wait_until "$SYNC_TIMEOUT" "$node reconnects and reports synced" node_link "$node" synced
    done
    ok "node-a and node-b reconnected with their tokens and synced"
    run_shown node-a "edgemesh status" nodectl node-a status
    run_shown cloud "cloudcore get nodes -o wide" cloudctl get nodes -o wide
}

# The Services the tunnel step adds: world (its only pod, hello-1, runs on node-b) and
# cloud-hello (its endpoint has no nodeName: cloudcore dials it). $1: world's annotations.
tunnel_manifests() {
    local annotations=$1
    cat <<EOF
apiVersion: v1
kind: Service
metadata:
  name: world
  namespace: default
  annotations: {$annotations}
spec:
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: world, namespace: default}
subsets:
  - addresses: [{ip: $HELLO1_IP, nodeName: node-b}]
    ports: [{name: http, port: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: cloud-hello, namespace: default}
spec:
  ports: [{name: http, port: 80, targetPort: 8090}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: cloud-hello, namespace: default}
subsets:
  - addresses: [{ip: $CLOUD_IP}]
    ports: [{name: http, port: 8090}]
EOF
}

# service_ip NAME: a Service's cluster IP, from the API.
service_ip() {
    local token
    token=$(cat "$WORK/cloud/data/api-token")
    in_ns "$NS_CLOUD" curl -fsS --max-time 2 -H "Authorization: Bearer $token" \
        "$API_URL/api/v1/namespaces/default/services/$1" |
        sed -n 's/.*"clusterIP":"\([0-9.]*\)".*/\1/p'
}

# api_post PATH JSON: a POST to the cloud API; prints the answer.
api_post() {
    local token
    token=$(cat "$WORK/cloud/data/api-token")
    in_ns "$NS_CLOUD" curl -fsS --max-time 5 -H "Authorization: Bearer $token" \
        -H 'Content-Type: application/json' -d "$2" "$API_URL$1"
}

step_tunnels() {
    header "Across nodes: a pod on node-a calls a Service whose pod runs on node-b"
    local why
    why=$(check_isolated "${NODE_NS[node-a]}" "$CLOUD_IP" "${NODE_IP[node-b]}") ||
        die "node-a must not reach node-b directly (the call must go through the cloud): $why"
    ok "node-a reaches the cloud but not node-b ($PING ${NODE_IP[node-b]} gets no answer): the call must go through the cloud"
    NAMESPACES+=("$NS_HELLO1")
    netns_add_pod "${NODE_NS[node-b]}" "$NS_HELLO1" pod0 "$POD_GATEWAY_B" "$HELLO1_IP/24" ||
        die "cannot create pod hello-1 behind node-b"
    start_proc hello-1 "$NS_HELLO1" "$HELLO_SERVER" http "$HELLO1_IP:8080" "hello from hello-1 on node-b"
    wait_until "$START_TIMEOUT" "hello-1 answers on $HELLO1_IP:8080" \
        in_ns "${NODE_NS[node-b]}" curl -fsS --max-time 1 "http://$HELLO1_IP:8080/"
    start_proc cloud-hello "$NS_CLOUD" "$HELLO_SERVER" http "$CLOUD_IP:8090" "hello from a server in the cloud"
    wait_until "$START_TIMEOUT" "the cloud server answers on $CLOUD_IP:8090" \
        in_ns "$NS_CLOUD" curl -fsS --max-time 1 "http://$CLOUD_IP:8090/"
    ok "hello-1 ($HELLO1_IP) serves behind node-b; a plain HTTP server runs in the cloud namespace"

    tunnel_manifests "" >"$WORK/tunnel.yaml"
    run_shown cloud "cloudcore apply -f tunnel.yaml   (world -> hello-1 on node-b; cloud-hello -> $CLOUD_IP, no nodeName)" \
        cloudctl apply -f "$WORK/tunnel.yaml"
    wait_until "$SYNC_TIMEOUT" "Service world is on node-a" node_has_service node-a world 80
    wait_until "$SYNC_TIMEOUT" "Service cloud-hello is on node-a" node_has_service node-a cloud-hello 80
    local world cloud_hello answer
    world=$(service_ip world)
    cloud_hello=$(service_ip cloud-hello)
    [ -n "$world" ] && [ -n "$cloud_hello" ] || die "cannot read the cluster IPs of world and cloud-hello"

    show client-a "curl http://$world/   (world: its only pod is on node-b)"
    answer=$(in_ns "$NS_CLIENT" curl -fsS --max-time 5 "http://$world/") ||
        die "client-a could not reach world on node-b through the cloud"
    printf '%s\n' "$answer" | indent
    [ "$answer" = "hello from hello-1 on node-b" ] || die "unexpected answer from world: $answer"
    ok "node-a -> cloudcore (relay by stream id) -> node-b -> hello-1"

    show client-a "curl http://$cloud_hello/   (cloud-hello: its endpoint is in the cloud)"
    answer=$(in_ns "$NS_CLIENT" curl -fsS --max-time 5 "http://$cloud_hello/") ||
        die "client-a could not reach the cloud service"
    printf '%s\n' "$answer" | indent
    [ "$answer" = "hello from a server in the cloud" ] || die "unexpected answer from cloud-hello: $answer"
    ok "node-a -> cloudcore, which dials the cloud endpoint itself"
    local r
    for r in "${REPLICAS[@]}"; do
        # HA=1: the streams went through the replicas that hold node-a and node-b.
        run_shown "$r" "curl /metrics | grep cloudcore_tunnel_streams_total" \
            bash -c "ip netns exec '${REPLICA_NS[$r]}' curl -fsS 'http://${REPLICA_IP[$r]}:10002/metrics' | grep '^cloudcore_tunnel_streams_total' || echo '      (no streams through this replica)'"
    done
    run_shown node-a "edgemesh status" nodectl node-a status

    header "Router: a cloud client calls an edge Service through a rule (cloudcore :9443)"
    run_shown cloud "POST /api/v1/router/endpoints {type: rest, name: cloud-rest}" \
        api_post /api/v1/router/endpoints '{"type":"rest","name":"cloud-rest"}'
    run_shown cloud "POST /api/v1/router/endpoints {type: service, name: mesh}" \
        api_post /api/v1/router/endpoints '{"type":"service","name":"mesh"}'
    local rule rule_id
    rule=$(api_post /api/v1/router/rules '{"name":"to-world","source":"cloud-rest","source_resource":{"path":"/world"},"target":"mesh","target_resource":{"namespace":"default","name":"world","port":80}}') ||
        die "cannot create the router rule"
    rule_id=$(printf '%s' "$rule" | sed -n 's/.*"id":"\([^"]*\)".*/\1/p')
    [ -n "$rule_id" ] || die "the rule has no id: $rule"
    ok "rule to-world ($rule_id): rest /world -> Service default/world port 80"
    show cloud "curl http://$CLOUD_IP:9443/world/greet"
    answer=$(in_ns "$NS_CLOUD" curl -fsS --max-time 5 "http://$CLOUD_IP:9443/world/greet") ||
        die "the router did not reach world"
    printf '%s\n' "$answer" | indent
    [ "$answer" = "hello from hello-1 on node-b" ] || die "unexpected answer through the router: $answer"
    local token
    token=$(cat "$WORK/cloud/data/api-token")
    local counters
    show cloud "GET /api/v1/router/rules/$rule_id   (success_messages, fail_messages)"
    counters=$(in_ns "$NS_CLOUD" curl -fsS -H "Authorization: Bearer $token" "$API_URL/api/v1/router/rules/$rule_id" |
        tr ',' '\n' | grep -E 'success_messages|fail_messages') || die "cannot read the rule's counters"
    printf '%s\n' "$counters" | indent
    grep -qE '"success_messages":[1-9]' <<<"$counters" || die "the rule counted no success: $counters"
    ok "cloud client -> router -> stream to node-b -> hello-1"

    header "QPS limit: edgemesh.io/qps: \"5\" on world, enforced on node-b where hello-1 is dialled"
    tunnel_manifests '"edgemesh.io/qps": "5"' >"$WORK/tunnel.yaml"
    run_shown cloud "cloudcore apply -f tunnel.yaml   (world now has edgemesh.io/qps: \"5\")" \
        cloudctl apply -f "$WORK/tunnel.yaml"
    wait_until "$SYNC_TIMEOUT" "node-b has world's limit" bash -c \
        "ip netns exec '${NODE_NS[node-b]}' curl -fsS http://$ADMIN_ADDR/debug/services | grep -q 'edgemesh.io/qps'"
    show client-a "curl: 20 requests at once to http://$world/ (one keep-alive connection)"
    local codes ok_count limited
    codes=$(in_ns "$NS_CLIENT" curl -sS --max-time 10 -o /dev/null -w '%{http_code}\n' "http://$world/?n=[1-20]") ||
        die "the burst of requests failed"
    ok_count=$(printf '%s\n' "$codes" | grep -c '^200$' || true)
    limited=$(printf '%s\n' "$codes" | grep -c '^429$' || true)
    info "200: $ok_count   429: $limited"
    [ "$ok_count" -ge 1 ] && [ "$ok_count" -le 8 ] && [ $((ok_count + limited)) -eq 20 ] ||
        die "expected about 5 answers and the rest 429, got 200 x $ok_count, 429 x $limited"
    run_shown node-b "curl /metrics | grep edgemesh_limit_rejected_total" \
        bash -c "ip netns exec '${NODE_NS[node-b]}' curl -fsS http://$ADMIN_ADDR/metrics | grep '^edgemesh_limit_rejected_total'"
    ok "the burst of 5 passed, the rest got 429 Too Many Requests with Retry-After"

    header "Fall-over across nodes: hello-0 on node-a stops, hello moves to hello-1 on node-b"
    stop_proc hello-0 >/dev/null 2>&1 || true
    show client-a "curl http://$CLUSTER_IP:8000/   (hello-0 is down)"
    answer=$(in_ns "$NS_CLIENT" curl -fsS --max-time 10 "http://$CLUSTER_IP:8000/") ||
        die "client-a could not reach hello after hello-0 stopped"
    printf '%s\n' "$answer" | indent
    [ "$answer" = "hello from hello-1 on node-b" ] || die "unexpected answer from hello: $answer"
    ok "node-a's proxy ejected its own endpoint and fell over to node-b's, through the cloud"
}

# udp_manifests: Service site-dns, one UDP port, its pod dns-b on node-b.
udp_manifests() {
    cat <<EOF
apiVersion: v1
kind: Service
metadata: {name: site-dns, namespace: default}
spec:
  ports: [{name: dns, port: 53, targetPort: 53, protocol: UDP}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: site-dns, namespace: default}
subsets:
  - addresses: [{ip: $DNS_B_IP, nodeName: node-b}]
    ports: [{name: dns, port: 53, protocol: UDP}]
EOF
}

step_udp() {
    header "UDP: a DNS server pod on node-b behind a UDP ClusterIP; client-a resolves through it"
    NAMESPACES+=("$NS_DNS_B")
    netns_add_pod "${NODE_NS[node-b]}" "$NS_DNS_B" pod1 "$POD_GATEWAY_B" "$DNS_B_IP/24" ||
        die "cannot create pod dns-b behind node-b"
    start_proc dns-b "$NS_DNS_B" dnsmasq --no-daemon --no-resolv --no-hosts --bind-interfaces \
        --user=root --pid-file= --port=53 --listen-address="$DNS_B_IP" \
        --address=/printer.factory.lan/10.20.30.40
    wait_until "$START_TIMEOUT" "dnsmasq answers on $DNS_B_IP:53" bash -c \
        "ip netns exec '${NODE_NS[node-b]}' dig @$DNS_B_IP printer.factory.lan +short +time=1 +tries=1 | grep -qx 10.20.30.40"
    ok "dns-b ($DNS_B_IP) runs dnsmasq behind node-b: printer.factory.lan is 10.20.30.40"

    udp_manifests >"$WORK/udp.yaml"
    run_shown cloud "cloudcore apply -f udp.yaml   (site-dns: port 53/UDP -> dns-b on node-b)" \
        cloudctl apply -f "$WORK/udp.yaml"
    wait_until "$SYNC_TIMEOUT" "Service site-dns is on node-a" node_has_service node-a site-dns 53
    local ip answer
    ip=$(service_ip site-dns)
    [ -n "$ip" ] || die "cannot read the cluster IP of site-dns"
    show client-a "dig @$ip printer.factory.lan +short   (a UDP ClusterIP; its pod is on node-b)"
    answer=$(in_ns "$NS_CLIENT" dig @"$ip" printer.factory.lan A +short +time=2 +tries=2) ||
        die "dig through site-dns failed"
    printf '%s\n' "$answer" | indent
    [ "$answer" = 10.20.30.40 ] || die "unexpected answer through site-dns: '$answer'"
    ok "client-a -> node-a's UDP proxy (mark + policy route) -> cloudcore (a stream of datagrams) -> node-b -> dns-b"
    run_shown node-a "curl /metrics | grep edgemesh_proxy_udp_flows_total" \
        bash -c "ip netns exec '${NODE_NS[node-a]}' curl -fsS http://$ADMIN_ADDR/metrics | grep '^edgemesh_proxy_udp_flows_total'"
    run_shown node-a "edgemesh status" nodectl node-a status
}

step_explore() {
    [ "$KEEP" = 1 ] || return 0
    header "KEEP=1: the topology stays up for exploration"
    local node
    info "cloudcore CLI:"
    info "  ip netns exec $NS_CLOUD $CLOUDCORE --config $WORK/cloud/cloudcore.toml get nodes -o wide --server $API_URL"
    for node in "${NODES[@]}"; do
        info "$node:"
        info "  ip netns exec ${NODE_NS[$node]} $EDGEMESH --config $WORK/$node/edgemesh.toml status"
        info "  ip netns exec ${NODE_NS[$node]} curl -s http://$ADMIN_ADDR/debug/services"
    done
    info "logs: $LOG_DIR"
    if [ -t 0 ]; then
        read -r -p "    Press Enter to tear everything down... " _ || true
    else
        info "stdin is not a terminal: not waiting"
    fi
}

# self_test: the demo's isolation check against topologies where it must fail, then where it
# must pass (the same check step_topology and step_tunnels run).
self_test() {
    header "Self-test of the demo's checks"
    [ "$(id -u)" -eq 0 ] || die "the self-test creates network namespaces and must run as root"
    install_packages iproute2 iputils-ping
    wire_topology
    local why rc=0
    why=$(check_isolated "${NODE_NS[node-a]}" "$CLOUD_IP" "${NODE_IP[node-b]}") || rc=$?
    ((rc == 1)) || die "the nodes reach each other, yet the isolation check returned $rc ($why)"
    ok "nodes that reach each other fail the isolation check: $why"
    isolate_nodes
    rc=0
    why=$(PING=/nonexistent/ping check_isolated "${NODE_NS[node-a]}" "$CLOUD_IP" "${NODE_IP[node-b]}") || rc=$?
    ((rc == 2)) || die "without ping the isolation check returned $rc, not 2 (cannot tell)"
    ok "without ping the check cannot tell and says so: $why"
    why=$(check_isolated "${NODE_NS[node-a]}" "$CLOUD_IP" "${NODE_IP[node-b]}") ||
        die "isolated nodes fail the isolation check: $why"
    ok "isolated nodes pass it"
}

# The objects of the direct-path step: Community factory (every node labelled site=factory) and
# Service plc-status, whose pod runs on node-d.
direct_manifests() {
    cat <<EOF
apiVersion: edgemesh.io/v1alpha1
kind: Community
metadata: {name: factory}
spec:
  nodeSelector:
    matchLabels: {site: factory}
---
apiVersion: v1
kind: Service
metadata: {name: plc-status, namespace: default}
spec:
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: plc-status, namespace: default}
subsets:
  - addresses: [{ip: $PLC_D_IP, nodeName: node-d}]
    ports: [{name: http, port: 8080, protocol: TCP}]
EOF
}

# path_of NODE PEER: the path NODE's calls to PEER take now (direct or relay), from /debug/direct.
path_of() {
    admin_get "$1" /debug/direct | tr -d ' \n' | grep -o "{\"peer\":\"$2\",\"path\":\"[a-z]*\"" |
        sed 's/.*"path":"\([a-z]*\)"/\1/'
}

path_is_direct() { [ "$(path_of "$1" "$2")" = direct ]; }

# relayed_streams: node-to-node streams cloudcore relayed so far.
relayed_streams() {
    local n
    n=$(in_ns "$NS_CLOUD" curl -fsS --max-time 2 "http://$CLOUD_IP:10002/metrics" |
        sed -n 's/^cloudcore_tunnel_streams_total{kind="relay"} \([0-9.e+]*\)$/\1/p')
    n=${n%.*}
    echo "${n:-0}"
}

plc_call() {
    in_ns "$NS_CLIENT_C" curl -fsS --max-time 5 "http://$1/"
}

step_direct() {
    if [ "$HA" = 1 ]; then
        # Candidates and punch requests pass through the replica a node is connected to
        # (docs/direct.md, Limits): two nodes held by different replicas do not meet.
        header "Direct paths: skipped with HA=1 (candidates are passed within one replica)"
        return 0
    fi
    header "Direct paths: node-c and node-d share a LAN (site=factory); a Community lets them talk directly"
    local node port=10
    for node in "${LAN_NODES[@]}"; do
        NAMESPACES+=("${NODE_NS[$node]}")
        netns_create "${NODE_NS[$node]}" || die "cannot create namespace ${NODE_NS[$node]}"
        netns_wire_host "$NS_SWITCH" "${NODE_NS[$node]}" "p$port" "${NODE_IP[$node]}/24" ||
            die "cannot connect ${NODE_NS[$node]} to the bridge (veth)"
        port=$((port + 1))
        info "$(printf '%-7s %-22s eth0 %s/24 (not isolated: same LAN)' "$node" "${NODE_NS[$node]}" "${NODE_IP[$node]}")"
        create_node_token "$node"
        write_node_config "$node"
        start_edgemesh "$node"
    done
    for node in "${LAN_NODES[@]}"; do
        wait_until "$SYNC_TIMEOUT" "$node is connected to the cloud and synced" node_link "$node" synced
        ok "edgemesh on $node (site=factory) is connected and synced"
    done
    NAMESPACES+=("$NS_PLC_D" "$NS_CLIENT_C")
    netns_add_pod "${NODE_NS[node-d]}" "$NS_PLC_D" pod0 10.244.4.1 "$PLC_D_IP/24" ||
        die "cannot create pod plc-d behind node-d"
    netns_add_pod "${NODE_NS[node-c]}" "$NS_CLIENT_C" pod0 10.244.3.1 "$CLIENT_C_IP/24" ||
        die "cannot create pod client-c behind node-c"
    start_proc plc-d "$NS_PLC_D" "$HELLO_SERVER" http "$PLC_D_IP:8080" "line 3: running (plc-d on node-d)"
    wait_until "$START_TIMEOUT" "plc-d answers on $PLC_D_IP:8080" \
        in_ns "${NODE_NS[node-d]}" curl -fsS --max-time 1 "http://$PLC_D_IP:8080/"
    ok "plc-d ($PLC_D_IP) serves behind node-d; client-c ($CLIENT_C_IP) runs behind node-c"

    direct_manifests >"$WORK/direct.yaml"
    run_shown cloud "cloudcore apply -f direct.yaml   (Community factory: site=factory; plc-status -> plc-d on node-d)" \
        cloudctl apply -f "$WORK/direct.yaml"
    run_shown cloud "cloudcore get communities" cloudctl get communities
    wait_until "$SYNC_TIMEOUT" "Service plc-status is on node-c" node_has_service node-c plc-status 80
    wait_until "$SYNC_TIMEOUT" "node-c has node-d's candidates" bash -c \
        "ip netns exec '${NODE_NS[node-c]}' curl -fsS http://$ADMIN_ADDR/debug/direct | grep -q '\"node-d\"'"
    local ip answer
    ip=$(service_ip plc-status)
    [ -n "$ip" ] || die "cannot read the cluster IP of plc-status"
    show client-c "curl http://$ip/   (the first call: served at once, over the relay while the path forms)"
    answer=$(plc_call "$ip") || die "client-c could not reach plc-status"
    printf '%s\n' "$answer" | indent
    [ "$answer" = "line 3: running (plc-d on node-d)" ] || die "unexpected answer from plc-status: $answer"
    wait_until "$SYNC_TIMEOUT" "node-c has a direct path to node-d" path_is_direct node-c node-d
    ok "node-c and node-d formed a QUIC path (node certificates from the cloud, LAN candidate first)"
    local before after i
    before=$(relayed_streams)
    for i in $(seq 10); do
        answer=$(in_ns "$NS_CLIENT_C" curl -fsS --max-time 5 -H 'Connection: close' "http://$ip/?n=$i") ||
            die "call $i to plc-status failed"
    done
    after=$(relayed_streams)
    [ "$after" = "$before" ] || die "cloudcore relayed $((after - before)) streams for a LAN pair with a direct path"
    ok "10 more calls, each on a new connection: cloudcore relayed none of them (relay streams $before -> $after)"
    run_shown node-c "edgemesh status   (the direct line: per peer, path, candidate, RTT, bytes)" nodectl node-c status

    header "Direct paths without the cloud: cloudcore stops, the factory keeps calling"
    stop_proc cloudcore || die "cloudcore did not exit cleanly on SIGTERM (status $?)"
    wait_until "$SYNC_TIMEOUT" "node-c notices that the cloud is gone" node_link node-c disconnected
    show client-c "curl http://$ip/   (cloud down)"
    answer=$(plc_call "$ip") || die "client-c could not reach plc-status while the cloud was down"
    printf '%s\n' "$answer" | indent
    ok "node-c -> node-d directly while the cloud is down"
    start_cloudcore
    for node in "${NODES[@]}" "${LAN_NODES[@]}"; do
        wait_until "$SYNC_TIMEOUT" "$node reconnects and reports synced" node_link "$node" synced
    done
    ok "cloudcore is back; every node reconnected"
}

main() {
    exec 3>&1 4>&2 # the demo's own stdout and stderr, for cleanup
    trap cleanup EXIT
    trap 'INTERRUPTED=SIGINT; exit 130' INT
    trap 'INTERRUPTED=SIGTERM; exit 143' TERM
    trap 'on_err "$LINENO" "$?" "$BASH_COMMAND"' ERR

    if [ "${1:-}" = --self-test ]; then
        MODE=self-test
        self_test
        FINISHED=1
        return 0
    fi
    step_prepare_host
    step_build
    step_topology
    step_cloud
    step_nodes
    step_apply
    step_inspect
    step_update
    step_pods
    step_offline
    step_tunnels
    step_udp
    step_direct

    FINISHED=1
    header "Summary"
    if [ "$HA" = 1 ]; then
        info "HA: 3 etcd members, 3 replicas; the replica holding node-a killed, node-a moved by delta"
    fi
    info "metadata plane: apply -> sync to both nodes -> live update -> offline restart -> resync"
    info "data plane: pod -> cluster IP -> node-a's proxy -> hello-0, also while the cloud is down"
    info "tunnels: node-a -> cloud -> node-b, node-a -> cloud endpoint, router -> node-b, QPS 429s, fall-over"
    info "UDP: dig from a pod on node-a through a UDP ClusterIP to a DNS server pod on node-b"
    [ "$HA" = 1 ] ||
        info "direct: two LAN nodes in a Community call each other over QUIC, also with the cloud down"
    info "demo ran in $(($(date +%s) - DEMO_STARTED))s after the build"
    step_explore
    # cleanup (the EXIT trap) tears everything down and prints the final "demo finished OK".
}

main "$@"
