#!/usr/bin/env bash
# A real single-node SLURM on loopback for the test suite (no systemd needed).
#
#   tests/workflow/slurm/local-slurm.sh start  STATE_DIR [--takeover]
#   tests/workflow/slurm/local-slurm.sh stop   STATE_DIR
#   tests/workflow/slurm/local-slurm.sh status STATE_DIR
#
# start: installs Debian's slurmctld, slurmd, slurm-client and munge when they are missing (as
# root, with apt-get), then starts munged, slurmctld and `slurmd -N localhost` with everything
# (config, munge key and socket, spool, logs, PID files) under STATE_DIR, and returns once
# `sinfo` shows the node idle. The only thing outside STATE_DIR is the symlink
# /etc/slurm/slurm.conf -> STATE_DIR/etc/slurm.conf: the slurm-jobstep plugin strips every
# SLURM_* variable (SLURM_CONF too) before its inner srun, so the config must be found at the
# compiled-in path. Clients need no environment: they read that symlink.
# Idempotent: a complete, healthy instance in STATE_DIR is left running; a partial one is
# stopped and started again. An instance of another STATE_DIR that is still alive is left
# alone (exit 4) unless --takeover is given, which stops it first.
#
# stop: stops slurmd, slurmctld and munged of STATE_DIR by their PID files (TERM, then KILL
# after 10 s), after cancelling any job still queued, and removes the /etc/slurm/slurm.conf
# symlink if it points into STATE_DIR.
#
# Exit codes: 0 done; 1 failed (logs under STATE_DIR/log are printed); 2 usage;
# 3 cannot run here (not root, or SLURM missing and no apt-get); 4 another SLURM owns
# /etc/slurm/slurm.conf.
#
# Environment (all optional):
#   SLURMCTLD_PORT, SLURMD_PORT   ports (default 6817, 6818)
#   SLURM_PARTITIONS              more partitions besides the default `debug`, e.g. "cpu gpu"
#                                 (all on the one node), so that a profile's names work as is
#   SLURM_NODE_CPUS, SLURM_NODE_MEMORY_MB
#                                 declare the node bigger than this machine (slurmd's
#                                 config_overrides), so that jobs sized for a real cluster node
#                                 are accepted; they then share the real cores
#   SLURM_WAIT_IDLE_S             how long to wait for the node to become idle (default 60)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TEMPLATE="$HERE/slurm.conf.in"
SYSTEM_CONF=/etc/slurm/slurm.conf
NODE=localhost
PACKAGES=(slurmctld slurmd slurm-client munge)
COMMANDS=(slurmctld slurmd munged munge sinfo sbatch squeue scontrol scancel)
WAIT_IDLE_S=${SLURM_WAIT_IDLE_S:-60}

say() { echo "local-slurm: $*" >&2; }
die() { local code=$1; shift; say "$*"; exit "$code"; }
usage() { die 2 "usage: $0 {start|stop|status} STATE_DIR [--takeover]"; }

[[ $# -ge 2 ]] || usage
ACTION=$1
STATE=$(realpath -m -- "$2")
TAKEOVER=0
[[ ${3:-} == --takeover ]] && TAKEOVER=1
CONF="$STATE/etc/slurm.conf"
export SLURM_CONF="$CONF"

# PID files, in the order the daemons are started.
pidfile() {
    case $1 in
        munged) echo "$2/munge/munged.pid" ;;
        slurmctld) echo "$2/run/slurmctld.pid" ;;
        slurmd) echo "$2/run/slurmd.pid" ;;
    esac
}

