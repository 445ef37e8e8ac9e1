// A "legacy" Go app: azblob with an account-key connection string, unchanged.
//
// It knows nothing about keyless. What keyless needs comes from the environment that any Go
// program honours without code:
//
//	HTTPS_PROXY    read by net/http's ProxyFromEnvironment, which azcore's default transport uses
//	SSL_CERT_FILE  read by crypto/x509 on Linux instead of its list of bundle files
//	SSL_CERT_DIR   likewise, instead of its list of directories (/etc/ssl/certs, ...)
//
// Input:  AZURE_STORAGE_CONNECTION_STRING, BLOB_SIZE (bytes, default 3 MiB + 17) and
// PAUSE_SECONDS (idle time before listing, default 0).
// Output: one JSON line on stdout; exit code 0 on success, 1 on a refusal or any error.
//
// The only addition to what a legacy app does is an observing pipeline policy: it records the
// HTTP version of each answer, whether the request carried Expect, and whether Go's transport
// reused a connection (httptrace), so the tests can say what Go does through the proxy.
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptrace"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/bloberror"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blockblob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/sas"
)

const blockSize = 1 << 20 // UploadStream stages blocks of this size, then commits the list

// wire records what Go's HTTP client did on the wire, for the tests.
type wire struct {
	mu        sync.Mutex
	Protocols map[string]int `json:"protocols"`
	Expect    int            `json:"expectContinue"`
	Reused    int            `json:"reusedConnections"`
	Requests  int            `json:"requests"`
}

func (w *wire) Do(req *policy.Request) (*http.Response, error) {
	trace := &httptrace.ClientTrace{GotConn: func(info httptrace.GotConnInfo) {
		if info.Reused {
			w.mu.Lock()
			w.Reused++
			w.mu.Unlock()
		}
	}}
	traced := req.WithContext(httptrace.WithClientTrace(req.Raw().Context(), trace))
	resp, err := traced.Next()
	w.mu.Lock()
	defer w.mu.Unlock()
	w.Requests++
	if strings.EqualFold(req.Raw().Header.Get("Expect"), "100-continue") {
		w.Expect++
	}
	if resp != nil {
		w.Protocols[resp.Proto]++
	}
	return resp, err
}

func digest(data []byte) string {
	sum := sha256.Sum256(data)
	return hex.EncodeToString(sum[:])
}

func listNames(ctx context.Context, client *azblob.Client, container string) ([]string, error) {
	names := []string{}
	pager := client.NewListBlobsFlatPager(container, nil)
	for pager.More() {
		page, err := pager.NextPage(ctx)
		if err != nil {
			return nil, err
		}
		for _, item := range page.Segment.BlobItems {
			names = append(names, *item.Name)
		}
	}
	return names, nil
}

// bogusSAS signs a read SAS for the blob with the connection string's (wrong) key.
func bogusSAS(connectionString, blobURL string) (string, string, error) {
	var account, key string
	for _, part := range strings.Split(connectionString, ";") {
		name, value, _ := strings.Cut(part, "=")
		switch strings.ToLower(name) {
		case "accountname":
			account = value
		case "accountkey":
			key = part[len(name)+1:]
		}
	}
	credential, err := azblob.NewSharedKeyCredential(account, key)
	if err != nil {
		return "", "", err
	}
	parts, err := sas.ParseURL(blobURL)
	if err != nil {
		return "", "", err
	}
	values, err := sas.BlobSignatureValues{
		Protocol:      sas.ProtocolHTTPS,
		ExpiryTime:    time.Now().UTC().Add(time.Hour),
		Permissions:   (&sas.BlobPermissions{Read: true}).String(),
		ContainerName: parts.ContainerName,
		BlobName:      parts.BlobName,
	}.SignWithSharedKey(credential)
	if err != nil {
		return "", "", err
	}
	return blobURL + "?" + values.Encode(), values.Signature(), nil
}

