"""Transparent mode's iptables recipe: the pod's outgoing HTTPS goes to keyless, except
keyless' own traffic (its UID) and loopback, for apps that ignore proxy variables."""

from __future__ import annotations

AMQP_PORTS = (5671,)  # AMQPS: Service Bus and Event Hubs SDKs' default transport
# The Azure database and cache ports (PostgreSQL, MySQL, Azure Cache for Redis, Azure
# Managed Redis) that --transparent-databases adds.
DATABASE_PORTS = (5432, 3306, 6380, 10000)


def transparent_rules(port: int, uid: int, protocol_port: int | None = None,
                      databases: bool = False) -> list[str]:
    """Shell commands for a privileged init container (CAP_NET_ADMIN) in the pod.
    `protocol_port`: keyless' --transparent-listen port, for AMQP (and the databases)."""
    if not 0 < port < 65536 or uid < 0 or not 0 < (protocol_port or 1) < 65536:
        raise ValueError("port must be 1-65535 and uid ≥ 0")
    rules = ["#!/bin/sh", "set -e",
             "# Send the pod's outgoing HTTPS (port 443) to keyless in transparent mode."]
    other = [*AMQP_PORTS, *(DATABASE_PORTS if databases else ())] if protocol_port else []
    if other:
        rules.append(f"# And its AMQP{' and database/cache' if databases else ''} connections "
                     f"({', '.join(map(str, other))}) to keyless' port {protocol_port} "
                     "(--transparent-listen).")
    for tool, loopback in (("iptables", "127.0.0.0/8"), ("ip6tables", "::1/128")):
        rules += [
            f"{tool} -t nat -N KEYLESS_OUTPUT",
            f"{tool} -t nat -A KEYLESS_OUTPUT -d {loopback} -j RETURN",
            "# keyless' own connections (to Azure and the identity endpoint) go out as they are",
            f"{tool} -t nat -A KEYLESS_OUTPUT -m owner --uid-owner {uid} -j RETURN",
            f"{tool} -t nat -A KEYLESS_OUTPUT -p tcp --dport 443 -j REDIRECT --to-ports {port}",
            *(f"{tool} -t nat -A KEYLESS_OUTPUT -p tcp --dport {other_port} -j REDIRECT "
              f"--to-ports {protocol_port}" for other_port in other),
            f"{tool} -t nat -A OUTPUT -p tcp -j KEYLESS_OUTPUT",
        ]
    return rules


def apply_rules(rules: list[str], timeout: float = 20.0) -> None:
    """Run the recipe's commands (no shell: each line is an argv), after removing keyless' own
    chain from an earlier run in this namespace (a restarted init container). Raise
    RuntimeError with iptables' message on the first failure: transparent mode fails closed."""
    import shlex
    import subprocess

    commands = [shlex.split(line) for line in rules
                if line.strip() and not line.startswith("#") and line != "set -e"]
    for tool in dict.fromkeys(c[0] for c in commands):
        for cleanup in (["-t", "nat", "-D", "OUTPUT", "-p", "tcp", "-j", "KEYLESS_OUTPUT"],
                        ["-t", "nat", "-F", "KEYLESS_OUTPUT"],
                        ["-t", "nat", "-X", "KEYLESS_OUTPUT"]):
            subprocess.run([tool, *cleanup], capture_output=True, timeout=timeout, check=False)
    for argv in commands:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"{argv[0]}: {exc}") from None
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(argv)}` failed: {done.stderr.strip()[:500]}")
