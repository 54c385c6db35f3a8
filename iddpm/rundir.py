"""The run directory of :func:`iddpm.train.train`: who may write into it, and what is in it.

A run directory (``--out-dir``) holds ``config.json``, ``log.jsonl``, ``ckpt_{step:07d}.pt``, ``latest.pt``
and sample grids. The rules that keep a run from losing work:

* **One run per folder.** A fresh run (no ``--resume``) refuses a folder that already holds a run
  (:func:`check_fresh`); the ways on are ``--resume auto`` or a new ``--out-dir``.
* **One writer per folder.** :class:`RunLock` is a lock file (``.lock``: PID, host, start time) created
  atomically; a second process gets :class:`RunDirError` naming the holder. A lock whose process is gone
  (same host, PID not alive; e.g. after ``kill -9``) is stale and taken over.
* **No crash leftovers.** :func:`remove_stale_tmp` deletes the ``.NAME.*.tmp`` files of atomic writes that
  a crash interrupted (each can be a whole checkpoint in size).
* **The log matches the checkpoint.** :func:`truncate_log` drops the ``log.jsonl`` records past the step a
  run resumes from, so a resumed run's log has no duplicated steps.
* **Fail before the work.** :func:`prepare_out_dir` and :func:`check_output_file` create/check output paths
  before any compute, with a one-line :class:`RunDirError` (a ``ValueError``) instead of a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = [
    "LOCK_NAME",
    "RunDirError",
    "RunLock",
    "check_fresh",
    "check_output_file",
    "existing_run_files",
    "prepare_out_dir",
    "remove_stale_tmp",
    "truncate_log",
]

LOCK_NAME = ".lock"
# The temporary files of iddpm.checkpoint.atomic_save and of this module: ".<name>.<random>.tmp".
_TMP_RE = re.compile(r"^\.(ckpt_\d+\.pt|latest\.pt|log\.jsonl|config\.json)\..+\.tmp$")


class RunDirError(ValueError):
    """An output folder or file that cannot be used (occupied, locked, not writable, not a folder)."""


# ------------------------------------------------------------------------------------------- output paths


def prepare_out_dir(path: str | os.PathLike) -> Path:
    """Create the folder ``path`` (and its parents) and check that files can be written in it.

    Raises:
        RunDirError: ``path`` (or a parent) is a regular file, or the folder is not writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path} is a regular file, not a folder: choose another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise RunDirError(f"cannot create the folder {path}: a part of that path is a regular file") from None
    except OSError as e:
        raise RunDirError(f"cannot create the folder {path}: {e.strerror or e}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
    except OSError as e:
        raise RunDirError(f"cannot write into the folder {path}: {e.strerror or e}") from None
    os.close(fd)
    os.unlink(probe)
    return path


def check_output_file(path: str | os.PathLike, what: str = "output") -> Path:
    """Check (before any compute) that a file can be written at ``path``; creates its folder.

    Raises:
        RunDirError: ``path`` is a folder, its folder cannot be created (a part is a file) or is not writable.
    """
    path = Path(path)
    if path.is_dir():
        raise RunDirError(f"{what} {path} is a folder; give a file name (e.g. {path / 'out'}...)")
    try:
        prepare_out_dir(path.parent if str(path.parent) else ".")
    except RunDirError as e:
        raise RunDirError(f"cannot write the {what} {path}: {e}") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise RunDirError(f"cannot write the {what} {path}: the file is not writable")
    return path


# --------------------------------------------------------------------------------------------- one run


def existing_run_files(out_dir: str | os.PathLike) -> list[str]:
    """Names of the run files already in ``out_dir`` (``latest.pt``, ``ckpt_*.pt``, ``log.jsonl``)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    names = [n for n in ("latest.pt", "log.jsonl") if (out_dir / n).exists()]
    names += sorted(p.name for p in out_dir.glob("ckpt_*.pt"))
    return names


def check_fresh(out_dir: str | os.PathLike) -> None:
    """Refuse to start a fresh run in a folder that already holds one (it would replace its checkpoints).

    Raises:
        RunDirError: naming the folder, what is in it, and the ways on.
    """
    found = existing_run_files(out_dir)
    if found:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise RunDirError(
            f"{out_dir} already holds a training run ({shown}); a fresh run would overwrite it. "
            f"Continue that run with --resume auto, or start a new one with a new --out-dir"
        )


# ------------------------------------------------------------------------------------------- the lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OSError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run directory: the file ``out_dir/.lock`` holding the owner's PID and host.

    ``acquire`` creates the file atomically (write a temporary file, then ``os.link`` it, which fails if the
    lock exists). If the lock exists and its process is alive (or on another host, where it cannot be
    checked), :class:`RunDirError` names it; if its process is gone, the lock is stale and replaced.
    ``release`` removes the file if it is still ours. Usable as a context manager.
    """

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self.held = False
        self._token = ""

    def _read(self) -> dict[str, Any] | None:
        try:
            info = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def acquire(self) -> RunLock:
        host = socket.gethostname()
        self._token = f"{os.getpid()}-{time.time_ns()}"
        body = json.dumps({"pid": os.getpid(), "host": host, "since": time.time(), "token": self._token})
        fd, tmp = tempfile.mkstemp(prefix=".lock.", suffix=".new", dir=self.out_dir)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(body + "\n")
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    info = self._read()
                    if info is None:
                        continue  # released meanwhile: try again
                    pid, where = info.get("pid"), info.get("host")
                    stale = isinstance(pid, int) and where == host and not _pid_alive(pid)
                    if not stale:
                        who = f"process {pid} on {where}" if pid else "another process"
                        raise RunDirError(
                            f"{self.out_dir} is in use: {who} is training into it (lock file {self.path}). "
                            "Wait for it to finish, stop it, or use another --out-dir; delete the lock file "
                            "only if you are sure no process writes there"
                        ) from None
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()  # the owner is gone (e.g. kill -9): take the lock over
                else:
                    self.held = True
                    return self
            raise RunDirError(f"could not take the lock {self.path}; is another process starting there?")
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        info = self._read()
        if info and info.get("token") == self._token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ------------------------------------------------------------------------------------- leftovers and log


def remove_stale_tmp(out_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that interrupted atomic writes left in ``out_dir``; returns them.

    Only names this package writes (``.ckpt_*.pt.*.tmp``, ``.latest.pt.*.tmp``, ``.log.jsonl.*.tmp``,
    ``.config.json.*.tmp``) are touched. Call it while holding the :class:`RunLock`.
    """
    removed = []
    for p in Path(out_dir).iterdir():
        if _TMP_RE.match(p.name) and p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def truncate_log(log_path: str | os.PathLike, step: int) -> int:
    """Drop the records of ``log.jsonl`` whose ``"step"`` is past ``step`` (the resumed checkpoint's).

    Records without an integer ``"step"`` are kept; unreadable lines (half a line from a crash) are dropped.
    Returns how many lines were dropped.
    """
    log_path = Path(log_path)
    if not log_path.is_file():
        return 0
    lines = log_path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a torn line from a crash mid-write
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > step:
            continue
        kept.append(line)
    dropped = len(lines) - len(kept)
    if dropped:
        atomic_write_text(log_path, "".join(line + "\n" for line in kept))
    return dropped
