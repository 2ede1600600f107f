"""What the cluster admin adds to every runner pod (chart values `runner.podTemplate`, `runner.modelCache`,
`runner.defaultResources` and `runner.storeTimeouts` (FINETUNE_STORE_TIMEOUTS, the ceiling of a job's
spec.storeTimeouts), passed to the controller as `--runner-pod` JSON), and the volumes a FineTuneJob asks for (spec.volumes,
spec.modelCache, allowed by controller/policy.py). Typed, checked once at controller start.

How `runner.podTemplate` merges into the pod the controller builds (for a Job and for each pod of a JobSet):

    metadata.labels, metadata.annotations   merged; keys under finetune.dev/ and the controller's own labels refused
    spec.runtimeClassName, hostNetwork,     set (a FineTuneJob cannot set them)
      dnsPolicy, dnsConfig, schedulerName
    spec.priorityClassName                  a default: a job's own spec.priorityClassName (policy-allowed) wins
    spec.terminationGracePeriodSeconds      the runner's time to save a checkpoint after SIGTERM (30-3600; the
                                            controller's default is 120: raise it for large models)
    spec.nodeSelector                       merged; on the same key the patch wins
    spec.tolerations, hostAliases, volumes  appended after the job's
    spec.affinity                           node affinity: the job's required terms AND the patch's (each pair of
                                            terms combined), preferred terms appended; pod (anti-)affinity terms
                                            appended (all must hold)
    spec.containers: [{name: runner, ...}]  the runner container: env appended, replacing a job's entry of the same
                                            name; volumeMounts appended (of the patch's own volumes only)

Refused at controller start (the error names the field): the security context, ServiceAccount and token, image,
command, args, resources, restart policy, host PID/IPC, init containers - the controller's own -
and any other field; env the controller sets (FINETUNE_JOB_*, FINETUNE_ATTEMPT, FINETUNE_POD_NAME,
FINETUNE_WORK_DIR, FINETUNE_MODEL_CACHE, HOME, TMPDIR, PET_*); volume names `job`, `dshm`, `scratch`, `tmp` or
`finetune-*`; mounts at or around the runner's own paths.
"""
from __future__ import annotations

import copy
import json
import posixpath
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from controller import naming
from runner.api import names, store_limits

SOURCE = "runner.podTemplate"
CONTROLLER_VOLUMES = ("job", "dshm", "scratch", "tmp")
VOLUME_PREFIX = "finetune-"  # volumes the controller adds: spec.volumes, the model cache
CACHE_VOLUME = "finetune-model-cache"
RUNNER_PATHS = ("/etc/finetune", "/dev/shm", "/scratch", "/tmp", names.MODEL_CACHE_DIR)
SYSTEM_PATHS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/opt", "/proc", "/root",
                "/run", "/sbin", "/sys", "/usr", "/var/run")
CONTROLLER_ENV = (names.ENV_JOB_NAME, names.ENV_JOB_NAMESPACE, names.ENV_ATTEMPT, names.ENV_POD_NAME,
                  names.ENV_WORK_DIR, names.ENV_MODEL_CACHE, names.ENV_LAUNCHED, names.ENV_GCS_CREDENTIALS, "HOME",
                  "TMPDIR")
CONTROLLER_ENV_PREFIXES = ("PET_",)
CONTROLLER_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/managed-by", naming.LABEL_KUEUE_QUEUE)
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")  # a DNS subdomain (PVC names)

_WHY = {
    "securityContext": "the controller sets the runner's security context (non-root uid 1000, read-only root, no "
                       "capabilities, seccomp RuntimeDefault)",
    "serviceAccountName": "each job runs as its own ServiceAccount, allowed only to report its own status",
    "serviceAccount": "each job runs as its own ServiceAccount, allowed only to report its own status",
    "automountServiceAccountToken": "the runner reports its status with the token",
    "restartPolicy": "the controller retries attempts itself", "initContainers": "only the runner runs",
    "ephemeralContainers": "only the runner runs", "hostPID": "model code would see the node's processes",
    "hostIPC": "model code would share the node's IPC", "nodeName": "use nodeSelector or affinity", "imagePullSecrets": "use "
    "runner.imagePullSecrets", "image": "it is runner.image (or a job's spec.image within policy.imagePrefixes)",
    "command": "the controller runs the runner's command", "args": "the controller runs the runner's command",
    "resources": "a job's spec.resources", "workingDir": "the runner works in /scratch",
}


