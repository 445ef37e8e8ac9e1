// A legacy Node.js Event Hubs app on AMQP over WebSockets behind an HTTP proxy, with the key
// from its connection string: @azure/event-hubs with `ws` and an https-proxy-agent.
// Usage: node eventhubs_ws_app.mjs CONNECTION_STRING BODY PROXY_URL
// (trust for the proxy's certificates: NODE_EXTRA_CA_CERTS). Prints one JSON line.
import { EventHubConsumerClient, EventHubProducerClient, earliestEventPosition } from '@azure/event-hubs';
import { HttpsProxyAgent } from 'https-proxy-agent';
import WebSocket from 'ws';

const [connectionString, body, proxyUrl] = process.argv.slice(2);
const options = {
    webSocketOptions: {
        webSocket: WebSocket,
        webSocketConstructorOptions: { agent: new HttpsProxyAgent(proxyUrl) },
    },
    retryOptions: { maxRetries: 0, timeoutInMs: 20000 },
};
const result = {};
const producer = new EventHubProducerClient(connectionString, options);
const consumer = new EventHubConsumerClient('$Default', connectionString, options);
try {
    await producer.sendBatch([{ body }], { partitionId: '1' });
    result.sent = true;
    result.received = await new Promise((resolve, reject) => {
        const received = [];
        const subscription = consumer.subscribe('1', {
            processEvents: async (events) => { received.push(...events.map((e) => e.body)); },
            processError: async (error) => { reject(error); },
        }, { startPosition: earliestEventPosition, maxWaitTimeInSeconds: 2 });
        setTimeout(() => subscription.close().then(() => resolve(received), reject), 5000);
    });
} catch (error) {
    result.error = `${error.name}: ${error.message}`;
} finally {
    await producer.close();
    await consumer.close();
}
process.stdout.write(`${JSON.stringify(result)}\n`);
