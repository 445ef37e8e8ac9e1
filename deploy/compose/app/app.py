"""A "legacy" app: Azure Blob Storage with a connection string holding an account key.

Nothing here knows about keyless. The key in the compose file is wrong on purpose: Azurite only
accepts the request because keyless removed the Shared Key signature and attached a token.
"""

import contextlib
import datetime
import os

from azure.core.exceptions import ResourceExistsError
from azure.storage.blob import BlobServiceClient


def main() -> None:
    connection_string = os.environ["AZURE_STORAGE_CONNECTION_STRING"]
    service = BlobServiceClient.from_connection_string(connection_string)
    container = service.get_container_client("legacy")
    with contextlib.suppress(ResourceExistsError):
        container.create_container()
    name = f"hello-{datetime.datetime.now(datetime.UTC):%Y%m%dT%H%M%S}.txt"
    container.upload_blob(name, b"written with a wrong key, through keyless\n")
    data = container.download_blob(name).readall()
    names = [blob.name for blob in container.list_blobs()]
    print(f"OK: wrote and read {name} ({len(data)} bytes); the container holds {len(names)} blobs")


if __name__ == "__main__":
    main()
