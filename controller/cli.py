"""Command line of `python -m controller` (see controller/__main__.py)."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from controller import generate
from controller.attribution import Unattributed
from runner.api import names

DEFAULT_IMAGE = os.environ.get(names.ENV_RUNNER_IMAGE, "finetune-runner:latest")
COMMANDS = ("run", "crd", "rbac")  # what --help lists
HIDDEN = ("generate",)  # a maintainer's command on a checkout (controller/generate.py): runs, but --help leaves it out


def _own_namespace() -> str | None:
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip() or None
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, *HIDDEN, "-h", "--help", "--version"):
        argv.insert(0, "run")
    import runner

    p = argparse.ArgumentParser(prog="python -m controller", description="The FineTuneJob operator.")
    runner.add_version_flag(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    c = sub.add_parser("crd", help="print the CustomResourceDefinition (generated from runner/api/spec.py)")
    c.add_argument("--without-cel", action="store_true",
                   help="leave out the CEL immutability rules (for Kubernetes < 1.25, where kubectl's "
                   "client-side validation refuses them)")
    sub.add_parser("rbac", help="print the controller's ClusterRole")
    generate.add_parser(sub)
    r = sub.add_parser("run", help="run the controller against the current kubeconfig (or in-cluster)")
    r.add_argument("-n", "--namespace", action="append", default=[],
                   help="watch this namespace (repeatable); default: all namespaces")
    r.add_argument("--all-namespaces", action="store_true", help="watch all namespaces (the default)")
    r.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, "
                   "or the in-cluster service account)")
    r.add_argument("--image", default=DEFAULT_IMAGE, help="runner image for jobs that do not set spec.image "
                   f"(default: ${names.ENV_RUNNER_IMAGE} or %(default)s)")
    r.add_argument("--workers", type=int, default=8, help="parallel reconcile passes (default %(default)s)")
    r.add_argument("--http-port", type=int, default=8080,
                   help="port of /metrics, /healthz and /readyz; 0 disables (default %(default)s)")
    r.add_argument("--http-host", default="0.0.0.0",
                   help="address /metrics, /healthz and /readyz listen on (default %(default)s)")
    r.add_argument("--retry-backoff", type=float, default=10.0,
                   help="seconds before the first retry of a failed attempt; doubles per failure (default %(default)s)")
    r.add_argument("--image-pull-timeout", type=float, default=300.0,
                   help="seconds a pod may fail to pull its image (or to find its Secrets) before the job "
                   "fails (default %(default)s)")
    r.add_argument("--policy", default=None, metavar="JSON",
                   help="the admin policy (JSON or YAML mapping; the chart passes its `policy` values): which "
                   "images, ServiceAccounts, env sources, tolerations, node labels and priority classes a "
                   "FineTuneJob may use; default: the secure defaults of controller/policy.py")
    r.add_argument("--policy-file", default=None, metavar="PATH", help="read the admin policy from a file instead")
    r.add_argument("--runner-pod", default=None, metavar="JSON",
                   help="what the admin adds to every runner pod (JSON or YAML mapping; the chart passes its "
                   "`runner.podTemplate` and `runner.modelCache` values as {podTemplate, modelCache}): see "
                   "controller/podtemplate.py; default: nothing")
    r.add_argument("--runner-pod-file", default=None, metavar="PATH", help="read --runner-pod from a file instead")
    r.add_argument("--webhook-cert", default=None, metavar="PEM",
                   help="serve the admission webhook over TLS with this certificate (and --webhook-key), kept by "
                   "another tool (cert-manager)")
    r.add_argument("--webhook-key", default=None, metavar="PEM", help="the webhook certificate's private key")
    r.add_argument("--webhook-port", type=int, default=8443, help="port of the webhook (default %(default)s)")
    r.add_argument("--webhook-host", default="0.0.0.0", help="address the webhook listens on (default %(default)s)")
    r.add_argument("--webhook-service", default=None, metavar="NAME",
                   help="serve the admission webhook with a certificate the controller makes for this Service of "
                   "its namespace and rotates before expiry (kept in --state-secret)")
    r.add_argument("--webhook-host-name", action="append", default=[], metavar="HOST",
                   help="a host name or address of the webhook's registration by URL, put into the certificate the "
                   "controller makes besides the Service's names (repeatable)")
    r.add_argument("--webhook-registration", action="append", default=[], metavar="KIND/NAME",
                   help="a webhook registration (validating/NAME or mutating/NAME) whose caBundle the controller "
                   "keeps and that owns --state-secret (repeatable)")
    r.add_argument("--state-secret", default=None, metavar="NAME",
                   help="the Secret of its namespace the controller keeps: the key that signs which Secrets the "
                   "webhook checked, and its own webhook certificate")
    r.add_argument("--unattributed-secrets", choices=[u.value for u in Unattributed], default=None,
                   help="a job naming a Secret that the webhook did not check for its creator (created while the "
                   "webhook was off or bypassed): refuse it (the default with --state-secret) or allow it (the "
                   "default without: nothing could check it)")
    r.add_argument("--controller-namespace", default=None, metavar="NS",
                   help="namespace of the controller's Lease and Secret (default: $POD_NAMESPACE, else the "
                   "ServiceAccount's)")
    r.add_argument("--leader-elect", action="store_true",
                   help="run several replicas: only the holder of a Lease (coordination.k8s.io/v1) reconciles")
    r.add_argument("--lease-name", default="finetune-controller", help="the leader Lease (default %(default)s)")
    r.add_argument("--lease-duration", type=float, default=15.0, help="seconds (default %(default)s)")
    r.add_argument("--renew-deadline", type=float, default=10.0, help="seconds (default %(default)s)")
    r.add_argument("--retry-period", type=float, default=2.0, help="seconds (default %(default)s)")
    r.add_argument("--no-jobsets", action="store_true",
                   help="neither watch nor create JobSets (jobset.x-k8s.io): FineTuneJobs with resources.nodes > 1 "
                   "are refused (InvalidSpec); for clusters without JobSet, or without the RBAC on jobsets")
    r.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)

    if args.command == "crd":
        from controller.crd import render

        sys.stdout.write(render(cel=not args.without_cel))
        return 0
    if args.command == "rbac":
        from controller.rbac import render

        sys.stdout.write(render())
        return 0
    if args.command == "generate":
        return generate.main(args)

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("kopf").setLevel(logging.WARNING)
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig  # for kopf's login too
    from controller.operator import Config, Election, KeptState, Webhook, run
    from controller.status import Options

    if args.all_namespaces and args.namespace:
        p.error("--all-namespaces and --namespace exclude each other")
    from controller.certs import Registration
    from controller.leader import Timing
    from controller.podtemplate import RunnerPod, RunnerPodError
    from controller.policy import Policy, PolicyError

    try:
        runner = (RunnerPod.from_file(args.runner_pod_file) if args.runner_pod_file else
                  RunnerPod.from_text(args.runner_pod or ""))
        kw = {"operator_image": args.image, "admin_mounts": runner.mount_paths()}
        policy = (Policy.from_file(args.policy_file, **kw) if args.policy_file else
                  Policy.from_text(args.policy or "", **kw))
    except (PolicyError, RunnerPodError, OSError) as e:
        p.error(str(e))
    logging.getLogger("controller").info("admin policy: %s", policy.describe())
    logging.getLogger("controller").info("runner pod additions: %s", runner.describe())
    if bool(args.webhook_cert) != bool(args.webhook_key):
        p.error("--webhook-cert and --webhook-key go together")
    if args.webhook_service and args.webhook_cert:
        p.error("--webhook-service (the controller's own certificate) and --webhook-cert exclude each other")
    if args.webhook_service and not args.state_secret:
        p.error("--webhook-service needs --state-secret (where the controller keeps the certificate)")
    hook = (Webhook(cert=args.webhook_cert, key=args.webhook_key, port=args.webhook_port, host=args.webhook_host)
            if args.webhook_cert or args.webhook_service else None)
    try:
        registrations = [Registration(*r.split("/", 1)) for r in args.webhook_registration]
        if any(r.kind not in ("validating", "mutating") or not r.name for r in registrations):
            raise ValueError
    except (TypeError, ValueError):
        p.error("--webhook-registration: KIND/NAME, KIND validating or mutating")
    own_ns = args.controller_namespace or _own_namespace()
    if (args.state_secret or args.leader_elect) and not own_ns:
        p.error("--controller-namespace: not in a pod and $POD_NAMESPACE unset; name the namespace of the "
                "controller's Lease and Secret")
    state = (KeptState(own_ns, args.state_secret, args.webhook_service or "", registrations,
                       hosts=tuple(args.webhook_host_name)) if args.state_secret else None)
    try:
        election = (Election(own_ns, args.lease_name, Timing(args.lease_duration, args.renew_deadline,
                                                             args.retry_period)) if args.leader_elect else None)
    except ValueError as e:
        p.error(str(e))
    unattributed = Unattributed(args.unattributed_secrets or ("refuse" if state else "allow"))
    logging.getLogger("controller").info("Secrets not checked at admission: %s", unattributed.value)
    run(Config(image=args.image, workers=args.workers, http_port=args.http_port, http_host=args.http_host,
               kubeconfig=args.kubeconfig,
               options=Options(retry_backoff=args.retry_backoff, image_pull_timeout=args.image_pull_timeout,
                               policy=policy, runner=runner), webhook=hook, state=state, election=election,
               unattributed=unattributed, jobsets=not args.no_jobsets),
        namespaces=args.namespace)
    return 0
