package keyless;

import com.azure.core.amqp.AmqpRetryOptions;
import com.azure.core.amqp.AmqpTransportType;
import com.azure.messaging.servicebus.ServiceBusClientBuilder;
import com.azure.messaging.servicebus.ServiceBusMessage;
import com.azure.messaging.servicebus.ServiceBusReceivedMessage;
import com.azure.messaging.servicebus.ServiceBusReceiverClient;
import com.azure.messaging.servicebus.ServiceBusSenderClient;
import com.azure.messaging.servicebus.models.ServiceBusReceiveMode;

import java.time.Duration;
import java.util.ArrayList;
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
 * JVM's proxy system properties. Every wait is bounded; a watchdog ends a hung run.
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
                            List<String> receivedIds, List<String> receivedBodies) {
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
        try (ServiceBusSenderClient sender = senderBuilder.buildClient()) {
            List<ServiceBusMessage> messages = new ArrayList<>();
            for (int i = 0; i < count; i++) {
                String id = "java-" + UUID.randomUUID();
                messages.add(new ServiceBusMessage("body of " + id).setMessageId(id));
            }
            sender.sendMessages(messages);
            for (ServiceBusMessage message : messages) {
                sent.add(message.getMessageId());
            }
        }
        try (ServiceBusReceiverClient receiver = receiverBuilder.buildClient()) {
            long deadline = System.currentTimeMillis() + RECEIVE_DEADLINE_MS;
            while (!receivedIds.containsAll(sent) && System.currentTimeMillis() < deadline) {
                for (ServiceBusReceivedMessage message : receiver.receiveMessages(count, RECEIVE_WAIT)) {
                    receiver.complete(message);
                    receivedIds.add(message.getMessageId());
                    receivedBodies.add(message.getBody().toString());
                }
            }
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
