"""Runs that never lose work: one run per folder, one writer (lock), crash leftovers, the log cut back to the
resumed checkpoint, and output paths checked before any compute (train, sample, nll)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import tiny_train_config  # tests/ is on sys.path (pytest's prepend import mode)

from iddpm import checkpoint as ck
from iddpm import rundir
from iddpm.cli import main
from iddpm.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(out_dir: Path, **kw) -> TrainConfig:
    return tiny_train_config(out_dir, **{"steps": 2, **kw})


def read_log(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


# ----------------------------------------------------------------------------------- 1. one run per folder


def test_a_fresh_run_never_overwrites_another_run(tmp_path, capsys):
    train(tiny_cfg(tmp_path))
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    with pytest.raises(rundir.RunDirError) as err:
        train(tiny_cfg(tmp_path, steps=3))
    msg = str(err.value)
    assert str(tmp_path) in msg and "--resume auto" in msg and "new --out-dir" in msg
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before  # nothing touched
    # A log alone (a run that died before its first checkpoint) also counts, and the CLI says it in one line.
    only_log = tmp_path / "b"
    only_log.mkdir()
    (only_log / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    args = ["train", "--preset", "tiny", "--dataset", "digits8", "--diffusion-steps", "20",
            "--batch-size", "4", "--steps", "1", "--out-dir", str(only_log), "--no-progress",
            "--device", "cpu"]  # fmt: skip
    assert main(args) == 2
    err_text = capsys.readouterr().err
    assert err_text.count("\n") == 1 and "already holds a training run (log.jsonl)" in err_text
    # --resume auto with nothing to resume starts that folder afresh, its log restarting at step 1.
    assert main([*args, "--resume", "auto"]) == 0
    assert [r["step"] for r in read_log(only_log) if "loss" in r] == [1]
    # Checkpoints without latest.pt are not silently replaced either.
    (tmp_path / "latest.pt").unlink()
    with pytest.raises(rundir.RunDirError, match="no latest.pt"):
        train(tiny_cfg(tmp_path), resume="auto")


# ---------------------------------------------------------------------------------------- 2. one writer


def test_second_writer_is_refused_and_stale_locks_are_taken_over(tmp_path):
    lock = rundir.RunLock(tmp_path).acquire()  # held by this (live) process
    try:
        with pytest.raises(rundir.RunDirError, match=rf"in use: process {os.getpid()} on .*lock file"):
            train(tiny_cfg(tmp_path))
        assert not list(tmp_path.glob("*.pt")) and not (tmp_path / "log.jsonl").exists()
    finally:
        lock.release()
    assert not (tmp_path / rundir.LOCK_NAME).exists()
    # A lock left by a killed process (same host, PID gone) is stale: the next run takes it over.
    import socket

    stale = {"pid": dead_pid(), "host": socket.gethostname(), "since": 0, "token": "x"}
    (tmp_path / rundir.LOCK_NAME).write_text(json.dumps(stale))
    r = train(tiny_cfg(tmp_path))
    assert r.step == 2 and not (tmp_path / rundir.LOCK_NAME).exists()  # released at the end
    # A lock from another host cannot be checked: refused.
    (tmp_path / rundir.LOCK_NAME).write_text(json.dumps({**stale, "host": "elsewhere"}))
    with pytest.raises(rundir.RunDirError, match="process .* on elsewhere"):
        train(tiny_cfg(tmp_path, steps=3), resume="auto")


# ---------------------------------------------------------------------------- 3. crash leftovers


def test_leftover_tmp_files_are_removed_at_start(tmp_path):
    train(tiny_cfg(tmp_path, save_every=1))
    # What an interrupted atomic write leaves (kill -9 between mkstemp and os.replace).
    leftovers = [".ckpt_0000003.pt.k2j3h4.tmp", ".latest.pt.abc.tmp", ".log.jsonl.x1.tmp"]
    for name in leftovers:
        (tmp_path / name).write_bytes(b"\0" * 1000)
    mine = tmp_path / ".notes.tmp"  # not ours: left alone
    mine.write_text("keep")
    train(tiny_cfg(tmp_path, steps=3), resume="auto")
    assert not [n for n in leftovers if (tmp_path / n).exists()] and mine.is_file()


# ----------------------------------------------------------------------------- 4. log matches checkpoint


def test_resume_cuts_the_log_back_to_the_checkpoint(tmp_path):
    def stop_at_3(step, out):
        if step == 3:
            raise KeyboardInterrupt

    train(tiny_cfg(tmp_path, steps=4, save_every=2), callback=stop_at_3)  # checkpoint at 2 and 3
    with open(tmp_path / "log.jsonl", "a") as f:  # as if the run had logged steps 4, 5 and died before saving
        f.write('{"step": 4, "loss": 1.0}\n{"step": 5, "loss": 1.0}\n{"step": 6, "lo')
    train(tiny_cfg(tmp_path, steps=5, save_every=2), resume=tmp_path / "ckpt_0000002.pt")
    log = read_log(tmp_path)
    steps = [r["step"] for r in log if "loss" in r]
    assert steps == [1, 2, 3, 4, 5]  # no duplicates: 3 (logged after the checkpoint at 2) was dropped
    assert [r["event"] for r in log if "event" in r] == ["resume"]  # the interrupted record (step 3) too
    assert rundir.truncate_log(tmp_path / "log.jsonl", 5) == 0


# ---------------------------------------------------------------------------- 6. fail before the work


def test_unusable_output_paths_fail_before_any_compute(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    import iddpm.data

    def no_compute(*a, **k):
        raise AssertionError("compute started before the output path was checked")

    monkeypatch.setattr(iddpm.data, "load_dataset", no_compute)
    for out_dir in (a_file, a_file / "run"):
        with pytest.raises(rundir.RunDirError, match="regular file"):
            train(tiny_cfg(out_dir))
    args = ["--preset", "tiny", "--dataset", "digits8", "--steps", "1", "--device", "cpu", "--no-progress"]
    assert main(["train", *args, "--out-dir", str(a_file / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "regular file" in err

    monkeypatch.setattr(ck, "safe_load", no_compute)  # sample/nll: before the checkpoint is even read
    for argv, what in [
        (["sample", "c.pt", "--out", str(tmp_path)], "is a folder"),
        (["sample", "c.pt", "--out", str(a_file / "s.png")], "regular file"),
        (["nll", "c.pt", "--json", str(tmp_path)], "is a folder"),
        (["nll", "c.pt", "--json", str(a_file / "n.json")], "regular file"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and what in err, (argv, err)
    # A folder that does not exist yet is created (the outputs then land there).
    assert rundir.check_output_file(tmp_path / "new" / "deeper" / "s.png").parent.is_dir()


def test_unwritable_folder_is_one_line(tmp_path, monkeypatch):
    import tempfile

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)  # tests may run as root, where chmod denies nothing
    with pytest.raises(rundir.RunDirError, match=r"cannot write into the folder .*: Permission denied"):
        rundir.prepare_out_dir(tmp_path / "run")
