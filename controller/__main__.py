"""`python -m controller` - the FineTuneJob operator.

Commands:
  run [--namespace NS ...]   watch FineTuneJobs (all namespaces, or the ones named) and run them (default)
  crd                        print the CustomResourceDefinition generated from runner/api/spec.py
  rbac                       print the controller's ClusterRole

For maintainers, on a checkout (left out of --help):
  generate [--check]         rewrite every generated file: the CRDs, install.yaml, the README's spec reference
                             (see controller/generate.py)
"""
from __future__ import annotations

import sys

from controller.cli import main

if __name__ == "__main__":
    sys.exit(main())
