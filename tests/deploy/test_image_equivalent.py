"""The Dockerfile and reality, kept in step without a Docker engine.

The test reproduces the final image stage on this machine: it copies what the build stage
COPYs, downloads the locked wheels with `--require-hashes` and builds keyless' own wheel as
stage 1 does, installs them with `--no-index --require-hashes` into a fresh Python 3.12 venv
as stage 2 does, writes the CycloneDX SBOM of that venv as the sbom stage does (with the
hash-pinned SBOM tool in a venv of its own), and runs the image's ENTRYPOINT +
CMD as UID/GID 10001 with the image's ENV (read from the Dockerfile), an unwritable working
directory, HOME, cache and temp directory, and the confdir on a directory that user owns (the
volume). Only the ports move: both stay on 127.0.0.1 here.

Then: /healthz and /readyz answer 200, the image's own HEALTHCHECK command succeeds (and fails
against a closed port), the CA files exist with the key at 0600, and SIGTERM ends keyless with
exit code 0. Needs root (for setpriv to become UID 10001) and PyPI or a warm pip cache.

The image's Python lives in /usr/local, readable by everyone. Where this machine's Python 3.12
is not reachable by UID 10001 (pyenv under a 0700 /root), the test runs a private copy of its
runtime (binary, libpython, standard library; no site-packages) instead.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.dockerfile import Stage, parse
from tests.deploy.test_lock import parse_lock

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
LOCK = REPO / "requirements.lock"
SBOM_TOOLS_LOCK = REPO / "deploy" / "image" / "sbom-tools.lock"
SBOM_IN_IMAGE = "/usr/share/doc/keyless/sbom.cdx.json"
UID = GID = 10001
BUILD_TIMEOUT = 900  # wheels for every dependency; seconds with a warm pip cache
START_TIMEOUT = 60
STOP_TIMEOUT = 45  # above keyless' default drain timeout (30 s)


def stages() -> list[Stage]:
    return parse(DOCKERFILE)


def final_stage() -> Stage:
    return stages()[-1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def admin_get(port: int, path: str) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


# -- static: the Dockerfile says what the deployment docs and manifests rely on ---------------


def test_final_image_runs_as_10001() -> None:
    user = final_stage().user
    assert user is not None and user.split(":") == [str(UID), str(GID)], user


def test_bases_are_python_312_slim_and_final_stage_has_no_build_tools() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2, "multi-stage: build the wheel, then install it"
    for stage in all_stages:
        assert stage.base.split("@")[0] == "python:3.12-slim", stage.base
    runs = final_stage().all("RUN")
    # One apt-get is allowed: iptables, for the injected transparent-mode init container
    # (`keyless iptables --apply`), with the package lists removed in the same layer.
    apt = [run for run in runs if "apt-get" in run]
    assert len(apt) <= 1, apt
    for run in apt:
        installed = run.split("--no-install-recommends", 1)[1].split("&&", 1)[0].split()
        assert installed == ["iptables"], installed
        assert "rm -rf /var/lib/apt/lists/*" in run
    final_runs = " ".join(run for run in runs if run not in apt)
    for tool in ("apt-get", "apk ", "gcc", "build-essential", "pip wheel"):
        assert tool not in final_runs, f"final stage must not use {tool!r}"
    assert "--no-index" in final_runs, "stage 2 installs only the wheels stage 1 built"


def test_env_is_only_known_flags_and_read_only_root_filesystem_ready() -> None:
    from proxy.config import FLAGS

    env = final_stage().env
    known = {flag.env for flag in FLAGS} | {"KEYLESS_CONFIG"}
    unknown = {key for key in env if key.startswith("KEYLESS_")} - known
    assert not unknown, f"Dockerfile sets KEYLESS_* variables keyless does not read: {unknown}"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env.get("PIP_NO_CACHE_DIR") == "1" or "--no-cache-dir" in " ".join(
        final_stage().all("RUN"))
    confdir = env["KEYLESS_CONFDIR"]
    volumes = " ".join(final_stage().all("VOLUME"))
    assert confdir in volumes, "the confdir must be a volume (read-only root filesystem)"
    # everything keyless or Python might write lives on the volume
    assert env["HOME"].startswith(confdir)
    assert env.get("XDG_CACHE_HOME", env["HOME"]).startswith(confdir)
    assert final_stage().last("STOPSIGNAL") == "SIGTERM"


def test_healthcheck_hits_the_admin_servers_healthz() -> None:
    options, command = final_stage().healthcheck
    script = " ".join(command)
    assert command[0] == "python" and "urllib" in script
    paths = re.findall(r"http://127\.0\.0\.1:[^/'\"]+(/[a-z]+)", script)
    assert paths == ["/healthz"], script
    admin_source = (REPO / "proxy" / "admin.py").read_text()
    assert 'web.get("/healthz"' in admin_source, "the admin server no longer serves /healthz"
    # the fallback port is the image's KEYLESS_ADMIN port
    admin_port = final_stage().env["KEYLESS_ADMIN"].rpartition(":")[2]
    assert f"'127.0.0.1:{admin_port}'" in script
    assert {"interval", "timeout"} <= options.keys()


def words(command: str) -> str:
    return " ".join(command.split())


def test_image_installs_only_hash_checked_locked_wheels_and_ships_the_sbom() -> None:
    build, sbom, final = stages()
    assert (build.name, sbom.name) == ("build", "sbom")
    (fetch,) = build.all("RUN")
    assert "pip download --require-hashes --only-binary=:all:" in words(fetch)
    assert f"-r {LOCK.name}" in words(fetch), "stage 1 fetches what the lock pins"
    assert "pip wheel --no-deps" in words(fetch), "keyless' wheel resolves nothing"
    assert any(LOCK.name in copy.split()[:-1] for copy in build.all("COPY"))
    (install,) = final.all("RUN")[-1:]
    assert "--no-index --find-links=/wheels --require-hashes -r /wheels/requirements.lock" \
        in words(install)
    assert "install --no-index --no-deps /wheels/keyless-" in words(install)
    # the SBOM describes the final environment: the sbom stage runs the same install first
    (sbom_run,) = sbom.all("RUN")
    assert words(sbom_run).startswith(words(install) + " && "), \
        "the sbom stage must repeat the final stage's install exactly"
    assert "cyclonedx-py environment" in words(sbom_run)
    assert f"--require-hashes -r /tools/{SBOM_TOOLS_LOCK.name}" in words(sbom_run)
    copies = [words(c) for c in final.all("COPY")]
    assert any(c.startswith("--from=sbom ") and c.endswith(" " + SBOM_IN_IMAGE)
               for c in copies), copies
    assert "cyclonedx" not in words(" ".join(final.all("RUN"))), "no SBOM tool in the image"


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents wins;
    `!` re-includes. Patterns are path-segment globs; `**` spans any number of segments."""
    def matches(pattern: list[str], parts: list[str]) -> bool:
        if not pattern:
            return not parts
        if pattern[0] == "**":
            return any(matches(pattern[1:], parts[n:]) for n in range(len(parts) + 1))
        return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and \
            matches(pattern[1:], parts[1:])

    parts = path.strip("/").split("/")
    excluded = False
    for raw in patterns:
        negated = raw.startswith("!")
        pattern = raw.removeprefix("!").strip("/").split("/")
        if any(matches(pattern, parts[:n]) for n in range(1, len(parts) + 1)):
            excluded = not negated
    return excluded