class RunnerPodError(ValueError):
    pass


def load_mapping(text: str, source: str, error: type[Exception]) -> Any:
    """An admin's JSON or YAML setting (a flag or a file); empty means {}. A syntax error raises `error`."""
    try:
        return yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as e:
        raise error(f"{source}: not JSON or YAML: {e}") from None


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class EnvVar(_Model):
    name: str = Field(min_length=1)
    value: str | None = None
    value_from: dict[str, Any] | None = None


class VolumeMount(_Model):
    name: str
    mount_path: str
    read_only: bool = False
    sub_path: str | None = None
    mount_propagation: Literal["None", "HostToContainer"] | None = None


class RunnerContainer(_Model):
    name: str = Field(description="runner (the only container)")
    env: tuple[EnvVar, ...] = ()
    volume_mounts: tuple[VolumeMount, ...] = ()


class PodSpecPatch(_Model):
    runtime_class_name: str | None = None
    host_network: bool | None = None
    dns_policy: Literal["ClusterFirst", "ClusterFirstWithHostNet", "Default", "None"] | None = None
    dns_config: dict[str, Any] | None = None
    scheduler_name: str | None = None
    priority_class_name: str | None = None
    # The runner's time to save a checkpoint after SIGTERM (suspend, preemption, delete); a 70B checkpoint can take
    # longer than the controller's default (children.TERMINATION_GRACE_SECONDS).
    termination_grace_period_seconds: int | None = Field(None, ge=30, le=3600)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: tuple[dict[str, Any], ...] = ()
    affinity: dict[str, Any] | None = None
    host_aliases: tuple[dict[str, Any], ...] = ()
    volumes: tuple[dict[str, Any], ...] = ()
    containers: tuple[RunnerContainer, ...] = ()


class Metadata(_Model):
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class PodTemplatePatch(_Model):
    metadata: Metadata = Field(default_factory=Metadata)
    spec: PodSpecPatch = Field(default_factory=PodSpecPatch)


class ModelCache(_Model):
    claim_name: str = ""


_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"  # a Kubernetes quantity (500m, 2, 4Gi)
DEFAULTED = ("cpu", "memory")  # the resources runner.defaultResources may give


class ResourceList(_Model):
    cpu: str | None = Field(None, pattern=_QUANTITY)
    memory: str | None = Field(None, pattern=_QUANTITY)


class DefaultResources(_Model):
    """The chart's `runner.defaultResources`: cpu and memory requests and limits for runner pods whose job sets
    none. Per resource: a job's own resources.cpu (resources.memory) replaces every cpu (memory) entry here."""

    requests: ResourceList = Field(default_factory=ResourceList)
    limits: ResourceList = Field(default_factory=ResourceList)

    def apply(self, container: dict) -> str:
        """Fill in the resources `container` does not set; what was given, for the pod's annotation ("" if none)."""
        res = container.setdefault("resources", {})
        given = []
        for resource in DEFAULTED:
            if any(resource in (res.get(kind) or {}) for kind in ("requests", "limits")):
                continue  # the job set it
            for kind in ("requests", "limits"):
                value = getattr(getattr(self, kind), resource)
                if value:
                    res.setdefault(kind, {})[resource] = value
                    given.append(f"{kind}.{resource}={value}")
        return " ".join(given)


