"""A legacy Service Bus app for the transparent-mode test: the real azure-servicebus SDK with
its SAS connection string (a WRONG key), AMQPS to the namespace's own name and port 5671, TLS
verified against the CA file it is given; it knows nothing of keyless. Prints one JSON line.

    python transparent_amqp_app.py CONNECTION_STRING QUEUE CA_FILE [websocket]

With `websocket` it uses `transport_type=AmqpOverWebsocket` (wss to the namespace's port 443),
as apps behind firewalls that close 5671 do; still no proxy setting.
"""

from __future__ import annotations

import json
import os
import sys
import uuid


def main() -> int:
    from azure.servicebus import ServiceBusClient, ServiceBusMessage, TransportType

    connection_string, queue, ca = sys.argv[1:4]
    transport = (TransportType.AmqpOverWebsocket if sys.argv[4:5] == ["websocket"]
                 else TransportType.Amqp)
    body = f"transparent-{uuid.uuid4()}"
    try:
        with ServiceBusClient.from_connection_string(
                connection_string, connection_verify=ca, retry_total=0,
                transport_type=transport) as client:
            with client.get_queue_sender(queue) as sender:
                sender.send_messages(ServiceBusMessage(body))
            with client.get_queue_receiver(queue, max_wait_time=10) as receiver:
                received = []
                for message in receiver.receive_messages(max_message_count=10, max_wait_time=10):
                    received.append(str(message))
                    receiver.complete_message(message)
        result: dict[str, object] = {"outcome": "ok" if body in received else "lost",
                                     "received": received, "sent": body}
    except Exception as exc:  # the test reads the outcome; the message helps when it fails
        result = {"outcome": "refused", "error": f"{type(exc).__name__}: {exc}"[:800]}
    result["uid"] = os.getuid()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