def test_every_copied_file_reaches_the_build_context() -> None:
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert dockerignore_excludes("deploy/compose/x.yaml", patterns), "the matcher bites"
    assert dockerignore_excludes("proxy/__pycache__/a.pyc", patterns)
    for stage in stages():
        for args in stage.all("COPY"):
            if args.startswith("--from="):
                continue
            for source in args.split()[:-1]:
                assert (REPO / source).exists(), f"COPY {source}: no such file"
                assert not dockerignore_excludes(source, patterns), \
                    f"COPY {source}: .dockerignore keeps it out of the build context"


# -- dynamic: the image's stage 2, reproduced ---------------------------------------------------


@pytest.fixture(scope="module")
def image_root() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("this test runs keyless as UID 10001 through setpriv, which needs root: "
                    "run the tests as root (as CI does), e.g. `sudo make test`")
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv is missing: `apt-get install -y util-linux`")
    if sys.version_info[:2] != (3, 12):
        pytest.fail(f"the image runs Python 3.12; this is {sys.version.split()[0]}: "
                    "run the tests from the Python 3.12 venv `make test` sets up")
    old_umask = os.umask(0o022)
    saved_ld = os.environ.get("LD_LIBRARY_PATH")
    root = Path(tempfile.mkdtemp(prefix="keyless-image-"))
    try:
        root.chmod(0o755)  # UID 10001 must reach the venv inside
        build = stages()[0]
        src = root / "src"
        src.mkdir()
        for args in build.all("COPY"):
            *sources, dest = args.split()
            target = src / dest
            for source in sources:
                origin = REPO / source
                if origin.is_dir():
                    shutil.copytree(origin, target if not dest.endswith("/") else
                                    target / origin.name,
                                    ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(origin, target / origin.name)
        wheels = root / "wheels"
        # stage 1: the locked wheels, hash-checked, and keyless' own wheel without deps
        run([sys.executable, "-m", "pip", "download", "-q", "--require-hashes",
             "--only-binary=:all:", "--dest", str(wheels), "-r", str(src / LOCK.name)])
        run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir",
             str(wheels), str(src)])
        python, library_path = python_for_image_user(root)
        if library_path:
            os.environ["LD_LIBRARY_PATH"] = library_path  # for the venv's pip, below
        run([python, "-m", "venv", str(root / "venv")])
        # stage 2 (and the sbom stage): hash-checked from the wheels only, then keyless
        (keyless_wheel,) = wheels.glob("keyless-*.whl")
        venv_python = str(root / "venv" / "bin" / "python")
        run([venv_python, "-m", "pip", "install", "-q", "--no-index", f"--find-links={wheels}",
             "--require-hashes", "-r", str(src / LOCK.name)])
        run([venv_python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
             str(keyless_wheel)])
        (root / "ld-library-path").write_text(library_path)
        yield root
    finally:
        if saved_ld is None:
            os.environ.pop("LD_LIBRARY_PATH", None)
        else:
            os.environ["LD_LIBRARY_PATH"] = saved_ld
        os.umask(old_umask)
        shutil.rmtree(root, ignore_errors=True)


