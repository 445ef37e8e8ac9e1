// A legacy Node app: ioredis with the cache's access key (a wrong one here), through keyless.
// Usage: node ioredis_app.js PORT KEY [USERNAME]; prints one JSON line with what it saw.
const Redis = require("ioredis");

async function main() {
  const [port, key, username] = process.argv.slice(2);
  const options = { host: "127.0.0.1", port: Number(port), password: key,
                    maxRetriesPerRequest: 0, retryStrategy: () => null, lazyConnect: true };
  if (username) options.username = username;
  const app = new Redis(options);
  await app.connect();
  const result = {};
  await app.set("node-key", "node-value");
  result.get = await app.get("node-key");
  result.whoami = await app.call("ACL", "WHOAMI");
  const piped = await app.pipeline().set("n1", "1").incr("n1").get("n1").exec();
  result.pipeline = piped.map(([err, value]) => (err ? String(err) : value));
  result.multi = await app.multi().incr("n2").incr("n2").exec();
  const sub = new Redis(options);
  await sub.connect();
  const got = new Promise((resolve) => sub.on("message", (_channel, message) => resolve(message)));
  await sub.subscribe("node-news");
  await app.publish("node-news", "hello from node");
  result.message = await got;
  const pusher = new Redis(options);
  setTimeout(() => pusher.rpush("node-queue", "job"), 500);
  result.blpop = await app.blpop("node-queue", 10);
  for (const connection of [sub, pusher, app]) connection.disconnect();
  console.log(JSON.stringify(result));
}

main().catch((err) => { console.log(JSON.stringify({ error: String(err) })); process.exit(1); });
