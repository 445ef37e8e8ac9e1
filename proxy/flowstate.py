"""What keyless knows about one HTTP flow, in one typed record.

The conversion (addons/azure_auth.py) creates the record for every request to a catalog host;
the other addons (401 replay, upstream pool, observation, RBAC diagnosis, blob batch) only
read it or mark what they did. It lives under one metadata key, so no addon depends on
another's loose keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.tokens import Identity

METADATA_KEY = "keyless"


class KeptBody(Protocol):
    data: bytearray | None


class AmqpStream(Protocol):
    """An AMQP connection's converter (proxy/amqp/stream.py AmqpConverter)."""

    async def from_app(self, data: bytes) -> Any: ...

    def from_service(self, data: bytes) -> Any: ...

    # (optional) the tokens keyless renews itself: when next (clock seconds), and what to send
    def due(self) -> float | None: ...

    async def tick(self) -> Any: ...


@dataclass(slots=True)
class FlowState:
    service: str  # the catalog service name (metric label)
    resource: str | None = None  # account, namespace, vault, ...
    # Set once a token is attached:
    converted: bool = False
    identity: Identity | None = None
    scope: str | None = None
    reattach: Callable[[Any, str], None] | None = None  # attach a fresh token (401 replay)
    # What keyless did with the request or its answer:
    refused: bool = False  # keyless answered with its own refusal
    answered: bool = False  # keyless answered (e.g. 502), not the service
    replayed: bool = False
    pooled: bool = False
    kept_body: KeptBody | None = None  # a copy of a small streamed body, for a replay
    relay_destination: tuple[bytes, str, int] | None = None  # pool: the real destination
    # AMQP over WebSocket (addons/amqp_websocket.py): the stream's converter, once the
    # upgrade to the agreed namespace succeeded; failed: it stopped, nothing more is forwarded
    amqp: AmqpStream | None = None
    amqp_failed: bool = False

    @property
    def identity_label(self) -> str:
        return self.identity.label if self.identity is not None else "default"

    @property
    def service_answered(self) -> bool:
        """Whether the flow's response (if any) came from the service itself."""
        return not (self.refused or self.answered)


def flow_state(flow: Any) -> FlowState | None:
    """The record of a flow to a catalog host; None for any other flow."""
    state: FlowState | None = flow.metadata.get(METADATA_KEY)
    return state


def converted(flow: Any) -> FlowState | None:
    """The record of a flow keyless attached a token to; None otherwise."""
    state = flow_state(flow)
    return state if state is not None and state.converted else None


def start_state(flow: Any, service: str, resource: str | None) -> FlowState:
    state = FlowState(service=service, resource=resource)
    flow.metadata[METADATA_KEY] = state
    return state
