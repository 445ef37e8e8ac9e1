"""A legacy app for the transparent-mode test: no proxy variables, a connection string with
a wrong key. Run inside the test's network namespace as its own UID; prints one JSON line.

    python transparent_app.py blob CONNECTION_STRING CONTAINER
        create a container, upload and download a blob, delete the container (Storage SDK;
        trusts REQUESTS_CA_BUNDLE)
    python transparent_app.py connections CONNECTION_STRING CONTAINER COUNT
        create a container, then COUNT times a new client (so a new connection) that uploads
        one small blob, then list and delete the container (Storage SDK)
    python transparent_app.py get HOST CA_FILE [HOST_HEADER]
        one HTTPS GET to HOST:443 (TLS server name HOST, certificate checked against CA_FILE)
        with a Shared Key header; HOST_HEADER replaces the Host header
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import sys
from collections.abc import Callable
from typing import Any

PAYLOAD_SIZES = (300 * 1024, 3 * 1024 * 1024 + 7)  # pooled and streamed sizes in keyless


def storage_client(connection_string: str, statuses: list[int]) -> Any:
    """The Storage SDK's client, no retries, with a transport of its own (its own requests
    session: its own connections); each answer's status is appended to `statuses`."""
    from azure.core.pipeline.transport import RequestsTransport
    from azure.storage.blob import BlobServiceClient

    return BlobServiceClient.from_connection_string(
        connection_string, retry_total=0,
        transport=RequestsTransport(connection_timeout=10, read_timeout=30),
        raw_response_hook=lambda response: statuses.append(response.http_response.status_code))


def storage_outcome(work: Callable[[list[int]], dict[str, Any]]) -> dict[str, Any]:
    """work(statuses)'s result with the statuses; a service refusal as outcome "refused"."""
    from azure.core.exceptions import HttpResponseError

    statuses: list[int] = []
    try:
        return {**work(statuses), "statuses": statuses}
    except HttpResponseError as exc:
        return {"outcome": "refused", "status": exc.status_code, "error_code": exc.error_code,
                "statuses": statuses}


def blob(connection_string: str, container_name: str) -> dict[str, Any]:
    def work(statuses: list[int]) -> dict[str, Any]:
        service = storage_client(connection_string, statuses)
        container = service.create_container(container_name)
        for index, size in enumerate(PAYLOAD_SIZES):
            payload = os.urandom(size)
            container.upload_blob(f"blob-{index}", payload)
            if container.download_blob(f"blob-{index}").readall() != payload:
                return {"outcome": "corrupted"}
        names = sorted(b.name for b in container.list_blobs())
        container.delete_container()
        return {"outcome": "ok", "names": names}

    return storage_outcome(work)


def connections(connection_string: str, container_name: str, count: str) -> dict[str, Any]:
    def work(statuses: list[int]) -> dict[str, Any]:
        storage_client(connection_string, statuses).create_container(container_name)
        for index in range(int(count)):
            with storage_client(connection_string, statuses) as fresh:
                fresh.get_container_client(container_name).upload_blob(
                    f"blob-{index}", f"payload {index}".encode())
        with storage_client(connection_string, statuses) as last:
            container = last.get_container_client(container_name)
            names = sorted(b.name for b in container.list_blobs())
            container.delete_container()
        return {"outcome": "ok", "names": names}

    return storage_outcome(work)


def get(host: str, ca_file: str, host_header: str | None = None) -> dict[str, Any]:
    context = ssl.create_default_context(cafile=ca_file)
    connection = http.client.HTTPSConnection(host, 443, context=context, timeout=20)
    wrong_signature = base64.b64encode(b"\x02" * 32).decode()
    headers = {"Authorization": f"SharedKey devstoreaccount1:{wrong_signature}",
               "x-ms-version": "2021-08-06", "Connection": "close"}
    if host_header:
        headers["Host"] = host_header
    try:
        connection.connect()
        issuer = dict(item[0] for item in connection.sock.getpeercert()["issuer"])
        connection.request("GET", "/?comp=list", headers=headers)
        response = connection.getresponse()
        body = response.read(4096).decode(errors="replace")
        return {"outcome": "answered", "status": response.status, "body": body,
                "issuer": issuer}
    except (OSError, ssl.SSLError) as exc:
        return {"outcome": "failed", "error": f"{exc.__class__.__name__}: {exc}"}
    finally:
        connection.close()


def main(argv: list[str]) -> int:
    command, *args = argv
    result = {"blob": blob, "connections": connections, "get": get}[command](*args)
    print(json.dumps({**result, "uid": os.getuid()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
