// A "legacy" Go app: azservicebus with a SAS connection string, unchanged.
//
// Through keyless it gets `Endpoint=sb://localhost:PORT;...;UseDevelopmentEmulator=true`: the
// SDK then speaks plain AMQP to keyless' local endpoint (`--reverse PORT=amqps://NS`), which
// replaces its SAS put-tokens with Entra tokens and speaks AMQPS to the namespace.
//
// Input:  SERVICEBUS_CONNECTION_STRING, SERVICEBUS_QUEUE (default "orders"),
//
//	SERVICEBUS_MESSAGES (default 3), SERVICEBUS_BODY_PREFIX (default "go-order"),
//	SERVICEBUS_CUSTOM_ENDPOINT (host:port to dial instead of the namespace; default none).
//
// Output: one JSON line on stdout; exit code 0 on success, 1 on a refusal or any error.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/messaging/azservicebus"
	"github.com/Azure/go-amqp"
)

func env(name, fallback string) string {
	if value := os.Getenv(name); value != "" {
		return value
	}
	return fallback
}

func run(ctx context.Context) (map[string]any, error) {
	count, err := strconv.Atoi(env("SERVICEBUS_MESSAGES", "3"))
	if err != nil {
		return nil, err
	}
	queue := env("SERVICEBUS_QUEUE", "orders")
	prefix := env("SERVICEBUS_BODY_PREFIX", "go-order")
	client, err := azservicebus.NewClientFromConnectionString(
		os.Getenv("SERVICEBUS_CONNECTION_STRING"),
		&azservicebus.ClientOptions{RetryOptions: azservicebus.RetryOptions{MaxRetries: 1},
			// where to dial instead of the namespace (as for a private endpoint); the TLS
			// name stays the namespace's
			CustomEndpoint: os.Getenv("SERVICEBUS_CUSTOM_ENDPOINT")})
	if err != nil {
		return nil, err
	}
	defer client.Close(context.Background())

	sender, err := client.NewSender(queue, nil)
	if err != nil {
		return nil, err
	}
	sent := []string{}
	for i := range count {
		body := fmt.Sprintf("%s-%d", prefix, i)
		if err := sender.SendMessage(ctx, &azservicebus.Message{Body: []byte(body)}, nil); err != nil {
			return nil, err
		}
		sent = append(sent, body)
	}
	if err := sender.Close(ctx); err != nil {
		return nil, err
	}

	receiver, err := client.NewReceiverForQueue(queue,
		&azservicebus.ReceiverOptions{ReceiveMode: azservicebus.ReceiveModePeekLock})
	if err != nil {
		return nil, err
	}
	received := []string{}
	for attempt := 0; attempt < 20 && len(received) < count; attempt++ { // bounded
		messages, err := receiver.ReceiveMessages(ctx, count-len(received), nil)
		if err != nil {
			return nil, err
		}
		for _, message := range messages {
			if err := receiver.CompleteMessage(ctx, message, nil); err != nil {
				return nil, err
			}
			if strings.HasPrefix(string(message.Body), prefix+"-") {
				received = append(received, string(message.Body))
			}
		}
	}
	if err := receiver.Close(ctx); err != nil {
		return nil, err
	}
	sort.Strings(received)
	return map[string]any{"ok": true, "sent": sent, "received": received}, nil
}

func main() {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	result, err := run(ctx)
	code := 0
	if err != nil {
		code = 1
		result = map[string]any{"ok": false, "code": nil, "condition": nil,
			"message": strings.SplitN(err.Error(), "\n", 2)[0]}
		var sbError *azservicebus.Error
		if errors.As(err, &sbError) {
			result["code"] = string(sbError.Code)
		}
		var amqpError *amqp.Error
		if errors.As(err, &amqpError) {
			result["condition"] = string(amqpError.Condition)
		}
	}
	line, _ := json.Marshal(result)
	fmt.Println(string(line))
	os.Exit(code)
}
