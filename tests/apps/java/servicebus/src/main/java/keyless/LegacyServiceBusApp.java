package keyless;

import com.azure.core.amqp.AmqpRetryOptions;
import com.azure.core.amqp.AmqpTransportType;
import com.azure.messaging.servicebus.ServiceBusClientBuilder;
import com.azure.messaging.servicebus.ServiceBusMessage;
import com.azure.messaging.servicebus.ServiceBusProcessorClient;
import com.azure.messaging.servicebus.ServiceBusReceivedMessage;
import com.azure.messaging.servicebus.ServiceBusReceiverClient;
import com.azure.messaging.servicebus.ServiceBusSenderClient;
import com.azure.messaging.servicebus.models.ServiceBusReceiveMode;

import java.time.Duration;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.UUID;

/**
 * A legacy Service Bus app: the real azure-messaging-servicebus SDK with its SAS connection
 * string (a WRONG key, from SERVICEBUS_CONNECTION_STRING); it knows nothing of keyless.
 * Sends COUNT messages to a queue (or a topic), receives them with peek-lock and completes
 * them, and prints ONE JSON line: ok, sent and received ids and bodies, or the error.
 *
 *   java keyless.LegacyServiceBusApp QUEUE [COUNT]
 *   java keyless.LegacyServiceBusApp TOPIC/SUBSCRIPTION [COUNT]
 *
 * SERVICEBUS_TRANSPORT=AMQP_WEB_SOCKETS chooses AMQP over WebSockets (443), which takes the
 * JVM's proxy system properties. SERVICEBUS_RECEIVER chooses how it receives: "client" (the
 * default, ServiceBusReceiverClient), "processor" (ServiceBusProcessorClient, completing in
 * its callback) or "session" (the messages carry a session id; a session receiver accepts
 * that session). Every wait is bounded; a watchdog ends a hung run.
 */
public final class LegacyServiceBusApp {
    private static final Duration TRY_TIMEOUT = Duration.ofSeconds(20);
    private static final Duration RECEIVE_WAIT = Duration.ofSeconds(5);
    private static final long RECEIVE_DEADLINE_MS = 30_000;
    private static final long WATCHDOG_MS = 100_000;

    private LegacyServiceBusApp() {
    }

    public static void main(String[] args) {
        String connectionString = System.getenv("SERVICEBUS_CONNECTION_STRING");
        if (connectionString == null || args.length < 1) {
            System.err.println("usage: SERVICEBUS_CONNECTION_STRING=... LegacyServiceBusApp QUEUE|TOPIC/SUBSCRIPTION [COUNT]");
            System.exit(2);
        }
        String entity = args[0];
        int count = args.length > 1 ? Integer.parseInt(args[1]) : 2;
        startWatchdog();
        List<String> sent = new ArrayList<>();
        List<String> receivedIds = new ArrayList<>();
        List<String> receivedBodies = new ArrayList<>();
        String result;
        try {
            run(connectionString, entity, count, sent, receivedIds, receivedBodies);
            boolean ok = receivedIds.containsAll(sent);
            result = "{\"ok\":" + ok + ",\"sent\":" + json(sent) + ",\"received_ids\":"
                + json(receivedIds) + ",\"received\":" + json(receivedBodies) + "}";
        } catch (Throwable error) {
            error.printStackTrace();  // stderr, for the test's failure message
            List<String> causes = new ArrayList<>();
            for (Throwable cause = error; cause != null && causes.size() < 6; cause = cause.getCause()) {
                causes.add(cause.getClass().getName() + ": " + cause.getMessage());
            }
            result = "{\"ok\":false,\"sent\":" + json(sent) + ",\"received_ids\":" + json(receivedIds)
                + ",\"error_class\":" + quote(error.getClass().getName())
                + ",\"error\":" + quote(String.valueOf(error.getMessage()))
                + ",\"causes\":" + json(causes) + "}";
        }
        System.out.println(result);
        System.out.flush();
        // the SDK's reactor threads are not all daemons: leave without waiting for them
        Runtime.getRuntime().halt(0);
    }

