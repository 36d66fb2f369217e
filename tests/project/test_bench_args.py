"""scripts/bench.py's command line accepts the routing networks (nothing is timed here)."""
from __future__ import annotations

import pytest

from tests.helpers import reference


def test_parse_args_accepts_the_routing_networks():
    bench = reference("bench")
    for network in ("mnist", "multimnist", "efficient", "em"):
        assert bench.parse_args(["--network", network]).network == network
    with pytest.raises(SystemExit):  # --launches counts the CapsNet networks only
        bench.parse_args(["--network", "em", "--launches"])
