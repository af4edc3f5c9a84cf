"""The context-parallel cost table (taylorseer.attach.parallel_cost): figures from the models' shapes."""

import pytest

from taylorseer.attach import parallel_cost as cost


def test_bytes_moved_follow_the_ulysses_all_to_alls():
    flux = cost.cases()[0]
    assert (flux.image_tokens, flux.text_tokens) == (4096, 512)
    rows = {k: cost.row(flux, k, factors=8 * 2**30, bandwidth_gbs=450.0, throughput=1e15) for k in (1, 2, 4, 8)}
    assert rows[1]["sent_bytes_per_step"] == 0 and rows[1]["speedup"] == pytest.approx(1.0)
    local = 4608 // 2  # tokens per rank at K = 2
    all_to_all = 4 * (19 + 38) * 0.5 * local * 3072 * 2  # q, k, v, out per layer, half of it leaves the rank
    gather = 0.5 * 4096 * 64 * 2
    assert rows[2]["sent_bytes_per_step"] == int(all_to_all + gather)
    assert [rows[k]["factor_bytes_per_rank"] for k in (1, 2, 4, 8)] == [8 * 2**30 // k for k in (1, 2, 4, 8)]
    assert all(rows[k]["speedup"] < k for k in (2, 4, 8))  # transfers only take away
    hv = cost.cases()[2]
    assert hv.image_tokens == 33 * 45 * 80  # 129 frames -> 33 latent frames, 720x1280 -> 45x80 patches


@pytest.mark.slow
def test_the_table_runs(capsys):
    cost.main(["--degrees", "1", "2"])
    out = capsys.readouterr().out
    assert "| FLUX.1-dev 1024x1024 | 2 | 1.78 |" in out and out.count("\n") == 8
