"""Atomic, code-free checkpoints: crash-safe writes, refusal of pickled code, RNG round trips."""

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from iddpm import checkpoint as ck


class _Evil:
    """Unpickling this would create ``marker``: what a malicious checkpoint would do (run code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_atomic_save_round_trip(tmp_path):
    state = {"step": 3, "w": torch.arange(5.0), "cfg": {"lr": 1e-4, "rates": (0.9999,)}, "none": None}
    ck.atomic_save(state, tmp_path / "a.pt")
    back = ck.safe_load(tmp_path / "a.pt")
    assert back["step"] == 3 and back["cfg"]["lr"] == 1e-4 and back["none"] is None
    torch.testing.assert_close(back["w"], state["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temp file left


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    ck.atomic_save({"step": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def crash_mid_write(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(10)  # a partial file on disk, then the "crash"
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        ck.atomic_save({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert ck.safe_load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]


def test_interrupt_during_train_checkpoint_keeps_latest(tmp_path, monkeypatch):
    ck.save_train_checkpoint({"step": 5}, tmp_path, 5)
    monkeypatch.setattr(ck.torch, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        ck.save_train_checkpoint({"step": 6}, tmp_path, 6)
    monkeypatch.undo()
    assert ck.safe_load(tmp_path / ck.LATEST)["step"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_0000005.pt", "latest.pt"]


def test_train_checkpoint_files_and_latest(tmp_path):
    ck.save_train_checkpoint({"step": 1}, tmp_path, 1)
    ck.save_train_checkpoint({"step": 2}, tmp_path, 2)
    assert ck.safe_load(ck.find_resume(tmp_path))["step"] == 2
    assert ck.safe_load(ck.checkpoint_path(tmp_path, 1))["step"] == 1
    assert ck.find_resume(tmp_path / "nothing") is None


def test_malicious_checkpoint_does_not_execute(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pt"
    torch.save({"model": {}, "payload": _Evil(marker)}, bad)
    with pytest.raises(ck.CheckpointError, match="weights_only"):
        ck.safe_load(bad)
    assert not marker.exists()
    # The same bytes through an unrestricted unpickler do run the payload: the test above can fail.
    torch.load(bad, weights_only=False)
    assert marker.exists()


def test_raw_pickle_and_garbage_are_refused(tmp_path):
    marker = tmp_path / "pwned2"
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    with pytest.raises(ck.CheckpointError):
        ck.safe_load(raw)
    assert not marker.exists()
    junk = tmp_path / "junk.pt"
    rng = random.Random(0)
    for n in (1, 10, 64, 1000):  # truncated / random files fail in many different ways; all become one error
        junk.write_bytes(rng.randbytes(n))
        with pytest.raises(ck.CheckpointError):
            ck.safe_load(junk)
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(100)}, good)
    junk.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ck.CheckpointError):
        ck.safe_load(junk)
    with pytest.raises(FileNotFoundError):
        ck.safe_load(tmp_path / "missing.pt")
    lst = tmp_path / "list.pt"
    torch.save([1, 2], lst)
    with pytest.raises(ck.CheckpointError, match="expected a dict"):
        ck.safe_load(lst)


def test_rng_state_round_trip_through_a_file(tmp_path):
    g = torch.Generator().manual_seed(7)
    state = ck.rng_state({"g": g})
    ck.atomic_save({"rng": state}, tmp_path / "r.pt")
    first = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=g))  # noqa: NPY002
    ck.set_rng_state(ck.safe_load(tmp_path / "r.pt")["rng"], {"g": g})
    second = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=g))  # noqa: NPY002
    torch.testing.assert_close(first[0], second[0], rtol=0, atol=0)
    np.testing.assert_array_equal(first[1], second[1])
    assert first[2] == second[2]
    torch.testing.assert_close(first[3], second[3], rtol=0, atol=0)


def test_config_check_names_the_fields():
    saved = {"lr": 1e-4, "steps": 10, "ema_rates": [0.9999], "preset": "tiny"}
    now = {"lr": 2e-4, "steps": 20, "ema_rates": (0.9999,), "preset": "digits8"}
    assert ck.config_diff(saved, now, ignore={"steps"}) == ["lr", "preset"]
    with pytest.raises(ck.CheckpointError, match=r"\['lr', 'preset'\]"):
        ck.check_config(saved, now, ignore={"steps"})
    ck.check_config(saved, dict(saved, steps=99), ignore={"steps"})  # harmless difference only


def test_keep_last_needs_no_room_for_an_extra_checkpoint(tmp_path, monkeypatch):
    real = ck.atomic_save
    on_disk = []  # checkpoints already on disk when each new one starts to be written

    def counting(obj, path):
        if Path(path).name.startswith("ckpt_"):
            on_disk.append(len(list(tmp_path.glob("ckpt_*.pt"))))
        return real(obj, path)

    monkeypatch.setattr(ck, "atomic_save", counting)
    for step in range(1, 6):
        ck.save_train_checkpoint({"step": step}, tmp_path, step, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.pt")) == ["ckpt_0000004.pt", "ckpt_0000005.pt"]
    assert ck.safe_load(tmp_path / ck.LATEST)["step"] == 5
    # The old code wrote the new checkpoint next to keep_last old ones (peak keep_last + 1) and then pruned.
    assert max(on_disk) == 1  # so at most keep_last = 2 on disk, the one being written included

    # A failed write still leaves the last good checkpoint (the one latest.pt points to) to resume from.
    def failing(obj, path):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "atomic_save", failing)
    with pytest.raises(OSError, match="disk full"):
        ck.save_train_checkpoint({"step": 6}, tmp_path, 6, keep_last=1)
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.pt")) == ["ckpt_0000005.pt"]
    assert ck.safe_load(tmp_path / ck.LATEST)["step"] == 5
    monkeypatch.setattr(ck, "atomic_save", real)
    with pytest.raises(ValueError, match="keep_last"):
        ck.save_train_checkpoint({"step": 7}, tmp_path, 7, keep_last=-1)


def test_prune_never_deletes_what_latest_points_to(tmp_path):
    for step in range(1, 5):
        ck.atomic_save({"step": step}, ck.checkpoint_path(tmp_path, step))
    import os

    os.link(ck.checkpoint_path(tmp_path, 1), tmp_path / ck.LATEST)  # latest -> the OLDEST one
    deleted = ck.prune_checkpoints(tmp_path, 1)
    assert sorted(p.name for p in deleted) == ["ckpt_0000002.pt", "ckpt_0000003.pt"]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == [
        "ckpt_0000001.pt",
        "ckpt_0000004.pt",
        "latest.pt",
    ]


def test_non_checkpoint_gets_our_message_not_torchs_advice(tmp_path):
    png = tmp_path / "demo.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    with pytest.raises(ck.CheckpointError) as err:
        ck.safe_load(png)
    msg = str(err.value)
    assert "not a valid iddpm checkpoint" in msg and "weights_only=True" in msg
    assert "Re-running" not in msg and "set to `False`" not in msg and "False will likely" not in msg


@pytest.mark.parametrize(
    "failure",
    [
        OSError(28, "No space left on device"),  # errno.ENOSPC
        RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4160 vs 4054"),
    ],
)
def test_full_disk_says_so_and_leaves_nothing_behind(tmp_path, monkeypatch, failure):
    ck.save_train_checkpoint({"step": 1}, tmp_path, 1)

    def full(obj, f):
        f.write(b"partial")
        raise failure

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(ck.CheckpointError, match=r"ckpt_0000002\.pt: no space left.*MiB free") as err:
        ck.save_train_checkpoint({"step": 2}, tmp_path, 2)
    assert "inline_container" not in str(err.value) and "--resume auto" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_0000001.pt", "latest.pt"]  # no *.tmp
    # Other errors pass through unchanged.
    monkeypatch.setattr(torch, "save", lambda obj, f: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="^boom$"):
        ck.atomic_save({}, tmp_path / "x.pt")
