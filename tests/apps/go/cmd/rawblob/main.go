// A "legacy" Go app that calls the Blob REST API with net/http itself, as older code does:
// its own Shared Key header (signed with the wrong key it was given) and, for uploads,
// `Expect: 100-continue`, so the body is sent only once the server (here: keyless) agreed.
//
// It knows nothing about keyless: net/http's DefaultTransport reads HTTPS_PROXY, crypto/x509
// reads SSL_CERT_FILE. The signature is the app's business; keyless strips it either way.
//
// Input:  BLOB_ACCOUNT, BLOB_ACCOUNT_KEY (base64), BLOB_ENDPOINT (https://account.blob...).
// Output: one JSON line on stdout; exit code 0 on success, 1 on any error.
package main

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptrace"
	"os"
	"strings"
	"time"
)

type call struct {
	Method      string  `json:"method"`
	Status      int     `json:"status"`
	Proto       string  `json:"proto"`
	Got100      bool    `json:"got100Continue"`
	WroteBodyAt float64 `json:"wroteBodyAfterSeconds"`
}

type app struct {
	account, endpoint string
	key               []byte
	calls             []call
}

// authorize signs "METHOD\npath\ndate" with the account key: not Azure's exact string to
// sign (this app's key is wrong anyway), but the header has the Shared Key form.
func (a *app) authorize(req *http.Request) {
	date := time.Now().UTC().Format(http.TimeFormat)
	req.Header.Set("x-ms-date", date)
	req.Header.Set("x-ms-version", "2021-12-02")
	mac := hmac.New(sha256.New, a.key)
	fmt.Fprintf(mac, "%s\n/%s%s\n%s", req.Method, a.account, req.URL.Path, date)
	req.Header.Set("Authorization",
		"SharedKey "+a.account+":"+base64.StdEncoding.EncodeToString(mac.Sum(nil)))
}

func (a *app) do(ctx context.Context, method, path string, body []byte, expect bool) ([]byte, error) {
	started := time.Now()
	record := call{Method: method}
	trace := &httptrace.ClientTrace{
		Got100Continue: func() { record.Got100 = true },
		WroteRequest: func(httptrace.WroteRequestInfo) {
			record.WroteBodyAt = time.Since(started).Seconds()
		},
	}
	var reader io.Reader
	if body != nil {
		reader = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(httptrace.WithClientTrace(ctx, trace), method,
		a.endpoint+path, reader)
	if err != nil {
		return nil, err
	}
	if body != nil {
		req.Header.Set("x-ms-blob-type", "BlockBlob")
	}
	if expect {
		req.Header.Set("Expect", "100-continue")
	}
	a.authorize(req)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	answer, err := io.ReadAll(resp.Body)
	record.Status, record.Proto = resp.StatusCode, resp.Proto
	a.calls = append(a.calls, record)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode >= 300 {
		return nil, fmt.Errorf("%s %s: %d %s", method, path, resp.StatusCode,
			strings.SplitN(string(answer), "\n", 2)[0])
	}
	return answer, nil
}

func run(ctx context.Context, a *app) (map[string]any, error) {
	var suffix [6]byte
	if _, err := rand.Read(suffix[:]); err != nil {
		return nil, err
	}
	container := "/go-raw-" + hex.EncodeToString(suffix[:])
	payload := make([]byte, 256*1024+3)
	if _, err := rand.Read(payload); err != nil {
		return nil, err
	}
	if _, err := a.do(ctx, http.MethodPut, container+"?restype=container", nil, false); err != nil {
		return nil, err
	}
	if _, err := a.do(ctx, http.MethodPut, container+"/raw.bin", payload, true); err != nil {
		return nil, err
	}
	downloaded, err := a.do(ctx, http.MethodGet, container+"/raw.bin", nil, false)
	if err != nil {
		return nil, err
	}
	if _, err := a.do(ctx, http.MethodDelete, container+"?restype=container", nil, false); err != nil {
		return nil, err
	}
	return map[string]any{"ok": true, "same": bytes.Equal(payload, downloaded)}, nil
}

func main() {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	key, err := base64.StdEncoding.DecodeString(os.Getenv("BLOB_ACCOUNT_KEY"))
	a := &app{account: os.Getenv("BLOB_ACCOUNT"), endpoint: os.Getenv("BLOB_ENDPOINT"), key: key}
	var result map[string]any
	if err == nil {
		result, err = run(ctx, a)
	}
	code := 0
	if err != nil {
		code = 1
		result = map[string]any{"ok": false, "message": strings.SplitN(err.Error(), "\n", 2)[0]}
	}
	result["calls"] = a.calls
	line, _ := json.Marshal(result)
	fmt.Println(string(line))
	os.Exit(code)
}
