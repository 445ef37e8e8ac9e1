"""Build the Go legacy apps (tests/apps/go/cmd/<name>) once per pytest run.

The binaries land in a cache directory keyed by a hash of go.mod, go.sum and the Go sources,
so a second run with the same sources builds nothing. The build is offline-capable once the
module cache holds the modules (go.sum is complete: no -mod=mod); `.ci/run` prefetches them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

MODULE = Path(__file__).resolve().parents[1] / "apps" / "go"
BUILD_TIMEOUT = 600  # a cold build (modules downloaded, nothing compiled) takes ~1-2 min here
INSTALL_HINT = ("install Go 1.26 (the official release in /usr/local/go, or Debian's "
                "`apt-get install golang-1.26`) and put `go` on PATH")
_built: dict[str, Path] = {}


def sources_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted([MODULE / "go.mod", MODULE / "go.sum", *MODULE.rglob("*.go")]):
        digest.update(str(path.relative_to(MODULE)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def go_env() -> dict[str, str]:
    """The environment of `go build`: this machine's Go, never a downloaded toolchain."""
    env = {**os.environ, "GOTOOLCHAIN": "local", "CGO_ENABLED": "0"}
    flags = env.get("GOFLAGS", "").split()
    if "-buildvcs=false" not in flags:  # tests/apps/go sits in a git worktree
        flags.append("-buildvcs=false")
    env["GOFLAGS"] = " ".join(flags)
    return env


def go_app(name: str) -> Path:
    """The path of the built tests/apps/go/cmd/<name> binary (built at most once a run)."""
    if name in _built:
        return _built[name]
    go = shutil.which("go")
    if go is None:
        pytest.fail(f"`go` is missing: the Go legacy apps cannot be built; {INSTALL_HINT}")
    cache = Path(os.environ.get("KEYLESS_GO_APPS_CACHE")
                 or Path(tempfile.gettempdir()) / "keyless-go-apps") / sources_hash()
    binary = cache / name
    if not binary.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        partial = cache / f".{name}.{os.getpid()}"
        try:
            done = subprocess.run([go, "build", "-trimpath", "-o", str(partial), f"./cmd/{name}"],
                                  cwd=MODULE, env=go_env(), capture_output=True, text=True,
                                  timeout=BUILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`go build ./cmd/{name}` took over {BUILD_TIMEOUT} s")
        if done.returncode != 0:
            hint = ""
            if any(sign in done.stderr for sign in ("dial tcp", "no such host",
                                                    "module lookup disabled", "GOPROXY")):
                hint = ("\nthe Go module proxy is unreachable and the module cache lacks the "
                        "modules: run `cd tests/apps/go && go mod download` where the proxy "
                        "can be reached (.ci/run does)")
            pytest.fail(f"`go build ./cmd/{name}` failed (exit {done.returncode}):\n"
                        f"{done.stderr[-4000:]}{hint}")
        partial.replace(binary)  # atomic: a concurrent run never sees a half-written binary
    _built[name] = binary
    return binary
