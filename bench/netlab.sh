#!/usr/bin/env bash
# netlab: N emulated hosts on one Linux machine, with a shaped network between them, and an
# Open MPI job across them.
#
#   sudo bash bench/netlab.sh --ranks 3 --rate 1gbit [--delay 1ms] -- python3 bench/bench_lab.py ...
#   sudo bash bench/netlab.sh --ranks 8 --per-host 2 --rate 100mbit -- ...     # 4 hosts x 2 ranks
#
# Builds H = N / per-host network namespaces hq0..hq{H-1} (per-host ranks in each, like the GPUs
# of one machine; they talk over the namespace's loopback and shared memory, unshaped), each with a veth ("eth0" inside) into one bridge
# (hqbr) on a private subnet (default 10.77.0.0/24: hq<i> is 10.77.0.<i+1>, the bridge, where
# mpirun's HNP listens, is .254). Each namespace is one "host" with a full-duplex NIC of rate R:
# tc tbf shapes its egress (inside the namespace) and its ingress (the bridge side of its veth);
# --delay adds netem one-way delay on the egress (needs sch_netem in the kernel).
# Then it writes an Open MPI hostfile of those IPs (per-host slots each) and an rsh agent that runs
# `ip netns exec hq<i> sh -c <cmd>` for host 10.77.0.<i+1>, and runs, from the root namespace,
#
#   mpirun --allow-run-as-root --oversubscribe -np N --hostfile H --mca plm_rsh_agent AGENT
#          --mca btl tcp,self --mca pml ob1 --mca btl_tcp_if_include SUBNET --mca oob_tcp_if_include SUBNET
#          -x OMP_NUM_THREADS=1 -x MKL_NUM_THREADS=1 -x NUMBA_NUM_THREADS=1 -x HVD_QADAM_THREADS=1 ... CMD
#
# so every orted (and the rank it forks) lives in its own namespace and every byte between ranks
# crosses two shaped veths. Everything is torn down on exit (also on failure, Ctrl-C, TERM); stale
# namespaces of a crashed earlier run are removed first. A lock serialises concurrent netlabs.
#
# Inside the job: HQ_NETLAB_RATE, HQ_NETLAB_DELAY, HQ_NETLAB_RANKS, HQ_NETLAB_PER_HOST are set; each
# host's interface is eth0 (/proc/self/net/dev there counts the real wire bytes of that host: with
# several ranks per host, of all of them together).
#
# Pitfalls:
# * local_size: Open MPI treats every namespace as a separate node (the hostfile names differ),
#   so OMPI_COMM_WORLD_LOCAL_SIZE, hvd.local_size() and MPI's COMM_TYPE_SHARED split are 1 and
#   hvd.cross_size() is N, although all namespaces share one kernel, one hostname and the cores.
#   Anything that divides the cores by local_size (hvd_qadam's numba pool sizing included) would
#   give every rank all cores; hence the explicit one-thread-per-rank exports below.
# * Open MPI's default allreduce decision (coll tuned) for 3 ranks x 42 MB moves ~2.5x the data
#   per rank (104 MB), not the ring's 2(N-1)/N (56 MB): at 1gbit 1.8 s instead of 0.75 s. Export
#   OMPI_MCA_coll_tuned_use_dynamic_rules=1 OMPI_MCA_coll_tuned_allreduce_algorithm=4 for the ring.
# * One TCP stream over a veth tops out at a few Gbit/s of CPU here, so "10gbit" is CPU-bound,
#   like "none"; with more ranks than cores, all rates are partly CPU-bound.
# * Open MPI's default routed component sometimes never starts the second daemon across these
#   namespaces (the launch hangs; seen 1 launch in 4): `--mca routed direct` (set below) avoids it.
# * --delay needs the sch_netem kernel module (not every VM kernel has it: netlab then says so).
#
# Options:
#   --ranks N        number of ranks (default 3)
#   --per-host R     ranks per namespace ("host"; default 1); N must be a multiple of R
#   --rate R         tc rate per direction per host, e.g. 100mbit, 1gbit, 10gbit; "none" = unshaped (default 1gbit)
#   --delay D        netem one-way delay on each host's egress, e.g. 1ms (default: none)
#   --egress-only    shape only each host's egress (the receive side is then limited by the senders only)
#   --queue-ms MS    tbf queue ("latency") in milliseconds of traffic at rate R (default 50)
#   --subnet A.B.C   /24 to use (default 10.77.0)
#   --mtu BYTES      veth MTU (default 1500)
#   --spin           keep Open MPI's busy-polling with more ranks than cores (default: yield)
#   --keep-log DIR   copy the hostfile, the agent and its log (every launch it made) to DIR
#   --mpirun-arg ARG extra argument for mpirun (repeatable), e.g. --mpirun-arg=--tag-output
#   -x VAR[=VALUE]   export VAR to the ranks (repeatable; as mpirun -x)
# Needs: root, iproute2 (ip, tc), Open MPI's mpirun.
set -euo pipefail

