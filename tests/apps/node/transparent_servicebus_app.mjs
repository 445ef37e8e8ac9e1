// A legacy Node.js Service Bus app for the transparent-mode test: the real @azure/service-bus
// SDK with its SAS connection string (a WRONG key), AMQPS to the namespace's own name and port
// 5671, trusting the CA that NODE_EXTRA_CA_CERTS names; it knows nothing of keyless.
// Usage: node transparent_servicebus_app.mjs CONNECTION_STRING QUEUE. Prints one JSON line.
import { randomUUID } from "node:crypto";

import { ServiceBusClient } from "@azure/service-bus";

const [connectionString, queue] = process.argv.slice(2);
const body = `node-transparent-${randomUUID()}`;
const result = { sent: body };
const client = new ServiceBusClient(connectionString, {
  retryOptions: { maxRetries: 0, timeoutInMs: 20000 },
});
try {
  const sender = client.createSender(queue);
  await sender.sendMessages({ body, messageId: `m-${body}` });  // the fake assigns none
  await sender.close();
  const receiver = client.createReceiver(queue, { receiveMode: "peekLock" });
  const messages = await receiver.receiveMessages(1, { maxWaitTimeInMs: 10000 });
  for (const message of messages) await receiver.completeMessage(message);
  await receiver.close();
  result.received = messages.map((message) => message.body);
  result.outcome = result.received.includes(body) ? "ok" : "lost";
} catch (error) {
  result.outcome = "refused";
  result.error = `${error.name}: ${error.message}`.slice(0, 800);
} finally {
  await client.close();
}
result.uid = process.getuid();
console.log(JSON.stringify(result));
process.exit(0);
