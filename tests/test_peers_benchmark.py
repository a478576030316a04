"""benchmarks/peers.py's pure helpers: exact Torch-Pruning ratios, kept channels, the tables."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def peers(load_benchmark):
    """The benchmark script as a module (it is a script, not part of the package)."""
    return load_benchmark("peers")


def test_pruning_ratio_gives_exact_widths_under_torch_pruning_rounding(peers):
    """Torch-Pruning removes before − int(before·(1 − ratio)) channels: every target is hit."""
    for before in range(1, 65):
        for after in range(1, before + 1):
            r = peers.pruning_ratio(before, after)
            assert 0 <= r < 1
            assert before - (before - int(before * (1 - r))) == after


def test_pruning_ratio_refuses_growth_and_zero(peers):
    with pytest.raises(ValueError, match="cannot prune 5 channels to 6"):
        peers.pruning_ratio(5, 6)
    with pytest.raises(ValueError, match="cannot prune 5 channels to 0"):
        peers.pruning_ratio(5, 0)


def test_kept_channels_recovers_the_choice_from_weights(peers):
    """Layer 1 keeps channels 0 and 2 of 3, layer 2 keeps channel 1 of 2 (inputs cut to 0, 2)."""
    w1 = torch.arange(3 * 1 * 3 * 3, dtype=torch.float32).view(3, 1, 3, 3)
    w2 = torch.arange(2 * 3 * 3 * 3, dtype=torch.float32).view(2, 3, 3, 3) + 100
    w3 = torch.ones(1, 2, 3, 3)
    after = [w1[[0, 2]], w2[[1]][:, [0, 2]], w3[:, [1]]]
    assert peers.kept_channels([w1, w2, w3], after) == [[True, False, True], [False, True], [True]]


def test_kept_channels_unmatched_filter_is_an_error(peers):
    w = torch.zeros(2, 1, 3, 3)
    with pytest.raises(ValueError, match="matches no original filter"):
        peers.kept_channels([w], [torch.ones(1, 1, 3, 3)])


def _rows(f1s: dict[str, float], seed: int = 0) -> list[dict]:
    return [{"task": "sobel", "seed": seed, "strategy": "l1", "threshold": 0.9, "method": m,
             "widths": [4, 3, 1], "steps": 7000, "f1": f1} for m, f1 in f1s.items()]


def test_table_and_summary_layout(peers):
    scores = {"selfscale": 0.71, "tp-taylor": 0.70, "tp-l1": 0.69, "tp-random": 0.60,
              "cut-at-once": 0.68, "cut-at-once-lineage": 0.66, "scratch": 0.72}
    rows = _rows(scores, 0) + _rows({**scores, "selfscale": 0.65}, 1)
    for r in rows:
        if r["method"] == "cut-at-once-lineage":
            r["steps"] = 4500
    text = peers.table(rows)
    assert text.splitlines()[0].startswith("| task | seed | threshold | selfscale widths |")
    assert text.splitlines()[0].count("|") == text.splitlines()[1].count("|") == 14
    assert ("| sobel | 0 | 0.90 | 4/3/1 | 0.710 | 0.700 | 0.690 | 0.600 | 0.680 | 0.660 | 0.720 "
            "| 7000 | 4500 |") in text
    (line,) = peers.summary_lines(rows)
    assert "selfscale 0.680" in line and "best Torch-Pruning (tp-taylor 0.700): no" in line
    assert "per seed 1/2" in line


def test_lineage_steps_count_kept_retrains_and_a_kept_finetune(peers, tmp_path):
    """Kept retrains (a free removal trains 0) plus the fine-tune; stepped-back trials are not
    counted, nor is a fine-tune that was undone."""
    import json

    log = [{"kept": True, "steps_trained": 0}, {"kept": True, "steps_trained": 3500},
           {"kept": False, "steps_trained": 3500}, {"kept": True, "steps_trained": 3500},
           {"kept": False, "steps_trained": 875}]
    (tmp_path / "decisions.jsonl").write_text("".join(json.dumps(d) + "\n" for d in log))
    for kept, want in ((True, 14000), (None, 14000), (False, 7000)):
        (tmp_path / "summary.json").write_text(json.dumps({"finetune_steps": 7000,
                                                           "finetune_kept": kept}))
        assert peers.lineage_steps(tmp_path) == want


def test_summary_means_cover_the_same_seeds(peers):
    """A seed whose Torch-Pruning results are missing (skipped: a layer went) enters no mean, so
    selfscale is never averaged over other seeds than the variants it is compared with."""
    scores = {"selfscale": 0.80, "tp-taylor": 0.70, "tp-l1": 0.75, "tp-random": 0.60,
              "cut-at-once": 0.68, "scratch": 0.72}
    rows = _rows(scores, 0) + _rows({**scores, "selfscale": 0.50}, 1)
    rows = [{**r, "skipped": "a hidden layer was removed"}
            if r["seed"] == 1 and r["method"].startswith("tp-") else r for r in rows]
    (line,) = peers.summary_lines(rows)
    assert "over 1 of 2 seed(s): selfscale 0.800," in line
    assert "best Torch-Pruning (tp-l1 0.750): yes; per seed 1/1" in line
    no_tp = [r for r in rows if r["seed"] == 1]
    expected = ("- sobel @ 0.90, mean F1 over 1 seed(s): selfscale 0.500. No Torch-Pruning "
                "result to compare")
    assert peers.summary_lines(no_tp) == [expected]


def test_skipped_peer_shows_a_dash_and_same_choice_is_marked(peers):
    rows = _rows({"selfscale": 0.7, "tp-taylor": 0.7, "tp-l1": 0.7, "tp-random": 0.7,
                  "cut-at-once": 0.7, "scratch": 0.7})
    rows[1] = {**rows[1], "skipped": "a layer was removed"}
    rows[2] = {**rows[2], "same_channels": True}
    line = peers.table(rows).splitlines()[-1]
    assert "| – | 0.700 (=) |" in line


def test_torch_pruning_hits_the_widths_and_reports_its_choice(peers):
    """With Torch-Pruning installed: each criterion prunes a 5/5/1 FCN to 3/2/1 exactly, and the
    pruned FCN equals the base with the reported channels switched off."""
    pytest.importorskip("torch_pruning")
    from selfscale.metrics import LOSSES
    from selfscale.model import build_model

    torch.manual_seed(0)
    base = build_model((5, 5, 1), 3, 1, 0.3, seed=1)
    x = torch.rand(4, 1, 12, 12)
    for method in peers.TP_METHODS:
        pruned, matrix = peers.tp_prune(base, [3, 2, 1], method, (x, torch.rand_like(x)),
                                        LOSSES["mse"], seed=0)
        assert pruned.widths == (3, 2, 1) and [sum(r) for r in matrix] == [3, 2, 1]
        assert torch.allclose(pruned(x), peers.cut_at_once(base, matrix)(x))
