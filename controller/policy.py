"""The admin policy: what a FineTuneJob may ask of the cluster through the operator. Secure by default.

Whoever may create a FineTuneJob gets, through the controller, a Job run with the controller's permissions.
The policy keeps that from becoming more power than the user has: a spec that asks for something outside it
is refused before any Job exists (status Failed, reason InvalidSpec, the message naming the field and the
policy key that refused it).

    default (no policy given)                 what it allows
    imagePrefixes: []                         spec.image only unset or the operator's own runner image
    serviceAccountNames: []                   no spec.serviceAccountName (the runner gets its own identity)
    envValueFrom: []                          spec.env with plain values only (no secretKeyRef, configMapKeyRef,
                                              fieldRef, resourceFieldRef)
    reservedEnv: []                           spec.env never sets what the controller sets or credentials come
                                              from: FINETUNE_*, AWS_*, HF_*, HUGGING_FACE_*, KUBERNETES_*, PET_*,
                                              HOME, TMPDIR (plus the names listed here)
    tolerationKeys: []                        no spec.tolerations ("*": any key, even a key-less toleration)
    nodeSelectorKeys: []                      no spec.nodeSelector, no node affinity ("*": any label)
    priorityClassNames: []                    no spec.priorityClassName
    podAffinity: false                        no spec.affinity.podAffinity / podAntiAffinity
    volumeClaims: []                          no spec.volumes (PersistentVolumeClaims; "*": any in the namespace)
    modelCacheClaims: []                      no spec.modelCache (the operator's runner.modelCache, if any, only)

The chart renders its `policy` values as the controller's `--policy` flag (JSON); `--policy-file` reads a
YAML or JSON file instead.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from controller.podtemplate import (RUNNER_PATHS, SYSTEM_PATHS, claim_name_problem, load_mapping,
                                   mount_path_problem)
from runner.api import names

# Environment the controller sets in every runner pod, and where credentials come from (Secret references).
# spec.env may not set these: in a pod the last entry of a name wins, so an override would redirect the runner
# (FINETUNE_*), the status sink and its token (KUBERNETES_*), the nodes' rendezvous (PET_*: torchrun's), or
# credentials (HF_ENDPOINT, AWS_ENDPOINT_URL).
RESERVED_ENV_PREFIXES = (names.ENV_PREFIX, "AWS_", "HF_", "HUGGING_FACE_", "KUBERNETES_", "PET_")
RESERVED_ENV_NAMES = ("HOME", "TMPDIR", names.ENV_GCS_CREDENTIALS)
VALUE_FROM_KINDS = ("secretKeyRef", "configMapKeyRef", "fieldRef", "resourceFieldRef")
ValueFromKind = Literal["secretKeyRef", "configMapKeyRef", "fieldRef", "resourceFieldRef"]
ANY = "*"


class PolicyError(ValueError):
    pass


class Policy(BaseModel):
    """What FineTuneJobs may set (chart values `policy.*`)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)

    image_prefixes: tuple[str, ...] = Field(
        (), description="Runner images spec.image may name besides the operator's own, as prefixes (end one "
        "with `/` to allow a repository path, e.g. `registry.example.com/ml/`).")
    service_account_names: tuple[str, ...] = Field(
        (), description="ServiceAccounts spec.serviceAccountName may name (in the job's namespace).")
    env_value_from: tuple[ValueFromKind, ...] = Field(
        (), description="Kinds of spec.env[].valueFrom allowed: secretKeyRef, configMapKeyRef, fieldRef, "
        "resourceFieldRef.")
    reserved_env: tuple[str, ...] = Field((), description="More env names spec.env may not set.")
    toleration_keys: tuple[str, ...] = Field(
        (), description="Taint keys spec.tolerations may tolerate; `*` allows any, and key-less tolerations.")
    node_selector_keys: tuple[str, ...] = Field(
        (), description="Node label keys spec.nodeSelector and spec.affinity.nodeAffinity may use; `*` any.")
    priority_class_names: tuple[str, ...] = Field((), description="PriorityClasses spec.priorityClassName may name.")
    pod_affinity: bool = Field(False, description="Allow spec.affinity.podAffinity and podAntiAffinity.")
    volume_claims: tuple[str, ...] = Field(
        (), description="PersistentVolumeClaims (in the job's namespace) spec.volumes may mount; `*` any.")
    model_cache_claims: tuple[str, ...] = Field(
        (), description="PersistentVolumeClaims spec.modelCache.claimName may name (a job's own model cache).")
    operator_image: str = Field("", exclude=True, description="The operator's runner image (set from --image).")
    admin_mounts: tuple[str, ...] = Field((), exclude=True, description="Where runner.podTemplate mounts volumes.")

    # ------------------------------------------------------------------------------------ loading
    @classmethod
    def parse(cls, doc: Any, *, operator_image: str = "", admin_mounts: tuple[str, ...] = (),
              source: str = "--policy") -> "Policy":
        if doc is None:
            doc = {}
        if not isinstance(doc, dict):
            raise PolicyError(f"{source}: the policy must be a mapping (chart values `policy`)")
        try:
            p = cls.model_validate({k: v for k, v in doc.items() if k != "operatorImage"})
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
            raise PolicyError(f"{source}: invalid policy: {problems}") from None
        return p.model_copy(update={"operator_image": operator_image, "admin_mounts": tuple(admin_mounts)})

    @classmethod
    def from_text(cls, text: str, **kw) -> "Policy":
        return cls.parse(load_mapping(text, kw.get("source", "--policy"), PolicyError), **kw)

    @classmethod
    def from_file(cls, path: str, **kw) -> "Policy":
        return cls.from_text(Path(path).read_text(encoding="utf-8"), source=path, **kw)

    def describe(self) -> str:
        return json.dumps(self.model_dump(by_alias=True), sort_keys=True)

    # ----------------------------------------------------------------------------------- checking
    def refusals(self, spec: dict) -> list[str]:
        """Every way `spec` (a FineTuneJob spec, by alias) asks for more than the policy allows."""
        out: list[str] = []
        out += self._image(spec.get("image"))
        sa = spec.get("serviceAccountName")
        if sa and sa not in self.service_account_names:
            out.append(_refused("spec.serviceAccountName", sa, "serviceAccountNames", self.service_account_names,
                                "the runner runs as its own ServiceAccount, allowed only to report this job's "
                                "status; leave the field out"))
        out += self._env(spec.get("env"))
        out += self._tolerations(spec.get("tolerations"))
        for key in (spec.get("nodeSelector") or {}):
            if not _allowed(key, self.node_selector_keys):
                out.append(_refused("spec.nodeSelector", key, "nodeSelectorKeys", self.node_selector_keys))
        out += self._affinity(spec.get("affinity"))
        pc = spec.get("priorityClassName")
        if pc and pc not in self.priority_class_names:
            out.append(_refused("spec.priorityClassName", pc, "priorityClassNames", self.priority_class_names))
        out += self._volumes(spec.get("volumes"))
        cache = (spec.get("modelCache") or {}).get("claimName") if isinstance(spec.get("modelCache"), dict) else None
        if cache and cache not in self.model_cache_claims:
            out.append(_refused("spec.modelCache.claimName", cache, "modelCacheClaims", self.model_cache_claims,
                                "leave spec.modelCache out to use the operator's model cache"))
        return out

    def _volumes(self, volumes: Any) -> list[str]:
        """spec.volumes: only PersistentVolumeClaims the policy names, mounted where nothing of the runner's is.
        (No other kind of volume exists in the spec: no hostPath, Secret or ConfigMap.)"""
        out: list[str] = []
        reserved = (*SYSTEM_PATHS, *RUNNER_PATHS, *self.admin_mounts)
        seen: set[str] = set()
        for i, v in enumerate(volumes or []):
            where = f"spec.volumes[{i}]"
            if not isinstance(v, dict):
                out.append(f"{where}: must be a mapping of claimName and mountPath")
                continue
            for key in sorted(set(v) - {"claimName", "mountPath", "readOnly", "subPath"}):
                out.append(f"{where}.{key}: a FineTuneJob mounts only PersistentVolumeClaims (claimName, mountPath, "
                           "readOnly, subPath); hostPath, Secret, ConfigMap and other volumes come only from the "
                           "cluster admin (chart values runner.podTemplate)")
            claim = v.get("claimName")
            if claim_name_problem(claim):
                out.append(f"{where}.claimName: {claim_name_problem(claim)}")
            elif not _allowed(claim, self.volume_claims):
                out.append(_refused(f"{where}.claimName", claim, "volumeClaims", self.volume_claims))
            path = v.get("mountPath")
            problem = mount_path_problem(path, reserved)
            if problem:
                out.append(f"{where}.mountPath: {problem}")
            elif path in seen:
                out.append(f"{where}.mountPath: {path} is mounted twice; give each volume its own path")
            seen.add(path)
            sub = v.get("subPath")
            if sub is not None and (not isinstance(sub, str) or sub.startswith("/") or
                                    ".." in sub.split("/") or not sub):
                out.append(f"{where}.subPath: {sub!r} must be a relative path inside the volume, without '..'")
        return out

    def _image(self, image: Any) -> list[str]:
        if not image or image == self.operator_image:
            return []
        if isinstance(image, str) and any(_prefix_match(image, p) for p in self.image_prefixes):
            return []
        allowed = [f"the operator's runner image {self.operator_image or '(the --image default)'}"]
        allowed += [f"images under {p}" for p in self.image_prefixes]
        return [f"spec.image: {image!r} is refused by the operator's policy (policy.imagePrefixes allows only "
                f"{', '.join(allowed)}); leave spec.image out, or ask a cluster admin to allow it"]

    def _env(self, env: Any) -> list[str]:
        out = []
        reserved = set(RESERVED_ENV_NAMES) | set(self.reserved_env)
        for i, item in enumerate(env or []):
            where = f"spec.env[{i}]"
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                out.append(f"{where}: must be a mapping with a name (as in a Pod's env)")
                continue
            name = item["name"]
            extra = sorted(set(item) - {"name", "value", "valueFrom"})
            if extra:
                out.append(f"{where} ({name}): unknown keys {extra}; give name and value")
            if name in reserved or name.startswith(RESERVED_ENV_PREFIXES):
                out.append(f"{where}: {name} is reserved (set by the controller, or from a Secret reference) and "
                           "refused by the operator's policy (reserved: "
                           f"{', '.join(p + '*' for p in RESERVED_ENV_PREFIXES)}, {', '.join(sorted(reserved))}, "
                           "plus policy.reservedEnv); use another name, or hfTokenSecretRef/s3SecretRef/"
                           "gcsSecretRef for credentials")
            if "valueFrom" in item:
                source = item["valueFrom"]
                kinds = sorted(source) if isinstance(source, dict) else []
                if len(kinds) != 1 or kinds[0] not in VALUE_FROM_KINDS:
                    out.append(f"{where}.valueFrom ({name}): must name one of {', '.join(VALUE_FROM_KINDS)}")
                elif kinds[0] not in self.env_value_from:
                    out.append(_refused(f"{where}.valueFrom.{kinds[0]}", name, "envValueFrom", self.env_value_from,
                                        "give a plain value, or hfTokenSecretRef/s3SecretRef/gcsSecretRef for "
                                        "credentials"))
            elif "value" in item and not isinstance(item["value"], str):
                out.append(f"{where}.value ({name}): must be a string")
        return out

    def _tolerations(self, tolerations: Any) -> list[str]:
        out = []
        for i, t in enumerate(tolerations or []):
            key = t.get("key") if isinstance(t, dict) else None
            if not key:
                if ANY not in self.toleration_keys:
                    out.append(f"spec.tolerations[{i}]: a toleration without a key tolerates every taint: refused "
                               "by the operator's policy (policy.tolerationKeys allows it only with `*`)")
            elif not _allowed(key, self.toleration_keys):
                out.append(_refused(f"spec.tolerations[{i}].key", key, "tolerationKeys", self.toleration_keys))
        return out

    def _affinity(self, affinity: Any) -> list[str]:
        if not affinity:
            return []
        if not isinstance(affinity, dict):
            return ["spec.affinity: must be a mapping (as in a Pod spec)"]
        out = []
        for kind in ("podAffinity", "podAntiAffinity"):
            if affinity.get(kind) and not self.pod_affinity:
                out.append(f"spec.affinity.{kind}: refused by the operator's policy (policy.podAffinity is false)")
        node = affinity.get("nodeAffinity")
        if node:
            for where, key in _node_affinity_keys(node):
                if not _allowed(key, self.node_selector_keys):
                    out.append(_refused(f"spec.affinity.nodeAffinity.{where}", key, "nodeSelectorKeys",
                                        self.node_selector_keys))
        return out


