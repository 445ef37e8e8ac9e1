"""A legacy Python app: azure-storage-blob with an account-key connection string, unchanged.
Everything keyless needs comes from its environment (HTTPS_PROXY, REQUESTS_CA_BUNDLE).
Prints one JSON line; exit 0 on success, 1 on a refusal or any error."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import uuid

from azure.core.exceptions import HttpResponseError
from azure.storage.blob import BlobServiceClient


def main() -> dict:
    service = BlobServiceClient.from_connection_string(
        os.environ["AZURE_STORAGE_CONNECTION_STRING"])
    container = service.get_container_client(f"k8s-{uuid.uuid4().hex[:12]}")
    container.create_container()
    payload = os.urandom(1024 * 1024 + 17)
    container.upload_blob("payload.bin", payload)
    downloaded = container.download_blob("payload.bin").readall()
    listed = [b.name for b in container.list_blobs()]
    container.delete_container()
    return {"ok": True, "container": container.container_name, "listed": listed,
            "same": hashlib.sha256(payload).digest() == hashlib.sha256(downloaded).digest()}


if __name__ == "__main__":
    try:
        print(json.dumps(main()))
    except HttpResponseError as exc:
        print(json.dumps({"ok": False, "status": exc.status_code, "code": exc.error_code}))
        sys.exit(1)
    except Exception as exc:  # the test reads the reason
        print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}))
        sys.exit(1)