ranks=3
per_host=1
spin=0
rate=1gbit
delay=""
egress_only=0
queue_ms=50
subnet=10.77.0
mtu=1500
keep_log=""
extra_mpirun=()
extra_env=()
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --ranks) ranks=$2; shift 2 ;;
    --per-host) per_host=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --delay) delay=$2; shift 2 ;;
    --egress-only) egress_only=1; shift ;;
    --queue-ms) queue_ms=$2; shift 2 ;;
    --subnet) subnet=$2; shift 2 ;;
    --mtu) mtu=$2; shift 2 ;;
    --keep-log) keep_log=$2; shift 2 ;;
    --mpirun-arg) extra_mpirun+=("$2"); shift 2 ;;
    --mpirun-arg=*) extra_mpirun+=("${1#--mpirun-arg=}"); shift ;;
    -x) extra_env+=(-x "$2"); shift 2 ;;
    --spin) spin=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "netlab: unknown option $1 (the command goes after --)" >&2; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "netlab: no command given (usage: netlab.sh [options] -- command ...)" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "netlab: needs root (network namespaces, tc)" >&2; exit 1; }
for tool in ip tc mpirun flock; do
  command -v "$tool" >/dev/null || { echo "netlab: $tool not found" >&2; exit 1; }
done
[[ "$ranks" =~ ^[0-9]+$ ]] && [ "$ranks" -ge 1 ] && [ "$ranks" -le 250 ] \
  || { echo "netlab: --ranks 1..250" >&2; exit 2; }
[[ "$per_host" =~ ^[0-9]+$ ]] && [ "$per_host" -ge 1 ] && [ $(( ranks % per_host )) -eq 0 ] \
  || { echo "netlab: --per-host must divide --ranks" >&2; exit 2; }
hosts=$(( ranks / per_host ))
[[ "$subnet" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || { echo "netlab: --subnet wants A.B.C" >&2; exit 2; }
cidr="$subnet.0/24"
hnp_ip="$subnet.254"

# Rate in bytes/s, for the tbf burst (tc itself accepts the string as given).
rate_bytes_per_s() {
  local r=${1,,} num unit
  [[ "$r" =~ ^([0-9]+(\.[0-9]+)?)([a-z]*)$ ]] || return 1
  num=${BASH_REMATCH[1]}; unit=${BASH_REMATCH[3]}
  case "$unit" in
    bit|"") awk -v n="$num" 'BEGIN{printf "%d", n/8}' ;;
    kbit) awk -v n="$num" 'BEGIN{printf "%d", n*1000/8}' ;;
    mbit) awk -v n="$num" 'BEGIN{printf "%d", n*1000000/8}' ;;
    gbit) awk -v n="$num" 'BEGIN{printf "%d", n*1000000000/8}' ;;
    tbit) awk -v n="$num" 'BEGIN{printf "%d", n*1000000000000/8}' ;;
    bps) awk -v n="$num" 'BEGIN{printf "%d", n}' ;;
    kbps) awk -v n="$num" 'BEGIN{printf "%d", n*1000}' ;;
    mbps) awk -v n="$num" 'BEGIN{printf "%d", n*1000000}' ;;
    gbps) awk -v n="$num" 'BEGIN{printf "%d", n*1000000000}' ;;
    *) return 1 ;;
  esac
}
if [ "$rate" != none ]; then
  bps=$(rate_bytes_per_s "$rate") \
    || { echo "netlab: cannot parse --rate $rate (e.g. 100mbit, 1gbit, none)" >&2; exit 2; }
  # burst: 1 ms of traffic, at least 64 KiB (one GSO super-packet; smaller bursts make tbf segment them)
  burst=$(( bps / 1000 )); [ "$burst" -ge 65536 ] || burst=65536
fi

ns_name() { echo "hq$1"; }
ns_ip() { echo "$subnet.$(( $1 + 1 ))"; }

# ------------------------------------------------------------------ teardown (also of stale runs)
lab_pids() {   # processes living in our namespaces
  local ns
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^hq[0-9]+$' || true); do
    ip netns pids "$ns" 2>/dev/null || true
  done
}
teardown_lab() {
  local pids ns
  pids=$(lab_pids)
  if [ -n "$pids" ]; then
    kill -TERM $pids 2>/dev/null || true
    sleep 1
    pids=$(lab_pids)
    [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
  fi
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^hq[0-9]+$' || true); do
    ip netns del "$ns" 2>/dev/null || true
  done
  ip link del hqbr 2>/dev/null || true
  for l in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E '^hqv[0-9]+$' || true); do
    ip link del "$l" 2>/dev/null || true
  done
}

