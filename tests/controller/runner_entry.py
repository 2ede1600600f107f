"""`python -m tests.controller.runner_entry run job.yaml`: the runner's CLI with the status sink attached.

Stands in for the wiring of runner/kube_status.sink_from_env() into runner/__main__.py's Reporter (the
lead's part); once that is wired, the sink is not added twice.
"""
from __future__ import annotations

import sys

import runner.report as report
from runner.kube_status import StatusSink, sink_from_env

_init = report.Reporter.__init__


def _with_sink(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if not any(isinstance(s, StatusSink) for s in self.sinks):
        sink = sink_from_env()
        if sink is not None:
            self.sinks.append(sink)


report.Reporter.__init__ = _with_sink

if __name__ == "__main__":
    from runner.__main__ import main

    sys.exit(main())