    private static void run(String connectionString, String entity, int count, List<String> sent,
                            List<String> receivedIds, List<String> receivedBodies)
            throws InterruptedException {
        ServiceBusClientBuilder builder = new ServiceBusClientBuilder()
            .connectionString(connectionString)
            .retryOptions(new AmqpRetryOptions().setMaxRetries(0).setTryTimeout(TRY_TIMEOUT));
        String transport = System.getenv("SERVICEBUS_TRANSPORT");
        if (transport != null && !transport.isEmpty()) {
            builder.transportType(AmqpTransportType.valueOf(transport));
        }
        String[] parts = entity.split("/", 2);
        ServiceBusClientBuilder.ServiceBusSenderClientBuilder senderBuilder = builder.sender();
        ServiceBusClientBuilder.ServiceBusReceiverClientBuilder receiverBuilder = builder.receiver()
            .receiveMode(ServiceBusReceiveMode.PEEK_LOCK);
        if (parts.length == 2) {
            senderBuilder.topicName(parts[0]);
            receiverBuilder.topicName(parts[0]).subscriptionName(parts[1]);
        } else {
            senderBuilder.queueName(entity);
            receiverBuilder.queueName(entity);
        }
        String mode = System.getenv().getOrDefault("SERVICEBUS_RECEIVER", "client");
        String session = "java-session-" + UUID.randomUUID();
        try (ServiceBusSenderClient sender = senderBuilder.buildClient()) {
            List<ServiceBusMessage> messages = new ArrayList<>();
            for (int i = 0; i < count; i++) {
                String id = "java-" + UUID.randomUUID();
                ServiceBusMessage message = new ServiceBusMessage("body of " + id).setMessageId(id);
                messages.add("session".equals(mode) ? message.setSessionId(session) : message);
            }
            sender.sendMessages(messages);
            for (ServiceBusMessage message : messages) {
                sent.add(message.getMessageId());
            }
        }
        long deadline = System.currentTimeMillis() + RECEIVE_DEADLINE_MS;
        switch (mode) {
            case "processor" -> receiveWithProcessor(builder, parts, entity, sent, receivedIds,
                receivedBodies, deadline);
            case "session" -> {
                ServiceBusClientBuilder.ServiceBusSessionReceiverClientBuilder sessions =
                    builder.sessionReceiver().receiveMode(ServiceBusReceiveMode.PEEK_LOCK);
                if (parts.length == 2) {
                    sessions.topicName(parts[0]).subscriptionName(parts[1]);
                } else {
                    sessions.queueName(entity);
                }
                try (var sessionClient = sessions.buildClient();
                     ServiceBusReceiverClient receiver = sessionClient.acceptSession(session)) {
                    receiveWithClient(receiver, count, sent, receivedIds, receivedBodies, deadline);
                }
            }
            case "client" -> {
                try (ServiceBusReceiverClient receiver = receiverBuilder.buildClient()) {
                    receiveWithClient(receiver, count, sent, receivedIds, receivedBodies, deadline);
                }
            }
            default -> throw new IllegalArgumentException("SERVICEBUS_RECEIVER " + mode);
        }
    }

    private static void receiveWithClient(ServiceBusReceiverClient receiver, int count,
                                          List<String> sent, List<String> receivedIds,
                                          List<String> receivedBodies, long deadline) {
        while (!receivedIds.containsAll(sent) && System.currentTimeMillis() < deadline) {
            for (ServiceBusReceivedMessage message : receiver.receiveMessages(count, RECEIVE_WAIT)) {
                receiver.complete(message);
                receivedIds.add(message.getMessageId());
                receivedBodies.add(message.getBody().toString());
            }
        }
    }

    private static void receiveWithProcessor(ServiceBusClientBuilder builder, String[] parts,
                                             String entity, List<String> sent,
                                             List<String> receivedIds, List<String> receivedBodies,
                                             long deadline) throws InterruptedException {
        List<String> ids = Collections.synchronizedList(new ArrayList<>());
        List<String> bodies = Collections.synchronizedList(new ArrayList<>());
        List<Throwable> errors = Collections.synchronizedList(new ArrayList<>());
        ServiceBusClientBuilder.ServiceBusProcessorClientBuilder processor = builder.processor()
            .receiveMode(ServiceBusReceiveMode.PEEK_LOCK)
            .disableAutoComplete()
            .maxConcurrentCalls(1)
            .processMessage(context -> {
                context.complete();
                ids.add(context.getMessage().getMessageId());
                bodies.add(context.getMessage().getBody().toString());
            })
            .processError(context -> errors.add(context.getException()));
        if (parts.length == 2) {
            processor.topicName(parts[0]).subscriptionName(parts[1]);
        } else {
            processor.queueName(entity);
        }
        ServiceBusProcessorClient client = processor.buildProcessorClient();
        client.start();
        try {
            while (!ids.containsAll(sent) && errors.isEmpty() && System.currentTimeMillis() < deadline) {
                Thread.sleep(100);
            }
        } finally {
            client.close();
        }
        synchronized (ids) {
            receivedIds.addAll(ids);
            receivedBodies.addAll(bodies);
        }
        if (!errors.isEmpty() && !receivedIds.containsAll(sent)) {
            throw new IllegalStateException("processor error", errors.get(0));
        }
    }

    private static void startWatchdog() {
        Thread watchdog = new Thread(() -> {
            try {
                Thread.sleep(WATCHDOG_MS);
            } catch (InterruptedException stopped) {
                return;
            }
            System.out.println("{\"ok\":false,\"error_class\":\"Watchdog\",\"error\":\"no result within "
                + WATCHDOG_MS / 1000 + " s\"}");
            System.out.flush();
            Runtime.getRuntime().halt(3);
        }, "watchdog");
        watchdog.setDaemon(true);
        watchdog.start();
    }

    private static String json(List<String> values) {
        StringBuilder out = new StringBuilder("[");
        for (int i = 0; i < values.size(); i++) {
            out.append(i == 0 ? "" : ",").append(quote(values.get(i)));
        }
        return out.append(']').toString();
    }

    private static String quote(String value) {
        StringBuilder out = new StringBuilder("\"");
        for (char c : value.toCharArray()) {
            switch (c) {
                case '"' -> out.append("\\\"");
                case '\\' -> out.append("\\\\");
                case '\n' -> out.append("\\n");
                case '\r' -> out.append("\\r");
                case '\t' -> out.append("\\t");
                default -> {
                    if (c < 0x20) {
                        out.append(String.format("\\u%04x", (int) c));
                    } else {
                        out.append(c);
                    }
                }
            }
        }
        return out.append('"').toString();
    }
}
