"""The image's lock files match what they lock.

requirements.lock (`make lock`, deploy/image/lock.py: uv pip compile --generate-hashes of
pyproject.toml's runtime dependencies for Python 3.12 on x86-64 Linux, from what PyPI had at
lock.py's EXCLUDE_NEWER) is what the Dockerfile installs with --require-hashes. Checked:

- offline: every entry is `name==version` with at least one `--hash=sha256:` and nothing
  else; every runtime requirement of pyproject.toml is locked at a version its specifier
  allows; every entry is pulled in, through the lock's own `# via` chain, by pyproject.toml
  (nothing that no runtime requirement needs);
- against PyPI (reachable in CI; about two seconds): a fresh `make lock` resolution into a
  temp directory is byte for byte the committed files. EXCLUDE_NEWER makes that resolution the
  same on any day, so the test fails only when pyproject.toml (or sbom-tools.in) and the lock
  disagree: a missing, extra or stale package, or a lost hash.

deploy/image/sbom-tools.lock (the SBOM generator of the build stage) gets the same checks
against deploy/image/sbom-tools.in.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
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


def load_make_lock():  # deploy/image/lock.py, what `make lock` runs (not a package)
    spec = importlib.util.spec_from_file_location("keyless_image_lock",
                                                  REPO / "deploy" / "image" / "lock.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_lock = load_make_lock()


@dataclass
class Locked:
    version: Version
    hashes: list[str] = field(default_factory=list)
    via: list[str] = field(default_factory=list)


def parse_lock(path: Path) -> dict[str, Locked]:
    """name -> (version, hashes, what pulls it in); fails on anything but entries, hashes and
    uv's comments."""
    locked: dict[str, Locked] = {}
    current: Locked | None = None
    in_via = False
    logical = re.sub(r"\\\n", " ", path.read_text())
    for number, line in enumerate(logical.splitlines(), 1):
        text = line.strip()
        if text.startswith("#"):
            comment = text.lstrip("#").strip()
            if current is not None and comment.startswith("via"):
                in_via = comment == "via"
                if not in_via:
                    current.via.append(comment.removeprefix("via").strip())
            elif current is not None and in_via and comment:
                current.via.append(comment)
            continue
        if not text:
            continue
        in_via = False
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


def runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


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


def unreachable(locked: dict[str, Locked], root: str) -> list[str]:
    """Entries whose `# via` chain never reaches ROOT (what the lock was compiled from)."""
    reached: set[str] = set()
    frontier = {name for name, entry in locked.items() if root in entry.via}
    while frontier:
        reached |= frontier
        frontier = {name for name, entry in locked.items() if name not in reached
                    and any(canonicalize_name(parent) in reached for parent in entry.via)}
    return sorted(set(locked) - reached)


def test_every_locked_package_is_pulled_in_by_what_it_locks() -> None:
    locked = parse_lock(LOCK)
    roots = [n for n, e in locked.items() if "keyless (pyproject.toml)" in e.via]
    assert {canonicalize_name(r.name) for r in runtime_requirements()} == set(roots), roots
    orphans = unreachable(locked, "keyless (pyproject.toml)")
    assert not orphans, f"requirements.lock has {orphans}, which no runtime requirement of " \
        f"pyproject.toml pulls in: {REFRESH}"
    assert "keyless" not in locked, "keyless itself is installed from its own wheel (--no-deps)"
    tools = parse_lock(SBOM_TOOLS_LOCK)
    assert not unreachable(tools, "-r deploy/image/sbom-tools.in"), REFRESH


def test_make_lock_writes_exactly_the_committed_lock_files(tmp_path: Path) -> None:
    installed = importlib.metadata.version("uv")
    assert installed == make_lock.UV_VERSION, \
        f"uv {installed} here, lock.py resolves with {make_lock.UV_VERSION}: `make deps`"
    written = make_lock.compile_locks(tmp_path)
    for fresh, committed in zip(written, (LOCK, SBOM_TOOLS_LOCK), strict=True):
        if fresh.read_text() != committed.read_text():
            now, then = parse_lock(fresh), parse_lock(committed)
            changed = {n: (str(then[n].version) if n in then else None,
                           str(now[n].version) if n in now else None)
                       for n in now.keys() | then.keys()
                       if n not in now or n not in then or now[n].version != then[n].version}
            pytest.fail(f"{committed.name} is not what `make lock` writes "
                        f"(committed, fresh): {changed or 'same versions, other hashes'}: "
                        f"{REFRESH}", pytrace=False)


def test_the_lock_parser_refuses_what_pip_would_not_verify(tmp_path: Path) -> None:
    digest = "--hash=sha256:" + "0" * 64
    good = tmp_path / "good.lock"
    good.write_text(f"a==1.0 \\\n    {digest}\n    # via b\nc==2 \\\n    {digest}\n"
                    "    # via\n    #   a\n    #   d\n")
    assert parse_lock(good)["a"].version == Version("1.0")
    assert parse_lock(good)["a"].via == ["b"] and parse_lock(good)["c"].via == ["a", "d"]
    assert unreachable(parse_lock(good), "b") == []
    assert unreachable(parse_lock(good), "d") == ["a"]
    for text, message in ((f"a>=1.0 \\\n    {digest}\n", "not name==version"),
                          ("a==1.0\n", "has no --hash"),
                          ("a==1.0 \\\n    --hash=md5:00\n", "not a sha256 hash"),
                          (f"a==1.0 {digest}\na==1.0 {digest}\n", "locked twice")):
        bad = tmp_path / "bad.lock"
        bad.write_text(text)
        with pytest.raises(AssertionError, match=message):
            parse_lock(bad)
