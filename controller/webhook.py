"""The validating admission webhook for FineTuneJobs, served by the controller over TLS (`--webhook-cert`).

At `kubectl apply` time, for CREATE and for an UPDATE that changes the spec, it refuses a FineTuneJob with every
problem listed at once:

  (a) the same checks as `python -m runner validate` (runner/api/parse.py), the bounds of controller/limits.py
      and the admin policy (controller/policy.py) - what the controller would otherwise report later as
      InvalidSpec;
  (b) a SubjectAccessReview per Secret the spec references (hfTokenSecretRef, s3SecretRef, gcsSecretRef,
      imagePullSecrets, env valueFrom secretKeyRef): the requesting user must be allowed to `get` it. The runner
      pod receives those Secrets, and the model code it runs can read them, so naming a Secret is reading it. On
      UPDATE only Secrets the old spec did not name are checked (a teammate may still suspend your job).

Only the webhook sees who asks; the controller re-checks (a) itself whatever the webhook said. The chart
registers it with failurePolicy Fail: (b) exists nowhere else, and while the controller is down no job could
run anyway, so failing closed costs only the creation of jobs during that time.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
from typing import Any, Callable

from aiohttp import web

from controller import attribution, limits, naming
from controller.policy import Policy
from runner.api import status as contract
from runner.api.errors import SpecError
from runner.api.parse import parse_job

log = logging.getLogger("controller.webhook")
PATH = "/validate-finetunejob"
ATTRIBUTE_PATH = "/attribute-finetunejob"  # the mutating half: signs which Secrets were checked
SAR_PATH = "/apis/authorization.k8s.io/v1/subjectaccessreviews"

# (user info, namespace, secret name) -> allowed?
AccessCheck = Callable[[dict, str, str], bool]


referenced_secrets = attribution.secret_names  # (where, Secret name) for every Secret a spec makes the pod receive


def _fixed(spec: Any) -> Any:
    return {k: v for k, v in spec.items() if k not in contract.MUTABLE_SPEC_FIELDS} if isinstance(spec, dict) else spec


def review(request: dict, policy: Policy, may_get_secret: AccessCheck) -> list[str]:
    """Every problem of an AdmissionReview request (empty: allowed)."""
    obj = request.get("object") or {}
    spec = obj.get("spec")
    old_spec = (request.get("oldObject") or {}).get("spec") if request.get("operation") == "UPDATE" else None
    if old_spec is not None and _fixed(spec) == _fixed(old_spec):
        return []  # run policy (suspend, ...), metadata, finalizers: nothing new to check
    problem = limits.measure(spec, max_depth=limits.SPEC_MAX_DEPTH, max_bytes=limits.SPEC_MAX_BYTES, where="spec")
    if problem:
        return [problem]  # not read any further
    if not isinstance(spec, dict):
        return ["spec: missing; a FineTuneJob needs a spec mapping"]
    md = obj.get("metadata") or {}
    problems: list[str] = []
    try:
        parse_job(naming.runner_manifest({"metadata": md}, spec))
    except SpecError as e:
        problems += e.problems
    problems += policy.refusals(spec)
    user = request.get("userInfo") or {}
    namespace = request.get("namespace") or md.get("namespace") or ""
    before = {name for _, name in referenced_secrets(old_spec)} if isinstance(old_spec, dict) else set()
    for where, name in referenced_secrets(spec):
        if name in before:
            continue
        try:
            allowed = may_get_secret(user, namespace, name)
        except Exception as e:  # noqa: BLE001 - fail closed, saying why
            problems.append(f"{where}: could not check access to Secret {name!r} ({e}); try again")
            continue
        if not allowed:
            problems.append(f"{where}: {user.get('username') or 'you'} may not get Secret {name!r} in namespace "
                            f"{namespace!r}, so a FineTuneJob of theirs may not use it (SubjectAccessReview); "
                            "reference a Secret you can read")
    return problems


def attribute(request: dict, key: bytes, may_get_secret: AccessCheck) -> list[dict]:
    """The mutating half: JSON patch operations that sign (controller/attribution.py) the Secrets checked for this
    request's user, or remove a signature that no longer holds. Never refuses (the validating half does).
    On UPDATE a valid signature of the old object carries over what it covered, so a teammate may still suspend
    a job that names Secrets only its creator may read; Secrets the old object did not cover are checked."""
    obj = request.get("object") or {}
    md, spec = obj.get("metadata") or {}, obj.get("spec")
    if not isinstance(spec, dict) or limits.measure(spec, max_depth=limits.SPEC_MAX_DEPTH,
                                                    max_bytes=limits.SPEC_MAX_BYTES, where="spec"):
        return attribution.annotation_patch(md, None)
    md = {**md, "namespace": md.get("namespace") or request.get("namespace") or ""}
    names = {n for _, n in referenced_secrets(spec)}
    old = request.get("oldObject") or {} if request.get("operation") == "UPDATE" else {}
    old_md = {**(old.get("metadata") or {}), "namespace": md["namespace"]}
    covered: set[str] = set()
    if isinstance(old.get("spec"), dict) and attribution.verified(key, old_md, old["spec"]):
        covered = {n for _, n in referenced_secrets(old["spec"])}
        if names == covered:  # nothing new: the old signature stands (bound to the uid, or re-bound to it)
            return attribution.annotation_patch(md, attribution.sign(key, md, spec))
    if not names:
        return attribution.annotation_patch(md, None)
    user = request.get("userInfo") or {}
    try:
        allowed = all(may_get_secret(user, md["namespace"], n) for n in sorted(names - covered))
    except Exception:  # noqa: BLE001 - unsigned; the validating half says why
        allowed = False
    return attribution.annotation_patch(md, attribution.sign(key, md, spec) if allowed else None)


def patch_response(request: dict, ops: list[dict]) -> dict:
    out: dict = {"uid": request.get("uid"), "allowed": True}
    if ops:
        out.update(patchType="JSONPatch", patch=base64.b64encode(json.dumps(ops).encode()).decode())
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": out}


def response(request: dict, problems: list[str]) -> dict:
    out: dict = {"uid": request.get("uid"), "allowed": not problems}
    if problems:
        out["status"] = {"code": 403, "reason": "Forbidden",
                         "message": "FineTuneJob refused:\n" + "\n".join(f"  - {p}" for p in problems)}
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": out}


def sar_check(kube) -> AccessCheck:
    """A SubjectAccessReview through the controller's client (needs `create` on subjectaccessreviews)."""
    def check(user: dict, namespace: str, name: str) -> bool:
        body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": {
            "user": user.get("username"), "uid": user.get("uid"), "groups": user.get("groups") or [],
            "extra": user.get("extra") or {},
            "resourceAttributes": {"namespace": namespace, "verb": "get", "resource": "secrets", "name": name}}}
        return bool((kube.create(SAR_PATH, body).get("status") or {}).get("allowed"))
    return check


