"""The Colab set-up cell's failure paths, executed for real (no network, no Colab).

The canonical cell (``scripts/sync_bootstrap.render()``) runs in a subprocess with a fake ``google.colab``
on PYTHONPATH, ``REPO_URL`` pointed at a local path and ``CLONE`` at a temporary folder (text substitution of
those two assignments; the IPython-only ``%matplotlib inline`` line is dropped). A clone or an install that
fails must stop the cell with a RuntimeError that says what failed, not a ModuleNotFoundError cells later.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sync_bootstrap", ROOT / "scripts" / "sync_bootstrap.py")
SYNC = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(SYNC)

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _cell(url: str, clone: Path) -> str:
    """The rendered set-up cell as plain Python, cloning `url` into `clone`."""
    source = SYNC.render()
    real_url = f'REPO_URL = "{SYNC.repository()[0]}"'
    assert source.count(real_url) == 1 and source.count('CLONE = "/content/iddpm"') == 1
    source = source.replace(real_url, f"REPO_URL = {url!r}")
    source = source.replace('CLONE = "/content/iddpm"', f"CLONE = {str(clone)!r}")
    lines = source.splitlines()
    assert lines[-1] == "%matplotlib inline"
    return "\n".join(lines[:-1]) + "\n"


def _run_cell(tmp_path: Path, url: str, *, colab: bool = True) -> subprocess.CompletedProcess[str]:
    fake = tmp_path / "fake"
    (fake / "google" / "colab").mkdir(parents=True)
    (fake / "google" / "__init__.py").write_text("")
    (fake / "google" / "colab" / "__init__.py").write_text('"""A stand-in for Colab."""\n')
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(GIT_TERMINAL_PROMPT="0", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    if colab:
        env["PYTHONPATH"] = str(fake)
    script = tmp_path / "setup_cell.py"
    script.write_text(_cell(url, tmp_path / "content" / "iddpm"))
    return subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )


def _last_error(stderr: str) -> str:
    """The traceback's final exception, from its 'RuntimeError: ...' line to the end."""
    at = stderr.rfind("RuntimeError: ")
    assert at >= 0, f"no RuntimeError in:\n{stderr}"
    return stderr[at:]


def test_bad_repo_url_fails_loudly_naming_the_url(tmp_path: Path) -> None:
    url = (tmp_path / "no-such-repo.git").as_uri()
    r = _run_cell(tmp_path, url)
    assert r.returncode != 0
    err = _last_error(r.stderr)
    assert err.startswith(f"RuntimeError: Colab set-up failed: could not clone {url} (branch "), err
    assert "ModuleNotFoundError" not in r.stderr
    assert not (tmp_path / "content" / "iddpm" / "iddpm").exists()


def test_clone_without_a_python_project_fails_at_pip_install(tmp_path: Path) -> None:
    """The clone succeeds (a local repo on the book's branch) but holds no pyproject.toml: pip must fail."""
    pytest.importorskip("pip")  # the cell runs `python -m pip`: without pip it would fail for another reason
    repo = tmp_path / "not-a-package"
    repo.mkdir()
    (repo / "README.md").write_text("not a Python project\n")
    branch = SYNC.repository()[1]
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "init.defaultBranch=b"]
    for args in (["init", "-q"], ["checkout", "-q", "-b", branch], ["add", "."], ["commit", "-q", "-m", "x"]):
        subprocess.run([*git, *args], cwd=repo, check=True, capture_output=True)
    r = _run_cell(tmp_path, repo.as_uri())
    assert r.returncode != 0
    assert (tmp_path / "content" / "iddpm" / "README.md").exists(), "the clone itself should have worked"
    err = _last_error(r.stderr)
    assert err.startswith("RuntimeError: Colab set-up failed: pip install -e failed (exit "), err
    assert "ModuleNotFoundError" not in r.stderr
    assert not (tmp_path / "content" / "iddpm" / ".iddpm-installed").exists(), "a failed install is retried"


def _fake_clone(tmp_path: Path, installed: bool) -> Path:
    """A clone left by an earlier run of the cell in the same runtime: an importable `iddpm` package."""
    clone = tmp_path / "content" / "iddpm"
    (clone / "iddpm").mkdir(parents=True)
    (clone / "iddpm" / "__init__.py").write_text('"""A stand-in for the cloned package."""\n')
    if installed:
        (clone / ".iddpm-installed").write_text("")
    return clone


def test_a_rerun_after_a_good_install_skips_clone_and_pip(tmp_path: Path) -> None:
    """The URL is bogus: the cell can only succeed by reusing the clone and skipping the install."""
    _fake_clone(tmp_path, installed=True)
    r = _run_cell(tmp_path, (tmp_path / "no-such-repo.git").as_uri())
    assert r.returncode == 0, r.stderr


def test_a_rerun_after_a_failed_install_installs_again(tmp_path: Path) -> None:
    pytest.importorskip("pip")
    _fake_clone(tmp_path, installed=False)  # cloned, but the install never finished: no marker
    r = _run_cell(tmp_path, (tmp_path / "no-such-repo.git").as_uri())
    assert r.returncode != 0
    err = _last_error(r.stderr)
    assert err.startswith("RuntimeError: Colab set-up failed: pip install -e failed (exit "), err


def test_outside_colab_the_cell_does_nothing(tmp_path: Path) -> None:
    r = _run_cell(tmp_path, (tmp_path / "no-such-repo.git").as_uri(), colab=False)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "content").exists()
