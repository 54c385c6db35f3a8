"""Atomic, code-free checkpoints.

A checkpoint is a ``dict`` of plain containers (dict/list/tuple/str/int/float/bool/None) and tensors, written
with ``torch.save`` and read back with ``torch.load(weights_only=True)`` only. ``weights_only`` refuses every
pickle global outside PyTorch's tensor allow-list, so a crafted file cannot run code when loaded (the
authors' plain ``torch.load`` of their ``.pt`` files would). No pickled classes: the config is ``asdict``.

Writes are atomic: the bytes go to a temporary file in the same directory, are flushed and ``fsync``-ed,
then ``os.replace``-d over the target, so a crash mid-write (power loss, Ctrl-C, full disk) leaves the
previous checkpoint intact. ``save_train_checkpoint`` keeps ``ckpt_{step:07d}.pt`` files (the newest
``keep_last`` of them, or all) plus ``latest.pt`` (a hard link to the newest one where the filesystem allows,
a copy otherwise).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest.pt"
FORMAT = "iddpm-train-v1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, unsafe, of another format, or from another config."""


def _fsync_dir(directory: Path) -> None:
    # Make the rename itself durable; not supported on every platform (Windows), hence the guard.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (temp file in the same dir, fsync, ``os.replace``).

    On any failure the temporary file is removed and the old ``path`` (if any) is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        clear = _write_error(path, e)
        if clear is None:
            raise
        raise clear from e
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        # BaseException: a KeyboardInterrupt mid-write must not leave a stray temp file either.
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        clear = _write_error(path, e) if isinstance(e, OSError | RuntimeError) else None
        if clear is not None:
            raise clear from e
        raise
    _fsync_dir(path.parent)
    return path


def _write_error(path: Path, e: BaseException) -> CheckpointError | None:
    """A clear :class:`CheckpointError` for a write that failed for lack of space, else None.

    ``torch.save`` reports a full disk either as ``OSError(ENOSPC)`` or, from its zip writer, as a
    ``RuntimeError`` mentioning ``inline_container.cc`` / "file write failed".
    """
    full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(e, RuntimeError):
        text = str(e)
        full = any(s in text for s in ("inline_container", "file write failed", "PytorchStreamWriter"))
    if not full:
        return None
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return CheckpointError(
        f"could not write {path}: no space left on the disk of {path.parent} ({free}; the checkpoint needs "
        "about the size of the last one). Free some space (e.g. delete old ckpt_*.pt, or lower --keep-last) "
        "and resume with --resume auto; the previous checkpoint is intact"
    )