# The PID of a daemon of a state dir: the one its PID file records, if that process is alive
# and is that daemon; else (PID file gone, e.g. a crashed test run whose temporary directory
# was deleted) the process of that name whose command line names this state dir's config or
# munge socket, which this script put there.
live_pid() {
    local name=$1 state=$2 f pid arg p
    f=$(pidfile "$name" "$state")
    if [[ -s $f ]]; then
        pid=$(tr -dc '0-9' <"$f")
        if [[ -n $pid && $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]]; then
            echo "$pid"
            return 0
        fi
    fi
    case $name in
        munged) arg="--socket=$state/munge/munge.socket" ;;
        *) arg="$state/etc/slurm.conf" ;;
    esac
    for p in /proc/[0-9]*; do
        [[ $(cat "$p/comm" 2>/dev/null) == "$name" ]] || continue
        if tr '\0' '\n' <"$p/cmdline" 2>/dev/null | grep -qxF -- "$arg"; then
            echo "${p#/proc/}"
            return 0
        fi
    done
    return 1
}

stop_daemons() {  # state_dir name...: TERM to all at once, KILL whatever is left after 10 s
    local state=$1 d pid i alive
    shift
    local -A pids=()
    for d in "$@"; do
        if pid=$(live_pid "$d" "$state"); then
            pids[$d]=$pid
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
    for ((i = 0; i < 100; i++)); do
        alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [[ $alive == 0 ]] && break
        sleep 0.1
    done
    for d in "${!pids[@]}"; do
        if kill -0 "${pids[$d]}" 2>/dev/null; then
            say "$d (${pids[$d]}) ignored TERM for 10 s; killing it"
            kill -KILL "${pids[$d]}" 2>/dev/null || true
        fi
    done
    for d in "$@"; do rm -f "$(pidfile "$d" "$state")"; done
}

stop_instance() {  # state_dir
    local state=$1 ids
    # (squeue retries for 60 s when its config file is missing: only ask with a config)
    if [[ -f $state/etc/slurm.conf ]] && live_pid slurmctld "$state" >/dev/null; then
        ids=$(SLURM_CONF="$state/etc/slurm.conf" timeout 10 squeue -h -o %i 2>/dev/null || true)
        if [[ -n $ids ]]; then
            # shellcheck disable=SC2086
            SLURM_CONF="$state/etc/slurm.conf" timeout 10 scancel $ids 2>/dev/null || true
            sleep 1
        fi
    fi
    stop_daemons "$state" slurmd slurmctld
    stop_daemons "$state" munged
    if [[ -L $SYSTEM_CONF && $(readlink "$SYSTEM_CONF") == "$state/etc/slurm.conf" ]]; then
        rm -f "$SYSTEM_CONF"
    fi
}

node_state() {
    [[ -f $CONF ]] || return 0
    timeout 10 sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1 || true
}

