// A legacy Node app: @azure/service-bus and @azure/event-hubs with the connection string it
// is given (a wrong key, UseDevelopmentEmulator=true). Prints one JSON line of what it got.
import { ServiceBusClient } from "@azure/service-bus";
import { EventHubProducerClient, EventHubConsumerClient } from "@azure/event-hubs";
import { eventHubsRoundTrip, serviceBusRoundTrip } from "../support/node_amqp_round_trip.mjs";

const [connectionString, body, kind] = process.argv.slice(2);
const options = { retryOptions: { maxRetries: 0 } };
const result = {};
try {
  if (kind === "eventhubs") {
    result.received = await eventHubsRoundTrip(
      new EventHubProducerClient(connectionString, options),
      () => new EventHubConsumerClient("$Default", connectionString, options), "1", body);
  } else {
    result.received = await serviceBusRoundTrip(new ServiceBusClient(connectionString, options), body);
  }
} catch (err) {
  result.error = `${err.name}: ${err.message}`;
}
console.log(JSON.stringify(result));
process.exit(0);
