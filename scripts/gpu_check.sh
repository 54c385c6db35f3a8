#!/usr/bin/env bash
# One-shot GPU check of iddpm's speed and mixed-precision numerics (docs PERFORMANCE targets). From the repository
# root on a CUDA machine:
#
#   OUT=/some/empty/dir PYTHON=python3 bash scripts/gpu_check.sh
#
# Needs a Python with a CUDA build of torch plus numpy/einops/tqdm/scikit-learn; iddpm is used from this checkout
# (PYTHONPATH), no install needed. Stages, most important first (each logs to $OUT/<stage>.log and gets what is
# left of the time budget IDDPM_GPU_CHECK_BUDGET seconds, default 720; a stage that fails or runs out of time
# does not stop the others; the exit code is 1 if any failed):
#   env                 GPU name, driver, torch/CUDA versions (+ nvidia-smi.txt)
#   bench_compile       the paper's CIFAR-10 model (52.5 M params), L_hybrid, T=4000: training at batch 128 and
#                       100-step respaced sampling at batch 256, bf16 + channels_last + torch.compile (mode
#                       "default"), with a profile of the kernels (profile_compile.txt)
#   bench_compile_ro    the same with compile mode "reduce-overhead" (CUDA graphs; iddpm's default on a GPU)
#   curve_fp32/_bf16    the CIFAR-10 model trained for a few hundred steps on 32x32 digits, fp32 then bf16, same
#   curve_compare       seeds: loss curves compared (precision_compare.json / .png), NaN/inf checked
#   bench_eager         bf16 without compile, and bench_fp32 (fp32 eager): the ratios within this one run
#   summary             $OUT/summary.md: the tables and the ratios to the authors' measured numbers
#
# IDDPM_GPU_CHECK_TINY=1 runs every stage with tiny settings on the CPU in about a minute (tests/test_bench.py
# does this so the script keeps working without a GPU).
set -uo pipefail

OUT=${OUT:-gpu_check_out}
PY=${PYTHON:-python}
TINY=${IDDPM_GPU_CHECK_TINY:-0}
BUDGET=${IDDPM_GPU_CHECK_BUDGET:-720}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
STATUS=0
T0=$(date +%s)

stage() {  # stage NAME MAX_SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, never abort the script
  local name=$1 max=$2 t0 rc left
  shift 2
  left=$((BUDGET - ($(date +%s) - T0) - 5))
  ((left < max)) && max=$left
  if ((max < 10)); then
    echo "-- $name skipped: time budget spent" | tee -a "$OUT/stages.log"
    STATUS=1
    return
  fi
  echo "== $name (limit ${max}s): $*" | tee -a "$OUT/stages.log"
  t0=$(date +%s)
  timeout -k 5 "$max" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  [ "$rc" -eq 0 ] || STATUS=1
  echo "-- $name rc=$rc $(($(date +%s) - t0))s" | tee -a "$OUT/stages.log"
  tail -n 8 "$OUT/$name.log"
}