def python_for_image_user(root: Path) -> tuple[str, str]:
    """(python 3.12 that UID 10001 can run, LD_LIBRARY_PATH it needs or "")."""
    base = Path(sys.base_prefix)
    exe = base / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    probe = subprocess.run(as_image_user([str(exe), "-c", "import ssl"]), capture_output=True,
                           timeout=30)
    if probe.returncode == 0:
        return str(exe), ""
    copy = root / "python"
    skip = shutil.ignore_patterns("test", "tests", "site-packages", "idlelib", "tkinter",
                                  "turtledemo", "__pycache__", "config-*", "*.a", "pkgconfig")
    shutil.copytree(base / "lib", copy / "lib", ignore=skip, symlinks=True)
    (copy / "bin").mkdir()
    shutil.copy2(exe, copy / "bin" / exe.name)
    library = str(copy / "lib")
    check = subprocess.run(as_image_user([str(copy / "bin" / exe.name), "-c", "import ssl"]),
                           capture_output=True, timeout=30,
                           env={**os.environ, "LD_LIBRARY_PATH": library})
    assert check.returncode == 0, check.stderr.decode(errors="replace")
    return str(copy / "bin" / exe.name), library


def run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT,
                            env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"


def as_image_user(command: list[str]) -> list[str]:
    return ["setpriv", f"--reuid={UID}", f"--regid={GID}", "--clear-groups", "--", *command]


def locked_dir(path: Path) -> Path:
    """A directory owned by root that UID 10001 can enter but not write."""
    path.mkdir()
    path.chmod(0o555)
    return path


