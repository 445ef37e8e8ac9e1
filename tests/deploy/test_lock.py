"""The image's lock files match what they lock, offline.

requirements.lock (`make lock`: uv pip compile --generate-hashes of pyproject.toml's runtime
dependencies for Python 3.12 on x86-64 Linux) is what the Dockerfile installs with
--require-hashes. Checked here without the network:

- every entry is `name==version` with at least one `--hash=sha256:` and nothing else;
- every runtime requirement of pyproject.toml is locked at a version its specifier allows;
- the locked names are exactly the dependency closure of those requirements, followed through
  the metadata of the distributions installed in this venv (markers evaluated for the image's
  Python 3.12 on Linux): nothing missing, nothing that no requirement pulls in.

deploy/image/sbom-tools.lock (the SBOM generator of the build stage) gets the same checks
against deploy/image/sbom-tools.in, except the closure (those tools are not installed here).
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements.lock"
SBOM_TOOLS_IN = REPO / "deploy" / "image" / "sbom-tools.in"
SBOM_TOOLS_LOCK = REPO / "deploy" / "image" / "sbom-tools.lock"
ENTRY = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+)$")
HASH = re.compile(r"^--hash=sha256:[0-9a-f]{64}$")
REFRESH = "run `make lock` and commit the lock files"


@dataclass
class Locked:
    version: Version
    hashes: list[str] = field(default_factory=list)


def parse_lock(path: Path) -> dict[str, Locked]:
    """name -> (version, hashes); fails on anything but entries, hashes and comments."""
    locked: dict[str, Locked] = {}
    current: Locked | None = None
    logical = re.sub(r"\\\n", " ", path.read_text())
    for number, line in enumerate(logical.splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        first, *options = text.split()
        entry = ENTRY.match(first)
        assert entry, f"{path.name}: entry {number} is not name==version: {text[:80]!r}"
        name = canonicalize_name(entry["name"])
        assert name not in locked, f"{path.name}: {name} is locked twice"
        current = locked[name] = Locked(Version(entry["version"]))
        for option in options:
            assert HASH.match(option), f"{path.name}: {name}: not a sha256 hash: {option!r}"
            current.hashes.append(option)
        assert current.hashes, f"{path.name}: {name} has no --hash=sha256: ({REFRESH})"
    return locked


def image_environment() -> dict[str, str]:
    """PEP 508 marker values of the image: CPython 3.12 on x86-64 Linux."""
    env = default_environment()
    env.update({"python_version": "3.12", "sys_platform": "linux", "platform_system": "Linux",
                "os_name": "posix", "platform_machine": "x86_64",
                "implementation_name": "cpython", "platform_python_implementation": "CPython"})
    return env


def applies(requirement: Requirement, extras: frozenset[str]) -> bool:
    if requirement.marker is None:
        return True
    base = image_environment()
    return any(requirement.marker.evaluate({**base, "extra": extra})
               for extra in (extras or {""}))


def runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def closure(requirements: list[Requirement]) -> dict[str, set[str]]:
    """name -> the names that pull it in, through the installed distributions' metadata."""
    pulled_by: dict[str, set[str]] = {}
    pending = [(r, "pyproject.toml") for r in requirements]
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        requirement, parent = pending.pop()
        if not applies(requirement, frozenset()):
            continue
        name = canonicalize_name(requirement.name)
        pulled_by.setdefault(name, set()).add(parent)
        key = (name, frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{name} (needed by {parent}) is not installed in this venv: "
                        "`pip install -e .` (make deps)")
        for text in distribution.requires or []:
            child = Requirement(text)
            if applies(child, frozenset(requirement.extras)):
                pending.append((child, name))
    return pulled_by


def test_lock_entries_are_pinned_and_hashed() -> None:
    for path in (LOCK, SBOM_TOOLS_LOCK):
        locked = parse_lock(path)
        assert len(locked) >= 5, f"{path.name}: {len(locked)} entries"
        assert all(entry.hashes for entry in locked.values())


def test_every_runtime_requirement_is_locked_at_an_allowed_version() -> None:
    locked = parse_lock(LOCK)
    for requirement in runtime_requirements():
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{name} (pyproject.toml) is not in requirements.lock: {REFRESH}"
        assert requirement.specifier.contains(locked[name].version, prereleases=True), \
            f"requirements.lock has {name}=={locked[name].version}, pyproject.toml wants " \
            f"{requirement.specifier}: {REFRESH}"
    tools = parse_lock(SBOM_TOOLS_LOCK)
    for line in SBOM_TOOLS_IN.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            name = canonicalize_name(requirement.name)
            assert name in tools and requirement.specifier.contains(tools[name].version), \
                f"{SBOM_TOOLS_LOCK.name} does not satisfy {line!r}: {REFRESH}"


def test_lock_is_exactly_the_runtime_dependency_closure() -> None:
    locked = set(parse_lock(LOCK))
    needed = closure(runtime_requirements())
    missing = sorted(set(needed) - locked)
    assert not missing, f"requirements.lock lacks {missing}, pulled in by " \
        f"{ {m: sorted(needed[m]) for m in missing} }: {REFRESH}"
    extra = sorted(locked - set(needed) - {"keyless"})
    assert not extra, f"requirements.lock has {extra}, which no runtime requirement of " \
        f"pyproject.toml pulls in: {REFRESH}"
    assert "keyless" not in locked, "keyless itself is installed from its own wheel (--no-deps)"


def test_the_lock_parser_refuses_what_pip_would_not_verify(tmp_path: Path) -> None:
    digest = "--hash=sha256:" + "0" * 64
    good = tmp_path / "good.lock"
    good.write_text(f"a==1.0 \\\n    {digest}\n    # via b\n")
    assert parse_lock(good)["a"].version == Version("1.0")
    for text, message in ((f"a>=1.0 \\\n    {digest}\n", "not name==version"),
                          ("a==1.0\n", "has no --hash"),
                          ("a==1.0 \\\n    --hash=md5:00\n", "not a sha256 hash"),
                          (f"a==1.0 {digest}\na==1.0 {digest}\n", "locked twice")):
        bad = tmp_path / "bad.lock"
        bad.write_text(text)
        with pytest.raises(AssertionError, match=message):
            parse_lock(bad)
