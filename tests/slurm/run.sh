#!/usr/bin/env bash
# The cluster-sweep test, on a real Slurm: a one-node cluster on localhost (munged, slurmctld,
# slurmd from Debian's slurm-wlm and munge, installed when missing), the job array of
# scripts/slurm/sweep.sbatch over generated NB201 models with 4 tasks, one task cancelled
# mid-run with scancel and requeued, then `gradalign merge`; every model must appear exactly
# once with the values of an uninterrupted single-machine `rank`.
#
#   bash tests/slurm/run.sh            (as root; run by .ci/run after `cargo test --release`)
#
# Needs target/release/gradalign (built by `cargo test --release`) and `cargo xtask` (or the
# prebuilt binary in GRADALIGN_XTASK).
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
count=${SLURM_TEST_MODELS:-40}
tasks=4
say() { echo "slurm-test: $*" >&2; }
fail() { say "FAILED: $*"; exit 1; }
# Without Slurm and no way to install it, the test is skipped, saying so — except in CI
# (CI=true), where a skip would hide a missing test.
skip() {
    if [[ ${CI:-} == true ]]; then fail "$* (CI=true: not skipping)"; fi
    say "SKIPPED: $*"
    exit 0
}

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    [[ $(id -u) == 0 ]] || skip "slurm-wlm and munge are not installed and installing them needs root"
    say "installing slurm-wlm and munge"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null; } \
        || skip "could not install slurm-wlm and munge with apt-get"
fi
[[ $(id -u) == 0 ]] || skip "starting munged, slurmctld and slurmd as a test cluster needs root"
bin=$repo/target/release/gradalign
[[ -x $bin ]] || cargo build --release --bin gradalign

