// A fake Service Bus / Event Hubs namespace on rhea (an AMQP 1.0 implementation independent of
// the SDKs and of keyless), enforcing what the service enforces for Entra tokens:
//   - SASL: ANONYMOUS and MSSBCBS accepted; PLAIN only with local auth (key name + key).
//   - the open frame's hostname must be the namespace;
//   - a valid CBS put-token within the deadline, or the connection is closed;
//   - put-token: a JWT (RS256 with the tests' issuer key, iss, aud for the entity's service,
//     nbf/exp) whose `name` (audience) host is the namespace; SAS refused unless local auth
//     (status-code 401), then checked like the service (HMAC-SHA256 of "uri\nexpiry");
//   - an attach to an entity without a valid token for it is refused;
//   - links are detached when their entity's token expires (unless a new one came).
// Entities: queues "orders" and "sessions" (requires-session), topic "events" with subscription
// "audit", event hub "telemetry" with partitions "0" and "1" (consumer group $Default).
// Every event is one JSON line in the event log; tokens and signatures are never written.
//
// Usage: node fake_namespace.mjs CONFIG.json  (written by tests/support/fake_namespace.py);
// prints one line `READY {"amqps_port":..,"wss_port":..}` on stdout when listening.
import { createRequire } from 'node:module';
import crypto from 'node:crypto';
import fs from 'node:fs';
import https from 'node:https';
import { Duplex } from 'node:stream';

const require = createRequire(import.meta.url);
const rhea = require('rhea');
const frames = require('rhea/lib/frames.js');

// azure-eventhub's pyamqp reads a transfer's payload at index 11, after all eleven fields of
// the performative; the service sends them all, rhea omits trailing defaults: fill them.
const rheaTransfer = frames.transfer;
frames.transfer = (fields) => rheaTransfer({ rcv_settle_mode: null, state: null, resume: false,
    aborted: false, batchable: false, ...fields });

const config = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const NAMESPACE = config.namespace.toLowerCase();
const PUBLIC_KEY = crypto.createPublicKey(config.public_key_pem);
const SERVICEBUS_AUDIENCE = 'https://servicebus.azure.net';
const EVENTHUBS_AUDIENCE = 'https://eventhubs.azure.net';
const DATETIMEOFFSET_EPOCH = 621355968000000000n;  // .NET ticks at the Unix epoch
const logFd = fs.openSync(config.event_log, 'a');

function record(event, details) {
    fs.writeSync(logFd, JSON.stringify({ event, time: Date.now() / 1000, ...details }) + '\n');
}

// -- entities --------------------------------------------------------------------------------

function newQueue(name, requiresSession) {
    return { name, requiresSession, messages: [], receivers: new Set(), sequence: 0 };
}
const queues = {
    orders: newQueue('orders', false),
    sessions: newQueue('sessions', true),
    'events/subscriptions/audit': newQueue('events/subscriptions/audit', false),
};
const topics = { events: ['events/subscriptions/audit'] };
const eventHubs = {
    telemetry: { partitions: { 0: { events: [], receivers: new Set() }, 1: { events: [], receivers: new Set() } }, next: 0 },
};

// The entity an address names: {kind, name, root, ...} or undefined.
function entityFor(segments) {
    const path = segments.join('/');
    const root = segments[0];
    // Event Hubs clients use the namespace-level "$management" (the hub is in the request).
    if (path === '$management') return { kind: 'management', root: null, name: path };
    if (segments.length >= 2 && segments[segments.length - 1] === '$management') {
        return { kind: 'management', root, name: path };
    }
    if (queues[path]) return { kind: 'queue', root, name: path, queue: queues[path] };
    if (topics[path]) return { kind: 'topic', root, name: path };
    const hub = eventHubs[root];
    if (hub) {
        if (segments.length === 1) return { kind: 'hub', root, name: path, hub };
        // telemetry/Partitions/0 (send) or telemetry/ConsumerGroups/$Default/Partitions/0 (receive)
        if (segments.length === 3 && segments[1] === 'partitions' && hub.partitions[segments[2]]) {
            return { kind: 'hub', root, name: path, hub, partition: segments[2] };
        }
        if (segments.length === 5 && segments[1] === 'consumergroups' && segments[2] === '$default'
            && segments[3] === 'partitions' && hub.partitions[segments[4]]) {
            return { kind: 'partition', root, name: path, hub, partition: segments[4] };
        }
    }
    return undefined;
}

