// The Node SDKs straight to the fake namespace (no keyless): @azure/service-bus and
// @azure/event-hubs with a TokenCredential (Entra mode) or with their SAS connection string.
// Prints one JSON line of what the app got.
// Usage: node node_direct_app.mjs servicebus|eventhubs entra|sas NAMESPACE PORT BODY
// Env: KEYLESS_TEST_TOKEN_<SERVICEBUS|EVENTHUBS> (minted by the test), KEYLESS_TEST_SAS
// (connection string), NODE_EXTRA_CA_CERTS (the test CA).
import { ServiceBusClient } from "@azure/service-bus";
import { EventHubProducerClient, EventHubConsumerClient, earliestEventPosition } from "@azure/event-hubs";

const [service, mode, namespace, port, body] = process.argv.slice(2);
const customEndpointAddress = `amqps://127.0.0.1:${port}`;
const retryOptions = { maxRetries: 0, timeoutInMs: 15000 };
const scopes = [];
const credential = {
  async getToken(scope) {
    scopes.push(...[scope].flat());
    const resource = [scope].flat()[0].includes("eventhubs") ? "EVENTHUBS" : "SERVICEBUS";
    return { token: process.env[`KEYLESS_TEST_TOKEN_${resource}`], expiresOnTimestamp: Date.now() + 3600_000 };
  },
};
const result = {};
try {
  if (service === "eventhubs") {
    const options = { retryOptions, customEndpointAddress };
    const producer = mode === "entra"
      ? new EventHubProducerClient(namespace, "telemetry", credential, options)
      : new EventHubProducerClient(process.env.KEYLESS_TEST_SAS, "telemetry", options);
    const batch = await producer.createBatch({ partitionId: "0" });
    batch.tryAdd({ body });
    await producer.sendBatch(batch);
    await producer.close();
    const consumer = new EventHubConsumerClient("$Default", namespace, "telemetry", credential, options);
    result.received = await new Promise((resolve, reject) => {
      const timer = setTimeout(() => resolve([]), 15000);
      const subscription = consumer.subscribe("0", {
        processEvents: async (events) => {
          const found = events.map((e) => e.body);
          if (found.includes(body)) { clearTimeout(timer); await subscription.close(); resolve(found); }
        },
        processError: async (err) => { clearTimeout(timer); reject(err); },
      }, { startPosition: earliestEventPosition, maxWaitTimeInSeconds: 2 });
    });
    await consumer.close();
  } else {
    const options = { retryOptions, customEndpointAddress };
    const client = mode === "entra"
      ? new ServiceBusClient(namespace, credential, options)
      : new ServiceBusClient(process.env.KEYLESS_TEST_SAS, options);
    const sender = client.createSender("orders");
    await sender.sendMessages({ body, messageId: `m-${body}` });
    await sender.close();
    const receiver = client.createReceiver("orders", { receiveMode: "peekLock" });
    const messages = await receiver.receiveMessages(1, { maxWaitTimeInMs: 10000 });
    for (const m of messages) await receiver.completeMessage(m);
    result.received = messages.map((m) => m.body);
    await receiver.close();
    await client.close();
  }
} catch (err) {
  result.error = `${err.name}: ${err.code ?? ""} ${err.message}`;
}
result.scopes = [...new Set(scopes)];
console.log(JSON.stringify(result));
process.exit(0);
