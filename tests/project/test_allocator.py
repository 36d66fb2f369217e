"""capsnet.allocator: import capsnet keeps freed arrays for the next step (glibc's mallopt), so a
warm step takes no page faults; CAPSNET_MALLOC=system and glibc's own variables turn it off."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from capsnet import allocator

glibc_only = pytest.mark.skipif(allocator._glibc() is None, reason="the allocator is tuned on glibc only")

FAULTS = r"""
import json, resource, sys
import numpy as np
import capsnet
from capsnet.allocator import state
from capsnet.models import MatrixCapsNet


def faults(step, n=20):
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / n


def eight_arrays():  # a step's pattern: several MB alive at once, then all freed
    arrays = [np.ones(1 << 18, np.float32) for _ in range(8)]
    del arrays


x = np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)
model = MatrixCapsNet(dtype="float32", seed=0)
print(json.dumps({"pattern": faults(eight_arrays), "predict": faults(lambda: model.predict(x)), "state": state()}))
"""


def _child(code: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in (allocator.ENV, *allocator.GLIBC_VARIABLES)}
    clean.update(env, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_freed_arrays_come_back_without_page_faults_once_capsnet_is_imported():
    """Eight 1 MiB arrays allocated and freed together, as a step does: with glibc's defaults
    the freed top of the heap goes back to the system and every round faults its pages in
    again (2,000 faults a round on the project's machine); with capsnet's setting, none. A
    warm batch-1 prediction of the EM network takes none either."""
    tuned = _child(FAULTS)
    system = _child(FAULTS, CAPSNET_MALLOC="system")
    assert tuned["state"]["applied"] is True
    assert system["state"]["applied"] is False and "CAPSNET_MALLOC=system" in system["state"]["reason"]
    assert system["pattern"] > 1000, system  # the premise: glibc's defaults hand the pages back
    assert tuned["pattern"] < 5, tuned
    assert tuned["predict"] < 5, tuned


STATE = "import json, capsnet.allocator as a; print(json.dumps(a.state()))"


@glibc_only
def test_glibc_variables_in_the_environment_win():
    got = _child(STATE, MALLOC_TRIM_THRESHOLD_="1000000")
    assert got["applied"] is False and "MALLOC_TRIM_THRESHOLD_" in got["reason"]


@glibc_only
def test_default_state_names_the_thresholds_and_glibc():
    got = _child(STATE)
    assert got["applied"] is True
    assert got["mmap_threshold"] == allocator.MMAP_THRESHOLD and got["trim_threshold"] == allocator.TRIM_THRESHOLD
    assert got["top_pad"] == allocator.TOP_PAD
    assert got["glibc"].split(".")[0].isdigit()


def test_a_wrong_setting_is_refused_at_import_naming_the_choices():
    env = {k: v for k, v in os.environ.items() if k != allocator.ENV}
    out = subprocess.run([sys.executable, "-c", "import capsnet"], env={**env, allocator.ENV: "jemalloc"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "CAPSNET_MALLOC must be 'tuned' (the default) or 'system', got 'jemalloc'" in out.stderr


@pytest.mark.parametrize("kwargs", [{"mmap_threshold": 0}, {"trim_threshold": 2**31}, {"mmap_threshold": 1.5},
                                    {"trim_threshold": True}, {"top_pad": -1}])
def test_thresholds_are_checked(kwargs):
    with pytest.raises(ValueError, match="keep_freed_memory .* must be an integer number of bytes"):
        allocator.keep_freed_memory(**kwargs)


def test_elsewhere_nothing_is_changed_and_state_says_why(monkeypatch):
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    before = allocator.state()
    try:
        assert allocator.keep_freed_memory() is False
        assert "not glibc" in allocator.state()["reason"]
    finally:
        allocator._state.clear()
        allocator._state.update(before)
