// A legacy Node app: @azure/service-bus and @azure/event-hubs with the connection string it
// is given (a wrong key, UseDevelopmentEmulator=true). Prints one JSON line of what it got.
import { ServiceBusClient } from "@azure/service-bus";
import { EventHubProducerClient, EventHubConsumerClient, earliestEventPosition } from "@azure/event-hubs";

const [connectionString, body, kind] = process.argv.slice(2);
const result = {};
try {
  if (kind === "eventhubs") {
    const producer = new EventHubProducerClient(connectionString, { retryOptions: { maxRetries: 0 } });
    const batch = await producer.createBatch({ partitionId: "1" });
    batch.tryAdd({ body });
    await producer.sendBatch(batch);
    await producer.close();
    const consumer = new EventHubConsumerClient("$Default", connectionString, { retryOptions: { maxRetries: 0 } });
    result.received = await new Promise((resolve, reject) => {
      const timer = setTimeout(() => resolve([]), 15000);
      const subscription = consumer.subscribe("1", {
        processEvents: async (events) => {
          const found = events.map((e) => e.body);
          if (found.includes(body)) { clearTimeout(timer); await subscription.close(); resolve(found); }
        },
        processError: async (err) => { clearTimeout(timer); reject(err); },
      }, { startPosition: earliestEventPosition, maxWaitTimeInSeconds: 2 });
    });
    await consumer.close();
  } else {
    const client = new ServiceBusClient(connectionString, { retryOptions: { maxRetries: 0 } });
    const sender = client.createSender("orders");
    await sender.sendMessages({ body, messageId: `m-${body}` });  // the fake assigns none
    await sender.close();
    const receiver = client.createReceiver("orders", { receiveMode: "peekLock" });
    const messages = await receiver.receiveMessages(1, { maxWaitTimeInMs: 10000 });
    for (const m of messages) await receiver.completeMessage(m);
    result.received = messages.map((m) => m.body);
    await receiver.close();
    await client.close();
  }
} catch (err) {
  result.error = `${err.name}: ${err.message}`;
}
console.log(JSON.stringify(result));
process.exit(0);
