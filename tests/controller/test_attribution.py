"""The signature of the Secrets the webhook checked (controller/attribution.py) and the webhook's mutating half
(controller/webhook.py attribute): what verifies, what does not, and what a teammate's update keeps."""
from __future__ import annotations

import datetime as dt

from controller import attribution, webhook
from controller.attribution import Attribution, Unattributed

KEY = b"k" * 32
T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
SPEC = {"s3SecretRef": {"name": "team-db"}, "imagePullSecrets": ["pull"]}


def _md(value: str | None, **extra) -> dict:
    md = {"name": "j", "namespace": "ns", "creationTimestamp": "2026-01-01T12:00:01Z", **extra}
    if value:
        md["annotations"] = {attribution.ANNOTATION: value}
    return md


def test_a_signature_covers_exactly_its_object_and_secrets():
    value = attribution.sign(KEY, {"name": "j", "namespace": "ns"}, SPEC, now=T0)
    assert attribution.verified(KEY, _md(value), SPEC)
    assert attribution.verified(KEY, _md(value), {**SPEC, "imagePullSecrets": ["pull", "pull"]})  # same set
    assert not attribution.verified(KEY, _md(value), {**SPEC, "hfTokenSecretRef": {"name": "other"}})
    assert not attribution.verified(KEY, {**_md(value), "name": "copy"}, SPEC)  # copied onto another job
    assert not attribution.verified(KEY, {**_md(value), "namespace": "other"}, SPEC)
    assert not attribution.verified(b"x" * 32, _md(value), SPEC)  # another key
    late = {**_md(value), "creationTimestamp": "2026-01-01T12:30:00Z"}  # replayed on a re-created job later
    assert not attribution.verified(KEY, late, SPEC)
    bound = attribution.sign(KEY, _md(None, uid="u1"), SPEC)
    assert attribution.verified(KEY, _md(bound, uid="u1"), SPEC) and not attribution.verified(KEY, _md(bound, uid="u2"),
                                                                                              SPEC)
    assert not attribution.verified(KEY, _md(value.replace("v1;", "v2;")), SPEC)
    assert not attribution.verified(KEY, _md("garbage"), SPEC)


def test_the_controller_refuses_unsigned_secrets_unless_the_admin_allows_them():
    refuse, allow = Attribution(KEY), Attribution(KEY, Unattributed.ALLOW)
    problems = attribution.refusals(refuse, _md(None), SPEC)
    assert [p.split(":")[0] for p in problems] == ["spec.s3SecretRef", "spec.imagePullSecrets[0]"]
    assert "Secret 'team-db' was not checked at admission" in problems[0]
    assert "webhook.unattributedSecrets" in problems[0]
    assert attribution.refusals(allow, _md(None), SPEC) == []
    assert attribution.refusals(refuse, _md(None), {}) == []  # no Secret: nothing to attribute
    assert attribution.refusals(Attribution(None), _md(None), SPEC)  # no key: nothing verifies
    signed = _md(attribution.sign(KEY, _md(None, uid="u"), SPEC), uid="u")
    assert attribution.refusals(refuse, signed, SPEC) == []
    # the attempt runs from the first attempt's spec: a Secret it names that the live signature does not cover
    assert attribution.refusals(refuse, signed, SPEC, runs_with={"hfTokenSecretRef": {"name": "x"}})


def _request(op: str, spec: dict, old: dict | None = None, user: str = "alice") -> dict:
    obj = {"metadata": {"name": "j", "namespace": "ns", **({"uid": "u"} if op == "UPDATE" else {})}, "spec": spec}
    return {"operation": op, "namespace": "ns", "userInfo": {"username": user}, "object": obj,
            **({"oldObject": old} if old else {})}


def test_the_mutating_half_signs_what_it_checked_and_keeps_a_teammates_update_signed():
    may = {("alice", "team-db"), ("alice", "pull")}
    check = lambda user, ns, name: (user["username"], name) in may  # noqa: E731
    [op] = webhook.attribute(_request("CREATE", SPEC), KEY, check)
    assert op["op"] == "add" and op["path"] == "/metadata/annotations"
    value = op["value"][attribution.ANNOTATION]
    assert attribution.verified(KEY, {"name": "j", "namespace": "ns", "creationTimestamp": dt.datetime.now(
        dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "annotations": {attribution.ANNOTATION: value}}, SPEC)
    # bob may not read team-db: nothing signed (the validating half refuses him)
    assert webhook.attribute(_request("CREATE", SPEC, user="bob"), KEY, check) == []
    # bob suspends alice's job: the old signature carries over, bound to the uid
    old = {"metadata": {"name": "j", "namespace": "ns", "uid": "u", "creationTimestamp": "2026-01-01T12:00:00Z",
                        "annotations": {attribution.ANNOTATION: attribution.sign(KEY, {"name": "j", "namespace": "ns",
                                                                                       "uid": "u"}, SPEC)}},
           "spec": SPEC}
    req = _request("UPDATE", {**SPEC, "suspend": True}, old, user="bob")
    req["object"]["metadata"]["annotations"] = dict(old["metadata"]["annotations"])
    [op] = webhook.attribute(req, KEY, check)
    assert op["path"].endswith("secrets-checked") and attribution.verified(
        KEY, {**req["object"]["metadata"], "annotations": {attribution.ANNOTATION: op["value"]}}, SPEC)
    # bob adds a Secret he may not read: the signature is removed
    req = _request("UPDATE", {**SPEC, "hfTokenSecretRef": {"name": "team-db2"}}, old, user="bob")
    req["object"]["metadata"]["annotations"] = dict(old["metadata"]["annotations"])
    assert webhook.attribute(req, KEY, check) == [{"op": "remove", "path": "/metadata/annotations/finetune.dev~1"
                                                                            "secrets-checked"}]