class RunnerPod(_Model):
    """The chart's `runner.podTemplate`, `runner.modelCache`, `runner.defaultResources` and
    `runner.storeTimeouts`."""

    pod_template: PodTemplatePatch = Field(default_factory=PodTemplatePatch)
    model_cache: ModelCache = Field(default_factory=ModelCache)
    default_resources: DefaultResources = Field(default_factory=DefaultResources)
    store_timeouts: str = Field(
        "", description="The limits on every runner's calls to remote stores, the ceiling of a job's "
        f"spec.storeTimeouts (FINETUNE_STORE_TIMEOUTS in each runner pod): {store_limits.EXAMPLE!r}, any subset; "
        "unset: those defaults.")

    # ------------------------------------------------------------------------------------ loading
    @classmethod
    def parse(cls, doc: Any, *, source: str = "--runner-pod") -> "RunnerPod":
        if doc is None:
            doc = {}
        if not isinstance(doc, dict):
            raise RunnerPodError(f"{source}: must be a mapping of podTemplate and modelCache (chart values runner.*)")
        try:
            rp = cls.model_validate(_unset_empty(doc))
        except ValidationError as e:
            raise RunnerPodError(f"{source}: " + "; ".join(_explain(err) for err in e.errors())) from None
        problems = rp.problems()
        if problems:
            raise RunnerPodError(f"{source}: " + "; ".join(problems))
        return rp

    @classmethod
    def from_text(cls, text: str, **kw) -> "RunnerPod":
        return cls.parse(load_mapping(text, kw.get("source", "--runner-pod"), RunnerPodError), **kw)

    @classmethod
    def from_file(cls, path: str) -> "RunnerPod":
        return cls.from_text(Path(path).read_text(encoding="utf-8"), source=path)

    def describe(self) -> str:
        return json.dumps(self.model_dump(by_alias=True, exclude_defaults=True), sort_keys=True)

    def mount_paths(self) -> tuple[str, ...]:
        """Where the patch mounts its volumes (a job's spec.volumes may not mount there)."""
        return tuple(m.mount_path for c in self.pod_template.spec.containers for m in c.volume_mounts)

    def problems(self) -> list[str]:
        out: list[str] = []
        md, spec = self.pod_template.metadata, self.pod_template.spec
        for kind, mapping in (("labels", md.labels), ("annotations", md.annotations)):
            for key in mapping:
                if key.startswith(f"{names.GROUP}/") or key in CONTROLLER_LABELS:
                    out.append(f"{SOURCE}.metadata.{kind}[{key!r}]: refused: the controller sets it (it finds its "
                               f"pods and their job file by it); use another key, outside {names.GROUP}/")
        vols: set[str] = set()
        for i, v in enumerate(spec.volumes):
            name = v.get("name")
            where = f"{SOURCE}.spec.volumes[{i}]"
            if not isinstance(name, str) or not name:
                out.append(f"{where}: needs a name (a Kubernetes Volume)")
            elif name in CONTROLLER_VOLUMES or name.startswith(VOLUME_PREFIX):
                out.append(f"{where}.name: {name!r} is the controller's (it uses {', '.join(CONTROLLER_VOLUMES)} and "
                           f"{VOLUME_PREFIX}*); pick another name")
            elif name in vols:
                out.append(f"{where}.name: {name!r} appears twice")
            else:
                vols.add(name)
        if len(spec.containers) > 1 or any(c.name != naming.RUNNER_CONTAINER for c in spec.containers):
            out.append(f"{SOURCE}.spec.containers: only one entry, named {naming.RUNNER_CONTAINER!r} (the runner "
                       "container, which the patch's env and volumeMounts go into)")
        for c in spec.containers:
            out += _container_problems(c, vols)
        claim = self.model_cache.claim_name
        if claim and claim_name_problem(claim):
            out.append(f"runner.modelCache.claimName: {claim_name_problem(claim)}")
        try:
            store_limits.StoreLimits.parse(self.store_timeouts, "runner.storeTimeouts")
        except ValueError as e:
            out.append(str(e))
        return out

    def store_limits(self) -> store_limits.StoreLimits:
        return store_limits.StoreLimits.parse(self.store_timeouts, "runner.storeTimeouts")

    # ----------------------------------------------------------------------------------- applying
    def apply(self, template: dict, spec: dict) -> dict:
        """The runner pod `template` (children.pod_template) with the job's volumes, the model cache and this
        patch merged in (a new dict)."""
        tpl = copy.deepcopy(template)
        pod, md = tpl["spec"], tpl["metadata"]
        c = next(x for x in pod["containers"] if x["name"] == naming.RUNNER_CONTAINER)
        for i, v in enumerate(spec.get("volumes") or []):
            name = f"{VOLUME_PREFIX}volume-{i}"
            claim: dict = {"claimName": v["claimName"]}
            mount: dict = {"name": name, "mountPath": v["mountPath"]}
            if v.get("readOnly"):
                claim["readOnly"] = mount["readOnly"] = True
            if v.get("subPath"):
                mount["subPath"] = v["subPath"]
            pod["volumes"].append({"name": name, "persistentVolumeClaim": claim})
            c["volumeMounts"].append(mount)
        cache = (spec.get("modelCache") or {}).get("claimName") or self.model_cache.claim_name
        if cache:
            pod["volumes"].append({"name": CACHE_VOLUME, "persistentVolumeClaim": {"claimName": cache}})
            mount = {"name": CACHE_VOLUME, "mountPath": names.MODEL_CACHE_DIR}
            if (spec.get("model") or {}).get("trustRemoteCode"):  # the model's own code runs here: it reads the
                mount["readOnly"] = True                           # cache other jobs fill, and writes nothing there
            c["volumeMounts"].append(mount)
            c["env"].append({"name": names.ENV_MODEL_CACHE, "value": names.MODEL_CACHE_DIR})
        # the cluster's store limits, always written: a job's spec.storeTimeouts may only tighten them
        c["env"].append({"name": names.ENV_STORE_TIMEOUTS, "value": self.store_limits().describe()})

        patch = self.pod_template
        md["labels"] = {**patch.metadata.labels, **md.get("labels", {})}
        md["annotations"] = {**patch.metadata.annotations, **md.get("annotations", {})}
        given = self.default_resources.apply(c)
        if given:
            md["annotations"][naming.ANNOTATION_DEFAULT_RESOURCES] = (
                f"{given} (runner.defaultResources, where the FineTuneJob's resources set none)")
        p = patch.spec
        for key in ("runtimeClassName", "hostNetwork", "dnsPolicy", "dnsConfig", "schedulerName",
                    "terminationGracePeriodSeconds"):
            value = getattr(p, _snake(key))
            if value not in (None, "", {}):
                pod[key] = copy.deepcopy(value)
        if p.priority_class_name and not pod.get("priorityClassName"):
            pod["priorityClassName"] = p.priority_class_name
        if p.node_selector:
            pod["nodeSelector"] = {**pod.get("nodeSelector", {}), **p.node_selector}
        for key, items in (("tolerations", p.tolerations), ("hostAliases", p.host_aliases), ("volumes", p.volumes)):
            if items:
                have = list(pod.get(key) or [])
                pod[key] = have + [copy.deepcopy(x) for x in items if x not in have]
        if p.affinity:
            pod["affinity"] = merge_affinity(pod.get("affinity") or {}, p.affinity)
        for pc in p.containers:
            env = [e.model_dump(by_alias=True, exclude_none=True) for e in pc.env]
            patched = {e["name"] for e in env}
            c["env"] = [e for e in c["env"] if e["name"] not in patched] + env
            c["volumeMounts"] += [m.model_dump(by_alias=True, exclude_none=True) for m in pc.volume_mounts]
        return tpl


