#!/usr/bin/env bash
# GPU check for ONNX Runtime's CUDA execution provider, one command on a machine with an NVIDIA
# GPU (≈ 5 minutes):
#
#   cargo xtask fetch-ort --gpu && scripts/gpu-check.sh
#
# 1. builds gradalign with `--features cuda` (or uses $GRADALIGN_BIN, e.g. a binary built elsewhere);
# 2. parity: per-sample gradients and scores of every NB201 fixture on CUDA vs ORT-CPU
#    (per-layer max|Δ|/max|g|, score relative difference);
# 3. throughput: $ARCHS (default 200) seeded NB201 architectures exported by PyTorch
#    (tests/golden/export_archs.py; the fixtures repeated when torch cannot export), scored with
#    `gradalign rank --device "$DEV"` — architectures per second, next to ORT-CPU on the first 20.
# Needs: libonnxruntime.so from onnxruntime-gpu (ORT_DYLIB_PATH or `cargo xtask fetch-ort --gpu`)
# with libonnxruntime_providers_{shared,cuda}.so beside it, and CUDA 13 + cuDNN 9 (the NVIDIA pip
# packages are found automatically), python3 with numpy.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${GRADALIGN_BIN:-}
if [ -z "$BIN" ]; then
  cargo build --release --features cuda
  BIN=target/release/gradalign
fi
OUT=${GPU_CHECK_OUT:-target/gpu-check}
ARCHS=${ARCHS:-200}
DEV=${GPU_CHECK_DEVICE:-cuda}  # cpu: dry-run the script without a GPU
mkdir -p "$OUT"
# CUDA / cuDNN libraries shipped as NVIDIA pip packages (torch's dependencies) when present.
NV=$(python3 -c 'import glob,os,site,sys
dirs=set()
for sp in site.getsitepackages()+[site.getusersitepackages()]:
    for f in glob.glob(os.path.join(sp,"nvidia","**","lib*.so*"),recursive=True): dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))' 2>/dev/null || true)
export LD_LIBRARY_PATH="${NV}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
echo "== parity: CUDA vs ORT-CPU, NB201 fixtures, N=64, f32"
status=0
for m in models/nb201_*.onnx; do
  name=$(basename "$m" .onnx)
  "$BIN" grads "$m" --backend ort --device cpu --out "$OUT/cpu.npy" --layout "$OUT/layout.json" 2>"$OUT/cpu.log"
  "$BIN" grads "$m" --backend ort --device "$DEV" --out "$OUT/gpu.npy" 2>"$OUT/gpu.log"
  tail -1 "$OUT/gpu.log"
  echo -n "$name grads: "
  python3 tests/golden/compare_grads.py "$OUT/cpu.npy" "$OUT/gpu.npy" "$OUT/layout.json" --tol 1e-4 || status=1
  "$BIN" score "$m" --backend ort --device cpu --format json --scorer gradalign-i,gradalign-ii,gradsign,grad_norm,snip > "$OUT/s_cpu.json" 2>/dev/null
  "$BIN" score "$m" --backend ort --device "$DEV" --format json --scorer gradalign-i,gradalign-ii,gradsign,grad_norm,snip > "$OUT/s_gpu.json" 2>/dev/null
  python3 - "$OUT/s_cpu.json" "$OUT/s_gpu.json" "$name" <<'PY'
import json,sys
a,b=(json.load(open(p))["scores"] for p in sys.argv[1:3])
rel={k:abs(a[k]-b[k])/max(abs(a[k]),1e-12) for k in a}
print(sys.argv[3],"scores: max rel diff %.2e"%max(rel.values()), {k:"%.1e"%v for k,v in rel.items()})
PY
done
echo "== throughput: $ARCHS NB201 architectures"
rm -rf "$OUT/archs" "$OUT"/rank-*.csv
mkdir -p "$OUT/archs"
if ! python3 tests/golden/export_archs.py --count "$ARCHS" --seed 0 --out "$OUT/archs" > "$OUT/export.log" 2>&1; then
  echo "torch export failed ($(tail -1 "$OUT/export.log")); timing the fixtures repeated instead"
  for k in $(seq 0 $((ARCHS - 1))); do
    fx=(models/nb201_*.onnx); cp "${fx[$((k % ${#fx[@]}))]}" "$OUT/archs/arch_$(printf %04d "$k").onnx"
  done
fi
S=gradalign-i,gradalign-ii,gradsign
t0=$(date +%s.%N)
"$BIN" rank "$OUT/archs" --backend ort --device "$DEV" --scorer $S --out "$OUT/rank-gpu.csv" > /dev/null
t1=$(date +%s.%N)
mkdir -p "$OUT/archs20" && cp $(ls "$OUT"/archs/*.onnx | head -20) "$OUT/archs20/"
"$BIN" rank "$OUT/archs20" --backend ort --device cpu --scorer $S --out "$OUT/rank-cpu.csv" > /dev/null
t2=$(date +%s.%N)
python3 - "$t0" "$t1" "$t2" "$ARCHS" "$OUT/rank-gpu.csv" "$OUT/rank-cpu.csv" <<'PY'
import sys,csv
t0,t1,t2=map(float,sys.argv[1:4]); n=int(sys.argv[4])
rows=list(csv.DictReader(open(sys.argv[5]))); cpu=list(csv.DictReader(open(sys.argv[6])))
errs=[r for r in rows if r["error"]]
g=sum(float(r["seconds"]) for r in rows)/len(rows); c=sum(float(r["seconds"]) for r in cpu)/len(cpu)
print(f"CUDA: {n} archs in {t1-t0:.1f}s = {n/(t1-t0):.2f} archs/s (mean {g:.3f}s per arch incl. graph build; {len(errs)} errors)")
print(f"ORT-CPU (same machine, first 20): mean {c:.3f}s per arch -> GPU speed-up {c/g:.1f}x")
gp={r["model"].split("/")[-1]:float(r["gradalign-ii"]) for r in rows if r["gradalign-ii"]}
d=[abs(gp[r["model"].split("/")[-1]]-float(r["gradalign-ii"]))/max(abs(float(r["gradalign-ii"])),1e-12) for r in cpu if r["gradalign-ii"]]
print(f"gradalign-ii CPU vs CUDA on those 20: max rel diff {max(d):.2e}")
PY
exit $status