func run(ctx context.Context, observed *wire) (map[string]any, error) {
	connectionString := os.Getenv("AZURE_STORAGE_CONNECTION_STRING")
	size := 3*1024*1024 + 17
	if text := os.Getenv("BLOB_SIZE"); text != "" {
		parsed, err := strconv.Atoi(text)
		if err != nil {
			return nil, err
		}
		size = parsed
	}
	options := &azblob.ClientOptions{ClientOptions: azcore.ClientOptions{
		PerRetryPolicies: []policy.Policy{observed},
		Retry:            policy.RetryOptions{MaxRetries: 1},
	}}
	client, err := azblob.NewClientFromConnectionString(connectionString, options)
	if err != nil {
		return nil, err
	}
	var suffix [6]byte
	if _, err := rand.Read(suffix[:]); err != nil {
		return nil, err
	}
	container := "go-" + hex.EncodeToString(suffix[:])
	if _, err := client.CreateContainer(ctx, container, nil); err != nil {
		return nil, err
	}
	payload := make([]byte, size)
	if _, err := rand.Read(payload); err != nil {
		return nil, err
	}
	_, err = client.UploadStream(ctx, container, "payload.bin", bytes.NewReader(payload),
		&blockblob.UploadStreamOptions{BlockSize: blockSize, Concurrency: 2})
	if err != nil {
		return nil, err
	}
	download, err := client.DownloadStream(ctx, container, "payload.bin", nil)
	if err != nil {
		return nil, err
	}
	downloaded, err := io.ReadAll(download.Body)
	download.Body.Close()
	if err != nil {
		return nil, err
	}
	// PAUSE_SECONDS: idle like a long-lived app between calls (azcore's HTTP/2 transport
	// pings an idle connection after 10 s and drops it if the ping goes unanswered for 5 s).
	pause, _ := strconv.Atoi(os.Getenv("PAUSE_SECONDS"))
	time.Sleep(time.Duration(pause) * time.Second)
	observed.mu.Lock()
	reusedBefore := observed.Reused
	observed.mu.Unlock()
	listed, err := listNames(ctx, client, container)
	if err != nil {
		return nil, err
	}
	observed.mu.Lock()
	reusedAfterPause := observed.Reused > reusedBefore
	observed.mu.Unlock()

	// A SAS URL signed with the same wrong key, read by a client with no credential at all.
	note := []byte("hello through a bogus SAS")
	if _, err := client.UploadBuffer(ctx, container, "note.txt", note, nil); err != nil {
		return nil, err
	}
	sasURL, signature, err := bogusSAS(connectionString,
		client.ServiceClient().NewContainerClient(container).NewBlobClient("note.txt").URL())
	if err != nil {
		return nil, err
	}
	sasClient, err := blob.NewClientWithNoCredential(sasURL, &blob.ClientOptions{
		ClientOptions: options.ClientOptions})
	if err != nil {
		return nil, err
	}
	sasDownload, err := sasClient.DownloadStream(ctx, nil)
	if err != nil {
		return nil, err
	}
	sasRead, err := io.ReadAll(sasDownload.Body)
	sasDownload.Body.Close()
	if err != nil {
		return nil, err
	}

	if _, err := client.DeleteBlob(ctx, container, "payload.bin", nil); err != nil {
		return nil, err
	}
	if _, err := client.DeleteBlob(ctx, container, "note.txt", nil); err != nil {
		return nil, err
	}
	afterDelete, err := listNames(ctx, client, container)
	if err != nil {
		return nil, err
	}
	if _, err := client.DeleteContainer(ctx, container, nil); err != nil {
		return nil, err
	}
	return map[string]any{
		"ok":               true,
		"container":        container,
		"size":             len(payload),
		"uploadedSha256":   digest(payload),
		"downloadedSha256": digest(downloaded),
		"listed":           listed,
		"sasRead":          string(sasRead),
		"sasSignature":     signature, // bogus (wrong key): the tests look for it in logs
		"afterDelete":      afterDelete,
		"reusedAfterPause": reusedAfterPause,
	}, nil
}

func main() {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	observed := &wire{Protocols: map[string]int{}}
	result, err := run(ctx, observed)
	code := 0
	if err != nil {
		code = 1
		result = map[string]any{"ok": false, "status": nil, "code": nil,
			"message": strings.SplitN(err.Error(), "\n", 2)[0]}
		var response *azcore.ResponseError
		if errors.As(err, &response) {
			result["status"] = response.StatusCode
			result["code"] = response.ErrorCode
			if response.ErrorCode == "" && bloberror.HasCode(err, bloberror.AuthenticationFailed) {
				result["code"] = string(bloberror.AuthenticationFailed)
			}
		}
	}
	observed.mu.Lock()
	result["wire"] = observed
	line, _ := json.Marshal(result)
	observed.mu.Unlock()
	fmt.Println(string(line))
	os.Exit(code)
}