function audienceFor(root) {
    return eventHubs[root] ? EVENTHUBS_AUDIENCE : SERVICEBUS_AUDIENCE;
}

// "sb://host/a/b", "amqps://host:5671/a", "a/b" -> {host, segments} (segments lowercased).
function parseAddress(address) {
    let host = null;
    let path = String(address ?? '');
    const scheme = path.indexOf('://');
    if (scheme >= 0) {
        const rest = path.slice(scheme + 3);
        const slash = rest.indexOf('/');
        host = (slash >= 0 ? rest.slice(0, slash) : rest).toLowerCase();
        path = slash >= 0 ? rest.slice(slash + 1) : '';
    }
    const segments = path.split('/').filter((s) => s.length).map((s) => s.toLowerCase());
    return { host, segments };
}

function isPrefix(prefix, segments) {
    return prefix.length <= segments.length && prefix.every((s, i) => s === segments[i]);
}

// -- token checks ----------------------------------------------------------------------------

function b64urlJson(part) {
    return JSON.parse(Buffer.from(part, 'base64url').toString('utf8'));
}

// Returns {ok, reason, expires} for a JWT the service would accept for `root`.
function checkJwt(token, root) {
    const parts = token.split('.');
    if (parts.length !== 3) return { ok: false, reason: 'not a JWT' };
    let header;
    let claims;
    try {
        header = b64urlJson(parts[0]);
        claims = b64urlJson(parts[1]);
    } catch {
        return { ok: false, reason: 'not a JWT' };
    }
    if (config.check_signature && !(header.alg === 'RS256' && crypto.verify(
        'RSA-SHA256', Buffer.from(`${parts[0]}.${parts[1]}`), PUBLIC_KEY,
        Buffer.from(parts[2], 'base64url')))) {
        return { ok: false, reason: 'signature does not verify with the issuer key' };
    }
    if (config.check_issuer && claims.iss !== config.issuer) {
        return { ok: false, reason: `issuer ${JSON.stringify(claims.iss)} not trusted` };
    }
    const audience = audienceFor(root);
    const aud = String(claims.aud ?? '').replace(/\/$/, '');
    if (config.check_audience && aud !== audience) {
        return { ok: false, reason: `token audience ${JSON.stringify(claims.aud)}, expected ${audience}` };
    }
    const now = Date.now() / 1000;
    if (config.token_lifetime_check) {
        if (typeof claims.exp !== 'number' || claims.exp <= now) return { ok: false, reason: 'token expired' };
        if (typeof claims.nbf !== 'number' || claims.nbf > now + 1) return { ok: false, reason: 'token not yet valid' };
    }
    return { ok: true, expires: typeof claims.exp === 'number' ? claims.exp : now + 3600 };
}

// A SharedAccessSignature: refused without local auth, else checked like the service.
function checkSas(token, audience) {
    if (!config.local_auth) return { ok: false, reason: 'local authentication (SAS) is disabled' };
    const fields = Object.fromEntries(token.slice('SharedAccessSignature '.length).split('&')
        .map((kv) => kv.split('=')).map(([k, ...v]) => [k, decodeURIComponent(v.join('='))]));
    const key = config.sas_keys[fields.skn];
    if (!key) return { ok: false, reason: 'unknown SAS key name' };
    const expected = crypto.createHmac('sha256', key)
        .update(`${encodeURIComponent(fields.sr)}\n${fields.se}`).digest('base64');
    const given = Buffer.from(String(fields.sig));
    if (given.length !== Buffer.from(expected).length || !crypto.timingSafeEqual(given, Buffer.from(expected))) {
        return { ok: false, reason: 'SAS signature does not verify' };
    }
    const sr = parseAddress(fields.sr);
    const name = parseAddress(audience);
    if (sr.host !== NAMESPACE || !isPrefix(sr.segments, name.segments)) {
        return { ok: false, reason: 'SAS resource does not cover the audience' };
    }
    const expires = Number(fields.se);
    if (!(expires > Date.now() / 1000)) return { ok: false, reason: 'SAS token expired' };
    return { ok: true, expires };
}

