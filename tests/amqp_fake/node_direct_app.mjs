// The Node SDKs straight to the fake namespace (no keyless): @azure/service-bus and
// @azure/event-hubs with a TokenCredential (Entra mode) or with their SAS connection string.
// Prints one JSON line of what the app got.
// Usage: node node_direct_app.mjs servicebus|eventhubs entra|sas NAMESPACE PORT BODY
// Env: KEYLESS_TEST_TOKEN_<SERVICEBUS|EVENTHUBS> (minted by the test), KEYLESS_TEST_SAS
// (connection string), NODE_EXTRA_CA_CERTS (the test CA).
import { ServiceBusClient } from "@azure/service-bus";
import { EventHubProducerClient, EventHubConsumerClient } from "@azure/event-hubs";
import { eventHubsRoundTrip, serviceBusRoundTrip } from "../support/node_amqp_round_trip.mjs";

const [service, mode, namespace, port, body] = process.argv.slice(2);
const options = { retryOptions: { maxRetries: 0, timeoutInMs: 15000 },
                  customEndpointAddress: `amqps://127.0.0.1:${port}` };
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
    const producer = mode === "entra"
      ? new EventHubProducerClient(namespace, "telemetry", credential, options)
      : new EventHubProducerClient(process.env.KEYLESS_TEST_SAS, "telemetry", options);
    result.received = await eventHubsRoundTrip(
      producer, () => new EventHubConsumerClient("$Default", namespace, "telemetry", credential, options),
      "0", body);
  } else {
    const client = mode === "entra"
      ? new ServiceBusClient(namespace, credential, options)
      : new ServiceBusClient(process.env.KEYLESS_TEST_SAS, options);
    result.received = await serviceBusRoundTrip(client, body);
  }
} catch (err) {
  result.error = `${err.name}: ${err.code ?? ""} ${err.message}`;
}
result.scopes = [...new Set(scopes)];
console.log(JSON.stringify(result));
process.exit(0);
