"""Makes the wheels carried to the offline GPU machine usable by its Python.

    python bench/gpu_site.py WHEEL_DIR TARGET

The GPU machine has no network and no package index, and its Python may have no pip or
a read-only environment, so nothing is installed into that environment: every wheel in
WHEEL_DIR (``make gpu-wheels``: pytest and its dependencies, ninja) goes into the folder
TARGET, which the caller puts on PYTHONPATH, and the wheels' executables (ninja) into
TARGET/bin, which the caller puts on PATH. ``pip install --target`` is tried first; where
pip is missing or fails, the wheels are unpacked with zipfile (a wheel is a zip whose
``*.data/scripts`` entries are the executables). Prints one line saying which way it
went; exits non-zero only when neither worked.
"""

from __future__ import annotations

import glob
import os
import shutil
import stat
import subprocess
import sys
import zipfile


def install_with_pip(wheels: list[str], target: str) -> bool:
    """``pip install --no-index --target`` of the wheel files; False where pip is missing
    or refuses (a Python without pip, an externally managed environment, ...)."""
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, timeout=60)
        if done.returncode != 0:
            return False
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                               "--disable-pip-version-check", "--upgrade", "--target", target, *wheels],
                              capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError):
        return False
    if done.returncode != 0:
        print(f"pip --target failed ({done.stderr.strip().splitlines()[-1:] or '?'}); unpacking instead")
    return done.returncode == 0


def unpack(wheels: list[str], target: str) -> None:
    """Unpacks each wheel into ``target``; ``<name>.data/scripts/*`` and
    ``<name>.data/purelib|platlib/*`` go where an installer would put them."""
    bin_dir = os.path.join(target, "bin")
    os.makedirs(bin_dir, exist_ok=True)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                parts = info.filename.split("/")
                if parts[0].endswith(".data") and len(parts) > 2:
                    kind, rest = parts[1], parts[2:]
                    if kind == "scripts":
                        dest = os.path.join(bin_dir, *rest)
                    elif kind in ("purelib", "platlib"):
                        dest = os.path.join(target, *rest)
                    else:
                        continue  # headers / data: nothing the check needs
                else:
                    dest = os.path.join(target, *parts)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with zf.open(info) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
                # zip entries keep the Unix mode in the upper 16 bits of external_attr
                mode = info.external_attr >> 16
                if mode & 0o111 or dest.startswith(bin_dir + os.sep):
                    os.chmod(dest, os.stat(dest).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    wheel_dir, target = argv
    wheels = sorted(glob.glob(os.path.join(wheel_dir, "*.whl")))
    if not wheels:
        print(f"no wheels in {wheel_dir} (run `make gpu-wheels` and carry bench/.wheels)")
        return 1
    os.makedirs(target, exist_ok=True)
    names = ", ".join(os.path.basename(w).split("-")[0] for w in wheels)
    if install_with_pip(wheels, target):
        print(f"installed with pip --target {target}: {names}")
        return 0
    try:
        unpack(wheels, target)
    except (OSError, zipfile.BadZipFile) as exc:
        print(f"could not unpack the wheels into {target}: {exc}")
        return 1
    print(f"unpacked with zipfile into {target} (no usable pip): {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