def test_image_stage_two_runs_as_10001_and_stops_cleanly(image_root: Path) -> None:
    final = final_stage()
    venv_bin = image_root / "venv" / "bin"
    run_dir = image_root / "run"
    run_dir.mkdir()
    run_dir.chmod(0o755)
    workdir = locked_dir(run_dir / "workdir")
    home = locked_dir(run_dir / "home")
    confdir = run_dir / "confdir"  # the volume: owned by the image's user
    confdir.mkdir(mode=0o700)
    os.chown(confdir, UID, GID)
    admin_port, listen_port = free_port(), free_port()

    env = {"PATH": f"{venv_bin}:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    library_path = (image_root / "ld-library-path").read_text()
    if library_path:
        env["LD_LIBRARY_PATH"] = library_path
    env.update(final.env)
    env.update({
        "KEYLESS_CONFDIR": str(confdir),
        "KEYLESS_ADMIN": f"127.0.0.1:{admin_port}",
        "KEYLESS_LISTEN": f"127.0.0.1:{listen_port}",
        # stricter than the image: even the volume is not offered as HOME, cache or temp
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "TMPDIR": str(home),
    })
    entrypoint = final.exec_form("ENTRYPOINT") + final.exec_form("CMD")
    command = [str(venv_bin / entrypoint[0]), *entrypoint[1:]]
    log_path = run_dir / "keyless.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(as_image_user(command), cwd=workdir, env=env,
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while admin_get(admin_port, "/readyz") != 200:
            assert process.poll() is None, f"keyless exited {process.returncode}:\n" + \
                log_path.read_text(errors="replace")
            assert time.monotonic() < deadline, "not ready in time:\n" + \
                log_path.read_text(errors="replace")
            time.sleep(0.2)
        assert admin_get(admin_port, "/healthz") == 200

        # The image's HEALTHCHECK command, as the image user with the image's environment.
        _, check = final.healthcheck
        check = [str(venv_bin / check[0]), *check[1:]]
        ok = subprocess.run(as_image_user(check), cwd=workdir, env=env, capture_output=True,
                            timeout=20)
        assert ok.returncode == 0, ok.stderr.decode(errors="replace")
        closed = {**env, "KEYLESS_ADMIN": f"127.0.0.1:{free_port()}"}
        bad = subprocess.run(as_image_user(check), cwd=workdir, env=closed,
                             capture_output=True, timeout=20)
        assert bad.returncode != 0, "the HEALTHCHECK must fail when nothing answers"

        # `keyless init` (the init container), as the image user, into a shared directory.
        shared = run_dir / "keyless-ca"
        shared.mkdir(mode=0o755)
        os.chown(shared, UID, GID)
        init = subprocess.run(
            as_image_user([str(venv_bin / entrypoint[0]), "init", "--ca-out",
                           str(shared / "keyless-ca.pem")]),
            cwd=workdir, env=env, capture_output=True, timeout=60)
        assert init.returncode == 0, init.stderr.decode(errors="replace")
        published = shared / "keyless-ca.pem"
        assert published.stat().st_mode & 0o777 == 0o644, "the app must be able to read it"
        assert b"PRIVATE KEY" not in published.read_bytes()

        # The CA lives on the volume; its key is readable by keyless alone.
        key, cert = confdir / "mitmproxy-ca.pem", confdir / "mitmproxy-ca-cert.pem"
        assert key.is_file() and cert.is_file(), sorted(p.name for p in confdir.iterdir())
        for secret in (key, confdir / "mitmproxy-ca.p12"):
            if secret.exists():
                assert secret.stat().st_mode & 0o777 == 0o600, oct(secret.stat().st_mode)
                assert secret.stat().st_uid == UID
        assert b"PRIVATE KEY" not in cert.read_bytes()
        assert published.read_bytes() == cert.read_bytes(), "init published another CA"
        assert list(home.iterdir()) == [] and list(workdir.iterdir()) == []

        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"keyless did not stop within {STOP_TIMEOUT}s of SIGTERM")
        assert code == 0, log_path.read_text(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def test_image_sbom_lists_every_installed_distribution(image_root: Path) -> None:
    """The sbom stage, reproduced: the SBOM tool from its hash-pinned lock in a venv of its
    own, run against the image's environment; every distribution installed there is in the
    SBOM with its version, and keyless' dependencies are the lock's versions."""
    tools = image_root / "sbom-tools"
    run([sys.executable, "-m", "venv", str(tools)])
    run([str(tools / "bin" / "pip"), "install", "-q", "--require-hashes", "-r",
         str(SBOM_TOOLS_LOCK)])
    out = image_root / "sbom.cdx.json"
    image_python = image_root / "venv" / "bin" / "python"
    run([str(tools / "bin" / "cyclonedx-py"), "environment", "--output-reproducible",
         "--of", "JSON", "-o", str(out), str(image_python)])
    sbom = json.loads(out.read_text())
    assert sbom["bomFormat"] == "CycloneDX"
    listed = {canonical(c["name"]): c["version"] for c in sbom["components"]}
    listing = subprocess.run(
        [str(image_python), "-c", "import importlib.metadata as m, json; print(json.dumps("
         "{d.metadata['Name']: d.version for d in m.distributions()}))"],
        capture_output=True, text=True, timeout=60, check=True)
    installed = {canonical(n): v for n, v in json.loads(listing.stdout).items()}
    assert listed == installed, {"only in the SBOM": sorted(listed.keys() - installed.keys()),
                                 "not in the SBOM": sorted(installed.keys() - listed.keys())}
    locked = parse_lock(LOCK)
    from proxy import __version__

    assert installed.pop("keyless") == __version__
    installed.pop("pip")  # the base image's (python -m venv here)
    assert installed == {name: str(entry.version) for name, entry in locked.items()}, \
        "the image's environment is exactly the lock"
    # no SBOM tooling leaked into the image's environment
    assert "cyclonedx-bom" not in installed and "cyclonedx-python-lib" not in installed
    tool_names = {canonical(d.metadata["Name"]) for d in importlib.metadata.distributions(
        path=[str(p) for p in (tools / "lib").glob("python*/site-packages")])}
    assert "cyclonedx-bom" in tool_names


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
