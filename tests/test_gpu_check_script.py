"""bench/gpu_check.sh rehearsed on the CPU in an environment stripped like the GPU
machine's: a Python with torch and triton but no pip, pytest, ninja, rich or numpy, and
no ninja on PATH. The script must make pytest and ninja usable from the carried wheels
(bench/.wheels, `make gpu-wheels`, which `make test` runs first), log the machine, write
info.json without rich and run the test stage -- everything up to where a GPU is needed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "bench" / ".wheels"
SCRIPT = ROOT / "bench" / "gpu_check.sh"
# Distributions the GPU machine does not have (besides pip itself).
ABSENT = {"pip", "pytest", "_pytest", "py", "pluggy", "iniconfig", "pygments", "ninja", "rich", "markdown_it",
          "mdurl", "numpy", "numpy.libs", "tqdm", "pytest_timeout", "pytest_benchmark", "hypothesis",
          "_hypothesis_pytestplugin", "_hypothesis_globals", "sortedcontainers"}
# The commands the script's prepare and test stages run.
COMMANDS = ("bash", "sh", "env", "date", "dirname", "mkdir", "tee", "nproc", "head", "tr", "tail", "timeout", "cat",
            "uname", "rm", "ls")

pytestmark = pytest.mark.skipif(not (WHEELS / ".complete").exists(),
                                reason="bench/.wheels missing: `make gpu-wheels` (make test runs it)")


def _top_name(entry: str) -> str:
    """``pytest-9.2.0.dist-info`` -> ``pytest``; ``_pytest`` -> ``_pytest``; ``py.py`` -> ``py``."""
    name = entry.split("-")[0] if entry.endswith((".dist-info", ".egg-info")) else entry
    return name[:-3] if name.endswith(".py") else name.lower()


def _stripped_python(tmp: Path) -> Path:
    """A venv without pip whose only packages are this environment's minus ``ABSENT``
    (linked through a folder of symlinks named by a .pth file)."""
    env = tmp / "env"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env)
    farm = tmp / "site"
    farm.mkdir()
    purelib = Path(sysconfig.get_paths()["purelib"])
    for entry in os.listdir(purelib):
        if _top_name(entry) in ABSENT or entry.endswith(".pth") or entry.startswith("__editable__"):
            continue
        (farm / entry).symlink_to(purelib / entry)
    env_site = Path(subprocess.check_output([str(env / "bin" / "python"), "-c",
                                             "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                            text=True).strip())
    (env_site / "farm.pth").write_text(str(farm) + "\n")
    return env / "bin" / "python"


def _stripped_path(tmp: Path) -> str:
    """A PATH with the script's commands only (no ninja, no pytest, no pip)."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for cmd in COMMANDS:
        found = shutil.which(cmd, path="/usr/bin:/bin")
        if found:
            (bin_dir / cmd).symlink_to(found)
    return str(bin_dir)


def test_gpu_check_prepares_and_tests_in_a_stripped_environment(tmp_path):
    python = _stripped_python(tmp_path)
    path = _stripped_path(tmp_path)
    clean_env = {"PATH": path, "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    # The stripped Python really lacks what the GPU machine lacks.
    for probe in ("import pytest", "import ninja", "import pip", "import rich"):
        assert subprocess.run([str(python), "-c", probe], env=clean_env, capture_output=True).returncode != 0, probe
    assert subprocess.run([str(python), "-c", "import torch, triton"], env=clean_env).returncode == 0
    assert shutil.which("ninja", path=path) is None

    out = tmp_path / "out"
    env = {**clean_env, "PYTHON": str(python), "OUT": str(out), "GPU_CHECK_SITE": str(tmp_path / "gpu-site"),
           "GPU_CHECK_TESTS": "tests/test_cuda.py", "TRITON_INTERPRET": "0"}
    done = subprocess.run([shutil.which("bash"), str(SCRIPT), "prepare,test"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    log = (out / "gpu-check.log").read_text()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "unpacked with zipfile" in log, log  # no pip: the fallback ran
    assert re.search(r"^ninja: available .*gpu-site/bin/ninja$", log, re.M), log
    assert re.search(r"^pytest \d+\.\d+", log, re.M), log
    assert "--maxfail=25" in log, log
    assert "TORCH_CUDA_ARCH_LIST=9.0" in log, log  # no nvidia-smi: the default arch
    assert "setuptools" in log and "cusparselt" in log and "CUDA_HOME=" in log, log
    tests = (out / "gpu-tests.txt").read_text()
    assert "pytest is not available" not in tests
    assert re.search(r"\d+ skipped", tests), tests  # test_cuda.py ran and skipped without a GPU
    info = json.loads((out / "info.json").read_text())  # no rich on that machine
    assert info["torch"] and "cusparselt" in info and info["cuda_available"] is False


def test_gpu_site_installs_with_pip_where_there_is_pip(tmp_path):
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_site.py"), str(WHEELS), str(target)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "installed with pip --target" in done.stdout
    ninja = target / "bin" / "ninja"
    assert os.access(ninja, os.X_OK)
    assert subprocess.run([str(ninja), "--version"], capture_output=True).returncode == 0
    assert (target / "pytest").is_dir() and (target / "_pytest").is_dir()


def test_gpu_site_reports_missing_wheels(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_site.py"), str(tmp_path / "none"),
                           str(tmp_path / "site")], capture_output=True, text=True)
    assert done.returncode == 1 and "make gpu-wheels" in done.stdout
