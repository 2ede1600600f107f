"""Which Secrets of a FineTuneJob were checked at admission, in a form only the controller can write.

The admission webhook (controller/webhook.py) checks, by SubjectAccessReview, that whoever creates or changes a
FineTuneJob may `get` every Secret it names. Only the webhook sees who asks; so that the controller can tell a
checked job from one created while the webhook was off or bypassed, the webhook's mutating half writes the
annotation `finetune.dev/secrets-checked`: an HMAC (the key is in the controller's own Secret, controller/certs.py)
over the namespace, the name, the object (its uid, or on creation the time of admission, which must be within
ADMISSION_SKEW of the object's creationTimestamp, so a copied annotation cannot be replayed on a later object) and
the sorted Secret names. Anyone may copy or edit the annotation; nobody without the key can make one that covers
other Secrets or another object.

Before every attempt the controller verifies it (controller/policies/admission.py): a job that names a Secret and
carries no valid signature is refused (InvalidSpec, naming the field and the Secret), unless the admin allows
unattributed Secret references (`--unattributed-secrets allow`, the chart's webhook.unattributedSecrets).
"""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
from dataclasses import dataclass
from enum import Enum

ANNOTATION = "finetune.dev/secrets-checked"
VERSION = "v1"
ADMISSION_SKEW = dt.timedelta(seconds=120)


class Unattributed(str, Enum):
    """What the controller does with a Secret reference the webhook did not check."""
    REFUSE = "refuse"
    ALLOW = "allow"


@dataclass(frozen=True)
class Attribution:
    """The controller's side: its key (None: not loaded, nothing verifies) and the admin's setting."""
    key: bytes | None = None
    unattributed: Unattributed = Unattributed.REFUSE


def secret_names(spec: dict) -> list[tuple[str, str]]:
    """(field, Secret name) for every Secret a spec makes the runner pod receive."""
    out = []
    for f in ("hfTokenSecretRef", "s3SecretRef", "gcsSecretRef"):
        ref = spec.get(f)
        if isinstance(ref, dict) and isinstance(ref.get("name"), str):
            out.append((f"spec.{f}", ref["name"]))
    for i, name in enumerate(spec.get("imagePullSecrets") or []):
        if isinstance(name, str):
            out.append((f"spec.imagePullSecrets[{i}]", name))
    for i, e in enumerate(spec.get("env") or []):
        ref = ((e.get("valueFrom") or {}).get("secretKeyRef") or {}) if isinstance(e, dict) else {}
        if isinstance(ref, dict) and isinstance(ref.get("name"), str):
            out.append((f"spec.env[{i}].valueFrom.secretKeyRef", ref["name"]))
    return out


def _mac(key: bytes, namespace: str, name: str, bound: str, names: list[str]) -> str:
    msg = "\n".join([VERSION, namespace, name, bound, *sorted(set(names))]).encode()
    return base64.urlsafe_b64encode(hmac.new(key, msg, hashlib.sha256).digest()).decode().rstrip("=")


def _ts(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def sign(key: bytes, metadata: dict, spec: dict, *, now: dt.datetime | None = None) -> str:
    """The annotation's value for this object: bound to its uid, or (on creation, no uid yet) to now."""
    names = [n for _, n in secret_names(spec)]
    uid = metadata.get("uid")
    bound = f"uid={uid}" if uid else f"admitted={_ts(now or dt.datetime.now(dt.timezone.utc))}"
    return f"{VERSION};{bound};{_mac(key, metadata.get('namespace') or '', metadata.get('name') or '', bound, names)}"


def _parse_time(text: str) -> dt.datetime | None:
    try:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    except (TypeError, ValueError):
        return None


def verified(key: bytes, metadata: dict, spec: dict) -> bool:
    """The annotation on `metadata` was written by the webhook for exactly this object and these Secrets."""
    value = (metadata.get("annotations") or {}).get(ANNOTATION)
    if not isinstance(value, str) or value.count(";") != 2:
        return False
    version, bound, mac = value.split(";")
    if version != VERSION:
        return False
    if bound.startswith("uid="):
        if bound[4:] != metadata.get("uid"):
            return False
    elif bound.startswith("admitted="):
        admitted, created = _parse_time(bound[9:]), _parse_time(metadata.get("creationTimestamp") or "")
        if admitted is None or created is None or abs(created - admitted) > ADMISSION_SKEW:
            return False
    else:
        return False
    names = [n for _, n in secret_names(spec)]
    expected = _mac(key, metadata.get("namespace") or "", metadata.get("name") or "", bound, names)
    return hmac.compare_digest(mac, expected)


def refusals(attribution: Attribution, metadata: dict, spec: dict, runs_with: dict | None = None) -> list[str]:
    """Why the controller may not hand this job's Secrets to a pod (empty: it may). `runs_with`: the spec the
    attempt is made from, when not the live one (its Secrets must be among those the live spec's signature covers)."""
    refs = secret_names(runs_with if runs_with is not None else spec)
    if not refs or attribution.unattributed == Unattributed.ALLOW:
        return []
    signed = attribution.key is not None and verified(attribution.key, metadata, spec)
    covered = {n for _, n in secret_names(spec)} if signed else set()
    return [f"{where}: Secret {name!r} was not checked at admission (the admission webhook was off or bypassed "
            f"when this job was created or changed), so the controller cannot tell that its creator may read it; "
            f"create the job again with the webhook on, or an admin sets webhook.unattributedSecrets: allow"
            for where, name in refs if name not in covered]


def annotation_patch(metadata: dict, value: str | None) -> list[dict]:
    """JSON patch operations that set (or, with None, remove) the annotation."""
    ann = metadata.get("annotations")
    key = "/metadata/annotations/" + ANNOTATION.replace("~", "~0").replace("/", "~1")
    if value is None:
        return [{"op": "remove", "path": key}] if isinstance(ann, dict) and ANNOTATION in ann else []
    if not isinstance(ann, dict):
        return [{"op": "add", "path": "/metadata/annotations", "value": {ANNOTATION: value}}]
    return [{"op": "add", "path": key, "value": value}]


__all__ = ["ANNOTATION", "Attribution", "Unattributed", "sign", "verified", "refusals", "annotation_patch",
           "secret_names"]
