"""The webhook's TLS and the attribution key, made and kept by the controller itself (no cert-manager needed).

The controller keeps one Secret of its own in its namespace (`<release>-webhook-state`, owned by the webhook
registration so that uninstalling the chart removes it):

  ca.crt / ca.key    a self-signed CA (10 years); ca.crt may also hold the previous CA while the registrations
                     move to a new one, so no API server ever holds a caBundle that does not trust the server
  tls.crt / tls.key  the serving certificate for the webhook Service's DNS names, signed by that CA (1 year)
  attribution.key    the HMAC key that signs which Secrets the webhook checked (controller/attribution.py)

`Keeper.ensure()` creates what is missing and rotates what expires within a third of its lifetime (or names other
hosts), writes the certificate files the webhook serves, and writes the CA into every registration's caBundle.
Every replica runs it at start and then periodically; several replicas agree through the Secret's resourceVersion
(the loser of a conflict reads the winner's). With cert-manager (`--webhook-cert`), only attribution.key is kept.
"""
from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from kubernetes.client.exceptions import ApiException

from controller.kube import Kube, ns_path

log = logging.getLogger("controller.certs")
CA_DAYS = 3650
SERVING_DAYS = 365
ROTATE_FRACTION = 1 / 3  # rotate when less than this part of the lifetime is left
KEY_ATTRIBUTION = "attribution.key"
JSON_PATCH = "application/json-patch+json"
REGISTRATION_KINDS = {"validating": "validatingwebhookconfigurations", "mutating": "mutatingwebhookconfigurations"}


@dataclass(frozen=True)
class Registration:
    """A webhook registration whose caBundle the controller keeps (kind: validating or mutating)."""
    kind: str
    name: str

    @property
    def path(self) -> str:
        return f"/apis/admissionregistration.k8s.io/v1/{REGISTRATION_KINDS[self.kind]}/{self.name}"


