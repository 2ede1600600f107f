"""Every place a job names, parsed once when the job is loaded: the rest of the runner receives these typed
values and never parses a URI again.

    job.places.model          model.source, read as a model repo where a store tells the two apart
    job.places.data           dataset.source (a dataset repo on the Hub)
    job.places.eval_data      dataset.evalSource, or None
    job.places.destination    output.destination
    job.places.checkpoints    output.checkpoints, or beside the destination: `<destination>.checkpoints`
    job.places.cache          the shared model cache folder (FINETUNE_MODEL_CACHE), or None
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from runner.api import names
from runner.api.errors import SpecError
from runner.api.uris import Location

CHECKPOINTS_SUFFIX = ".checkpoints"  # the default checkpoint location: beside the destination


@dataclass(frozen=True)
class Places:
    model: Location
    data: Location
    eval_data: Location | None
    destination: Location
    checkpoints: Location
    cache: Path | None

    @classmethod
    def of(cls, spec, environ=os.environ) -> Places:
        """The places of a FineTuneJobSpec (runner/api/spec.py builds them for Job.places); a SpecError naming
        every field whose URI does not parse."""
        problems: list[str] = []

        def parse(field: str, value: str | None, kind: str | None = None) -> Location | None:
            if value is None:
                return None
            try:
                loc = Location.parse(value)
            except ValueError as e:
                problems.append(f"{field}: {e}")
                return None
            return loc.as_kind(kind) if kind else loc

        out = spec.output
        model = parse(FIELDS["model"], spec.model.source, "model")
        data = parse(FIELDS["data"], spec.dataset.source, "dataset")
        eval_data = parse(FIELDS["eval_data"], spec.dataset.eval_source, "dataset")
        destination = parse(FIELDS["destination"], out.destination, "model")
        checkpoints = parse(FIELDS["checkpoints"], out.checkpoints)
        if problems:
            raise SpecError(problems)
        if checkpoints is None:
            checkpoints = destination.sibling(CHECKPOINTS_SUFFIX)
        cache = (environ.get(names.ENV_MODEL_CACHE) or "").strip()
        return cls(model, data, eval_data, destination, checkpoints, Path(cache) if cache else None)

    def sources(self) -> list[tuple[str, Location]]:
        """What the job reads, each with the field that names it: the model, the data, the eval data if any."""
        return [(FIELDS[k], loc) for k, loc in (("model", self.model), ("data", self.data),
                                                ("eval_data", self.eval_data)) if loc is not None]


FIELDS = {  # the spec field that names each place (every message about a place names its field)
    "model": "model.source",
    "data": "dataset.source",
    "eval_data": "dataset.evalSource",
    "destination": "output.destination",
    "checkpoints": "output.checkpoints",
}
