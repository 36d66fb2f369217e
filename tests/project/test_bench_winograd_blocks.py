"""scripts/bench_winograd_blocks.py: a smoke run (no figure is checked, only that every block
size runs in the blocks it stands for, and the JSON it writes)."""
from __future__ import annotations

import json

from tests.helpers import reference


def test_a_smoke_run_times_each_block_size_and_the_whole_batch(tmp_path, capsys):
    sweep = reference("bench_winograd_blocks")
    from capsnet.layers.convolution import winograd  # noqa: PLC0415

    default = winograd.BLOCK_BYTES
    out = tmp_path / "blocks.json"
    assert sweep.main(["--batch-sizes", "3", "--block-kb", "16", "--rounds", "1", "--min-round-time", "0",
                       "--json", str(out)]) == 0
    assert winograd.BLOCK_BYTES == default  # restored after each call
    report = json.loads(out.read_text())
    assert len(report["rows"]) == 3 * 2  # three shapes, inference and training
    for row in report["rows"]:
        assert row["batch"] == 3 and set(row["ms"]) == {"16 KiB", f"{default >> 10} KiB (default)", "whole"}
        assert row["blocks"]["16 KiB"] == 3 and row["blocks"]["whole"] == 1  # one image a block, one block
        assert all(v > 0 for v in row["ms"].values())
    assert report["settings"]["default_block_bytes"] == default and "cpu_model" in report["machine"]
    assert "whole / default" in capsys.readouterr().out