def merge_affinity(job: dict, patch: dict) -> dict:
    """Both affinities must hold: required node selector terms (ORed within each side) are combined pairwise,
    everything else appended."""
    out = copy.deepcopy(job)
    for kind, value in patch.items():
        if kind != "nodeAffinity":
            mine = out.setdefault(kind, {})
            for rule, terms in value.items():
                mine[rule] = list(mine.get(rule) or []) + copy.deepcopy(list(terms or []))
            continue
        node = out.setdefault("nodeAffinity", {})
        req = "requiredDuringSchedulingIgnoredDuringExecution"
        pref = "preferredDuringSchedulingIgnoredDuringExecution"
        if value.get(pref):
            node[pref] = list(node.get(pref) or []) + copy.deepcopy(value[pref])
        theirs = (value.get(req) or {}).get("nodeSelectorTerms") or []
        if theirs:
            ours = (node.get(req) or {}).get("nodeSelectorTerms") or []
            combined = [_and(a, b) for a in ours for b in theirs] if ours else copy.deepcopy(theirs)
            node[req] = {"nodeSelectorTerms": combined}
    return out


def _and(a: dict, b: dict) -> dict:
    out = {}
    for field in ("matchExpressions", "matchFields"):
        items = list(a.get(field) or []) + list(b.get(field) or [])
        if items:
            out[field] = copy.deepcopy(items)
    return out