@dataclass(frozen=True)
class State:
    """What the Secret holds (PEM bytes; empty where not kept)."""
    attribution_key: bytes
    ca_crt: bytes = b""
    ca_key: bytes = b""
    tls_crt: bytes = b""
    tls_key: bytes = b""

    @classmethod
    def from_data(cls, data: dict | None) -> "State | None":
        d = {k: base64.b64decode(v) for k, v in (data or {}).items()}
        if not d.get(KEY_ATTRIBUTION):
            return None
        return cls(d[KEY_ATTRIBUTION], d.get("ca.crt", b""), d.get("ca.key", b""), d.get("tls.crt", b""),
                   d.get("tls.key", b""))

    def data(self) -> dict:
        raw = {KEY_ATTRIBUTION: self.attribution_key, "ca.crt": self.ca_crt, "ca.key": self.ca_key,
               "tls.crt": self.tls_crt, "tls.key": self.tls_key}
        return {k: base64.b64encode(v).decode() for k, v in raw.items() if v}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(subject: str, key, issuer_name, issuer_key, days: int, *, ca: bool, dns: tuple[str, ...] = (),
                 now: dt.datetime):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
         .not_valid_after(now + dt.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, encipher_only=False, decipher_only=False),
                            critical=True)
    else:
        b = (b.add_extension(x509.SubjectAlternativeName([_san(d) for d in dns]), critical=False)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    return b.sign(issuer_key or key, hashes.SHA256())


def _san(name: str):
    """An IP address SAN for an address (a webhook registered by URL), else a DNS name."""
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _load(pem: bytes):
    from cryptography import x509

    return x509.load_pem_x509_certificates(pem) if pem else []


def _expiring(cert, now: dt.datetime) -> bool:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return end - now < (end - start) * ROTATE_FRACTION


def _dns_of(cert) -> set[str]:
    from cryptography import x509

    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return set(sans.get_values_for_type(x509.DNSName)) | {str(a) for a in sans.get_values_for_type(x509.IPAddress)}
    except x509.ExtensionNotFound:
        return set()


def renewed(state: State | None, dns: tuple[str, ...], *, tls: bool = True, now: dt.datetime | None = None,
            ca_days: int = CA_DAYS, serving_days: int = SERVING_DAYS) -> State:
    """`state` with whatever is missing or expiring made anew (the same object when nothing is)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    now = now or _now()
    state = state or State(attribution_key=secrets.token_bytes(32))
    if not tls:
        return state
    cas = _load(state.ca_crt)
    ca_crt, ca_key = state.ca_crt, state.ca_key
    new_ca = not cas or not ca_key or _expiring(cas[0], now)
    if new_ca:
        key = _key()
        cert = _certificate("finetune-controller-webhook-ca", key, None, None, ca_days, ca=True, now=now)
        previous = [c for c in cas[:1] if c.not_valid_after_utc > now]  # still trusted until the move is done
        ca_crt = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [cert, *previous])
        ca_key = _pem_key(key)
        cas = [cert, *previous]
    served = _load(state.tls_crt)
    if not new_ca and served and state.tls_key and not _expiring(served[0], now) and _dns_of(served[0]) == set(dns):
        return state if (ca_crt, ca_key) == (state.ca_crt, state.ca_key) else State(
            state.attribution_key, ca_crt, ca_key, state.tls_crt, state.tls_key)
    key = _key()
    cert = _certificate(dns[-1][:64], key, cas[0].subject, load_pem_private_key(ca_key, None), serving_days, ca=False,
                        dns=dns, now=now)
    return State(state.attribution_key, ca_crt, ca_key, cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))


def service_dns(service: str, namespace: str, hosts: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The names the API server may call the webhook by: the Service's (the .svc one is what it uses), and the
    hosts of a registration by URL."""
    return (*hosts, service, f"{service}.{namespace}", f"{service}.{namespace}.svc")


@dataclass
class Keeper:
    """Keeps the controller's Secret, the webhook's certificate files and the registrations' caBundle."""
    kube: Kube
    namespace: str
    secret: str
    service: str
    registrations: list[Registration] = field(default_factory=list)
    hosts: tuple[str, ...] = ()  # names or addresses of a registration by URL, besides the Service's
    directory: Path | None = None  # where tls.crt / tls.key are written for the server; None: not served here
    manage_tls: bool = True  # False: cert-manager provides the certificate; only the attribution key is kept
    state: State | None = None

    @property
    def cert_file(self) -> Path:
        return self.directory / "tls.crt"

    @property
    def key_file(self) -> Path:
        return self.directory / "tls.key"

    def _secret_path(self, name: str | None = None) -> str:
        return ns_path("v1", self.namespace, "secrets", name)

    def ensure(self, now: dt.datetime | None = None) -> bool:
        """Create or rotate what is due; True when the certificate served changed (the server reloads it)."""
        dns = service_dns(self.service, self.namespace, self.hosts)
        for _ in range(5):
            try:
                current = self.kube.request("GET", self._secret_path(self.secret))
            except ApiException as e:
                if e.status != 404:
                    raise
                current = None
            state = State.from_data((current or {}).get("data"))
            new = renewed(state, dns, tls=self.manage_tls, now=now)
            owner = self._owner()
            # a registration deleted and made again (an upgrade from a chart without it): the Secret follows the
            # new one, before the garbage collector takes it with the old
            owned = current is None or owner is None or \
                [o.get("uid") for o in current["metadata"].get("ownerReferences") or []] == [owner["uid"]]
            try:
                if current is None:
                    self.kube.create(self._secret_path(), self._body(new, owner))
                elif new is not state or not owned:
                    body = self._body(new, owner)
                    body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                    self.kube.request("PUT", self._secret_path(self.secret), body)
            except ApiException as e:
                if e.status == 409:  # another replica wrote first: use what it wrote
                    continue
                raise
            if new is not state:
                log.info("Secret %s/%s: %s", self.namespace, self.secret,
                         "created" if current is None else "certificate rotated")
            changed = self._write_files(new)
            self.state = new
            if self.manage_tls:
                self._publish_ca(new.ca_crt)
            return changed
        raise RuntimeError(f"Secret {self.namespace}/{self.secret}: kept changing under the controller")

    def _body(self, state: State, owner: dict | None) -> dict:
        md: dict = {"name": self.secret, "namespace": self.namespace,
                    "labels": {"app.kubernetes.io/managed-by": "finetune-controller"}}
        if owner:
            md["ownerReferences"] = [owner]
        return {"apiVersion": "v1", "kind": "Secret", "metadata": md, "type": "Opaque", "data": state.data()}

    def _owner(self) -> dict | None:
        """The first registration: deleting it (helm uninstall) deletes the Secret."""
        for reg in self.registrations:
            try:
                obj = self.kube.request("GET", reg.path)
            except ApiException as e:
                if e.status in (403, 404):
                    continue
                raise
            return {"apiVersion": "admissionregistration.k8s.io/v1", "kind": obj.get("kind") or
                    ("ValidatingWebhookConfiguration" if reg.kind == "validating" else "MutatingWebhookConfiguration"),
                    "name": reg.name, "uid": obj["metadata"]["uid"]}
        return None

    def _write_files(self, state: State) -> bool:
        if self.directory is None or not self.manage_tls:
            return False
        if self.cert_file.exists() and self.cert_file.read_bytes() == state.tls_crt:
            return False
        self.directory.mkdir(parents=True, exist_ok=True)
        for path, data in ((self.key_file, state.tls_key), (self.cert_file, state.tls_crt)):
            part = path.with_suffix(".part")
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            part.replace(path)
        return True

    def _publish_ca(self, ca: bytes) -> None:
        bundle = base64.b64encode(ca).decode()
        for reg in self.registrations:
            try:
                obj = self.kube.request("GET", reg.path)
            except ApiException as e:
                if e.status == 404:
                    log.warning("webhook registration %s not found: its caBundle is not kept", reg.name)
                    continue
                raise
            ops = [{"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": bundle}
                   for i, w in enumerate(obj.get("webhooks") or []) if (w.get("clientConfig") or {}).get("caBundle")
                   != bundle]
            if ops:
                self.kube.request("PATCH", reg.path, ops, content_type=JSON_PATCH)
                log.info("webhook registration %s: caBundle updated", reg.name)


__all__ = ["Keeper", "Registration", "State", "renewed", "service_dns"]