// -- connections -----------------------------------------------------------------------------

let connectionCount = 0;

function connState(connection) {
    if (!connection.fake) {
        connection.fake = { id: ++connectionCount, tokens: [], authorized: false, links: new Set() };
    }
    return connection.fake;
}

function closeConnection(connection, condition, reason) {
    const state = connState(connection);
    if (state.closed) return;
    state.closed = true;
    record('connection_closed', { connection: state.id, condition, reason });
    connection.close({ condition, description: reason, info: {} });
}

const container = rhea.create_container({ id: `fake-${NAMESPACE}` });
const mechanisms = container.sasl_server_mechanisms;
function anonymous(name) {
    return () => ({
        start() {
            record('sasl', { mechanism: name, accepted: true });
            this.outcome = true;
            this.username = 'anonymous';
        },
    });
}
mechanisms.ANONYMOUS = anonymous('ANONYMOUS');
mechanisms.MSSBCBS = anonymous('MSSBCBS');
mechanisms.PLAIN = () => ({
    start(response) {
        const [, user, password] = Buffer.from(response ?? []).toString('utf8').split('\0');
        const ok = config.local_auth && config.sas_keys[user] !== undefined
            && config.sas_keys[user] === password;
        record('sasl', { mechanism: 'PLAIN', accepted: ok, user,
            reason: ok ? undefined : (config.local_auth ? 'wrong key' : 'local authentication is disabled') });
        this.outcome = ok;
        this.username = user;
    },
});

container.on('connection_open', (context) => {
    const connection = context.connection;
    const state = connState(connection);
    const hostname = (connection.remote.open.hostname ?? '').toLowerCase();
    const accepted = !config.check_hostname || hostname === NAMESPACE;
    record('open', { connection: state.id, hostname, accepted, transport: connection.fake_transport ?? 'amqps' });
    if (!accepted) {
        closeConnection(connection, 'amqp:not-found',
            `The messaging entity 'sb://${hostname}/' could not be found.`);
        return;
    }
    if (config.enforce_deadline) {
        state.deadline = setTimeout(() => {
            if (!state.authorized) {
                closeConnection(connection, 'amqp:unauthorized-access',
                    `no valid put-token within ${config.put_token_deadline} seconds`);
            }
        }, config.put_token_deadline * 1000);
    }
});

function cleanupConnection(context) {
    const state = connState(context.connection);
    clearTimeout(state.deadline);
    for (const link of state.links) releaseLink(link);
    state.links.clear();
}
container.on('disconnected', cleanupConnection);
container.on('connection_close', cleanupConnection);
container.on('connection_error', () => {});
container.on('error', () => {});

// azure-eventhub reads begin's handle-max and properties (index 4, 7): always send them.
container.on('session_open', (context) => {
    context.session.local.begin.handle_max = 255;
    context.session.local.begin.properties = { 'com.microsoft:tracking-id': crypto.randomUUID() };
});

// The client attaches a sender: we receive on this link.
container.on('receiver_open', (context) => {
    const link = context.receiver;
    const address = link.remote.attach.target?.address;
    link.set_target({ address });
    link.set_source({ address: link.remote.attach.source?.address });
    link.local.attach.properties = { 'com.microsoft:tracking-id': crypto.randomUUID() };
    link.local.attach.max_message_size = 1048576;
    if (address === '$cbs') {
        record('attach', { connection: connState(link.connection).id, role: 'sender', address, accepted: true });
        link.fake_kind = 'cbs';
        return;
    }
    const entity = authorizeAttach(link, address, 'sender');
    if (!entity) return;
    link.fake_entity = entity;
    link.fake_kind = entity.kind === 'management' ? 'management' : 'entity';
});

