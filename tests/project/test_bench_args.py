"""scripts/bench.py's command line accepts the routing networks (nothing is timed here)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "scripts" / "bench.py"


def _bench():
    spec = importlib.util.spec_from_file_location("capsnet_bench_script", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parse_args_accepts_the_routing_networks():
    bench = _bench()
    for network in ("mnist", "multimnist", "efficient", "em"):
        assert bench.parse_args(["--network", network]).network == network
    with pytest.raises(SystemExit):  # --launches counts the CapsNet networks only
        bench.parse_args(["--network", "em", "--launches"])