if [ "$TINY" = "1" ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  DEV=(--device cpu)
  BENCH=(--preset tiny --batch 4 --sample-batch 4 --steps 2 --warmup 1 --repeats 1 --sample-steps 3
         --diffusion-steps 50 --device cpu)
  COMPILE=(--no-compile)  # torch.compile on a CPU takes minutes: the tiny run checks the plumbing only
  CURVE=(--preset tiny --dataset digits8 --diffusion-steps 20 --batch-size 8 --steps 4 --log-every 1)
else
  DEV=()
  BENCH=(--preset cifar10 --batch 128 --sample-batch 256 --steps 20 --warmup 5 --repeats 3 --sample-steps 100
         --diffusion-steps 4000)
  COMPILE=(--compile)
  CURVE=(--preset cifar10 --dataset digits8 --image-size 32 --diffusion-steps 4000 --batch-size 128 --lr 1e-4
         --steps 200 --log-every 10)
fi

stage env 60 "$PY" -c "
import platform, torch
print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('gpu', p.name, f'{p.total_memory / 2**30:.1f} GiB', 'capability', torch.cuda.get_device_capability(0))
else:
    print('no CUDA device')
"
command -v nvidia-smi >/dev/null && nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1

stage bench_compile 300 "$PY" -m iddpm bench "${BENCH[@]}" --precision bf16 "${COMPILE[@]}" --compile-mode default \
  --json "$OUT/bench_compile.json" --profile "$OUT/profile_compile.txt"
stage bench_compile_ro 240 "$PY" -m iddpm bench "${BENCH[@]}" --precision bf16 "${COMPILE[@]}" \
  --compile-mode reduce-overhead --json "$OUT/bench_compile_ro.json" --profile "$OUT/profile_compile_ro.txt"

for prec in fp32 bf16; do
  stage "curve_$prec" 90 "$PY" -m iddpm train "${CURVE[@]}" ${DEV[@]+"${DEV[@]}"} --precision "$prec" --save-every 0 \
    --sample-every 0 --out-dir "$OUT/curve_$prec" --no-progress
done
stage curve_compare 60 "$PY" - "$OUT" <<'EOF'
import json, math, sys
from pathlib import Path

out = Path(sys.argv[1])
curves = {}
for prec in ("fp32", "bf16"):
    recs = [json.loads(l) for l in (out / f"curve_{prec}" / "log.jsonl").read_text().splitlines()]
    curves[prec] = {r["step"]: r for r in recs if "loss" in r}
steps = sorted(set(curves["fp32"]) & set(curves["bf16"]))
rows = []
for s in steps:
    a, b = curves["fp32"][s], curves["bf16"][s]
    rows.append({"step": s, "mse_fp32": a["mse"], "mse_bf16": b["mse"], "loss_fp32": a["loss"], "loss_bf16": b["loss"],
                 "vlb_fp32": a.get("vlb"), "vlb_bf16": b.get("vlb"),
                 "rel_diff_mse": abs(b["mse"] - a["mse"]) / abs(a["mse"])})
finite = all(math.isfinite(r[k]) for r in rows for k in ("mse_fp32", "mse_bf16", "loss_fp32", "loss_bf16"))
tail = rows[len(rows) * 2 // 3 :] or rows
mean = lambda k: sum(r[k] for r in tail) / len(tail)
res = {"points": rows, "all_finite": finite, "last_third_mean_mse_fp32": mean("mse_fp32"),
       "last_third_mean_mse_bf16": mean("mse_bf16"),
       "last_third_rel_diff": abs(mean("mse_bf16") - mean("mse_fp32")) / mean("mse_fp32"),
       "first_mse_fp32": rows[0]["mse_fp32"], "first_mse_bf16": rows[0]["mse_bf16"],
       "bf16_speedup": curves["fp32"][steps[-1]]["step_time_s"] / curves["bf16"][steps[-1]]["step_time_s"]}
(out / "precision_compare.json").write_text(json.dumps(res, indent=1) + "\n")
print(f"all finite: {finite}; mse at the first log: fp32 {res['first_mse_fp32']:.4f} bf16 {res['first_mse_bf16']:.4f}; "
      f"last-third mean mse: fp32 {res['last_third_mean_mse_fp32']:.4f}  bf16 {res['last_third_mean_mse_bf16']:.4f}"
      f"  (relative difference {res['last_third_rel_diff']:.2%}; same seeds, so t, noise and dropout match)")
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for prec in ("fp32", "bf16"):
        ax.plot(steps, [curves[prec][s]["mse"] for s in steps], label=prec)
    ax.set(xlabel="step", ylabel="mse (mean over log interval)", yscale="log", title="bf16 vs fp32 training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "precision_compare.png", dpi=120)
except ImportError:
    print("matplotlib not installed: no plot")
sys.exit(0 if finite else 1)
EOF

stage bench_eager 90 "$PY" -m iddpm bench "${BENCH[@]}" --precision bf16 --no-compile --json "$OUT/bench_eager.json"
stage bench_fp32 90 "$PY" -m iddpm bench "${BENCH[@]}" --precision fp32 --no-compile --json "$OUT/bench_fp32.json"

stage summary 30 "$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
# The authors' code on one H200 (docs PERFORMANCE.md): only comparable on the same GPU kind.
AUTHORS = {"train_img_per_s": 864.0, "sample_img_per_s": 47.8}
lines = ["# iddpm GPU check", "", "| run | precision | compile | train img/s | train ms/step | train TFLOP/s | "
         "train peak GiB | sample img/s | sample ms/eval | sample TFLOP/s | sample peak GiB |",
         "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
fmt = lambda v, f: "n/a" if v is None else format(v, f)
gpu = None
for p in sorted(out.glob("bench_*.json")):
    r = json.loads(p.read_text())
    gpu = r.get("gpu") or r["device"]
    mode = r.get("compile_mode") or "default" if r["compile"] else "off"
    lines.append(f"| {p.stem} | {r['precision']} | {mode} | {fmt(r['train_img_per_s'], ',.0f')} | "
                 f"{fmt(r['train_ms_per_step'], '.1f')} | {fmt(r['train_tflops'], '.1f')} | "
                 f"{fmt(r['train_peak_mem_gib'], '.2f')} | {fmt(r.get('sample_img_per_s'), ',.1f')} | "
                 f"{fmt(r.get('sample_ms_per_eval'), '.2f')} | {fmt(r.get('sample_tflops'), '.1f')} | "
                 f"{fmt(r.get('sample_peak_mem_gib'), '.2f')} |")
    if "H200" in str(gpu):
        lines.append(f"|   vs authors (H200) | | | x{r['train_img_per_s'] / AUTHORS['train_img_per_s']:.2f} | | | | "
                     f"x{r.get('sample_img_per_s', 0) / AUTHORS['sample_img_per_s']:.2f} | | | |")
    for part, rec in (r.get("profile") or {}).items():
        if isinstance(rec, dict) and rec.get("device_busy_frac") is not None:
            lines.append(f"|   profile: {part} | | | device busy {rec['device_busy_frac']:.0%} "
                         f"({rec['device_ms_per_call']:.1f} of {rec['wall_ms_per_call']:.1f} ms) | | | | | | | |")
lines += ["", f"GPU: {gpu}", ""]
p = out / "precision_compare.json"
if p.is_file():
    d = json.loads(p.read_text())
    d.pop("points", None)
    lines.append(f"- precision_compare: {json.dumps(d)}")
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF

echo "gpu_check finished with status $STATUS in $(($(date +%s) - T0))s; results in $OUT"
exit "$STATUS"
