// Connect to 127.0.0.1:PORT over TLS as HOST, trusting only CA_FILE; send GET / and print the answer's status line.
// Exit 0 when the handshake (chain, name constraints and host name) succeeds, 1 otherwise.
package main

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"strings"
	"time"
)

func main() {
	host, port, caFile := os.Args[1], os.Args[2], os.Args[3]
	pem, err := os.ReadFile(caFile)
	if err != nil {
		fmt.Println("ERROR", err)
		os.Exit(2)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		fmt.Println("ERROR no certificate in", caFile)
		os.Exit(2)
	}
	dialer := &net.Dialer{Timeout: 10 * time.Second}
	conn, err := tls.DialWithDialer(dialer, "tcp", net.JoinHostPort("127.0.0.1", port),
		&tls.Config{RootCAs: roots, ServerName: host})
	if err != nil {
		fmt.Println("REJECTED", err)
		os.Exit(1)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(conn, "GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", host)
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		fmt.Println("REJECTED", err)
		os.Exit(1)
	}
	fmt.Println("ACCEPTED", strings.TrimSpace(line))
}
