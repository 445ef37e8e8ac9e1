"""Where tokens come from: azure-identity's aio credentials, one per identity.

`DefaultAzureCredential` semantics limited to what a sidecar can use: environment (service
principal), workload identity, managed identity, and the Azure CLI for local development.
`AZURE_CLIENT_ID` picks a user-assigned identity for the default identity.
"""

from __future__ import annotations

import asyncio

from azure.core.credentials import AccessTokenInfo
from azure.identity.aio import DefaultAzureCredential

from proxy.tokens import Identity


class CredentialSource:
    """A `TokenSource` backed by one azure-identity credential per identity."""

    def __init__(self) -> None:
        self._credentials: dict[Identity, DefaultAzureCredential] = {}
        self._closing: set[asyncio.Task[None]] = set()

    async def __call__(self, identity: Identity, scope: str) -> AccessTokenInfo:
        credential = self._credentials.get(identity)
        if credential is None:
            credential = self._credentials[identity] = self._create(identity)
        return await credential.get_token_info(scope)

    @staticmethod
    def _create(identity: Identity) -> DefaultAzureCredential:
        extra = {}
        if identity.client_id:
            extra["managed_identity_client_id"] = identity.client_id
            extra["workload_identity_client_id"] = identity.client_id
        return DefaultAzureCredential(
            exclude_shared_token_cache_credential=True,
            exclude_visual_studio_code_credential=True,
            exclude_developer_cli_credential=True,
            exclude_powershell_credential=True,
            exclude_interactive_browser_credential=True,
            # The credential's own traffic must never loop through a proxy (least of all
            # keyless itself), whatever HTTPS_PROXY says in this process' environment.
            use_env_settings=False,
            **extra,
        )

    def forget(self, identity: Identity) -> None:
        """Drop the identity's credential (and its token cache): the next call fetches anew."""
        credential = self._credentials.pop(identity, None)
        if credential is not None:
            task = asyncio.get_running_loop().create_task(credential.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for credential in self._credentials.values():
            await credential.close()
        self._credentials.clear()
