// loadgen: a cheap HTTP(S) load generator for keyless' benchmarks (bench/percore.py), so
// that the proxy, not the client, is what a run measures. Standard library only.
//
//	loadgen -url URL [-proxy URL] [-ca FILE] [-c N] [-seconds S] [-cap N] [-new-conn]
//	        [-H "Name: value"]...
//
// Sends GETs with N workers until S seconds or cap requests, whichever first (both bounded),
// and prints one JSON line: requests (2xx answers), failures, seconds, cpu_seconds (its own).
package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

type headers []string

func (h *headers) String() string     { return strings.Join(*h, ", ") }
func (h *headers) Set(v string) error { *h = append(*h, v); return nil }

func main() {
	target := flag.String("url", "", "URL to GET")
	proxy := flag.String("proxy", "", "HTTP proxy URL (CONNECT for https)")
	caFile := flag.String("ca", "", "PEM file of the CA to trust (default: the system's)")
	concurrency := flag.Int("c", 1, "concurrent connections")
	seconds := flag.Float64("seconds", 5, "run at most this long")
	limit := flag.Int64("cap", 1_000_000, "send at most this many requests")
	newConn := flag.Bool("new-conn", false, "a new connection for every request")
	var extra headers
	flag.Var(&extra, "H", "request header 'Name: value' (repeatable)")
	flag.Parse()
	if *target == "" {
		fail("-url is required")
	}
	tlsConfig := &tls.Config{}
	if *caFile != "" {
		pem, err := os.ReadFile(*caFile)
		if err != nil {
			fail(err.Error())
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			fail("no certificate in " + *caFile)
		}
		tlsConfig.RootCAs = pool
	}
	transport := &http.Transport{TLSClientConfig: tlsConfig, DisableKeepAlives: *newConn,
		MaxIdleConnsPerHost: *concurrency, MaxConnsPerHost: *concurrency, ForceAttemptHTTP2: false,
		TLSNextProto: map[string]func(string, *tls.Conn) http.RoundTripper{}}
	if *proxy != "" {
		proxyURL, err := url.Parse(*proxy)
		if err != nil {
			fail(err.Error())
		}
		transport.Proxy = http.ProxyURL(proxyURL)
	}
	client := &http.Client{Transport: transport, Timeout: 30 * time.Second}
	var sent, ok, failed atomic.Int64
	var firstError atomic.Value
	started := time.Now()
	deadline := started.Add(time.Duration(*seconds * float64(time.Second)))
	var wg sync.WaitGroup
	for i := 0; i < *concurrency; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) && sent.Add(1) <= *limit {
				request, _ := http.NewRequest("GET", *target, nil)
				for _, h := range extra {
					name, value, _ := strings.Cut(h, ":")
					request.Header.Set(strings.TrimSpace(name), strings.TrimSpace(value))
				}
				response, err := client.Do(request)
				if err != nil {
					failed.Add(1)
					firstError.CompareAndSwap(nil, err.Error())
					continue
				}
				io.Copy(io.Discard, response.Body)
				response.Body.Close()
				if response.StatusCode/100 == 2 {
					ok.Add(1)
				} else {
					failed.Add(1)
					firstError.CompareAndSwap(nil, fmt.Sprintf("status %d", response.StatusCode))
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(started).Seconds()
	var usage syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &usage)
	cpu := float64(usage.Utime.Sec+usage.Stime.Sec) + float64(usage.Utime.Usec+usage.Stime.Usec)/1e6
	result := map[string]any{"requests": ok.Load(), "failures": failed.Load(), "seconds": elapsed,
		"cpu_seconds": cpu}
	if e := firstError.Load(); e != nil {
		result["first_error"] = e
	}
	json.NewEncoder(os.Stdout).Encode(result)
}

func fail(message string) {
	fmt.Fprintln(os.Stderr, "loadgen:", message)
	os.Exit(2)
}
