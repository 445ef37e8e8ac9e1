"""CBS put-token (claims-based security): recognise a SAS put-token, build the Entra one, and
the local endpoint's rewrites of host names and addresses. Pure.

A put-token is a message on the `$cbs` sender link: application-properties `operation`,
`type`, `name` (the audience, the entity URI) and sometimes `expiration`; the body an
amqp-value string with the token. The SAS is recognised by the body, whatever `type` says
(azure-servicebus 7.15 says "jwt" for a SAS).
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

from proxy.amqp.codec import (
    PROPERTIES_CORRELATION_ID,
    PROPERTIES_MESSAGE_ID,
    AmqpProtocolError,
    Map,
    Section,
    encode_section,
    parse_message,
    section,
)

SAS_PREFIX = "SharedAccessSignature "
CBS_NODE = "$cbs"
PLACEHOLDER = "KeylessTokenUnavailable"  # the body sent instead of a SAS when no token: no secret
APPLICATION_PROPERTIES, AMQP_VALUE, PROPERTIES = 0x74, 0x77, 0x73
_ADDRESS = re.compile(r"^(?P<scheme>sb|amqps?|https?)://(?P<authority>[^/?#]*)(?P<rest>.*)$",
                      re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Sas:
    audience: str | None  # sr
    expiry: float | None  # se (seconds since the epoch)
    key_name: str | None  # skn


@dataclass(frozen=True, slots=True)
class PutToken:
    """A CBS request as the app sent it (the token itself is not kept here)."""

    sections: list[Section]
    audience: str
    type: str
    sas: Sas | None  # None: the body is no SAS (an Entra JWT already, or something else)
    message_id: object


def parse_sas(token: str) -> Sas | None:
    """`SharedAccessSignature sr=...&sig=...&se=...&skn=...` → its non-secret fields."""
    if not token.startswith(SAS_PREFIX):
        return None
    fields = urllib.parse.parse_qs(token[len(SAS_PREFIX):], keep_blank_values=True)
    expiry = None
    try:
        expiry = float(fields["se"][0]) if "se" in fields else None
    except ValueError:
        expiry = None
    return Sas(audience=fields.get("sr", [None])[0], expiry=expiry,
               key_name=(fields.get("skn", [None])[0] or None))


def _app_properties(sections: list[Section]) -> Map:
    props = section(sections, APPLICATION_PROPERTIES)
    return props.value if props is not None and isinstance(props.value, Map) else Map()


def _body_text(sections: list[Section]) -> str | None:
    body = section(sections, AMQP_VALUE)
    if body is None:
        return None
    if isinstance(body.value, str):
        return body.value
    if isinstance(body.value, bytes):  # a binary body: still a SAS if it reads as one
        try:
            return body.value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return None


def message_id(sections: list[Section]) -> object:
    props = section(sections, PROPERTIES)
    if props is None or not isinstance(props.value, list):
        return None
    fields = props.value
    return fields[PROPERTIES_MESSAGE_ID] if len(fields) > PROPERTIES_MESSAGE_ID else None


def correlation_id(sections: list[Section]) -> object:
    props = section(sections, PROPERTIES)
    if props is None or not isinstance(props.value, list):
        return None
    fields = props.value
    return fields[PROPERTIES_CORRELATION_ID] if len(fields) > PROPERTIES_CORRELATION_ID else None


def read_put_token(payload: bytes) -> PutToken | None:
    """The put-token in a `$cbs` transfer's message bytes, or None when the message is none.

    A message whose body is a SAS counts as a put-token whatever its `operation`: a SAS never
    passes keyless unconverted."""
    sections = parse_message(payload)
    props = _app_properties(sections)
    body = _body_text(sections)
    sas = parse_sas(body) if body is not None else None
    if props.get("operation") != "put-token" and sas is None:
        return None
    audience = props.get("name")
    if not isinstance(audience, str):
        audience = (sas.audience if sas and sas.audience else "")
    kind = props.get("type")
    return PutToken(sections, audience, kind if isinstance(kind, str) else "", sas,
                    message_id(sections))


def rewritten_put_token(request: PutToken, token: str, audience: str) -> bytes:
    """The message bytes of the Entra put-token: `type="jwt"`, the audience given, the body
    the JWT (or the placeholder); every other section and property as the app sent it."""
    out = []
    have_props = False
    for s in request.sections:
        if s.code == APPLICATION_PROPERTIES:
            have_props = True
            props = _app_properties([s]).replace("type", "jwt").replace("name", audience)
            out.append(encode_section(APPLICATION_PROPERTIES, props))
        elif s.code == AMQP_VALUE:
            out.append(encode_section(AMQP_VALUE, token))
        else:
            out.append(s.raw)
    if not have_props:
        raise AmqpProtocolError("CBS request without application-properties")
    if not any(s.code == AMQP_VALUE for s in request.sections):
        out.append(encode_section(AMQP_VALUE, token))
    return b"".join(out)


@dataclass(frozen=True, slots=True)
class CbsReply:
    sections: list[Section]
    correlation_id: object
    status_code: int | None
    description: str | None


# A reply's status under either spelling: CBS says status-code, Service Bus' $management
# statusCode; the Java SDK reads statusCode/statusDescription first when a reply has both.
STATUS_CODE_KEYS = ("status-code", "statusCode")
STATUS_DESCRIPTION_KEYS = ("status-description", "statusDescription")


def _first(props: Map, keys: tuple[str, ...]) -> Any:
    return next((props.get(key) for key in keys if props.get(key) is not None), None)


def read_reply(payload: bytes) -> CbsReply:
    sections = parse_message(payload)
    props = _app_properties(sections)
    code = _first(props, STATUS_CODE_KEYS)
    value = getattr(code, "value", code)
    description = _first(props, STATUS_DESCRIPTION_KEYS)
    return CbsReply(sections, correlation_id(sections),
                    int(value) if isinstance(value, int) and not isinstance(value, bool) else None,
                    description if isinstance(description, str) else None)


def reply_with_description(reply: CbsReply, description: str) -> bytes:
    out = []
    for s in reply.sections:
        if s.code == APPLICATION_PROPERTIES:
            props = _app_properties([s]).replace("status-description", description)
            if props.get("statusDescription") is not None:  # what the Java SDK shows
                props = props.replace("statusDescription", description)
            out.append(encode_section(APPLICATION_PROPERTIES, props))
        else:
            out.append(s.raw)
    return b"".join(out)


# ---------------------------------------------------------------- local endpoint rewrites

def rewrite_address(address: str, namespace: str, local_authority: str | None) -> str:
    """`sb://localhost:5672/orders` → `sb://NS/orders` (also amqps://, amqp:// Java,
    https://); an address with another authority, or a bare entity name, stays as it is.
    `local_authority="*"` rewrites any authority (the app may say localhost or 127.0.0.1)."""
    if local_authority is None:
        return address
    match = _ADDRESS.match(address)
    if match is None:
        return address
    authority = match["authority"]
    if local_authority != "*" and authority.lower() != local_authority.lower():
        return address
    if authority.lower() == namespace.lower():
        return address
    return f"{match['scheme']}://{namespace}{match['rest']}"


def rewrite_hostname(hostname: str | None, namespace: str,
                     local_authority: str | None) -> str | None:
    """The open frame's hostname: the namespace instead of the local host (with or without
    its port)."""
    if local_authority is None or hostname is None:
        return hostname
    if local_authority == "*":
        return namespace
    host = local_authority.rsplit(":", 1)[0] if ":" in local_authority else local_authority
    return namespace if hostname.lower() in (local_authority.lower(), host.lower()) else hostname


def audience_host(audience: str) -> str | None:
    match = _ADDRESS.match(audience)
    if match is None:
        return None
    return match["authority"].rsplit("@", 1)[-1].split(":", 1)[0].lower() or None
