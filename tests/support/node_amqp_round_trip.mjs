// The round trip the Node test apps make with @azure/service-bus and @azure/event-hubs
// (tests/amqp/node_servicebus_app.mjs, tests/amqp_fake/node_direct_app.mjs): send one
// message or event with `body`, then receive what is there. The apps build the clients
// (their connection strings, credentials and options differ); this is what they then do.
import { earliestEventPosition } from "@azure/event-hubs";

// Queue "orders": send `body` (with a message id: the fake assigns none), then receive one
// message in peek-lock mode and complete it. Returns the bodies received.
export async function serviceBusRoundTrip(client, body) {
  const sender = client.createSender("orders");
  await sender.sendMessages({ body, messageId: `m-${body}` });
  await sender.close();
  const receiver = client.createReceiver("orders", { receiveMode: "peekLock" });
  const messages = await receiver.receiveMessages(1, { maxWaitTimeInMs: 10000 });
  for (const m of messages) await receiver.completeMessage(m);
  await receiver.close();
  await client.close();
  return messages.map((m) => m.body);
}

// Send `body` to `partitionId`, then read that partition from the earliest event until
// `body` is among what arrived (15 s at the most). `consumer()` makes the consumer client,
// after the producer is closed. Returns the bodies of the batch that held `body`, or [].
export async function eventHubsRoundTrip(producer, consumer, partitionId, body) {
  const batch = await producer.createBatch({ partitionId });
  batch.tryAdd({ body });
  await producer.sendBatch(batch);
  await producer.close();
  const reader = consumer();
  const received = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => resolve([]), 15000);
    const subscription = reader.subscribe(partitionId, {
      processEvents: async (events) => {
        const found = events.map((e) => e.body);
        if (found.includes(body)) { clearTimeout(timer); await subscription.close(); resolve(found); }
      },
      processError: async (err) => { clearTimeout(timer); reject(err); },
    }, { startPosition: earliestEventPosition, maxWaitTimeInSeconds: 2 });
  });
  await reader.close();
  return received;
}