// The client attaches a receiver: we send on this link.
container.on('sender_open', (context) => {
    const link = context.sender;
    const source = link.remote.attach.source ?? {};
    const address = source.address;
    link.local.attach.snd_settle_mode = link.remote.attach.snd_settle_mode;
    link.local.attach.rcv_settle_mode = link.remote.attach.rcv_settle_mode;
    link.local.attach.properties = { 'com.microsoft:tracking-id': crypto.randomUUID() };
    link.set_source({ address, filter: source.filter });
    link.set_target({ address: link.remote.attach.target?.address });
    if (address === '$cbs' || /(^|\/)\$management$/i.test(String(address))) {
        if (address !== '$cbs' && !authorizeAttach(link, address, 'receiver')) return;
        if (address === '$cbs') {
            record('attach', { connection: connState(link.connection).id, role: 'receiver', address, accepted: true });
        }
        link.fake_kind = 'reply';
        return;
    }
    const entity = authorizeAttach(link, address, 'receiver');
    if (!entity) return;
    if (entity.kind === 'queue') {
        let sessionId;
        if (entity.queue.requiresSession) {
            const filter = source.filter ?? {};
            sessionId = filter['com.microsoft:session-filter'];
            if (sessionId === undefined || sessionId === null) {
                sessionId = entity.queue.messages.find((m) => !sessionLocked(entity.queue, m.session))?.session;
            }
            if (sessionId === undefined || sessionLocked(entity.queue, sessionId)) {
                refuseLink(link, 'com.microsoft:timeout', 'no session available');
                return;
            }
            link.set_source({ address, filter: { ...(source.filter ?? {}), 'com.microsoft:session-filter': sessionId } });
        }
        link.fake_entity = entity;
        link.fake_session = sessionId;
        link.fake_unsettled = new Map();
        entity.queue.receivers.add(link);
        link.fake_kind = 'queue_receiver';
    } else if (entity.kind === 'partition') {
        const partition = entity.hub.partitions[entity.partition];
        link.fake_entity = entity;
        link.fake_next = startPosition(partition, source.filter ?? {});
        partition.receivers.add(link);
        link.fake_kind = 'partition_receiver';
    } else {
        refuseLink(link, 'amqp:not-implemented', `cannot receive from ${entity.kind} ${entity.name}`);
        return;
    }
    connState(link.connection).links.add(link);
    setImmediate(() => pump(link));
});

function sessionLocked(queue, sessionId) {
    for (const receiver of queue.receivers) if (receiver.fake_session === sessionId) return true;
    return false;
}

function refuseLink(link, condition, reason) {
    record('attach_refused', { connection: connState(link.connection).id, address: link.fake_address, condition, reason });
    // Like the service: the attach is answered without a terminus, then detached with the error.
    if (link.is_sender()) link.local.attach.source = null; else link.local.attach.target = null;
    link.close({ condition, description: reason, info: {} });
}

// The entity of an attach when a valid token covers it; else the link is refused (undefined).
function authorizeAttach(link, address, role) {
    const state = connState(link.connection);
    const { host, segments } = parseAddress(address);
    link.fake_address = address;
    const entity = entityFor(segments);
    let reason;
    let condition = 'amqp:unauthorized-access';
    if (host !== null && config.check_hostname && host.split(':')[0] !== NAMESPACE) {
        reason = `address host ${host} is not the namespace`;
        condition = 'amqp:not-found';
    } else if (!entity) {
        reason = `no entity ${segments.join('/')}`;
        condition = 'amqp:not-found';
    } else if (config.check_attach && !validToken(state, tokenScope(entity, segments))) {
        reason = `no valid token for ${segments.join('/')}`;
    }
    record('attach', { connection: state.id, role, address, entity: entity?.name, accepted: !reason, reason });
    if (reason) {
        refuseLink(link, condition, reason);
        return undefined;
    }
    if (config.check_expiry) scheduleExpiry(link, tokenScope(entity, segments));
    return entity;
}

function tokenScope(entity, segments) {
    return entity.root === null ? null : segments;
}

function validToken(state, segments) {
    const now = Date.now() / 1000;
    let best;
    for (const token of state.tokens) {
        // segments null: any entity's token (namespace-level $management)
        if (token.expires > now && (segments === null || isPrefix(token.segments, segments)) && (!best || token.expires > best.expires)) {
            best = token;
        }
    }
    return best;
}

function scheduleExpiry(link, segments) {
    const state = connState(link.connection);
    const token = validToken(state, segments);
    if (!token) {
        record('link_detached', { connection: state.id, address: link.fake_address, reason: 'token expired' });
        link.close({ condition: 'amqp:unauthorized-access', description: 'The token has expired.', info: {} });
        releaseLink(link);
        return;
    }
    const delay = Math.max(0, token.expires * 1000 - Date.now()) + 10;
    link.fake_expiry = setTimeout(() => {
        if (!link.is_closed() && !state.closed) scheduleExpiry(link, segments);
    }, Math.min(delay, 2 ** 31 - 1));
}

