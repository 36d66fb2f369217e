"""scripts/bench.py's command line and its combining of rounds (nothing is timed here)."""
from __future__ import annotations

import pytest

from tests.helpers import reference


def test_parse_args_accepts_the_routing_networks():
    bench = reference("bench")
    for network in ("mnist", "multimnist", "efficient", "em"):
        assert bench.parse_args(["--network", network]).network == network
    with pytest.raises(SystemExit):  # --launches counts the CapsNet networks only
        bench.parse_args(["--network", "em", "--launches"])


def _process(rate: float, peak: float) -> dict:
    return {"train": {"images_per_s": rate, "memory": {"peak_increase_mb": peak}},
            "infer": {"images_per_s": 2 * rate}}


def test_combine_rounds_takes_the_median_of_every_figure_not_the_first_process():
    bench = reference("bench")
    entry = bench.combine_rounds([_process(10, 239), _process(30, 267), _process(20, 263)])
    assert entry["train"]["images_per_s"] == 20
    assert entry["infer"]["images_per_s"] == 40
    assert entry["train"]["memory"]["peak_increase_mb"] == 263
    assert entry["train"]["memory"]["rounds_peak_increase_mb"] == [239, 267, 263]