def _allowed(value: str, allowlist: tuple[str, ...]) -> bool:
    return ANY in allowlist or value in allowlist


def _prefix_match(image: str, prefix: str) -> bool:
    """`prefix` matches at a boundary: `reg/ml/` matches reg/ml/x:1; `reg/ml` matches reg/ml, reg/ml:1,
    reg/ml@sha256:..., reg/ml/x, but not reg/ml-evil."""
    if not prefix or not image.startswith(prefix):
        return False
    rest = image[len(prefix):]
    return prefix.endswith(("/", ":", "@")) or rest == "" or rest[0] in "/:@"


def _node_affinity_keys(node: Any) -> list[tuple[str, str]]:
    """(where, label key) of every term of a NodeAffinity; malformed terms yield a key that no list allows."""
    out = []
    if not isinstance(node, dict):
        return [("", "<not a mapping>")]
    terms: list[tuple[str, Any]] = []
    required = node.get("requiredDuringSchedulingIgnoredDuringExecution")
    if required:
        sel = required.get("nodeSelectorTerms") if isinstance(required, dict) else None
        for i, term in enumerate(sel if isinstance(sel, list) else [None]):
            terms.append((f"requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[{i}]", term))
    preferred = node.get("preferredDuringSchedulingIgnoredDuringExecution")
    for i, p in enumerate(preferred if isinstance(preferred, list) else ([None] if preferred else [])):
        terms.append((f"preferredDuringSchedulingIgnoredDuringExecution[{i}].preference",
                      p.get("preference") if isinstance(p, dict) else None))
    for where, term in terms:
        if not isinstance(term, dict):
            out.append((where, "<not a mapping>"))
            continue
        for field in ("matchExpressions", "matchFields"):
            for j, expr in enumerate(term.get(field) or []):
                key = expr.get("key") if isinstance(expr, dict) else None
                out.append((f"{where}.{field}[{j}].key", key if isinstance(key, str) else "<missing>"))
    return out


def _refused(field: str, value: Any, key: str, allowlist: tuple[str, ...], hint: str = "") -> str:
    allowed = ", ".join(allowlist) if allowlist else "nothing"
    return (f"{field}: {value!r} is refused by the operator's policy (policy.{key} allows {allowed})"
            + (f"; {hint}" if hint else "; ask a cluster admin to allow it"))


__all__ = ["Policy", "PolicyError", "RESERVED_ENV_PREFIXES", "RESERVED_ENV_NAMES"]