// Put back what a closed receiver held unsettled (peek-lock: the lock is lost).
function releaseLink(link) {
    clearTimeout(link.fake_expiry);
    if (link.fake_kind === 'queue_receiver') {
        const queue = link.fake_entity.queue;
        queue.receivers.delete(link);
        const held = [...link.fake_unsettled.values()];
        link.fake_unsettled.clear();
        queue.messages.unshift(...held);
        for (const other of queue.receivers) setImmediate(() => pump(other));
    } else if (link.fake_kind === 'partition_receiver') {
        link.fake_entity.hub.partitions[link.fake_entity.partition].receivers.delete(link);
    }
}
container.on('sender_close', (context) => releaseLink(context.sender));
container.on('receiver_close', (context) => clearTimeout(context.receiver.fake_expiry));

// -- messages --------------------------------------------------------------------------------

container.on('message', (context) => {
    const link = context.receiver;
    if (link.fake_kind === 'cbs') return onPutToken(context);
    if (link.fake_kind === 'management') return onManagement(context);
    if (link.fake_kind === 'entity') return onEntityMessage(context);
    return undefined;
});

// Answers a request on the reply link of the same node ($cbs, $management), preferring the
// one the request's reply-to names.
function reply(context, status, description, body) {
    const request = context.message;
    const node = context.receiver.remote.attach.target?.address;
    const candidates = Object.values(context.connection.local_channel_map)
        .flatMap((s) => Object.values(s.links))
        .filter((l) => l.is_sender() && l.fake_kind === 'reply' && !l.is_closed()
            && l.remote.attach.source?.address === node);
    const replyLink = candidates.find((l) => l.remote.attach.target?.address === request.reply_to)
        ?? candidates[0];
    if (!replyLink) return;
    const delivery = replyLink.send({
        correlation_id: request.message_id ?? request.correlation_id,
        to: request.reply_to,
        // CBS and Event Hubs answer with status-code; Service Bus' $management with statusCode.
        // Both are AMQP `int` as the service sends them: rhea would pick uint for a positive
        // number, which the Go SDK (int32 only) and the Java SDK (a cast to Integer) refuse.
        application_properties: { 'status-code': rhea.types.wrap_int(status),
            'status-description': description, statusCode: rhea.types.wrap_int(status),
            statusDescription: description },
        body,
    });
    // Replies go pre-settled: a client that never settles them (pyamqp) must not hold rhea's
    // outgoing delivery buffer (shared by the session's links) at its head forever. Only
    // `settled`: rhea marks a pre-settled delivery remote_settled itself once it is sent, and
    // drops settled + remote_settled ones from the buffer's head, sent or not. A reply that
    // waits for credit (the Go SDK grants its new reply link's credit after the put-token
    // went out) would be dropped, where the service delivers it when the credit comes.
    delivery.settled = true;
}

function onPutToken(context) {
    const message = context.message;
    const props = message.application_properties ?? {};
    const state = connState(context.connection);
    const type = String(props.type ?? '');
    const name = String(props.name ?? '');
    let token = message.body;
    if (token && typeof token === 'object' && token.typecode !== undefined) token = token.content;
    if (Buffer.isBuffer(token)) token = token.toString('utf8');
    token = String(token ?? '');
    const kind = token.startsWith('SharedAccessSignature ') ? 'sas' : (token.split('.').length === 3 ? 'jwt' : 'other');
    const { host, segments } = parseAddress(name);
    let verdict;
    if (props.operation !== 'put-token') {
        verdict = { ok: false, status: 400, reason: `unsupported CBS operation ${props.operation}` };
    } else if (config.check_audience_host && host?.split(':')[0] !== NAMESPACE) {
        verdict = { ok: false, status: 401, reason: `audience host ${host} is not the namespace` };
    } else if (kind === 'sas') {
        verdict = { status: 401, ...checkSas(token, name) };
    } else if (type !== 'jwt' && config.check_type) {
        verdict = { ok: false, status: 400, reason: `token type ${type} with a ${kind} body` };
    } else if (kind === 'jwt') {
        verdict = { status: 401, ...checkJwt(token, segments[0]) };
    } else {
        verdict = { ok: false, status: 401, reason: 'token is neither a JWT nor a SAS' };
    }
    if (verdict.ok) {
        state.tokens.push({ segments, expires: verdict.expires });
        state.authorized = true;
    }
    record('put_token', { connection: state.id, type, audience: name, token_kind: kind, accepted: !!verdict.ok,
        status: verdict.ok ? 200 : verdict.status, reason: verdict.reason, expires: verdict.expires });
    reply(context, verdict.ok ? 200 : verdict.status,
        verdict.ok ? 'OK' : verdict.reason, undefined);
}

