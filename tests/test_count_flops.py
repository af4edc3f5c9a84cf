"""The FLOPs command on a full-size model (meta device, seconds on a CPU)."""

import json

from taylorseer_eval import count_flops


def test_dit_xl2_counts_and_compressions(capsys):
    rows = count_flops.main(["dit-xl-2-256", "--json"])
    assert json.loads(capsys.readouterr().out) == rows
    (row,) = rows
    assert row["cache"] == "N3-O3-W2" and row["full_steps"] == 18
    assert abs(row["full_step_flops"] / 2 / 2 / 118.6e9 - 1) < 0.02  # CFG batch of 2, multiply-adds
    assert round(row["compression"], 2) == 2.77  # paper: 2.77x (forecast steps still run embedders/adaLN)
    row5 = count_flops.count("dit-xl-2-256", interval=5)
    assert row5["full_steps"] == 11 and round(row5["compression"], 2) == 4.53  # paper: 4.53x