async def _read(req: web.Request) -> dict | None:
    try:
        doc = await req.json(loads=lambda s: limits.loads_bounded(s, max_bytes=4 * 1024 * 1024, max_depth=10_001)[0])
        request = (doc or {}).get("request")
        return request if isinstance(request, dict) else None
    except (ValueError, AttributeError):
        return None


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """The server's TLS context; `load_cert_chain` on it again serves a rotated certificate to new connections."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def serve(port: int, context: ssl.SSLContext, policy: Policy, may_get_secret: AccessCheck, pool,
                host: str = "0.0.0.0", attribution_key: bytes | None = None) -> web.AppRunner:
    """The webhook's HTTPS server; reviews run in `pool` (SubjectAccessReviews are blocking calls). Every replica
    serves it (SO_REUSEPORT: replicas on one node's network share the port)."""
    async def mutate(req: web.Request) -> web.Response:
        request = await _read(req)
        if request is None:
            return web.Response(status=400, text="not an AdmissionReview\n")
        if attribution_key is None:
            return web.json_response(patch_response(request, []))
        loop = asyncio.get_running_loop()
        ops = await loop.run_in_executor(pool, attribute, request, attribution_key, may_get_secret)
        return web.json_response(patch_response(request, ops))

    async def validate(req: web.Request) -> web.Response:
        request = await _read(req)
        if request is None:
            return web.Response(status=400, text="not an AdmissionReview\n")
        loop = asyncio.get_running_loop()
        problems = await loop.run_in_executor(pool, review, request, policy, may_get_secret)
        if problems:
            log.info("refused %s %s/%s for %s: %s", request.get("operation"), request.get("namespace"),
                     request.get("name") or (request.get("object") or {}).get("metadata", {}).get("name"),
                     (request.get("userInfo") or {}).get("username"), "; ".join(problems)[:1000])
        return web.json_response(response(request, problems))

    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.add_routes([web.post(PATH, validate), web.post(ATTRIBUTE_PATH, mutate)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=context, reuse_port=True).start()
    log.info("admission webhook serving https://%s:%d%s", host, port, PATH)
    return runner


__all__ = ["review", "response", "attribute", "patch_response", "referenced_secrets", "serve", "tls_context",
           "sar_check", "PATH", "ATTRIBUTE_PATH"]
