"""Readiness states, the admin token file, and the migration report built from recorded calls."""

from __future__ import annotations

import json

import pytest

from proxy.admin import AdminTokenError, Health, read_admin_token
from proxy.audit import CallKey, CallLog, az_commands, bicep, build_report, render_text


def test_readiness_needs_listening_tokens_and_not_draining():
    tokens = {"ready": False}
    health = Health(tokens_ready=lambda: tokens["ready"])
    assert not health.ready
    health.listening = True
    assert not health.ready
    tokens["ready"] = True
    assert health.ready
    health.draining = True
    assert not health.ready


def test_the_admin_token_file_holds_one_strong_secret(tmp_path):
    token_file = tmp_path / "token"
    assert read_admin_token(None) is None
    token_file.write_text("  0123456789abcdef-xyz\n")
    assert read_admin_token(token_file) == "0123456789abcdef-xyz"
    for weak in ("", "0123456789abcde", "0123456789 abcdef", "0123456789\nabcdef"):
        token_file.write_text(weak)
        with pytest.raises(AdminTokenError) as refused:
            read_admin_token(token_file)
        assert weak.strip() == "" or weak.split()[0] not in str(refused.value)
    with pytest.raises(AdminTokenError, match="cannot read"):
        read_admin_token(tmp_path / "missing")


def key(service="storage-blob", resource="acct", scheme="SharedKey", operation="write",
        identity="default", handled="audited") -> CallKey:
    return CallKey(service, resource, f"{resource}.blob.core.windows.net", scheme, operation,
                   identity, handled)


def test_report_inventory_roles_and_verdicts(tmp_path):
    clock = iter(range(100, 200)).__next__
    log = CallLog(tmp_path / "state.json", clock=lambda: float(clock()))
    log.record(key(operation="read"))
    log.record(key(operation="write"))
    log.record(key(service="servicebus", resource="ns", scheme="SharedAccessSignature",
                   operation="write", handled="audited"))
    log.record(key(service="servicebus", resource="ns", scheme="SharedAccessSignature",
                   operation="write", handled="converted"))
    log.record(key(service="cosmos", resource="db", scheme="CosmosMasterKey",
                   operation="read", identity="aaaaaaaa-0000-4000-8000-00000000000a"))
    log.save()
    report = build_report(CallLog(tmp_path / "state.json").entries())  # survives a restart
    by_resource = {i["resource"]: i for i in report["inventory"]}
    assert by_resource["acct"]["calls"] == 2 and by_resource["acct"]["schemes"] == {
        "SharedKey": 2}
    assert by_resource["acct"]["local_auth_can_be_disabled"] is False
    assert by_resource["ns"]["local_auth_can_be_disabled"] is True  # converted after audited
    roles = {(a["resource"], a["role"]) for a in report["role_assignments"]}
    # the write role covers reading: no separate reader assignment
    assert roles == {("acct", "Storage Blob Data Contributor"),
                     ("ns", "Azure Service Bus Data Sender"),
                     ("db", "Cosmos DB Built-in Data Reader")}
    commands = "\n".join(az_commands(report))
    assert '--role "Storage Blob Data Contributor"' in commands
    assert "az cosmosdb sql role assignment create --account-name db" in commands
    assert "clientId=='aaaaaaaa-0000-4000-8000-00000000000a'" in commands
    assert "ba92f5b4-2d11-453d-a403-e96b0029c9fe" in bicep(report)
    assert "NO: key-based calls are still forwarded" in render_text(report)
    json.dumps(report)


def test_a_damaged_state_file_is_set_aside_not_fatal(tmp_path):
    state = tmp_path / "state.json"
    state.write_text("{not json")
    log = CallLog(state)
    assert log.entries() == []
    assert (tmp_path / "state.damaged").exists()
