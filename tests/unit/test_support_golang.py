"""tests/support/golang.py: a missing `go` is a test error with an install hint, never a
skip; a failed build says why; the cache key follows the sources."""

from __future__ import annotations

import subprocess

import pytest

from tests.support import golang


def test_missing_go_fails_with_an_install_hint(monkeypatch):
    monkeypatch.setattr(golang, "_built", {})
    monkeypatch.setattr(golang.shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match=r"`go` is missing.*install Go 1\.26"):
        golang.go_app("storage")


def test_unreachable_module_proxy_fails_with_the_prefetch_hint(monkeypatch, tmp_path):
    monkeypatch.setattr(golang, "_built", {})
    monkeypatch.setenv("KEYLESS_GO_APPS_CACHE", str(tmp_path))
    monkeypatch.setattr(golang.shutil, "which", lambda name: "/usr/bin/go")
    failed = subprocess.CompletedProcess([], 1, "", "go: github.com/x@v1: dial tcp: lookup x")
    monkeypatch.setattr(golang.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(pytest.fail.Exception, match=r"(?s)dial tcp.*go mod download"):
        golang.go_app("storage")


def test_the_cache_key_follows_the_sources(monkeypatch, tmp_path):
    (tmp_path / "cmd" / "storage").mkdir(parents=True)
    for name in ("go.mod", "go.sum"):
        (tmp_path / name).write_text(name)
    source = tmp_path / "cmd" / "storage" / "main.go"
    source.write_text("package main\n")
    monkeypatch.setattr(golang, "MODULE", tmp_path)
    first = golang.sources_hash()
    assert golang.sources_hash() == first
    source.write_text("package main // changed\n")
    assert golang.sources_hash() != first


def test_the_build_uses_the_machines_go_and_no_vcs_stamp(monkeypatch):
    monkeypatch.setenv("GOFLAGS", "-mod=readonly")
    monkeypatch.setenv("GOTOOLCHAIN", "auto")
    env = golang.go_env()
    assert env["GOTOOLCHAIN"] == "local"
    assert env["GOFLAGS"].split() == ["-mod=readonly", "-buildvcs=false"]