def _container_problems(c: RunnerContainer, vols: set[str]) -> list[str]:
    out = []
    where = f"{SOURCE}.spec.containers[{naming.RUNNER_CONTAINER}]"
    seen: set[str] = set()
    for i, e in enumerate(c.env):
        if e.name in CONTROLLER_ENV or e.name.startswith(CONTROLLER_ENV_PREFIXES):
            out.append(f"{where}.env[{i}]: {e.name} is set by the controller for every runner pod; leave it out")
        if e.name in seen:
            out.append(f"{where}.env[{i}]: {e.name} appears twice")
        seen.add(e.name)
        if (e.value is None) == (e.value_from is None):
            out.append(f"{where}.env[{i}] ({e.name}): give exactly one of value and valueFrom")
    paths: set[str] = set()
    for i, m in enumerate(c.volume_mounts):
        if m.name not in vols:
            out.append(f"{where}.volumeMounts[{i}].name: {m.name!r} is not one of {SOURCE}.spec.volumes "
                       f"({', '.join(sorted(vols)) or 'none'}); mount only the patch's own volumes")
        problem = mount_path_problem(m.mount_path, RUNNER_PATHS)
        if problem:
            out.append(f"{where}.volumeMounts[{i}].mountPath: {problem}")
        elif m.mount_path in paths:
            out.append(f"{where}.volumeMounts[{i}].mountPath: {m.mount_path} is mounted twice")
        paths.add(m.mount_path)
    return out


def mount_path_problem(path: Any, reserved: tuple[str, ...]) -> str | None:
    """Why a volume may not be mounted at `path` (None: it may): not absolute and normal, or at, under or above
    one of `reserved` (what the runner needs as it is)."""
    if not isinstance(path, str) or not path.startswith("/") or posixpath.normpath(path) != path or path == "/":
        return (f"{path!r} must be an absolute, normalized path other than / (no '..', '//' or trailing '/'), "
                "e.g. /mnt/checkpoints")
    for r in reserved:
        if path == r or path.startswith(r + "/") or r.startswith(path + "/"):
            return (f"{path} would hide or replace {r}, which the runner needs as it is; mount under another "
                    "directory, e.g. /mnt/...")
    return None


def claim_name_problem(name: Any) -> str | None:
    if not isinstance(name, str) or not _NAME.match(name):
        return f"{name!r} is not a PersistentVolumeClaim name (lowercase letters, digits, '-' and '.')"
    return None


def _unset_empty(doc: dict) -> dict:
    """The chart lists every key with an empty default ("", false, {}): those mean "not set"."""
    doc = copy.deepcopy(doc)
    for lst in ((doc.get("defaultResources") or {}).values()):
        if isinstance(lst, dict):
            for key in [k for k, v in lst.items() if v in ("", None)]:
                del lst[key]
    spec = (doc.get("podTemplate") or {}).get("spec")
    if isinstance(spec, dict):
        for key in [k for k, v in spec.items() if v in ("", None, False, {})]:
            del spec[key]
    return doc


def _snake(key: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), key)


def _explain(err: dict) -> str:
    where = "runner" + "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"])
    last = str(err["loc"][-1]) if err["loc"] else ""
    if err["type"] == "extra_forbidden":
        if last in _WHY:
            return f"{where}: refused: {_WHY[last]}; remove it"
        return f"{where}: not something {SOURCE} may set; see the chart's values.yaml for what it may"
    return f"{where}: {err['msg']}"