def safe_load(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``; never executes code from the file.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is not a safe tensor/container pickle (e.g. it references arbitrary
            globals), is truncated, or is not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # garbage bytes can fail in many ways (KeyError, IndexError, struct.error, ...)
        # Our own words, not torch's: its message advises re-running with weights_only=False, which would
        # unpickle (and so may execute) whatever the file holds.
        raise CheckpointError(
            f"{path} is not a valid iddpm checkpoint: it cannot be read as a plain tensor/container file "
            "(not a checkpoint, corrupt, truncated, or it contains pickled code/objects). iddpm only loads "
            "checkpoints with torch.load(weights_only=True) and never unpickles a file freely. "
            f"Reason: {_load_error_detail(e)}"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a dict checkpoint")
    return obj


def _load_error_detail(e: BaseException) -> str:
    """A short reason for a failed ``torch.load``, minus torch's advice to retry with weights_only=False."""
    text = str(e)
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, flags=re.S)
    if m:
        detail = " ".join(m.group(1).split())
    else:
        lines = [ln for ln in text.splitlines() if ln.strip() and "weights_only" not in ln]
        detail = lines[0].strip() if lines else ""
    return f"{type(e).__name__}: {detail[:200]}" if detail else type(e).__name__


# ---------------------------------------------------------------------------------------------------------
# RNG state as plain tensors/containers (numpy's state holds an ndarray, which weights_only refuses).


def rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Capture torch CPU, CUDA (all devices), numpy and Python RNG states, plus named generators."""
    np_state = np.random.get_state()  # noqa: NPY002 (the global RNG other code may use)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_plain, np_state[2:])],
        "python": _tuple_to_list(random.getstate()),
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    return state


def set_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only if the device count matches)."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([c.cpu() for c in cuda])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np_state = (kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached))
    np.random.set_state(np_state)  # noqa: NPY002
    random.setstate(_list_to_tuple(state["python"]))
    saved = state.get("generators", {})
    for name, g in (generators or {}).items():
        if name in saved:
            g.set_state(saved[name].cpu())


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def _tuple_to_list(x: Any) -> Any:
    return [_tuple_to_list(v) for v in x] if isinstance(x, tuple | list) else x


def _list_to_tuple(x: Any) -> Any:
    return tuple(_list_to_tuple(v) for v in x) if isinstance(x, tuple | list) else x


# ---------------------------------------------------------------------------------------------------------
# Training checkpoints.


def checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    """``out_dir/ckpt_{step:07d}.pt``."""
    return Path(out_dir) / f"ckpt_{step:07d}.pt"


def save_train_checkpoint(
    state: dict[str, Any], out_dir: str | os.PathLike, step: int, keep_last: int = 0
) -> Path:
    """Write ``ckpt_{step:07d}.pt`` atomically, then point ``latest.pt`` at it (atomically too).

    ``keep_last > 0`` keeps only the newest ``keep_last`` ``ckpt_*.pt`` files (0 keeps all): the oldest are
    deleted *before* the write, down to ``keep_last - 1``, so the disk needs no room for one checkpoint more
    than ``keep_last``. Pruning never touches ``latest.pt`` or the file it points to (the last good
    checkpoint), so a failed write still leaves a checkpoint to resume from.
    """
    if not isinstance(keep_last, int) or keep_last < 0:
        raise ValueError(f"keep_last must be an int >= 0 (0 = keep all), got {keep_last!r}")
    out_dir = Path(out_dir)
    if keep_last:
        # Make room first, so the disk never holds more than keep_last checkpoints (the new one's temporary
        # file included); the checkpoint latest.pt points to survives until the new one is in place, so
        # keep_last=1 still needs room for two.
        prune_checkpoints(out_dir, keep_last - 1)
    path = atomic_save(state, checkpoint_path(out_dir, step))
    latest = out_dir / LATEST
    fd, tmp = tempfile.mkstemp(prefix=f".{LATEST}.", suffix=".tmp", dir=out_dir)
    os.close(fd)
    os.unlink(tmp)
    try:
        os.link(path, tmp)  # a hard link costs no extra disk or I/O
    except OSError:
        atomic_save(state, latest)
    else:
        try:
            os.replace(tmp, latest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(out_dir)
    if keep_last:
        prune_checkpoints(out_dir, keep_last, protect=path)
    return path


def prune_checkpoints(out_dir: str | os.PathLike, keep_last: int, protect: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep_last`` ``ckpt_*.pt`` in ``out_dir``; returns the deleted paths.

    Never deletes ``latest.pt``, the file ``latest.pt`` is a hard link of, or ``protect``.
    """
    out_dir = Path(out_dir)
    found = []
    for p in out_dir.glob("ckpt_*.pt"):
        m = re.fullmatch(r"ckpt_(\d+)\.pt", p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    found.sort()
    latest = out_dir / LATEST
    deleted = []
    for _, p in found[: max(len(found) - keep_last, 0)]:
        if protect is not None and p == Path(protect):
            continue
        with contextlib.suppress(OSError):
            if latest.exists() and os.path.samefile(p, latest):
                continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            deleted.append(p)
    return deleted


def find_resume(out_dir: str | os.PathLike) -> Path | None:
    """``out_dir/latest.pt`` if it exists (the ``--resume auto`` rule), else None."""
    p = Path(out_dir) / LATEST
    return p if p.is_file() else None


def config_diff(
    saved: Mapping[str, Any], current: Mapping[str, Any], ignore: Iterable[str] = ()
) -> list[str]:
    """Names of config fields whose values differ (tuples and lists compare equal), minus ``ignore``."""
    ignore = set(ignore)
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in ignore:
            continue
        a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
        if _tuple_to_list(a) != _tuple_to_list(b):
            out.append(key)
    return out


def check_config(saved: Mapping[str, Any], current: Mapping[str, Any], ignore: Iterable[str] = ()) -> None:
    """Raise :class:`CheckpointError` naming each differing field and both values (``ignore`` may differ)."""
    diff = config_diff(saved, current, ignore)
    if diff:
        detail = "; ".join(
            f"{k}: checkpoint={saved.get(k, '-')!r} vs now={current.get(k, '-')!r}" for k in diff
        )
        raise CheckpointError(
            f"the checkpoint was trained with a different configuration in fields {diff} ({detail}). "
            "Use the same settings to resume, or start a new out_dir."
        )
