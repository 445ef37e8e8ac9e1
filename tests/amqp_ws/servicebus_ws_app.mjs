// A legacy Node.js Service Bus app on AMQP over WebSockets behind an HTTP proxy, with the key
// from its connection string: @azure/service-bus with `ws` and an https-proxy-agent.
// Usage: node servicebus_ws_app.mjs CONNECTION_STRING QUEUE BODY PROXY_URL
// (trust for the proxy's certificates: NODE_EXTRA_CA_CERTS). Prints one JSON line.
import { ServiceBusClient } from '@azure/service-bus';
import { HttpsProxyAgent } from 'https-proxy-agent';
import WebSocket from 'ws';

const [connectionString, queue, body, proxyUrl] = process.argv.slice(2);
const client = new ServiceBusClient(connectionString, {
    webSocketOptions: {
        webSocket: WebSocket,
        webSocketConstructorOptions: { agent: new HttpsProxyAgent(proxyUrl) },
    },
    retryOptions: { maxRetries: 0, timeoutInMs: 20000 },
});
const result = {};
try {
    const sender = client.createSender(queue);
    await sender.sendMessages({ body, messageId: `m-${Date.now()}` });
    await sender.close();
    const receiver = client.createReceiver(queue);  // peek-lock
    const messages = await receiver.receiveMessages(1, { maxWaitTimeInMs: 10000 });
    for (const message of messages) await receiver.completeMessage(message);
    result.received = messages.map((m) => m.body);
    await receiver.close();
} catch (error) {
    result.error = `${error.name}: ${error.message}`;
} finally {
    await client.close();
}
process.stdout.write(`${JSON.stringify(result)}\n`);
