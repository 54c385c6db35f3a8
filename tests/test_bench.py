"""The benchmark runs in seconds on CPU with the tiny preset, and the one-shot GPU script works end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from iddpm.bench import bench, count_params, format_table
from iddpm.cli import main

REPO = Path(__file__).resolve().parents[1]

KEYS = {
    "preset", "params", "device", "gpu", "torch", "precision", "compile", "channels_last", "batch",
    "train_ms_per_step", "train_img_per_s", "train_flops_per_step", "train_tflops", "train_peak_mem_gib",
    "fwd_flops_per_image", "sample_batch", "sample_steps", "sample_ms_per_eval", "sample_img_per_s",
    "sample_tflops", "sample_peak_mem_gib", "peak_rss_gib",
}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def test_param_counts_on_the_meta_device():
    assert count_params("cifar10") == 52_546_438  # spec §13, the authors' CIFAR-10 model
    assert count_params("imagenet64") == 121_063_942


def test_bench_cli_tiny_writes_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    argv = [
        "bench",
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--batch",
        "2",
        "--sample-batch",
        "2",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--repeats",
        "2",
        "--sample-steps",
        "2",
        "--diffusion-steps",
        "50",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    r = json.loads(out.read_text())
    assert KEYS <= set(r)
    assert r["params"] == count_params("tiny") and r["sample_steps"] == 2 and r["precision"] == "fp32"
    assert r["train_img_per_s"] > 0 and r["sample_img_per_s"] > 0 and r["train_peak_mem_gib"] is None
    # Forward + backward costs about 3 forwards (backward = 2x forward for convs and matmuls).
    assert 2.5 < r["train_flops_per_step"] / (r["fwd_flops_per_image"] * r["batch"]) < 3.5
    assert "train step" in capsys.readouterr().out


def test_bench_function_and_table_without_sampling():
    r = bench("tiny", batch=2, steps=1, warmup=0, repeats=1, sample=False, diffusion_steps=20, device="cpu")
    assert "sample_img_per_s" not in r
    assert "train step" in format_table(r) and "sample" not in format_table(r).splitlines()[-1]
    with pytest.raises(ValueError, match="batch must be a positive int"):
        bench("tiny", batch=0, device="cpu")


@pytest.mark.slow
def test_gpu_check_script_runs_tiny_on_cpu(tmp_path):
    # PYTHON: the script must use this interpreter (CI runs pytest from .venv/bin without activating it).
    env = dict(os.environ, IDDPM_GPU_CHECK_TINY="1", OUT=str(tmp_path), OMP_NUM_THREADS="1")
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    names = [
        "bench_compile.json",
        "bench_compile_ro.json",
        "bench_eager.json",
        "bench_fp32.json",
        "profile_compile.txt",
        "precision_compare.json",
        "precision_compare.png",
        "summary.md",
    ]
    for name in names:
        assert (tmp_path / name).is_file(), name
    summary = (tmp_path / "summary.md").read_text()
    assert "bench_fp32" in summary and "bench_compile_ro" in summary and "skipped" not in proc.stdout
    assert json.loads((tmp_path / "precision_compare.json").read_text())["all_finite"] is True
    assert "## training step" in (tmp_path / "profile_compile.txt").read_text()
    assert json.loads((tmp_path / "precision_compare.json").read_text())["points"]


def test_bench_profile_writes_kernel_tables_after_reporting(tmp_path):
    seen = []
    path = tmp_path / "prof" / "p.txt"
    r = bench(
        "tiny", batch=2, sample_batch=2, steps=1, warmup=0, repeats=1, sample_steps=2, diffusion_steps=20,
        device="cpu", profile=str(path), report=lambda res: seen.append(dict(res)),
    )  # fmt: skip
    # The numbers are reported before the profiler runs, so a profiler crash cannot lose them.
    assert len(seen) == 1 and "profile" not in seen[0] and seen[0]["train_img_per_s"] == r["train_img_per_s"]
    text = path.read_text()
    assert "## training step" in text and "## sampling loop (2 model calls)" in text and "aten::" in text
    assert set(r["profile"]) == {"training step", "sampling loop (2 model calls)"}
    assert r["profile"]["training step"]["wall_ms_per_call"] > 0
    assert r["profile"]["training step"]["device_busy_frac"] is None  # no CUDA kernels on a CPU
    # Auto compile is off on a CPU, and the table says so.
    assert r["compile"] is False and r["compile_mode"] is None and "compile=off" in format_table(r)


def test_bench_compile_flags_parse():
    from iddpm.cli import build_parser

    ns = build_parser().parse_args(["bench"])
    assert ns.compile is None and ns.compile_mode == "reduce-overhead" and ns.sample_compile_mode is None
    ns = build_parser().parse_args(["bench", "--no-compile", "--sample-compile-mode", "default"])
    assert ns.compile is False and ns.sample_compile_mode == "default"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--compile-mode", "fast"])
    with pytest.raises(ValueError, match="unknown compile mode"):
        bench("tiny", device="cpu", sample_compile_mode="fast")
