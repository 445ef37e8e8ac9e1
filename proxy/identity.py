"""Where tokens come from: azure-identity's aio credentials, one per identity.

`DefaultAzureCredential` semantics limited to what a sidecar can use: environment (service
principal), workload identity, managed identity, and the Azure CLI for local development.
`AZURE_CLIENT_ID` picks a user-assigned identity for the default identity.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import Callable

from azure.core.credentials import AccessTokenInfo
from azure.core.exceptions import ClientAuthenticationError
from azure.identity.aio import DefaultAzureCredential

from proxy.tokens import Identity


class CredentialSource:
    """A `TokenSource` backed by azure-identity credentials: one per (identity, scope).

    Per scope, not per identity: an azure-identity credential asks its endpoint at most once
    per 30 s across all its scopes, answering from its cache meanwhile, so scopes whose
    refreshes fall within 30 s of each other would be handed their old tokens (and, near the
    expiry margin, requests would find no token to attach)."""

    def __init__(
        self, create: Callable[[Identity], DefaultAzureCredential] | None = None
    ) -> None:
        self._create = create or self._default_credential
        self._credentials: dict[tuple[Identity, str], DefaultAzureCredential] = {}
        # Credentials that have handed out a token at least once.
        self._proven: weakref.WeakSet[DefaultAzureCredential] = weakref.WeakSet()
        self._closing: set[asyncio.Task[None]] = set()

    async def __call__(self, identity: Identity, scope: str) -> AccessTokenInfo:
        credential = self._credential(identity, scope)
        try:
            info = await credential.get_token_info(scope)
        except ClientAuthenticationError:
            if credential not in self._proven:
                raise  # never worked: a configuration problem a fresh credential won't fix
            # A credential that worked may hold what azure-identity read once and keeps: a
            # certificate file (read at construction, so a rotated one is never seen), a
            # federated token file (re-read at most every 10 minutes). One fresh credential
            # reads them anew; unless another request's failure has already replaced it.
            if self._credentials.get((identity, scope)) is credential:
                self.forget(identity)
            credential = self._credential(identity, scope)
            info = await credential.get_token_info(scope)
        self._proven.add(credential)
        return info

    def _credential(self, identity: Identity, scope: str) -> DefaultAzureCredential:
        credential = self._credentials.get((identity, scope))
        if credential is None:
            credential = self._credentials[(identity, scope)] = self._create(identity)
        return credential

    @staticmethod
    def _default_credential(identity: Identity) -> DefaultAzureCredential:
        extra: dict[str, str | bool] = {}
        if identity.client_id:
            extra["managed_identity_client_id"] = identity.client_id
            extra["workload_identity_client_id"] = identity.client_id
            if identity.client_id != os.environ.get("AZURE_CLIENT_ID"):
                # The environment's service principal is AZURE_CLIENT_ID's identity: for any
                # other client id it would hand out its own token under that identity's name.
                extra["exclude_environment_credential"] = True
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
        """Drop the identity's credentials (and their token caches): the next calls fetch
        anew."""
        for key in [key for key in self._credentials if key[0] == identity]:
            task = asyncio.get_running_loop().create_task(self._credentials.pop(key).close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for credential in self._credentials.values():
            await credential.close()
        self._credentials.clear()
