#!/usr/bin/env bash
# A throw-away single-node SLURM cluster for featshard's SLURM tests (root, no systemd).
#
#   bash .ci/slurm.sh up      install (if missing) + start munged, slurmctld, slurmd; wait until the node is idle
#   bash .ci/slurm.sh down    cancel jobs, stop the daemons we started (by PID), remove the state dir
#   bash .ci/slurm.sh status  print whether the cluster is up
#
# Everything (config, state, spool, logs, pid files, fake GPU device nodes) lives under $FEATSHARD_SLURM_STATE
# (default /tmp/featshard-slurm). `up` prints the environment clients need and writes it to $STATE/env.sh:
#   source /tmp/featshard-slurm/env.sh && sinfo
# The node advertises 4 fake GPUs (gres File= entries are character devices made with mknod) so jobs asking for
# --gres=gpu:N get CUDA_VISIBLE_DEVICES; there is no CUDA behind them.
set -euo pipefail

STATE="${FEATSHARD_SLURM_STATE:-/tmp/featshard-slurm}"
CONF="$STATE/slurm.conf"
NODE="$(hostname -s)"
CPUS="${FEATSHARD_SLURM_CPUS:-16}"
GPUS=4
CTLD_PORT="${FEATSHARD_SLURMCTLD_PORT:-6817}"
SLURMD_PORT="${FEATSHARD_SLURMD_PORT:-6818}"

say() { echo "slurm.sh: $*" >&2; }
die() { say "error: $*"; exit 1; }

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

node_state() { SLURM_CONF="$CONF" sinfo -h -N -n "$NODE" -o %t 2>/dev/null | head -n1 || true; }

install_packages() {
    local missing=""
    for cmd in slurmctld slurmd sbatch munged; do
        command -v "$cmd" >/dev/null 2>&1 || missing=1
    done
    [ -z "$missing" ] && return 0
    [ "$(id -u)" = 0 ] || die "SLURM is not installed and installing it needs root"
    local pkgs=(slurmctld slurmd slurm-client munge)
    say "installing ${pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "${pkgs[@]}" >"$STATE/apt.log" 2>&1; then
        apt-get update >>"$STATE/apt.log" 2>&1 || true
        apt-get install -y --no-install-recommends "${pkgs[@]}" >>"$STATE/apt.log" 2>&1 \
            || die "apt-get install failed; see $STATE/apt.log"
    fi
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0  # a munged is already answering (ours or the machine's)
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        install -d -o munge -g munge -m 0700 /etc/munge
        if command -v mungekey >/dev/null 2>&1; then
            runuser -u munge -- mungekey -c -k /etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        fi
        chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    for _ in $(seq 50); do
        if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
            cp /run/munge/munged.pid "$STATE/munged.pid"  # we started it, so `down` stops it
            return 0
        fi
        sleep 0.1
    done
    die "munged did not start"
}

make_gpu_devices() {
    # gres.conf File= must name character devices or the node goes INVAL; without CAP_MKNOD fall back to
    # existing character devices (slurmd only stats them; there is no CUDA behind them either way).
    local fallback=(/dev/null /dev/zero /dev/full /dev/random) i
    mkdir -p "$STATE/dev"
    : >"$STATE/gres.conf"
    echo "AutoDetect=off" >>"$STATE/gres.conf"
    for i in $(seq 0 $((GPUS - 1))); do
        local dev="$STATE/dev/nvidia$i"
        [ -c "$dev" ] || mknod "$dev" c 195 "$i" 2>/dev/null || dev="${fallback[$i]}"
        echo "NodeName=$NODE Name=gpu File=$dev" >>"$STATE/gres.conf"
    done
}

write_config() {
    local mem
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    mkdir -p "$STATE/ctld" "$STATE/slurmd" "$STATE/log"
    cat >"$CONF" <<EOF
# written by featshard .ci/slurm.sh: a single-node test cluster
ClusterName=featshard
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=1,bf_interval=1
DependencyParameters=kill_invalid_depend
SlurmdParameters=config_overrides
ReturnToService=2
InactiveLimit=0
KillWait=10
MinJobAge=300
Waittime=0
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$CPUS RealMemory=$mem Gres=gpu:$GPUS State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    make_gpu_devices
}

