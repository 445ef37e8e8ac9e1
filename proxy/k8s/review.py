"""One AdmissionReview (admission.k8s.io/v1) in, one answer out. Pure apart from the clock-free
logging the server does with the returned `Answer`.

Whatever goes wrong with a review that names its uid, the answer is `allowed` without a patch:
keyless must never keep a pod from starting. Only a body that is not a review at all gets an
HTTP error (the API server then applies the webhook's failurePolicy: Ignore).
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from typing import Any

from proxy.k8s.defaults import Defaults
from proxy.k8s.inject import decide, notes, plan

API_VERSION = "admission.k8s.io/v1"
MAX_BODY = 8 * 1024 * 1024
# The API server serialises AdmissionRequest with uid first; a body too large to parse still
# gets its allowed answer when its uid can be read from the head.
_HEAD_UID = re.compile(rb'"request"\s*:\s*\{\s*"uid"\s*:\s*"([A-Za-z0-9-]{1,64})"')


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]
    log: str  # one line: who, what was decided, why (never an env value)


def allowed(uid: str, patch: list[dict[str, Any]] | None = None,
            warnings: list[str] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    if warnings:
        response["warnings"] = warnings
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}


def error(status: int, message: str) -> Answer:
    return Answer(status, {"error": message}, f"decision=error status={status} reason={message}")


def too_large(head: bytes, size: int) -> Answer:
    found = _HEAD_UID.search(head)
    reason = f"body of {size} bytes exceeds {MAX_BODY}"
    if not found:
        return error(413, reason)
    uid = found.group(1).decode()
    return Answer(200, allowed(uid), f"uid={uid} decision=skip reason={reason}")


def answer(body: bytes, defaults: Defaults) -> Answer:
    try:
        review = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return error(400, "the body is not JSON (expected an AdmissionReview)")
    request = review.get("request") if isinstance(review, dict) else None
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str) \
            or not request["uid"]:
        return error(400, "not an AdmissionReview: no request.uid")
    uid = request["uid"]
    if review.get("apiVersion") != API_VERSION or review.get("kind") != "AdmissionReview":
        return _skip(uid, "-", f"expected {API_VERSION} AdmissionReview")
    namespace = str(request.get("namespace") or "")
    obj = request.get("object")
    who = _who(namespace, obj)
    kind = request.get("kind") if isinstance(request.get("kind"), dict) else {}
    if (kind.get("group"), kind.get("version"), kind.get("kind")) != ("", "v1", "Pod"):
        return _skip(uid, who, f"not a v1 Pod: {_short(kind.get('kind'))}")
    if request.get("operation") != "CREATE":
        return _skip(uid, who, f"operation {_short(request.get('operation'))}, not CREATE")
    if not isinstance(obj, dict) or not isinstance(obj.get("spec"), dict) \
            or not isinstance(obj["spec"].get("containers"), list):
        return _skip(uid, who, "the object is not a pod with containers")
    try:
        decision = decide(obj, namespace, defaults)
        if not decision.inject or decision.options is None:
            return _skip(uid, who, decision.reason)
        patch = plan(obj, decision.options, defaults)
        warnings = notes(obj, decision.options, defaults)
    except (TypeError, AttributeError, KeyError, ValueError) as exc:
        # a pod shape the planner did not expect: leave it alone rather than fail it
        return _skip(uid, who, f"unexpected pod shape ({type(exc).__name__})")
    kept = "".join(f"; {w.removeprefix('keyless: ')}" for w in warnings)
    return Answer(200, allowed(uid, patch, warnings),
                  f"uid={uid} pod={who} decision=inject reason={decision.reason} "
                  f"operations={len(patch)}{kept}")


def _skip(uid: str, who: str, reason: str) -> Answer:
    return Answer(200, allowed(uid), f"uid={uid} pod={who} decision=skip reason={reason}")


def _who(namespace: str, obj: Any) -> str:
    metadata = obj.get("metadata") if isinstance(obj, dict) else None
    metadata = metadata if isinstance(metadata, dict) else {}
    name = metadata.get("name") or (str(metadata.get("generateName") or "") + "*")
    return f"{namespace or '-'}/{_short(name)}"


def _short(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._*/-]", "?", str(value))[:80]