function onManagement(context) {
    const message = context.message;
    const props = message.application_properties ?? {};
    const entity = context.receiver.fake_entity;
    const root = entity.root ?? String(props.name ?? '').toLowerCase();
    const hub = eventHubs[root];
    record('management', { connection: connState(context.connection).id, entity: root, operation: props.operation, type: props.type });
    if (hub && props.operation === 'READ' && props.type === 'com.microsoft:eventhub') {
        reply(context, 200, 'OK', {
            name: root, type: 'com.microsoft:eventhub',
            created_at: rhea.types.wrap_timestamp(Date.now()), partition_count: rhea.types.wrap_int(2),
            partition_ids: rhea.types.wrap_array(Object.keys(hub.partitions), 0xa1),
        });
    } else if (hub && props.operation === 'READ' && props.type === 'com.microsoft:partition') {
        const events = hub.partitions[String(props.partition)]?.events ?? [];
        const last = events.length - 1;
        reply(context, 200, 'OK', {
            name: root, type: 'com.microsoft:partition', partition: String(props.partition),
            begin_sequence_number: rhea.types.wrap_long(0),
            last_enqueued_sequence_number: rhea.types.wrap_long(last),
            last_enqueued_offset: String(last), is_partition_empty: events.length === 0,
            last_enqueued_time_utc: rhea.types.wrap_timestamp(Date.now()),
        });
    } else {
        reply(context, 501, `operation ${props.operation} not implemented by the fake`, undefined);
    }
}

// rhea encodes a footer before the body (the spec and the service put it last), and proton-j
// (Java) then sees no body at all: the stored copy keeps every section but an empty footer
// (the Java SDK sends one with every message).
function stored(message, extra) {
    const { footer, ...rest } = message;
    const kept = footer && Object.keys(footer).length ? { footer } : {};
    return { ...rest, ...kept, message_annotations: { ...(message.message_annotations ?? {}), ...extra } };
}

// The messages a transfer carries: a batch (message-format 0x80013700, which rhea hands over
// undecoded) is an outer message whose data sections are each a whole message.
function messagesOf(message) {
    if (!Buffer.isBuffer(message)) return [message];
    const outer = rhea.message.decode(message);
    const sections = outer.body?.multiple ? outer.body.content : [outer.body?.content ?? outer.body];
    return sections.map((section) => rhea.message.decode(Buffer.from(section)));
}

function onEntityMessage(context) {
    const entity = context.receiver.fake_entity;
    const messages = messagesOf(context.message);
    const state = connState(context.connection);
    let targets = [];
    if (entity.kind === 'queue') targets = [entity.queue];
    else if (entity.kind === 'topic') targets = topics[entity.name].map((q) => queues[q]);
    if (config.record_transfers) record('transfer', { connection: state.id, entity: entity.name, messages: messages.length });
    if (entity.kind === 'hub') {
        const partitionIds = Object.keys(entity.hub.partitions);
        const partitionId = entity.partition ?? partitionIds[entity.hub.next++ % partitionIds.length];
        const partition = entity.hub.partitions[partitionId];
        for (const event of messages) {
            const sequence = partition.events.length;
            partition.events.push(stored(event, {
                'x-opt-sequence-number': rhea.types.wrap_long(sequence),
                'x-opt-offset': String(sequence),
                'x-opt-enqueued-time': rhea.types.wrap_timestamp(Date.now()),
            }));
        }
        for (const receiver of partition.receivers) setImmediate(() => pump(receiver));
        return;
    }
    for (const queue of targets) {
        for (const one of messages) {
            queue.messages.push({
                session: one.group_id,
                message: stored(one, {
                    'x-opt-sequence-number': rhea.types.wrap_long(++queue.sequence),
                    'x-opt-enqueued-time': rhea.types.wrap_timestamp(Date.now()),
                    'x-opt-locked-until': rhea.types.wrap_timestamp(Date.now() + 60000),
                }),
            });
        }
        for (const receiver of queue.receivers) setImmediate(() => pump(receiver));
    }
}