start_daemon() {  # name, pid file, command...
    local name=$1 pidfile=$2
    shift 2
    setsid "$@" </dev/null >>"$STATE/log/$name.stdout" 2>&1 &
    echo $! >"$pidfile"
}

wait_idle() {
    local state=""
    for _ in $(seq 300); do
        state=$(node_state)
        case "$state" in
            idle*) return 0 ;;
            down* | drain* | inval* | unk*) [ -z "$state" ] || SLURM_CONF="$CONF" scontrol update \
                nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.1
    done
    die "node $NODE is '${state:-not reported}' after 30 s; see $STATE/log/"
}

write_env() {
    cat >"$STATE/env.sh" <<EOF
export SLURM_CONF=$CONF
export FEATSHARD_SLURM_STATE=$STATE
EOF
    cat "$STATE/env.sh"
}

up() {
    mkdir -p "$STATE"
    if alive "$STATE/slurmctld.pid.ours" && alive "$STATE/slurmd.pid.ours" && [[ "$(node_state)" == idle* || \
          "$(node_state)" == mix* || "$(node_state)" == alloc* ]]; then
        say "already up (state dir $STATE)"
        write_env
        return 0
    fi
    [ "$(id -u)" = 0 ] || die "starting SLURM needs root"
    stop_daemons
    install_packages
    start_munge
    write_config
    start_daemon slurmctld "$STATE/slurmctld.pid.ours" slurmctld -D -c -f "$CONF"
    for _ in $(seq 100); do
        SLURM_CONF="$CONF" scontrol ping 2>/dev/null | grep -q UP && break
        alive "$STATE/slurmctld.pid.ours" || die "slurmctld exited; see $STATE/log/slurmctld.log"
        sleep 0.1
    done
    start_daemon slurmd "$STATE/slurmd.pid.ours" slurmd -D -f "$CONF" -N "$NODE"
    wait_idle
    say "up: node $NODE idle, $CPUS CPUs, gpu:$GPUS (fake), state dir $STATE"
    write_env
}

stop_pids() {  # pid files: TERM them all at once, wait up to 10 s, then KILL what is left
    local pidfile pid pids=() left
    for pidfile in "$@"; do
        if alive "$pidfile"; then pids+=("$(cat "$pidfile")"); fi
    done
    [ ${#pids[@]} -gt 0 ] && kill -TERM "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 100); do
        left=()
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left+=("$pid"); done
        pids=("${left[@]}")
        [ ${#pids[@]} -eq 0 ] && break
        sleep 0.1
    done
    [ ${#pids[@]} -gt 0 ] && kill -KILL "${pids[@]}" 2>/dev/null || true
    rm -f "$@"
}

stop_daemons() {
    if alive "$STATE/slurmctld.pid.ours"; then
        SLURM_CONF="$CONF" timeout 10 scancel --user="$(id -un)" >/dev/null 2>&1 || true
    fi
    stop_pids "$STATE/slurmd.pid.ours" "$STATE/slurmctld.pid.ours"
}

down() {
    [ -d "$STATE" ] || { say "nothing to stop ($STATE does not exist)"; return 0; }
    stop_daemons
    stop_pids "$STATE/munged.pid"
    rm -rf "$STATE"
    say "down"
}

status() {
    if alive "$STATE/slurmctld.pid.ours" && alive "$STATE/slurmd.pid.ours"; then
        echo "up: node $NODE $(node_state) (SLURM_CONF=$CONF)"
    else
        echo "down"
        return 1
    fi
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: bash $0 up|down|status   (state dir: \$FEATSHARD_SLURM_STATE, default /tmp/featshard-slurm)" >&2; exit 2 ;;
esac
