// A bare AMQP client (rhea) that attaches a sender to an entity without any CBS put-token,
// which no SDK does: the namespace must refuse the attach. Prints one JSON line.
// Usage: node attach_without_token.mjs PORT NAMESPACE ENTITY CA_PEM
import { createRequire } from 'node:module';
import fs from 'node:fs';

const require = createRequire(import.meta.url);
const rhea = require('rhea');
const [port, namespace, entity, caPath] = process.argv.slice(2);
const container = rhea.create_container();
const done = (result) => { console.log(JSON.stringify(result)); process.exit(0); };
setTimeout(() => done({ outcome: 'timeout' }), 10000);
// The service answers a refused attach with an attach (no terminus) and then a detach.
container.on('sender_open', () => setTimeout(() => done({ outcome: 'attached' }), 1500));
container.on('sender_error', (context) => done({ outcome: 'refused', condition: context.sender.error?.condition }));
container.on('sender_close', () => done({ outcome: 'closed' }));
container.on('error', (e) => done({ outcome: 'error', message: String(e) }));
const connection = container.connect({
    host: '127.0.0.1', port: Number(port), transport: 'tls', servername: namespace,
    hostname: namespace, ca: fs.readFileSync(caPath), reconnect: false, username: 'anonymous',
});
connection.open_sender({ target: { address: `amqps://${namespace}/${entity}` } });
