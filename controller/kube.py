"""A thin layer over the official `kubernetes` client: JSON in, dicts out, by API path.

The generated typed methods validate and (de)serialize every object through models, which costs more CPU
than the API call itself when 1,000 jobs arrive at once; the controller builds plain dicts anyway.
"""
from __future__ import annotations

import json
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

MERGE_PATCH = "application/merge-patch+json"


def load_configuration(kubeconfig: str | None = None, pool_size: int = 8) -> client.Configuration:
    """The current kubeconfig (or `kubeconfig`), else the in-cluster service account."""
    cfg = client.Configuration()
    try:
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    except config.ConfigException:
        if kubeconfig:
            raise
        config.load_incluster_config(client_configuration=cfg)
    cfg.connection_pool_maxsize = pool_size
    return cfg


class Kube:
    def __init__(self, api_client: client.ApiClient, timeout: float = 30.0):
        self.api = api_client
        self.timeout = timeout

    @classmethod
    def from_config(cls, cfg: client.Configuration) -> "Kube":
        return cls(client.ApiClient(cfg))

    def request(self, method: str, path: str, body: Any = None, *, content_type: str = "application/json",
                query: list[tuple[str, str]] | None = None) -> dict:
        params = self.api.param_serialize(
            method=method, resource_path=path, query_params=query or [],
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body, auth_settings=["BearerToken"],
        )
        resp = self.api.call_api(*params, _request_timeout=self.timeout)
        data = resp.read()
        if not 200 <= resp.status < 300:
            raise ApiException(status=resp.status, reason=resp.reason, body=data.decode("utf-8", "replace"))
        return json.loads(data) if data else {}

    def create(self, path: str, body: dict) -> dict:
        return self.request("POST", path, body)

    def merge_patch(self, path: str, body: dict) -> dict:
        return self.request("PATCH", path, body, content_type=MERGE_PATCH)

    def delete(self, path: str, propagation: str | None = "Background") -> bool:
        """Delete; False if it was already gone."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions"}
        if propagation:
            body["propagationPolicy"] = propagation
        try:
            self.request("DELETE", path, body)
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise

    def close(self) -> None:
        self.api.close()


def api_message(e: ApiException) -> str:
    try:
        return json.loads(e.body or "{}").get("message") or str(e.reason)
    except ValueError:
        return str(e.body or e.reason)


# Paths
def ns_path(group_version: str, namespace: str, plural: str, name: str | None = None, sub: str | None = None) -> str:
    base = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
    path = f"{base}/namespaces/{namespace}/{plural}"
    if name:
        path += f"/{name}"
    if sub:
        path += f"/{sub}"
    return path