function pump(link) {
    if (link.is_closed() || !link.fake_entity) return;
    if (link.fake_kind === 'queue_receiver') {
        const queue = link.fake_entity.queue;
        while (link.sendable()) {
            const index = queue.messages.findIndex((m) => !queue.requiresSession || m.session === link.fake_session);
            if (index < 0) return;
            const [item] = queue.messages.splice(index, 1);
            const delivery = link.send(item.message, crypto.randomBytes(16));
            if (config.record_transfers) record('delivered', { connection: connState(link.connection).id, entity: queue.name });
            if (link.local.attach.snd_settle_mode !== 1) link.fake_unsettled.set(delivery, item);
        }
    } else if (link.fake_kind === 'partition_receiver') {
        const partition = link.fake_entity.hub.partitions[link.fake_entity.partition];
        while (link.sendable() && link.fake_next < partition.events.length) {
            link.send(partition.events[link.fake_next++]);
            if (config.record_transfers) record('delivered', { connection: connState(link.connection).id, entity: link.fake_entity.name });
        }
    }
}
container.on('sendable', (context) => pump(context.sender));

function settle(context, outcome) {
    const link = context.sender;
    // rcv-settle-mode second (peek-lock): the receiver waits for us to settle its outcome.
    if (!context.delivery.remote_settled && !context.delivery.settled) {
        context.delivery.update(true, rhea.message[outcome]().described());
    }
    const item = link.fake_unsettled?.get(context.delivery);
    if (!item) return;
    link.fake_unsettled.delete(context.delivery);
    record('settled', { connection: connState(link.connection).id, entity: link.fake_entity.name, outcome });
    if (outcome === 'released') {
        link.fake_entity.queue.messages.unshift(item);
        setImmediate(() => pump(link));
    }
}
container.on('accepted', (context) => settle(context, 'accepted'));
container.on('rejected', (context) => settle(context, 'rejected'));
container.on('released', (context) => settle(context, 'released'));

// Event hub start position from the selector filter: "amqp.annotation.x-opt-offset > '@latest'".
function startPosition(partition, filter) {
    const selector = Object.entries(filter).find(([key]) => key.includes('selector-filter'))?.[1];
    const text = String(selector?.value ?? selector ?? '');
    const match = /x-opt-(offset|sequence-number|enqueued-time)\s*(>=|>)\s*'([^']*)'/.exec(text);
    if (!match) return 0;
    const [, field, operator, value] = match;
    if (value === '@latest') return partition.events.length;
    if (field === 'enqueued-time') return 0;
    const n = Number(value);
    if (!Number.isFinite(n) || n < 0) return 0;
    return operator === '>=' ? n : n + 1;
}

// -- listeners -------------------------------------------------------------------------------

// azure-eventhub reads the open frame's properties field (index 9): always send it.
const OPEN_PROPERTIES = { product: 'keyless-fake-namespace' };
const tlsOptions = { cert: fs.readFileSync(config.cert), key: fs.readFileSync(config.key) };
const amqps = container.listen({
    transport: 'tls', host: '127.0.0.1', port: config.amqps_port, ...tlsOptions,
    require_sasl: true, max_frame_size: 262144, idle_time_out: 240000, properties: OPEN_PROPERTIES,
});
amqps.on('secureConnection', (socket) => record('connection', { transport: 'amqps', sni: socket.servername ?? null }));

