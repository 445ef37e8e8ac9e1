"""A legacy Event Hubs app for the transparent-mode test: the real azure-eventhub SDK with its
SAS connection string (a WRONG key), AMQPS to the namespace's own name and port 5671, TLS
verified against the CA file it is given; it knows nothing of keyless. It sends one event to
partition 1 and reads partition 1 back. Prints one JSON line.

    python transparent_eventhubs_app.py CONNECTION_STRING CA_FILE
"""

from __future__ import annotations

import json
import os
import sys
import uuid

WAIT = 10  # seconds the consumer waits for an event: a bound


def main() -> int:
    from azure.eventhub import EventData, EventHubConsumerClient, EventHubProducerClient

    connection_string, ca = sys.argv[1:3]
    body = f"transparent-reading-{uuid.uuid4()}"
    received: list[str] = []
    try:
        with EventHubProducerClient.from_connection_string(
                connection_string, connection_verify=ca, retry_total=0) as producer:
            batch = producer.create_batch(partition_id="1")
            batch.add(EventData(body))
            producer.send_batch(batch)
        consumer = EventHubConsumerClient.from_connection_string(
            connection_string, "$Default", connection_verify=ca, retry_total=0)

        def on_event(_context, event) -> None:
            if event is not None:
                received.append(event.body_as_str())
                if body in received:
                    consumer.close()

        with consumer:
            consumer.receive(on_event=on_event, partition_id="1", starting_position="-1",
                             max_wait_time=WAIT)
        result: dict[str, object] = {"outcome": "ok" if body in received else "lost",
                                     "received": received, "sent": body}
    except Exception as exc:  # the test reads the outcome; the message helps when it fails
        result = {"outcome": "refused", "error": f"{type(exc).__name__}: {exc}"[:800]}
    result["uid"] = os.getuid()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
