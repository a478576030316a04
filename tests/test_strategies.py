"""Selection strategies: the ranking functions against independent computations, the proposal
rules (ranked, random, seq, oracle), the exclusions, the registry, the candidate's plain form,
and an exact resume from state_dict."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import cdist

from selfscale.checkpoint import load_state, save_state
from selfscale.config import MinimizeConfig
from selfscale.errors import ConfigError
from selfscale.minimize.proposal import Candidate, SelectionContext
from selfscale.minimize.strategies import (COSINE_STRATEGIES, REDUCTIONS, STRATEGIES, cos_scores,
                                           cosine_matrix, fpgm_scores, l1_scores, make_strategy,
                                           mask_vectors, taylor_scores)
from selfscale.model import FCN

COS_NAMES = [f"cos{r}{suffix}" for r in REDUCTIONS for suffix in ("", "-abs")]
ALL_NAMES = sorted([*COS_NAMES, "l1", "group-l1", "fpgm", "taylor", "random", "seq", "oracle"])


def M(layer, mask):
    return Candidate("mask", layer, mask)


def prunable(model):
    """Mirror of the loop's rule: enabled, not the output layer, not the last enabled mask."""
    out = []
    for l, conv in enumerate(model.layers[:-1]):
        if int(conv.enabled.sum()) > 1:
            out += [(l, m) for m in range(conv.out_channels) if bool(conv.enabled[m])]
    return out


def make_ctx(model, *, failed=(), step=0, seed=0, trial=None, x=None, y=None):
    if x is None:
        g = torch.Generator().manual_seed(123)
        x = torch.rand(2, model.in_channels, 6, 6, generator=g)
        y = torch.rand(2, 1, 6, 6, generator=g)
    return SelectionContext(model=model, prunable=prunable(model), failed=frozenset(failed),
                            step=step, rng=np.random.default_rng(seed),
                            batches=lambda: iter([(x, y)]),
                            loss_fn=lambda o, t: (o - t).abs().mean(), trial=trial)


def random_model(widths=(4, 3, 1), kernel=3, seed=0):
    model = FCN(widths, kernel)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in model.layers:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g))
    return model


def set_vectors(conv, vectors):
    """Set each mask of ``conv`` to one row: weights flattened, bias last."""
    v = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
    with torch.no_grad():
        conv.weight.copy_(v[:, :-1].reshape(conv.weight.shape))
        conv.bias.copy_(v[:, -1])


def np_cos(a):
    n = np.linalg.norm(a, axis=1)
    safe = np.where(n > 0, n, 1.0)
    u = a / safe[:, None]
    return u @ u.T


# --- ranking functions ----------------------------------------------------------------------------

def test_registered_names():
    """Every strategy of the brief is registered under its name, which the class carries."""
    assert sorted(STRATEGIES) == ALL_NAMES
    for name in ALL_NAMES:
        assert make_strategy(name).name == name