show_logs() {
    local f
    for f in "$STATE"/log/*.log; do
        [[ -f $f ]] || continue
        echo "----- $f (last 30 lines)" >&2
        tail -n 30 "$f" >&2
    done
}

STARTING=0
fail() {
    say "$*"
    show_logs
    say "FAILED: $*"
    # A failed start leaves nothing running behind it.
    [[ $STARTING == 1 ]] && stop_instance "$STATE" >/dev/null 2>&1
    exit 1
}

install_packages() {
    local missing=() c
    for c in "${COMMANDS[@]}"; do command -v "$c" >/dev/null || missing+=("$c"); done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    command -v apt-get >/dev/null ||
        die 3 "SLURM is not installed (missing: ${missing[*]}) and there is no apt-get to install it"
    say "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    # No service may start from the package scripts: the daemons are started below, by hand.
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
    fi
    local ok=0
    export DEBIAN_FRONTEND=noninteractive
    if apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >"$STATE/log/apt.log" 2>&1; then
        ok=1
    elif apt-get update -qq >>"$STATE/log/apt.log" 2>&1 &&
        apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >>"$STATE/log/apt.log" 2>&1; then
        ok=1
    fi
    [[ $made_policy == 1 ]] && rm -f "$policy"
    [[ $ok == 1 ]] || { tail -n 20 "$STATE/log/apt.log" >&2; die 1 "apt-get install ${PACKAGES[*]} failed"; }
    for c in "${COMMANDS[@]}"; do
        command -v "$c" >/dev/null || die 1 "$c is still missing after installing ${PACKAGES[*]}"
    done
}

render_config() {  # -> $CONF.new
    local hw real mem cpus mem_per_cpu params="" note extra="" p
    # The node as slurmd sees it (CPUs, boards, sockets, cores, threads), named localhost.
    hw=$(slurmd -C | head -n1) || fail "slurmd -C failed"
    cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
    hw=$(tr ' ' '\n' <<<"$hw" | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')
    hw=${hw% }
    [[ -n $cpus && -n $mem ]] || fail "cannot read CPUs/RealMemory from slurmd -C: $hw"
    real=$((mem * 9 / 10))  # a margin: slurmd drains a node that has less than configured
    note="Node as detected by slurmd -C (RealMemory 90% of it)."
    if [[ -n ${SLURM_NODE_CPUS:-} && ${SLURM_NODE_CPUS} -gt $cpus ]]; then
        cpus=$SLURM_NODE_CPUS
        hw="CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1"
        params="SlurmdParameters=config_overrides"
        note="Node declared bigger than this machine (SLURM_NODE_CPUS/SLURM_NODE_MEMORY_MB): jobs share the real cores."
    fi
    if [[ -n ${SLURM_NODE_MEMORY_MB:-} && ${SLURM_NODE_MEMORY_MB} -gt $real ]]; then
        real=$SLURM_NODE_MEMORY_MB
        params="SlurmdParameters=config_overrides"
        note="Node declared bigger than this machine (SLURM_NODE_CPUS/SLURM_NODE_MEMORY_MB): jobs share the real cores."
    fi
    mem_per_cpu=$((real / cpus))
    ((mem_per_cpu > 1000)) && mem_per_cpu=1000
    for p in ${SLURM_PARTITIONS:-}; do
        [[ $p =~ ^[A-Za-z0-9_-]+$ ]] || die 2 "bad partition name in SLURM_PARTITIONS: $p"
        [[ $p == debug ]] && continue
        extra+="PartitionName=$p Nodes=localhost Default=NO MaxTime=INFINITE State=UP\n"
    done
    sed -e "s|@STATE@|$STATE|g" \
        -e "s|@CTLD_PORT@|${SLURMCTLD_PORT:-6817}|g" \
        -e "s|@SLURMD_PORT@|${SLURMD_PORT:-6818}|g" \
        -e "s|@NODE_HARDWARE@|$hw|g" \
        -e "s|@REAL_MEMORY@|$real|g" \
        -e "s|@MEM_PER_CPU@|$mem_per_cpu|g" \
        -e "s|@NODE_SIZE_NOTE@|$note|g" \
        -e "s|@SLURMD_PARAMETERS@|$params|g" \
        -e "s|@EXTRA_PARTITIONS@|$extra|g" \
        "$TEMPLATE" >"$CONF.new"
}

claim_system_conf() {
    mkdir -p "$(dirname "$SYSTEM_CONF")"
    if [[ -e $SYSTEM_CONF || -L $SYSTEM_CONF ]]; then
        if [[ ! -L $SYSTEM_CONF ]]; then
            die 4 "$SYSTEM_CONF is a real file (a SLURM installation of this machine?); refusing to replace it"
        fi
        local target other
        target=$(readlink "$SYSTEM_CONF")
        if [[ $target != "$CONF" && $target == */etc/slurm.conf ]]; then
            other=${target%/etc/slurm.conf}
            if live_pid slurmctld "$other" >/dev/null || live_pid slurmd "$other" >/dev/null ||
                live_pid munged "$other" >/dev/null; then
                [[ $TAKEOVER == 1 ]] ||
                    die 4 "another local SLURM is running from $other (stop it with: $0 stop $other)"
                say "taking over from the SLURM of $other: stopping it"
                stop_instance "$other"
            fi
        elif [[ $target != "$CONF" ]]; then
            die 4 "$SYSTEM_CONF points to $target, which this script did not make; refusing to replace it"
        fi
    fi
    ln -sfn "$CONF" "$SYSTEM_CONF"
}