// AMQP over WebSocket: a small RFC 6455 server (rhea ships only the client side glue, and `ws`
// is not installed); binary messages carry AMQP bytes, frames may span messages.
const wss = https.createServer(tlsOptions, (request, response) => {
    response.writeHead(404).end();
});
wss.on('upgrade', (request, socket) => {
    const protocols = String(request.headers['sec-websocket-protocol'] ?? '').split(',').map((p) => p.trim());
    // The request target may be absolute-form (the Java SDK's proton-j-extensions sends
    // `GET https://NS/$servicebus/websocket`), which an HTTP server must accept (RFC 9112
    // 3.2.2); then its host must be the namespace.
    const absolute = /^[a-z][a-z0-9+.-]*:\/\//i.test(request.url);
    let target;
    try {
        target = new URL(request.url, `https://${NAMESPACE}`);
    } catch {
        target = null;
    }
    const path = target?.pathname ?? request.url;
    const ok = target !== null && target.hostname === NAMESPACE
        && path === '/$servicebus/websocket' && protocols.includes('AMQPWSB10')
        && String(request.headers.upgrade).toLowerCase() === 'websocket';
    record('websocket', { path, absolute, protocols, accepted: ok });
    if (!ok) {
        socket.end('HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n');
        return;
    }
    const accept = crypto.createHash('sha1')
        .update(request.headers['sec-websocket-key'] + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11').digest('base64');
    socket.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n'
        + `Sec-WebSocket-Accept: ${accept}\r\nSec-WebSocket-Protocol: AMQPWSB10\r\n\r\n`);
    const stream = websocketStream(socket);
    const connection = container.create_connection({ require_sasl: true, max_frame_size: 262144, idle_time_out: 240000, properties: OPEN_PROPERTIES });
    connection.fake_transport = 'wss';
    connection.accept(stream);
});

// Wraps an upgraded socket as a Duplex of AMQP bytes (server side: client frames are masked).
function websocketStream(socket) {
    let buffered = Buffer.alloc(0);
    const stream = new Duplex({
        read() {},
        write(chunk, encoding, callback) {
            const length = chunk.length;
            const header = length < 126 ? Buffer.from([0x82, length])
                : length < 65536 ? Buffer.from([0x82, 126, length >> 8, length & 255])
                    : Buffer.concat([Buffer.from([0x82, 127]), (() => { const b = Buffer.alloc(8); b.writeBigUInt64BE(BigInt(length)); return b; })()]);
            socket.write(Buffer.concat([header, chunk]), callback);
        },
        final(callback) {
            socket.end(Buffer.from([0x88, 0]));
            callback();
        },
    });
    socket.on('data', (data) => {
        buffered = Buffer.concat([buffered, data]);
        for (;;) {
            if (buffered.length < 2) return;
            const opcode = buffered[0] & 0x0f;
            const masked = (buffered[1] & 0x80) !== 0;
            let length = buffered[1] & 0x7f;
            let offset = 2;
            if (length === 126) { if (buffered.length < 4) return; length = buffered.readUInt16BE(2); offset = 4; }
            else if (length === 127) { if (buffered.length < 10) return; length = Number(buffered.readBigUInt64BE(2)); offset = 10; }
            if (length > 16 * 1024 * 1024) { socket.destroy(); return; }
            const maskOffset = offset;
            if (masked) offset += 4;
            if (buffered.length < offset + length) return;
            const payload = Buffer.from(buffered.subarray(offset, offset + length));
            if (masked) for (let i = 0; i < payload.length; i++) payload[i] ^= buffered[maskOffset + (i % 4)];
            buffered = buffered.subarray(offset + length);
            if (opcode === 0x8) { stream.push(null); socket.end(Buffer.from([0x88, 0])); return; }
            if (opcode === 0x9) { socket.write(Buffer.concat([Buffer.from([0x8a, payload.length]), payload])); continue; }
            if (opcode === 0x2 || opcode === 0x0) stream.push(payload);
        }
    });
    socket.on('end', () => stream.push(null));
    socket.on('close', () => stream.destroy());
    socket.on('error', (e) => stream.destroy(e));
    return stream;
}

let listening = 0;
function ready() {
    if (++listening === 2) {
        process.stdout.write(`READY ${JSON.stringify({ amqps_port: amqps.address().port, wss_port: wss.address().port })}\n`);
    }
}
amqps.on('listening', ready);
wss.listen(config.wss_port, '127.0.0.1', ready);
process.on('SIGTERM', () => process.exit(0));
