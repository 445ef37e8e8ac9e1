"""Write the image's hash-pinned lock files (`make lock`).

    python deploy/image/lock.py [OUTDIR]

requirements.lock (keyless' runtime dependencies from pyproject.toml) and
deploy/image/sbom-tools.lock (the build stage's SBOM tool, from sbom-tools.in), resolved by
uv for the image's Python: CPython 3.12 on x86-64 Linux (python:3.12-slim), every file with
its sha256. The resolution takes only files PyPI had at EXCLUDE_NEWER, so the same inputs give
the same lock on any day (tests/deploy/test_lock.py re-runs it and compares): to move to newer
releases, advance EXCLUDE_NEWER and run `make lock`. With OUTDIR, both files go there instead
(the test's way); the repository's copies are left alone.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
UV_VERSION = "0.13.9"
EXCLUDE_NEWER = "2026-12-02T00:00:00Z"
FLAGS = ("--generate-hashes", "--python-version", "3.12",
         "--python-platform", "x86_64-unknown-linux-gnu", "--upgrade",
         "--exclude-newer", EXCLUDE_NEWER, "--custom-compile-command", "make lock", "--quiet",
         "--no-progress")
# (input relative to the repository, lock file name, where the repository keeps it)
LOCKS = (("pyproject.toml", "requirements.lock", REPO),
         ("deploy/image/sbom-tools.in", "sbom-tools.lock", HERE))
TIMEOUT = 120


def uv() -> str:
    beside = Path(sys.executable).with_name("uv")
    found = str(beside) if beside.exists() else shutil.which("uv")
    if not found:
        raise SystemExit(f"uv is missing: `pip install uv=={UV_VERSION}` (make lock does)")
    return found


def compile_locks(out: Path | None = None) -> list[Path]:
    """Resolve both lock files into OUT (default: their places in the repository)."""
    written = []
    for source, name, home in LOCKS:
        target = (out or home) / name
        done = subprocess.run([uv(), "pip", "compile", source, *FLAGS, "-o", str(target)],
                              cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
        if done.returncode != 0:
            raise RuntimeError(f"uv pip compile {source} failed (PyPI must be reachable):\n"
                               f"{done.stderr[-4000:]}")
        written.append(target)
    return written


if __name__ == "__main__":
    for path in compile_locks(Path(sys.argv[1]) if len(sys.argv) > 1 else None):
        print(f"wrote {path}")
