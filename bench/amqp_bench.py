"""The AMQP listener's cost: Service Bus messages through keyless vs the SDK straight to the
namespace, side by side in one run.

    python -m bench.amqp_bench [--messages N] [--connections C] [--rss-messages M] [--smoke]

Real processes on 127.0.0.1: the fake namespace (tests/support/fake_namespace.mjs, rhea, TLS,
Entra token checks), a fake managed-identity endpoint and keyless with a
`--reverse PORT=amqps://NS` listener. "direct" is azure-servicebus in its Entra mode (a
TokenCredential) speaking AMQPS to the namespace; "keyless" is the same SDK with a wrong SAS
key and `UseDevelopmentEmulator=true`, plain AMQP to the listener, keyless speaking AMQPS
upstream. Rounds alternate direct and keyless so both see the same machine load.

Reported: 1 KiB messages/s (send in batches of 100, then receive-and-delete) and the ratio
keyless/direct (target >= 0.9); connection set-up (open a sender: TCP, TLS, SASL, CBS
put-token, attach) p50 direct and keyless and the difference (target <= 5 ms); keyless' RSS
before and after --rss-messages messages (target: flat). Bounded: a count per phase and a
timeout for each receive. Nothing asserts an absolute timing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from azure.servicebus import (
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusReceiveMode,
    TransportType,
)

from tests.amqp.conftest import NAMESPACE, start_keyless
from tests.amqp_fake.conftest import MintingCredential
from tests.support.azurite import TestPKI
from tests.support.fake_namespace import FakeNamespace
from tests.support.identity_endpoint import FakeIdentityEndpoint

QUEUE = "orders"
BODY = b"x" * 1024
BATCH = 100
RECEIVE_WAIT = 10.0  # seconds one receive call may wait: a bound, not a speed target


def direct_client(ns: FakeNamespace) -> ServiceBusClient:
    return ServiceBusClient(
        fully_qualified_namespace=ns.namespace, credential=MintingCredential(),
        custom_endpoint_address=f"sb://127.0.0.1:{ns.amqps_port}",
        connection_verify=ns.ca_pem_path, transport_type=TransportType.Amqp, retry_total=0)


def keyless_client(connection_string: str) -> ServiceBusClient:
    return ServiceBusClient.from_connection_string(connection_string, retry_total=0)


def send_and_receive(client: ServiceBusClient, count: int) -> float:
    """Messages per second (sent + received) for `count` 1 KiB messages on one connection."""
    with client, client.get_queue_sender(QUEUE) as sender, client.get_queue_receiver(
            QUEUE, receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE,
            prefetch_count=BATCH, max_wait_time=RECEIVE_WAIT) as receiver:
        sender.send_messages(ServiceBusMessage(BODY))  # warm: links open, tokens put
        receiver.receive_messages(max_message_count=1, max_wait_time=RECEIVE_WAIT)
        started = time.perf_counter()
        for offset in range(0, count, BATCH):
            sender.send_messages([ServiceBusMessage(BODY)
                                  for _ in range(min(BATCH, count - offset))])
        received = 0
        while received < count:
            got = receiver.receive_messages(max_message_count=BATCH,
                                            max_wait_time=RECEIVE_WAIT)
            if not got:
                raise RuntimeError(f"received {received} of {count} messages")
            received += len(got)
        return 2 * count / (time.perf_counter() - started)


def connection_setup_ms(client_factory, count: int) -> list[float]:
    """Milliseconds to open a sender on a fresh connection, `count` times."""
    samples = []
    for _ in range(count):
        client = client_factory()
        started = time.perf_counter()
        with client, client.get_queue_sender(QUEUE):
            samples.append((time.perf_counter() - started) * 1000)
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--connections", type=int, default=30)
    parser.add_argument("--rss-messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny counts: runs in seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.messages, args.connections, args.rss_messages, args.rounds = 200, 3, 400, 1

    with tempfile.TemporaryDirectory(prefix="keyless-amqp-bench-") as tmp, \
            FakeIdentityEndpoint() as identity:
        work = Path(tmp)
        pki = TestPKI(work / "pki")
        with FakeNamespace(work / "ns", pki, NAMESPACE, record_transfers=False) as ns:
            through = start_keyless(work / "keyless", ns, identity)
            try:
                via = through.connection_string()
                rates: dict[str, list[float]] = {"direct": [], "keyless": []}
                setup: dict[str, list[float]] = {"direct": [], "keyless": []}
                for _ in range(args.rounds):
                    rates["direct"].append(send_and_receive(direct_client(ns), args.messages))
                    rates["keyless"].append(send_and_receive(keyless_client(via), args.messages))
                    setup["direct"] += connection_setup_ms(lambda: direct_client(ns),
                                                           args.connections)
                    setup["keyless"] += connection_setup_ms(lambda: keyless_client(via),
                                                            args.connections)
                rss_before = through.keyless.rss_bytes()
                send_and_receive(keyless_client(via), args.rss_messages)
                rss_after = through.keyless.rss_bytes()
                converted = through.logins("converted")
            finally:
                through.keyless.stop()
            puts = ns.events("put_token")

    sas_upstream = [p for p in puts if p["token_kind"] != "jwt"]
    direct_rate, keyless_rate = (statistics.median(rates[k]) for k in ("direct", "keyless"))
    direct_p50, keyless_p50 = (statistics.median(setup[k]) for k in ("direct", "keyless"))
    print(f"{'':10} {'msg/s':>10} {'setup p50 ms':>13}")
    print(f"{'direct':10} {direct_rate:10.0f} {direct_p50:13.2f}")
    print(f"{'keyless':10} {keyless_rate:10.0f} {keyless_p50:13.2f}")
    print(f"ratio keyless/direct msg/s: {keyless_rate / direct_rate:.2f} (target >= 0.90)")
    print(f"setup added by keyless p50: {keyless_p50 - direct_p50:.2f} ms (target <= 5 ms)")
    print(f"keyless RSS: {rss_before / 2**20:.1f} MiB before, {rss_after / 2**20:.1f} MiB after "
          f"{args.rss_messages} messages ({(rss_after - rss_before) / 2**20:+.1f} MiB)")
    print(f"put-tokens converted by keyless: {converted:.0f}; "
          f"SAS tokens that reached the namespace: {len(sas_upstream)}")
    if converted <= 0 or sas_upstream:
        print("FAILED: keyless did not convert the app's SAS put-tokens", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
