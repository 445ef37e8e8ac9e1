"""What keyless saw of key-based calls, kept across restarts, and the migration report built
from it: the inventory, the role assignments each identity needs, and where local (key)
authentication can be switched off.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from proxy.roles import LOGIN_SETUP, ROLE_IDS, ROLES

logger = logging.getLogger(__name__)
STATE_FILE = "keyless-state.json"


@dataclass(frozen=True, slots=True)
class CallKey:
    service: str
    resource: str  # the Azure resource's name (storage account, namespace, vault, ...)
    host: str
    scheme: str  # the key scheme the app used
    operation: str  # read or write
    identity: str  # the identity keyless used (or would use)
    handled: str  # converted (keyless swapped the key) or audited (forwarded as sent)


class CallLog:
    """Counts of key-based calls with first and last time seen; saved as JSON (mode 0600)."""

    def __init__(self, path: Path | None, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self._calls: dict[CallKey, dict[str, float]] = {}
        self.dirty = False
        if path is not None and path.exists():
            self._load(path)

    def record(self, key: CallKey) -> None:
        now = self.clock()
        entry = self._calls.setdefault(key, {"count": 0, "first_seen": now, "last_seen": now})
        entry["count"] += 1
        entry["last_seen"] = now
        self.dirty = True

    def entries(self) -> list[dict[str, Any]]:
        return [{**asdict(key), **values} for key, values in sorted(
            self._calls.items(), key=lambda item: (item[0].service, item[0].resource))]

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps({"version": 1, "calls": self.entries()}, indent=1)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".keyless-state-")
        with os.fdopen(fd, "w") as file:
            file.write(data)
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)
        self.dirty = False

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
            for entry in data.get("calls", []):
                key = CallKey(**{f: entry[f] for f in CallKey.__dataclass_fields__})
                self._calls[key] = {k: entry[k] for k in ("count", "first_seen", "last_seen")}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # A damaged state file must not stop the proxy; keep it aside for inspection.
            logger.warning("ignoring unreadable state file %s: %s", path, type(exc).__name__)
            path.rename(path.with_suffix(".damaged"))


class SharedCallLog(CallLog):
    """--workers: each worker keeps only what it saw since its last save, and `save` merges
    that into the state file under an exclusive lock (read, add, write), so N workers never
    overwrite each other's counts. The file's format is CallLog's."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        super().__init__(None, clock)  # deltas only: the file is read when merging
        self.path = path

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            merged = CallLog(self.path, self.clock)
            for key, seen in self._calls.items():
                entry = merged._calls.get(key)
                if entry is None:
                    merged._calls[key] = dict(seen)
                else:
                    entry["count"] += seen["count"]
                    entry["first_seen"] = min(entry["first_seen"], seen["first_seen"])
                    entry["last_seen"] = max(entry["last_seen"], seen["last_seen"])
            merged.dirty = True
            merged.save()
        self._calls.clear()
        self.dirty = False


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def build_report(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The report as data: inventory, role assignments, local-auth verdicts."""
    resources: dict[tuple[str, str], dict[str, Any]] = {}
    assignments: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for entry in entries:
        service, resource = entry["service"], entry["resource"]
        item = resources.setdefault((service, resource), {
            "service": service, "resource": resource, "hosts": set(), "schemes": {},
            "operations": set(), "identities": set(), "calls": 0,
            "last_converted": None, "last_audited": None})
        item["hosts"].add(entry["host"])
        item["schemes"][entry["scheme"]] = item["schemes"].get(entry["scheme"], 0) + entry["count"]
        item["operations"].add(entry["operation"])
        item["identities"].add(entry["identity"])
        item["calls"] += entry["count"]
        field = "last_converted" if entry["handled"] == "converted" else "last_audited"
        item[field] = max(item[field] or 0, entry["last_seen"])
        roles = ROLES.get(service)
        if roles is None:
            continue
        role = roles.write if entry["operation"] == "write" else roles.read
        assignments.setdefault((entry["identity"], service, resource, role), {
            "identity": entry["identity"], "service": service, "resource": resource,
            "resource_type": roles.resource_type, "role": role,
            "role_definition_id": ROLE_IDS.get(role)})
    # A write role covers reading: drop the read role where the write role is also needed.
    for (identity, service, resource, role) in list(assignments):
        roles = ROLES[service]
        if roles.write_covers_read and role == roles.read != roles.write and (
                identity, service, resource, roles.write) in assignments:
            del assignments[(identity, service, resource, role)]
    inventory = []
    for item in resources.values():
        audited, converted = item["last_audited"], item["last_converted"]
        keys_still_sent = audited is not None and (converted is None or audited > converted)
        inventory.append({
            **item, "hosts": sorted(item["hosts"]), "operations": sorted(item["operations"]),
            "identities": sorted(item["identities"]),
            "last_converted": _iso(converted) if converted else None,
            "last_audited": _iso(audited) if audited else None,
            "key_based_calls_still_forwarded": keys_still_sent,
            "local_auth_can_be_disabled": not keys_still_sent,
        })
    logins = [{"service": item["service"], "resource": item["resource"],
               "identities": item["identities"], "setup": list(LOGIN_SETUP[item["service"]])}
              for item in inventory if item["service"] in LOGIN_SETUP]
    return {"inventory": inventory, "role_assignments": list(assignments.values()),
            "database_logins": logins}


def az_commands(report: dict[str, Any]) -> list[str]:
    commands = []
    for a in report["role_assignments"]:
        scope = (f"$(az resource list --name {a['resource']} --resource-type "
                 f"{a['resource_type']} --query '[0].id' -o tsv)")
        principal = ("<principal id of the pod's managed identity>" if a["identity"] == "default"
                     else f"$(az identity list --query \"[?clientId=='{a['identity']}'].principalId"
                          "\" -o tsv)")
        if a["service"] == "cosmos":  # Cosmos data-plane roles are not Azure RBAC roles
            role_id = ("00000000-0000-0000-0000-000000000002" if "Contributor" in a["role"]
                       else "00000000-0000-0000-0000-000000000001")
            commands.append(
                f"az cosmosdb sql role assignment create --account-name {a['resource']} "
                f"--resource-group <resource group> --role-definition-id {role_id} "
                f"--principal-id {principal} --scope /")
            continue
        commands.append(f"az role assignment create --assignee-object-id {principal} "
                        f"--assignee-principal-type ServicePrincipal --role \"{a['role']}\" "
                        f"--scope {scope}")
    return commands


def bicep(report: dict[str, Any]) -> str:
    lines = ["param principalId string  // the managed identity's principal (object) id", ""]
    declared: set[str] = set()
    for i, a in enumerate(report["role_assignments"]):
        if a["service"] == "cosmos":
            lines.append(f"// {a['resource']}: Cosmos DB data-plane role '{a['role']}': "
                         "use Microsoft.DocumentDB/databaseAccounts/sqlRoleAssignments")
            continue
        symbol = "res_" + "".join(c if c.isalnum() else "_" for c in a["resource"])
        if symbol not in declared:
            declared.add(symbol)
            lines += [f"resource {symbol} '{a['resource_type']}@2023-01-01' existing = {{",
                      f"  name: '{a['resource']}'", "}", ""]
        role_id = a["role_definition_id"] or (
            f"<GUID of '{a['role']}': az role definition list --name \"{a['role']}\" "
            "--query [0].name -o tsv>")
        lines += [
            f"resource assignment{i} 'Microsoft.Authorization/roleAssignments@2022-04-01' = {{",
            f"  name: guid({symbol}.id, principalId, '{a['role']}')",
            f"  scope: {symbol}",
            "  properties: {",
            "    roleDefinitionId: subscriptionResourceId("
            f"'Microsoft.Authorization/roleDefinitions', '{role_id}')",
            "    principalId: principalId",
            "    principalType: 'ServicePrincipal'",
            "  }", "}", ""]
    return "\n".join(lines)


def render_text(report: dict[str, Any]) -> str:
    out = ["# keyless migration report", "", "## Key-based calls seen, per resource", ""]
    if not report["inventory"]:
        out.append("(none recorded yet: run keyless, or keyless --audit, with the app)")
    for item in report["inventory"]:
        schemes = ", ".join(f"{s} ×{n}" for s, n in sorted(item["schemes"].items()))
        verdict = ("yes" if item["local_auth_can_be_disabled"] else
                   "NO: key-based calls are still forwarded with their keys (audit mode)")
        out += [f"- {item['service']} {item['resource']} ({', '.join(item['hosts'])}): "
                f"{item['calls']} calls, schemes {schemes}, operations "
                f"{', '.join(item['operations'])}, identities {', '.join(item['identities'])}",
                f"  last converted: {item['last_converted'] or 'never'}; last forwarded with "
                f"key: {item['last_audited'] or 'never'}",
                f"  local (key) authentication can be disabled: {verdict}"]
    if report.get("database_logins"):
        out += ["", "## Database and cache logins: what the identities need", ""]
        for login in report["database_logins"]:
            out.append(f"- {login['service']} {login['resource']} (identities "
                       f"{', '.join(login['identities'])}):")
            out += [f"  {n}. {step}" for n, step in enumerate(login["setup"], 1)]
    out += ["", "## Role assignments the identities need (az CLI)", ""]
    out += az_commands(report) or ["(none)"]
    out += ["", "## The same as Bicep", "", bicep(report)]
    return "\n".join(out)
