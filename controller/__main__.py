"""`python -m controller` - the FineTuneJob operator.

Commands:
  run [--namespace NS ...]   watch FineTuneJobs (all namespaces, or the ones named) and run them (default)
  crd                        print the CustomResourceDefinition generated from runner/spec.py
  rbac                       print the controller's ClusterRole
"""
from __future__ import annotations

import sys

from controller.cli import main

if __name__ == "__main__":
    sys.exit(main())