workdir=""
mpirun_pid=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$mpirun_pid" ] && kill -0 "$mpirun_pid" 2>/dev/null; then
    kill -TERM "$mpirun_pid" 2>/dev/null || true
    for _ in 1 2 3 4 5; do kill -0 "$mpirun_pid" 2>/dev/null || break; sleep 1; done
    kill -KILL "$mpirun_pid" 2>/dev/null || true
  fi
  teardown_lab
  if [ -n "$workdir" ]; then
    if [ -n "$keep_log" ]; then mkdir -p "$keep_log" && cp -f "$workdir"/* "$keep_log"/ 2>/dev/null || true; fi
    rm -rf "$workdir"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "netlab: command failed (line $LINENO): $BASH_COMMAND" >&2' ERR
trap 'exit 130' INT
trap 'exit 143' TERM

# One netlab at a time on this machine (a second one would tear down the first one's namespaces).
exec 9>/run/hvd_qadam_netlab.lock
flock -w 900 9 || { echo "netlab: another netlab holds the lock for 15 minutes; giving up" >&2; exit 1; }
if ip netns list 2>/dev/null | awk '{print $1}' | grep -qE '^hq[0-9]+$' || ip link show hqbr >/dev/null 2>&1; then
  echo "netlab: removing stale namespaces/links of an earlier run" >&2
fi
teardown_lab

# ------------------------------------------------------------------ build the lab
workdir=$(mktemp -d "${TMPDIR:-/tmp}/hq-netlab.XXXXXX")
ip link add hqbr type bridge
ip link set hqbr mtu "$mtu" 2>/dev/null || true
ip addr add "$hnp_ip/24" dev hqbr
ip link set hqbr up

shape() {   # shape <netns or ""> <dev> <with delay: 0/1>
  local nsx=() dev=$2 with_delay=$3
  [ -n "$1" ] && nsx=(ip netns exec "$1")
  if [ "$with_delay" = 1 ] && [ -n "$delay" ]; then
    if ! "${nsx[@]}" tc qdisc add dev "$dev" root handle 1: netem delay "$delay" limit 100000 2>"$workdir/tc.err"; then
      echo "netlab: tc netem failed ($(cat "$workdir/tc.err")); this kernel may lack sch_netem;" \
        "run without --delay" >&2
      exit 1
    fi
    if [ "$rate" != none ]; then
      "${nsx[@]}" tc qdisc add dev "$dev" parent 1:1 handle 10: tbf rate "$rate" burst "$burst" latency "${queue_ms}ms"
    fi
  elif [ "$rate" != none ]; then
    "${nsx[@]}" tc qdisc add dev "$dev" root handle 1: tbf rate "$rate" burst "$burst" latency "${queue_ms}ms"
  fi
}

agent="$workdir/rsh_agent.sh"
hostfile="$workdir/hostfile"
: >"$hostfile"
{
  echo '#!/bin/sh'
  echo '# netlab rsh agent for Open MPI: <agent> [options] <host> <command...>: runs the command'
  echo '# in the network namespace that stands for <host>'
  echo 'while [ $# -gt 0 ]; do case "$1" in -*) shift ;; *) break ;; esac; done'
  echo 'host=$1; shift'
  echo 'case "$host" in'
} >"$agent"
for ((i = 0; i < hosts; i++)); do
  ns=$(ns_name "$i"); ip_=$(ns_ip "$i")
  ip netns add "$ns"
  ip link add "hqv$i" type veth peer name "hqv${i}p"
  ip link set "hqv${i}p" netns "$ns"
  ip -n "$ns" link set "hqv${i}p" name eth0
  ip -n "$ns" link set eth0 mtu "$mtu"
  ip -n "$ns" addr add "$ip_/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
  ip link set "hqv$i" mtu "$mtu"
  ip link set "hqv$i" master hqbr
  ip link set "hqv$i" up
  shape "$ns" eth0 1                              # the host's uplink (its sends)
  [ "$egress_only" = 1 ] || shape "" "hqv$i" 0    # its downlink (what it receives)
  echo "$ip_ slots=$per_host" >>"$hostfile"
  echo "  $ip_) ns=$ns ;;" >>"$agent"
done
{
  echo '  *) echo "netlab agent: unknown host $host" >&2; exit 255 ;;'
  echo 'esac'
  echo "echo \"\$(date +%s.%N) \$host -> \$ns: \$*\" >>\"$workdir/agent.log\""
  echo 'exec ip netns exec "$ns" /bin/sh -c "$*"'
} >>"$agent"
chmod +x "$agent"

# Fail early if the namespaces cannot reach each other or the HNP.
if command -v ping >/dev/null; then
  for ((i = 0; i < hosts; i++)); do
    ip netns exec "$(ns_name "$i")" ping -c 1 -W 2 "$hnp_ip" >/dev/null \
      || { echo "netlab: $(ns_name "$i") cannot reach $hnp_ip" >&2; exit 1; }
  done
fi

shaping="rate $rate"
[ "$rate" = none ] || shaping+=" per direction"
if [ "$egress_only" = 1 ]; then shaping+=" (egress only)"; fi
echo "netlab: $ranks ranks on $hosts hosts hq0..hq$((hosts - 1)) ($per_host per host) on $cidr, $shaping${delay:+, one-way delay $delay}" >&2

export HQ_NETLAB_RATE="$rate" HQ_NETLAB_DELAY="${delay:-0}" HQ_NETLAB_RANKS="$ranks" HQ_NETLAB_PER_HOST="$per_host"
# numba's on-disk kernel cache that scripts/install.sh fills (else every rank compiles for minutes)
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-${HVD_QADAM_CACHE:-$HOME/.cache/hvd_qadam}/numba}"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMBA_NUM_THREADS=1 HVD_QADAM_THREADS=1 OPENBLAS_NUM_THREADS=1
env_args=(-x OMP_NUM_THREADS -x MKL_NUM_THREADS -x NUMBA_NUM_THREADS -x HVD_QADAM_THREADS -x OPENBLAS_NUM_THREADS
          -x HQ_NETLAB_RATE -x HQ_NETLAB_DELAY -x HQ_NETLAB_RANKS -x HQ_NETLAB_PER_HOST -x PATH -x NUMBA_CACHE_DIR)
# Ranks of one host talk TCP to the host's own address, which the kernel carries over the
# namespace's loopback: unshaped, the fast links inside a node. (Open MPI's shared-memory btl,
# vader, crashes in MPI_Comm_dup across these namespaces.)
btls=tcp,self
# More ranks than cores (the namespaces share this machine's cores, which Open MPI cannot see:
# each namespace is a node with its own slots): tell MPI, as it would tell itself on one
# oversubscribed node, to yield the core while it polls for a message. Busy-polling ranks
# otherwise take the cores from the ranks that still compute, encode or decode, and every
# collective waits for those: measured, 8 ranks as 4 hosts x 2 at 100 Mbit/s, Horovod fp16 1.87 s
# -> 1.16 s per step, hvd_qadam compressed 4.0-4.6 s -> 1.9 s. A cluster gives each rank its
# own core, where polling costs nothing; --spin keeps Open MPI's default here.
# (getconf, not nproc: nproc counts OMP_NUM_THREADS, exported as 1 above)
cores=$(getconf _NPROCESSORS_ONLN)
if [ "$spin" = 0 ] && [ "$ranks" -gt "$cores" ]; then
  extra_mpirun+=(--mca mpi_yield_when_idle 1)
  echo "netlab: $ranks ranks on $cores cores: mpi_yield_when_idle=1 (--spin to keep busy-polling)" >&2
fi
for v in PYTHONPATH PYTHONUNBUFFERED HVD_QADAM_CACHE HVD_QADAM_EXCHANGE VIRTUAL_ENV; do
  [ -z "${!v:-}" ] || env_args+=(-x "$v")
done
while read -r v; do env_args+=(-x "$v"); done < <(env | sed -n 's/^\(HOROVOD_[A-Za-z0-9_]*\)=.*/\1/p')

mpirun --allow-run-as-root --oversubscribe -np "$ranks" --hostfile "$hostfile" \
  --mca plm_rsh_agent "$agent" --mca plm_rsh_no_tree_spawn 1 --mca routed direct \
  --mca pml ob1 --mca btl "$btls" --mca osc '^ucx' \
  --mca btl_tcp_if_include "$cidr" --mca oob_tcp_if_include "$cidr" \
  --bind-to none "${env_args[@]}" "${extra_env[@]}" "${extra_mpirun[@]}" "$@" &
mpirun_pid=$!
set +e
trap - ERR
wait "$mpirun_pid"
rc=$?
set -e
mpirun_pid=""
launches=$(grep -c . "$workdir/agent.log" 2>/dev/null || echo 0)
echo "netlab: mpirun exited with $rc; the rsh agent launched $launches daemon(s) via ip netns exec" >&2
exit "$rc"