def test_registry_is_full_after_importing_only_the_strategies_module():
    """A fresh interpreter that imports only selfscale.minimize.strategies sees all 17."""
    code = ("import selfscale.minimize.strategies as s; "
            "print(','.join(sorted(s.STRATEGIES)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().split(",") == ALL_NAMES


def test_cosine_table_gives_each_variant_its_reduction():
    """cos<reduce> and cos<reduce>-abs for every reduction, with the matching settings."""
    assert sorted(COSINE_STRATEGIES) == sorted(COS_NAMES)
    for reduce in REDUCTIONS:
        for suffix, absolute in (("", False), ("-abs", True)):
            strategy = make_strategy(f"cos{reduce}{suffix}")
            assert (strategy.reduce, strategy.absolute, strategy.highest_first) == (
                reduce, absolute, True)


def test_candidate_describe_and_plain_round_trip(tmp_path):
    """1-based text; to_plain/from_plain round-trip through JSON and a saved state file."""
    candidates = [Candidate("mask", 1, 2), Candidate("layer", 0)]
    assert [c.describe() for c in candidates] == ["layer 2 mask 3", "layer 1"]
    assert [c.to_plain() for c in candidates] == [["mask", 1, 2], ["layer", 0, None]]
    plain = json.loads(json.dumps([c.to_plain() for c in candidates]))
    assert [Candidate.from_plain(item) for item in plain] == candidates
    save_state(tmp_path / "s.pt", {"failed": [c.to_plain() for c in candidates]})
    loaded = load_state(tmp_path / "s.pt")["failed"]
    assert [Candidate.from_plain(item) for item in loaded] == candidates


@pytest.mark.parametrize("kw, message", [
    ({"patience": 0}, "--patience: must be a positive integer, got 0"),
    ({"patience": True}, "--patience: must be a positive integer, got True"),
    ({"random_steps": 0}, "--random-steps: must be a positive integer, got 0"),
    ({"oracle_steps": -1}, "--oracle-steps: must be a non-negative integer, got -1"),
])
def test_strategy_options_are_validated_by_the_config(kw, message):
    """patience, random_steps and oracle_steps are checked by MinimizeConfig, naming the flag."""
    with pytest.raises(ConfigError, match=message):
        MinimizeConfig(**kw)


def test_unknown_strategy_lists_names():
    """An unknown name is a ConfigError that lists the known strategies."""
    with pytest.raises(ConfigError, match="unknown strategy 'nope'.*cosmax.*oracle.*taylor"):
        make_strategy("nope")


def test_mask_vectors_layout():
    """Row m = weight[m] flattened then bias[m]; ``inputs`` keeps only live input channels."""
    conv = random_model((3, 2, 1)).layers[1]
    v = mask_vectors(conv)
    assert v.shape == (2, 3 * 9 + 1) and v.dtype == torch.float64
    assert torch.equal(v[1, :-1], conv.weight[1].double().flatten())
    assert v[1, -1] == conv.bias[1].double()
    keep = torch.tensor([True, False, True])
    v2 = mask_vectors(conv, inputs=keep)
    assert v2.shape == (2, 2 * 9 + 1)
    assert torch.equal(v2[0, 9:18], conv.weight[0, 2].double().flatten())


def test_cosine_matrix_matches_numpy_and_zero_rows():
    """Against an independent numpy formula; a zero vector is similar to nothing (no NaN)."""
    rng = np.random.default_rng(1)
    a = rng.normal(size=(5, 7))
    a[3] = 0
    got = cosine_matrix(torch.from_numpy(a)).numpy()
    np.testing.assert_allclose(got, np_cos(a), atol=1e-12)
    assert not np.isnan(got).any() and np.all(got[3] == 0)
    assert np.array_equal(got, got.T)


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_cos_scores_match_numpy(reduce, absolute):
    """Each reduction over the other enabled masks (diagonal and disabled masks excluded)."""
    conv = random_model((6, 1), seed=4).layers[0]
    conv.enabled[2] = False
    idx = [0, 1, 3, 4, 5]
    s = np_cos(mask_vectors(conv).numpy()[idx])
    if absolute:
        s = np.abs(s)
    fn = {"max": np.max, "mean": np.mean, "min": np.min, "std": np.std, "median": np.median}[reduce]
    expected = {m: fn(np.delete(s[r], r)) for r, m in enumerate(idx)}
    got = cos_scores(conv, reduce, absolute)
    assert sorted(got) == idx
    for m in idx:
        assert got[m] == pytest.approx(expected[m], abs=1e-12)


def test_cos_scores_single_enabled_mask_and_bad_reduce():
    """One enabled mask: no score. An unknown reduction names itself."""
    conv = random_model((3, 1)).layers[0]
    conv.enabled[:2] = False
    assert cos_scores(conv) == {}
    with pytest.raises(ValueError, match="'avg'"):
        cos_scores(conv, "avg")


def test_cosmax_picks_lower_of_identical_pair():
    """Two identical masks in layer 1: cosmax disables the lower index of the pair."""
    model = random_model((4, 3, 1), seed=2)
    with torch.no_grad():
        model.layers[1].weight[2] = model.layers[1].weight[0]
        model.layers[1].bias[2] = model.layers[1].bias[0]
    assert make_strategy("cosmax").propose(make_ctx(model)) == M(1, 0)


def test_absolute_value_changes_the_choice():
    """Masks [v, −v, u, w] with u·w similar: cosmax picks u, cosmax-abs picks v (its inverse)."""
    model = FCN((4, 1), 3)
    e = np.eye(10)
    v, u, w = e[0], e[1], e[1] + e[2]  # cos(u, w) = 1/√2, v ⟂ u, w
    set_vectors(model.layers[0], [v, -v, u, w])
    assert cos_scores(model.layers[0], "max")[2] == pytest.approx(2 ** -0.5)
    assert make_strategy("cosmax").propose(make_ctx(model)) == M(0, 2)
    assert make_strategy("cosmax-abs").propose(make_ctx(model)) == M(0, 0)


def test_dead_inputs_are_ignored_by_the_strategies():
    """Weights on a disabled previous-layer mask (always-zero input) do not affect the ranking."""
    model = FCN((2, 3, 1), 1)
    # layer 1 masks over inputs (ch0, ch1) + bias; ch1 is disabled in layer 0.
    set_vectors(model.layers[0], [[1.0, 0.0], [2.0, 0.0]])
    set_vectors(model.layers[1], [[1.0, 9.0, 0.0], [1.0, -9.0, 0.0], [0.0, 0.0, 1.0]])
    model.layers[0].enabled[1] = False
    ctx = make_ctx(model)
    assert ctx.prunable == [(1, 0), (1, 1), (1, 2)]
    # On live inputs masks 0 and 1 are identical (cos 1); the stale ±9 would make them opposite.
    assert make_strategy("cosmax").propose(ctx) == M(1, 0)
    assert cos_scores(model.layers[1], "max")[0] < 0.1


def test_l1_picks_smallest_and_skips_disabled_output_and_last_mask():
    """Smallest mean |w|; never a disabled mask, the output layer or a layer's last mask."""
    model = FCN((3, 2, 1), 3)
    with torch.no_grad():
        for m, scale in enumerate([0.5, 0.1, 0.3]):
            model.layers[0].weight[m].fill_(scale)
        model.layers[1].weight[0].fill_(0.01)
        model.layers[1].weight[1].fill_(0.2)
        model.layers[2].weight.fill_(0.001)
    scores = l1_scores(model.layers[0])
    assert scores == pytest.approx({0: 0.5, 1: 0.1, 2: 0.3})
    assert make_strategy("l1").propose(make_ctx(model)) == M(1, 0)
    model.layers[1].enabled[1] = False  # (1, 0) is now its layer's last enabled mask
    assert make_strategy("l1").propose(make_ctx(model)) == M(0, 1)
    model.layers[0].enabled[1] = False
    assert make_strategy("l1").propose(make_ctx(model)) == M(0, 2)
    assert 1 not in l1_scores(model.layers[0])


def test_group_l1_matches_a_reference_and_counts_what_reads_a_mask():
    """group-l1: sum |w| of a mask's kernels from live inputs plus sum |w| of the enabled next
    masks' kernels on its output, over its layer's mean (a numpy reference, with disabled masks
    on both sides). Where a mask is small but strongly read, l1 and group-l1 disagree."""
    from selfscale.minimize.magnitude import group_l1_scores

    model = random_model((4, 3, 1), seed=3)
    model.layers[0].enabled[1] = False
    model.layers[1].enabled[2] = False
    w = [c.weight.detach().double().abs().numpy() for c in model.layers]
    on = [c.enabled.numpy() for c in model.layers]
    expected = {}
    for i in range(2):
        live_in = on[i - 1] if i else np.ones(1, dtype=bool)
        raw = {m: w[i][m][live_in].sum() + w[i + 1][on[i + 1]][:, m].sum()
               for m in range(len(on[i])) if on[i][m]}
        mean = np.mean(list(raw.values()))
        expected |= {(i, m): v / mean for m, v in raw.items()}
    assert group_l1_scores(model) == pytest.approx(expected, rel=1e-12)

    model = FCN((3, 2, 1), 3)
    with torch.no_grad():
        for m, scale in enumerate([0.5, 0.1, 0.3]):  # l1 ranks layer-1 mask 2 (0.1) first …
            model.layers[0].weight[m].fill_(scale)
        for m, scale in enumerate([0.01, 1.0, 0.02]):  # … but layer 2 reads it strongly
            model.layers[1].weight[:, m].fill_(scale)
        model.layers[2].weight[0, 0].fill_(0.5)
        model.layers[2].weight[0, 1].fill_(0.1)
    # layer 1 raw: 4.5 + 0.18, 0.9 + 18, 2.7 + 0.36 (mean 8.88); layer 2: 9.27 + 4.5, 9.27 + 0.9
    assert group_l1_scores(model) == pytest.approx(
        {(0, 0): 4.68 / 8.88, (0, 1): 18.9 / 8.88, (0, 2): 3.06 / 8.88,
         (1, 0): 13.77 / 11.97, (1, 1): 10.17 / 11.97})
    assert make_strategy("l1").propose(make_ctx(model)) == M(0, 1)
    assert make_strategy("group-l1").propose(make_ctx(model)) == M(0, 2)


def test_fpgm_matches_scipy():
    """Summed Euclidean distance to the other enabled masks over the layer mean (scipy cdist)."""
    conv = random_model((5, 1), seed=7).layers[0]
    conv.enabled[1] = False
    idx = [0, 2, 3, 4]
    a = mask_vectors(conv).numpy()[idx]
    sums = cdist(a, a, "euclidean").sum(axis=1)
    expected = sums / sums.mean()
    got = fpgm_scores(conv)
    assert sorted(got) == idx
    np.testing.assert_allclose([got[m] for m in idx], expected, rtol=1e-12)


def test_fpgm_picks_the_geometric_median():
    """Masks at −1, 0, +1 along one axis: the middle one is closest to all others."""
    model = FCN((3, 1), 1)
    set_vectors(model.layers[0], [[-1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    assert make_strategy("fpgm").propose(make_ctx(model)) == M(0, 1)


def _reference_taylor(model, batches, loss_fn):
    """Independent forward with explicit activations a = relu(conv(·)) and autograd.grad."""
    hidden = len(model.layers) - 1
    totals = [torch.zeros(model.widths[l], dtype=torch.float64) for l in range(hidden)]
    count = 0
    for x, y in batches:
        w = [c.weight.detach().clone() for c in model.layers]
        b = [c.bias.detach().clone() for c in model.layers]
        acts, a = [], x
        for l, conv in enumerate(model.layers):
            gate = conv.enabled.float()
            a = F.relu(F.conv2d(a, w[l] * gate.view(-1, 1, 1, 1), b[l] * gate,
                                padding=conv.padding))
            if l < hidden:
                a = a.detach().requires_grad_(True) if l == 0 else a
                acts.append(a)
        grads = torch.autograd.grad(loss_fn(a, y), acts)
        for l in range(hidden):
            totals[l] += (acts[l] * grads[l]).double().mean(dim=(2, 3)).abs().sum(dim=0).detach()
        count += x.shape[0]
    out = {}
    for l in range(hidden):
        s = totals[l] / count
        s = s / s.norm()
        out.update({(l, m): float(s[m]) for m in range(model.widths[l])
                    if model.layers[l].enabled[m]})
    return out


def test_taylor_matches_manual_computation_and_leaves_model_untouched():
    """|mean(a·∂L/∂a)| per image and channel, averaged, L2-normalized per layer; no side effects."""
    model = random_model((4, 3, 1), kernel=3, seed=5)
    with torch.no_grad():
        for conv in model.layers:
            conv.weight.mul_(0.3)
    model.layers[1].enabled[2] = False
    model.layers[0].frozen[1] = True
    g = torch.Generator().manual_seed(9)
    batches = [(torch.rand(3, 1, 7, 7, generator=g), torch.rand(3, 1, 7, 7, generator=g)),
               (torch.rand(2, 1, 7, 7, generator=g), torch.rand(2, 1, 7, 7, generator=g))]
    loss_fn = lambda o, t: (o - t).abs().mean()  # noqa: E731
    before = {k: v.clone() for k, v in model.state_dict().items()}

    got = taylor_scores(model, batches, loss_fn)
    expected = _reference_taylor(model, batches, loss_fn)
    assert sorted(got) == sorted(expected) and (1, 2) not in got
    for k in expected:
        assert got[k] == pytest.approx(expected[k], rel=1e-6, abs=1e-12)
    assert any(v > 0 for v in got.values())

    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert all(not conv._forward_hooks for conv in model.layers)


def test_taylor_strategy_proposes_smallest():
    """The taylor strategy proposes the prunable mask with the smallest Taylor score."""
    model = random_model((4, 3, 1), kernel=3, seed=5)
    ctx = make_ctx(model)
    scores = taylor_scores(model, ctx.batches(), ctx.loss_fn)
    best = min(ctx.prunable, key=lambda k: (scores[k], k))
    assert make_strategy("taylor").propose(ctx) == M(*best)


# --- proposal rules -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_strategy_proposes_only_prunable(name):
    """Disabled masks, the output layer and a layer's last enabled mask are never proposed."""
    model = random_model((4, 2, 3, 1), kernel=3, seed=11)
    model.layers[0].enabled[1] = False
    model.layers[1].enabled[0] = False  # (1, 1) is the last enabled mask of layer 1
    ctx = make_ctx(model, trial=lambda c: float(c.layer * 10 + c.mask))
    allowed = set(prunable(model))
    assert allowed == {(0, 0), (0, 2), (0, 3), (2, 0), (2, 1), (2, 2)}
    strategy = make_strategy(name, MinimizeConfig(patience=10, random_steps=100))
    seen = []
    for step in range(len(allowed)):
        ctx.step, ctx.failed = step, frozenset(M(*k) for k in seen)
        c = strategy.propose(ctx)
        assert c is not None and (c.layer, c.mask) in allowed and (c.layer, c.mask) not in seen
        seen.append((c.layer, c.mask))
        strategy.update(c, kept=False)
        if name == "oracle":
            break
    ctx.failed = frozenset(M(*k) for k in seen)
    assert strategy.propose(ctx) is None  # nothing open (or oracle's single failure)


def test_ranked_base_patience_and_failed_exclusion():
    """1st ranked; after one step-back the 2nd; stop after `patience` step-backs (the size of
    ctx.failed); after a keep (ctx.failed empty) the ranking starts over."""
    model = FCN((4, 2, 1), 1)
    with torch.no_grad():
        for m, scale in enumerate([0.4, 0.1, 0.3, 0.2]):  # l1 order: (0,1) (0,3) (0,2) (0,0)
            model.layers[0].weight[m].fill_(scale)
        model.layers[1].weight.fill_(1.0)
    strategy = make_strategy("l1")  # patience 2
    assert strategy.propose(make_ctx(model)) == M(0, 1)
    assert strategy.propose(make_ctx(model, failed=[M(0, 1)])) == M(0, 3)
    assert strategy.propose(make_ctx(model, failed=[M(0, 1), M(0, 3)])) is None

    patient = make_strategy("l1", MinimizeConfig(patience=3))
    failed = []
    for c in (M(0, 1), M(0, 3)):
        assert patient.propose(make_ctx(model, failed=failed)) == c
        failed.append(c)
    assert patient.propose(make_ctx(model, failed=failed)) == M(0, 2)
    assert patient.propose(make_ctx(model, failed=[*failed, M(0, 2)])) is None
    model.layers[0].enabled[2] = False  # (0, 2) kept
    # After a keep the stepped-back candidates are open again, ranked on the new network.
    assert patient.propose(make_ctx(model)) == M(0, 1)


def test_ctx_failed_is_respected():
    """A candidate the loop lists in ctx.failed is skipped even if the strategy was not told."""
    model = FCN((3, 1), 1)
    set_vectors(model.layers[0], [[0.1, 0.0], [0.2, 0.0], [0.3, 0.0]])
    assert make_strategy("l1").propose(make_ctx(model, failed=[M(0, 0)])) == M(0, 1)


def test_seq_order_and_stop_after_last():
    """Seq visits every prunable mask once in (layer, mask) order, then stops."""
    model = random_model((3, 2, 1), kernel=1)
    strategy = make_strategy("seq")
    visited, failed = [], []
    for kept in [True, False, False, True, True]:
        c = strategy.propose(make_ctx(model, failed=failed))
        if c is None:
            break
        visited.append((c.layer, c.mask))
        strategy.update(c, kept)
        if kept:
            model.layers[c.layer].enabled[c.mask] = False
            failed = []
        else:
            failed.append(c)
    # (0,0) kept; (0,1) failed; (0,2) failed; (1,0) kept → (1,1) is then the last enabled mask.
    assert visited == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert strategy.propose(make_ctx(model)) is None


def test_random_reproducible_and_stops_after_max_steps():
    """Same seed, same draws; another seed differs; max_steps steps then None."""
    def draws(seed):
        model = random_model((6, 6, 1), kernel=1)
        ctx = make_ctx(model, seed=seed)
        strategy = make_strategy("random", MinimizeConfig(random_steps=5))
        out = []
        while (c := strategy.propose(ctx)) is not None:
            out.append((c.layer, c.mask))
            strategy.update(c, kept=True)
            model.layers[c.layer].enabled[c.mask] = False
            ctx.prunable, ctx.step = prunable(model), ctx.step + 1
        return out

    assert len(draws(0)) == 5
    assert draws(0) == draws(0)
    assert draws(0) != draws(1)


def test_random_draw_is_documented_one():
    """The draw is ``open[rng.integers(len(open))]`` on the sorted open candidates."""
    model = random_model((4, 3, 1), kernel=1)
    ctx = make_ctx(model, failed=[M(0, 2)], seed=3)
    open_ = [k for k in prunable(model) if k != (0, 2)]
    expected = open_[int(np.random.default_rng(3).integers(len(open_)))]
    assert make_strategy("random").propose(ctx) == M(*expected)


def test_oracle_picks_best_and_stops_after_one_failure():
    """Highest trial score wins (ties to the lower index); one step-back ends it."""
    model = random_model((3, 2, 1), kernel=1)
    scores = {(0, 0): 0.5, (0, 1): 0.9, (0, 2): 0.9, (1, 0): float("nan"), (1, 1): 0.2}
    tried = []

    def trial(c):
        tried.append((c.layer, c.mask))
        return scores[(c.layer, c.mask)]

    strategy = make_strategy("oracle")
    assert strategy.propose(make_ctx(model, trial=trial)) == M(0, 1)
    assert tried == sorted(scores)
    strategy.update(M(0, 1), kept=True)
    model.layers[0].enabled[1] = False
    assert strategy.propose(make_ctx(model, trial=trial)) == M(0, 2)
    strategy.update(M(0, 2), kept=False)
    assert strategy.propose(make_ctx(model, failed=[M(0, 2)], trial=trial)) is None
    with pytest.raises(RuntimeError, match="ctx.trial"):
        make_strategy("oracle").propose(make_ctx(model))


@pytest.mark.parametrize("name", ALL_NAMES)
def test_state_dict_round_trip(name):
    """A strategy restored from its (JSON-able) state proposes exactly what the original would."""
    model = random_model((5, 4, 1), kernel=3, seed=13)
    trial = lambda c: float(np.sin(c.layer * 7 + c.mask))  # noqa: E731
    options = MinimizeConfig(patience=3, random_steps=6)
    original = make_strategy(name, options)
    failed = []
    ctx = make_ctx(model, trial=trial, seed=21)
    for kept in [True, True] if name == "oracle" else [True, False]:  # oracle: patience 1
        c = original.propose(ctx)
        original.update(c, kept)
        if kept:
            model.layers[c.layer].enabled[c.mask] = False
            failed = []
        else:
            failed.append(c)
        ctx.prunable, ctx.failed, ctx.step = prunable(model), frozenset(failed), ctx.step + 1

    state = json.loads(json.dumps(original.state_dict()))
    assert "failed" not in state  # the loop keeps the one list of stepped-back candidates
    restored = make_strategy(name, options)
    restored.load_state_dict(state)
    rng_state = ctx.rng.bit_generator.state
    expected = original.propose(ctx)
    ctx.rng.bit_generator.state = rng_state
    assert restored.propose(ctx) == expected
    assert expected is not None
    # The same in another context too (here: after a keep, nothing stepped back).
    ctx.failed = frozenset()
    ctx.rng.bit_generator.state = rng_state
    a = original.propose(ctx)
    ctx.rng.bit_generator.state = rng_state
    assert restored.propose(ctx) == a


def test_state_of_another_strategy_is_refused():
    """Loading l1's state into cosmax is a clear CheckpointError, not a silent mix-up."""
    from selfscale.errors import CheckpointError

    with pytest.raises(CheckpointError, match="'l1'.*'cosmax'"):
        make_strategy("cosmax").load_state_dict(make_strategy("l1").state_dict())
