"""The cluster-only fields: values the Job API or the kubelet would turn into something else are refused at
validate (and by the CRD the apiserver checks), each naming its field."""
from __future__ import annotations

import re

import pytest

from controller import crd
from runner.api.errors import SpecError
from runner.api.parse import parse_job

MINIMAL = {"model": {"source": "hf://org/base"}, "dataset": {"source": "data.jsonl"},
           "output": {"destination": "./out"}}


def _problems(**fields) -> list[str]:
    with pytest.raises(SpecError) as e:
        parse_job({**MINIMAL, **fields})
    return e.value.problems


def _crd_spec() -> dict:
    return crd.spec_schema()["properties"]


@pytest.mark.parametrize("seconds", [2 ** 62, 30 * 86400 + 1])
def test_an_active_deadline_beyond_30_days_is_refused_naming_the_field(seconds):
    problems = _problems(activeDeadlineSeconds=seconds)
    assert len(problems) == 1 and "activeDeadlineSeconds" in problems[0] and "2592000" in problems[0], problems
    assert _crd_spec()["activeDeadlineSeconds"]["maximum"] == 30 * 86400  # the apiserver refuses it too
    parse_job({**MINIMAL, "activeDeadlineSeconds": 30 * 86400})  # the bound itself is fine


@pytest.mark.parametrize("name", ["memory", "cpu", "ephemeral-storage", "hugepages-2Mi", "gpu",
                                  "kubernetes.io/gpu", "nvidia gpu"])
def test_a_built_in_resource_is_not_a_gpu_resource_name(name):
    problems = _problems(resources={"gpuResourceName": name})
    assert len(problems) == 1 and "resources.gpuResourceName" in problems[0], problems


@pytest.mark.parametrize("name", ["nvidia.com/gpu", "amd.com/gpu", "gpu.intel.com/i915", "nvidia.com/mig-1g.10gb"])
def test_device_plugin_names_are_gpu_resource_names(name):
    parse_job({**MINIMAL, "resources": {"gpuResourceName": name}})
    pattern = _crd_spec()["resources"]["properties"]["gpuResourceName"]["pattern"]
    assert re.match(pattern, name) and not re.match(pattern, "memory")
