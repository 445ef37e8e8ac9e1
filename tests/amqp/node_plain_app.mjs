// A generic AMQP 1.0 client (rhea, as Qpid JMS and other non-Azure clients do it): SASL PLAIN
// with user = the SAS key name and password = the key, no CBS. It sends `body` to the queue
// "orders" and receives it back. With HOLD > 0 the receiver stays open HOLD seconds and a
// second message is sent after HOLD - 5 s (the token renewal test).
//
// With TLS_HOST and CA_FILE it speaks AMQPS to TLS_HOST:PORT (the namespace's own name, as an
// unchanged app in transparent mode does), verifying the server against CA_FILE.
//
// Usage: node node_plain_app.mjs PORT KEY_NAME KEY BODY [HOLD [TLS_HOST CA_FILE]]
// Prints one JSON line: {"received": [...]} or {"error": "..."}.
import fs from 'node:fs';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const rhea = require('rhea');

const [port, username, password, body, holdText, tlsHost, caFile] = process.argv.slice(2);
const hold = Number(holdText ?? 0);
const expected = hold > 0 ? [body, `${body}-late`] : [body];
const received = [];
const container = rhea.create_container({ id: 'keyless-plain-app' });
let finished = false;

function finish(result, code) {
    if (finished) return;
    finished = true;
    process.stdout.write(JSON.stringify(result) + '\n');
    setTimeout(() => process.exit(code), 100);
}

const target = tlsHost
    ? { transport: 'tls', host: tlsHost, servername: tlsHost, hostname: tlsHost,
        ca: fs.readFileSync(caFile) }
    : { host: '127.0.0.1', hostname: 'localhost' };
const connection = container.connect({
    ...target, port: Number(port), username, password, reconnect: false, idle_time_out: 60000,
});
connection.on('connection_error', (context) => {
    // a SASL failure is rhea's transport error; a close with an error the connection's
    const error = context.error ?? context.connection.error ?? {};
    finish({ error: `connection error: ${error.condition ?? ''} `
        + `${error.description ?? error.message ?? ''}` }, 1);
});
connection.on('disconnected', (context) => {
    finish({ error: `disconnected: ${context.error?.message ?? context.error ?? 'closed'}`,
        received }, 1);
});
connection.on('receiver_error', (context) => {
    const error = context.receiver.error ?? {};
    finish({ error: `receiver error: ${error.condition} ${error.description}`, received }, 1);
});
connection.on('sender_error', (context) => {
    const error = context.sender.error ?? {};
    finish({ error: `sender error: ${error.condition} ${error.description}`, received }, 1);
});

connection.open_receiver('orders');
const sender = connection.open_sender('orders');
let sent = 0;
sender.on('sendable', () => {
    if (sent === 0) {
        sent = 1;
        sender.send({ body });
        if (hold > 0) {
            setTimeout(() => sender.send({ body: `${body}-late` }), (hold - 5) * 1000);
        }
    }
});
connection.on('message', (context) => {
    const text = String(context.message.body);
    // (rhea accepts it; a message another test left in the queue is not this app's)
    if (!expected.includes(text)) return;
    received.push(text);
    if (received.length >= expected.length) {
        setTimeout(() => {  // let the accepted disposition go before the close
            connection.close();
            finish({ received }, 0);
        }, 200);
    }
});
setTimeout(() => finish({ error: 'timed out', received }, 1), (hold + 30) * 1000);