work=$(mktemp -d /tmp/gradalign-slurm.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [[ ${KEEP:-0} == 1 ]]; then say "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# --- munge: a fresh key, the daemon as the munge user ------------------------------------------
mkdir -p "$work/munge" /run/munge
chown munge:munge "$work/munge" /run/munge
dd if=/dev/urandom of="$work/munge/munge.key" bs=1024 count=1 status=none
chown munge:munge "$work/munge/munge.key"
chmod 400 "$work/munge/munge.key"
runuser -u munge -- /usr/sbin/munged --foreground --key-file="$work/munge/munge.key" \
    --socket="$work/munge/munge.socket" --pid-file="$work/munge/munged.pid" \
    --log-file="$work/munge/munged.log" --seed-file="$work/munge/munged.seed" \
    > "$work/munge/munged.out" 2>&1 &
pids+=($!)

# --- slurm.conf for one node on localhost -----------------------------------------------------
host=$(hostname -s)
cpus=$(nproc)
mkdir -p "$work/state" "$work/spool" "$work/log"
cat > "$work/slurm.conf" <<CONF
ClusterName=gradalign-test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$work/munge/munge.socket
CredType=cred/munge
SlurmctldPort=${SLURMCTLD_PORT:-16817}
SlurmdPort=${SLURMD_PORT:-16818}
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/log/slurmctld.log
SlurmdLogFile=$work/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
JobRequeue=1
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=600
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=test Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$work/slurm.conf
slurmctld -D -i -f "$SLURM_CONF" > "$work/log/slurmctld.out" 2>&1 &
pids+=($!)
slurmd -D -f "$SLURM_CONF" > "$work/log/slurmd.out" 2>&1 &
pids+=($!)
for i in $(seq 1 60); do
    state=$(sinfo -h -N -o '%T' 2>/dev/null | head -1 || true)
    [[ $state == idle ]] && break
    sleep 1
done
[[ $state == idle ]] || { tail -20 "$work"/log/*; fail "the node did not come up idle (state '$state')"; }
say "one-node cluster up ($host, $cpus CPUs)"

# --- the models, and the uninterrupted reference run ----------------------------------------------
${GRADALIGN_XTASK:-cargo xtask} gen-nb201 --count "$count" --seed 0 --out "$work/models" 2>&1 | tail -1
flags=(--n 32 --scorer gradalign-i,gradalign-ii,gradsign,synflow)
"$bin" rank "$work/models" --out "$work/single.csv" --jobs 1 "${flags[@]}" > /dev/null 2> "$work/single.log" \
    || { cat "$work/single.log"; fail "the single-machine rank failed"; }

# --- the sweep -------------------------------------------------------------------------------
out=$work/shards
job=$(cd "$work" && GRADALIGN=$bin sbatch --parsable --array=0-$((tasks - 1)) \
    "$repo/scripts/slurm/sweep.sbatch" "$work/models" "$out" "${flags[@]}")
job=${job%%;*}
say "submitted job array $job ($tasks tasks over $count models)"

# Cancel the first task that has scored a model, while it still has models left.
victim=""
for i in $(seq 1 600); do
    for t in $(seq 0 $((tasks - 1))); do
        f=$out/shard-$t-of-$tasks.csv
        [[ -f $f ]] || continue
        rows=$(($(wc -l < "$f") - 1))
        if [[ $rows -ge 1 ]]; then victim=$t; break 2; fi
    done
    sleep 0.2
done
[[ -n $victim ]] || fail "no task wrote a row within 120 s"
scancel "${job}_$victim"
for i in $(seq 1 100); do
    st=$(squeue -h -j "${job}_$victim" -o '%T' 2>/dev/null || true)
    [[ -z $st ]] && break
    sleep 0.2
done
# Counted once the task is gone: it may have finished a model between the poll and the signal.
before=$(($(wc -l < "$out/shard-$victim-of-$tasks.csv") - 1))
expected=$(grep -h "^shard hash:$victim/$tasks:" "$work"/gradalign-sweep-*_"$victim".log | head -1 | sed 's/.*: \([0-9]*\) of.*/\1/')
say "cancelled task $victim after $before of $expected models"
[[ $before -lt $expected ]] || fail "task $victim finished before it was cancelled; the test did not interrupt it"
scontrol requeue "${job}_$victim"
# Slurm holds a requeued job for two minutes before it is eligible again; don't wait for that.
scontrol update JobId="${job}_$victim" StartTime=now
say "requeued task $victim"

# --- wait for the whole array, merge, compare -----------------------------------------------
for i in $(seq 1 1800); do
    [[ -z $(squeue -h -j "$job" 2>/dev/null) ]] && break
    sleep 1
done
[[ -z $(squeue -h -j "$job") ]] || fail "the job array did not finish in 30 min"
grep -h "shard hash:$victim/$tasks\|resuming" "$work"/gradalign-sweep-*_"$victim".log >&2 || true
grep -q "resuming: $before of" "$work"/gradalign-sweep-*_"$victim".log \
    || fail "the requeued task did not resume its CSV"
"$bin" merge "$work/merged.csv" "$out"/shard-*.csv --models "$work/models" > /dev/null \
    || fail "merge failed or reported missing models"
python3 - "$work/single.csv" "$work/merged.csv" <<'PY'
import csv, sys
def rows(p):
    with open(p, newline="") as f:
        r = list(csv.reader(f))
    return r[0], r[1:]
h1, single = rows(sys.argv[1])
h2, merged = rows(sys.argv[2])
assert h1 == h2, (h1, h2)
keys = [r[0] for r in merged]
assert len(keys) == len(set(keys)), "a model appears twice in the merged file"
a = {r[0]: r for r in single}
b = {r[0]: r for r in merged}
assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
worst = 0.0
for k in a:
    for name, x, y in zip(h1[1:-2], a[k][1:-2], b[k][1:-2]):
        assert (x == "") == (y == ""), (k, name, x, y)
        if x:
            x, y = float(x), float(y)
            worst = max(worst, abs(x - y) / max(abs(x), 1e-300))
    assert a[k][-2] == b[k][-2], (k, a[k][-2], b[k][-2])
# Same binary, same threads, same inputs: the values are expected to be identical.
assert worst == 0.0, f"merged values differ from the single run: max relative {worst:.3g}"
print(f"slurm-test: {len(keys)} models exactly once, scores identical to the single-machine run")
PY
say "PASSED"