start() {
    local t0 st d deadline
    t0=$EPOCHREALTIME
    [[ $EUID -eq 0 ]] || die 3 "must run as root (starts daemons as root and links $SYSTEM_CONF)"
    [[ -f $TEMPLATE ]] || die 1 "missing $TEMPLATE"
    mkdir -p "$STATE"/{etc,munge,run,log,spool/slurmctld,spool/slurmd}
    install_packages

    render_config
    # Already running here with this very config, complete and healthy: nothing to do.
    if live_pid munged "$STATE" >/dev/null && live_pid slurmctld "$STATE" >/dev/null &&
        live_pid slurmd "$STATE" >/dev/null && [[ -L $SYSTEM_CONF ]] &&
        [[ $(readlink "$SYSTEM_CONF") == "$CONF" ]] && cmp -s "$CONF" "$CONF.new" &&
        [[ $(node_state) =~ ^(idle|mix|alloc) ]]; then
        rm -f "$CONF.new"
        say "already running from $STATE"
        return 0
    fi
    stop_instance "$STATE"  # whatever part of an earlier start is still there
    claim_system_conf
    STARTING=1
    mv "$CONF.new" "$CONF"
    : >"$STATE/etc/plugstack.conf"

    # munge: own key and socket under STATE_DIR; munged refuses a key readable by others.
    chmod 700 "$STATE/munge"
    if [[ ! -s $STATE/munge/munge.key ]]; then
        head -c 1024 /dev/urandom >"$STATE/munge/munge.key"
    fi
    chmod 400 "$STATE/munge/munge.key"
    munged --force --socket="$STATE/munge/munge.socket" --key-file="$STATE/munge/munge.key" \
        --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/log/munged.log" \
        --seed-file="$STATE/munge/munged.seed" ||
        fail "munged did not start"
    deadline=$((SECONDS + 10))
    until munge -n -S "$STATE/munge/munge.socket" 2>/dev/null |
        unmunge -S "$STATE/munge/munge.socket" >/dev/null 2>&1; do
        live_pid munged "$STATE" >/dev/null || fail "munged died"
        ((SECONDS < deadline)) || fail "munge does not answer on $STATE/munge/munge.socket"
        sleep 0.1
    done

    slurmctld -i -f "$CONF" || fail "slurmctld did not start"
    deadline=$((SECONDS + 30))
    until timeout 5 scontrol ping 2>/dev/null | grep -q ' is UP'; do
        sleep 0.3
        live_pid slurmctld "$STATE" >/dev/null || fail "slurmctld died"
        ((SECONDS < deadline)) || fail "slurmctld does not answer (scontrol ping) after 30 s"
    done
    # -N: the node is named localhost, whatever this machine's hostname is.
    slurmd -N "$NODE" -f "$CONF" || fail "slurmd did not start"

    deadline=$((SECONDS + WAIT_IDLE_S))
    while :; do
        st=$(node_state)
        case $st in
            idle*) break ;;
            drain* | down* | fail*)
                # Left drained/down by an earlier instance's saved state: give it back.
                timeout 5 scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
        esac
        for d in slurmctld slurmd; do live_pid "$d" "$STATE" >/dev/null || fail "$d died"; done
        if ((SECONDS >= deadline)); then
            sinfo -N -l >&2 || true
            fail "node $NODE not idle after ${WAIT_IDLE_S} s (state: ${st:-none})"
        fi
        sleep 0.2
    done
    say "up from $STATE in $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }') s"
}

status() {
    local d pid rc=0
    for d in munged slurmctld slurmd; do
        if pid=$(live_pid "$d" "$STATE"); then echo "$d: running ($pid)"; else echo "$d: stopped"; rc=1; fi
    done
    echo "node $NODE: $(node_state)"
    return $rc
}

case $ACTION in
    start) start ;;
    stop) stop_instance "$STATE"; say "stopped ($STATE)" ;;
    status) status ;;
    *) usage ;;
esac
