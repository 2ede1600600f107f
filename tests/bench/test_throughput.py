"""The cost estimate's throughput table: built from the committed results in bench/results, and the copy the runner
ships (runner/api/throughput.json) is that same table."""
from __future__ import annotations

import json

from bench import throughput


def test_the_committed_tables_are_the_ones_the_results_give():
    built = throughput.text()
    assert throughput.OUT.read_text() == built, "bench/results/throughput.json is stale: python -m bench throughput"
    assert throughput.RUNTIME.read_text() == built, "runner/api/throughput.json differs: python -m bench throughput"


def test_every_measured_row_names_its_result_and_the_others_say_how_they_were_derived():
    doc = json.loads(throughput.text())
    measured = {r["gpu"] for r in doc["rows"] if "derived" not in r}
    assert {"h100", "h200"} <= measured
    for r in doc["rows"]:
        file = r["source"].split(":")[0]
        assert (throughput.RESULTS / file).is_file()
        if r["gpu"] not in measured:
            assert "equal utilisation assumed" in r["derived"]
    h100 = next(r for r in doc["rows"] if r["id"] == "h100-8b-packed")
    assert h100["tokensPerSecond"] == 12394.5  # bench/README.md's H100 row
