"""The minimization loop: keep / step-back rule, phases, optimizer reset, frozen masks, layer
removal, exact resume of a killed minimization, result files."""

import json

import pytest
import torch

from selfscale.checkpoint import load_state
from selfscale.config import (DataConfig, MinimizeConfig, ModelConfig, RunConfig, TaskConfig,
                              TrainConfig)
from selfscale.errors import ConfigError
from selfscale.minimize import loop
from selfscale.minimize.alter import prunable_masks, remove_hidden_layer
from selfscale.minimize.loop import minimize, ratio, start
from selfscale.minimize.summary import mask_matrix, summary
from selfscale.minimize.session import minimize_run as _minimize_run
from selfscale.run import load_network, load_run, prepare_data, start_run, train_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, rect_folder):
    """A small sobel run (widths 3,3,1; kernel 3) trained 200 steps on six synthetic images."""
    root = tmp_path_factory.mktemp("mini")
    imgs = rect_folder("mini-imgs", 6, (40, 44), seed=0, corner=(3, 20), size=(15, 17), level=0.9)
    cfg = RunConfig(
        data=DataConfig(data=imgs, crop=32, train_crop=None, batch=2, eval_fraction=0.34,
                        cache_dir=root / "c"),
        task=TaskConfig(name="sobel"),
        model=ModelConfig(widths=(3, 3, 1), kernel=3, init_std=0.1),
        train=TrainConfig(steps=200, eval_every=100, lr=0.003, seed=0, device="cpu", threads=1))
    run = start_run(cfg, root / "base")
    train_run(run, prepare_data(run.config))
    return run, root


def _env(run):
    """(spec, data): what the loop retrains and evaluates with."""
    return run.spec(), prepare_data(run.config)


def minimize_run(path, config, **kw):
    """The minimize command's path: load the run and its data once, then minimize."""
    run = load_run(kw["out"] if kw.get("resume") and kw.get("out") else path)
    return _minimize_run(run, prepare_data(run.config), config, **kw)


def _scripted(monkeypatch, scores):
    """Replace retraining by a scripted sequence of F1 scores; record what each trial saw."""
    seen = []
    it = iter(scores)

    def fake_retrain(state, steps, spec, data, **judging):
        seen.append({"adam_state": len(state.optimizer.state),
                     "active": state.model.active_widths(),
                     "widths": state.model.widths})
        state.step += steps
        f1 = next(it)
        state.history.append({"step": state.step, "f1": f1, "mae": 0.1, "mse": 0.01,
                              "uiqi": 0.5, "loss": 0.1})
        return {**state.history[-1], "trained": steps, "trajectory": [f1]}

    monkeypatch.setattr(loop, "retrain", fake_retrain)
    # the scripted weights do not change, so which masks are dead is not what these tests test
    monkeypatch.setattr(loop, "remove_dead_masks", lambda m, spec, data: [])
    return seen


def test_ratio_rule():
    """new/ref for F1 and UIQI, ref/new for errors; both zero is a tie."""
    assert ratio(0.9, 1.0, "f1") == pytest.approx(0.9)
    assert ratio(0.2, 0.1, "mae") == pytest.approx(0.5)
    assert ratio(0.0, 0.0, "mse") == 1.0


def test_keep_and_step_back_by_threshold(trained, monkeypatch):
    """seq with scripted score ratios: kept iff ratio >= 0.95; every trial has a fresh Adam."""
    run, _ = trained
    env = _env(run)
    m = start(run.state, MinimizeConfig(finetune_steps=0, strategy="seq", threshold=0.95, layers=False), *env)
    base = m.reference
    # seq visits (0,0) (0,1) (0,2) (1,0) (1,1) (1,2); scores relative to the base score
    seen = _scripted(monkeypatch, [base * r for r in (0.99, 0.5, 0.97, 0.94, 0.96, 0.2)])
    minimize(m, *env)
    kept = [d["kept"] for d in m.log]
    assert kept == [True, False, True, False, True, False]
    tried = [d["tried"] for d in m.log]
    assert tried == ["layer 1 mask 1", "layer 1 mask 2", "layer 1 mask 3", "layer 2 mask 1",
                     "layer 2 mask 2", "layer 2 mask 3"]
    assert m.current.model.active_widths() == (1, 2, 1)
    assert all(s["adam_state"] == 0 for s in seen), "every trial starts with a fresh Adam"
    assert m.current.model.enabled_masks()[0][0] is False
    assert m.phase == "done"


def test_seq_never_disables_the_last_mask_of_a_layer(trained, monkeypatch):
    """With every change accepted, seq leaves exactly one mask per hidden layer."""
    run, _ = trained
    env = _env(run)
    m = start(run.state, MinimizeConfig(finetune_steps=0, strategy="seq", threshold=0.5, layers=False), *env)
    _scripted(monkeypatch, [m.reference] * 10)
    minimize(m, *env)
    assert m.current.model.active_widths() == (1, 1, 1)
    assert len(m.log) == 4  # 2 per hidden layer; the output layer is never touched
    assert prunable_masks(m.current.model) == []


def test_cosmax_stops_after_two_consecutive_failures(trained, monkeypatch):
    """Thesis 4.3: cosmax tries the 1st, then the 2nd ranked, and stops after two failures."""
    run, _ = trained
    env = _env(run)
    m = start(run.state, MinimizeConfig(finetune_steps=0, strategy="cosmax", threshold=0.95, layers=False), *env)
    _scripted(monkeypatch, [m.reference * r for r in (1.0, 0.1, 0.1, 1.0)])
    minimize(m, *env)
    assert [d["kept"] for d in m.log] == [True, False, False]
    assert m.log[1]["tried"] != m.log[2]["tried"]


def test_random_stops_after_its_step_budget(trained, monkeypatch):
    """random stops after --random-steps decisions whatever the outcome."""
    run, _ = trained
    env = _env(run)
    m = start(run.state, MinimizeConfig(finetune_steps=0, strategy="random", threshold=0.95, layers=False,
                                        random_steps=3), *env)
    _scripted(monkeypatch, [m.reference * 0.1] * 10)
    minimize(m, *env)
    assert len(m.log) == 3 and not any(d["kept"] for d in m.log)
    assert m.current.model.active_widths() == (3, 3, 1)


def test_max_steps_budget(trained, monkeypatch):
    """--max-steps caps the decisions of every phase together."""
    run, _ = trained
    env = _env(run)
    m = start(run.state, MinimizeConfig(finetune_steps=0, strategy="seq", threshold=0.5, max_steps=2), *env)
    _scripted(monkeypatch, [m.reference] * 10)
    minimize(m, *env)
    assert len(m.log) == 2


def test_reference_previous_compounds_and_base_does_not(trained, monkeypatch):
    """With 'previous' each kept score becomes the reference (thesis); with 'base' it stays."""
    run, _ = trained
    env = _env(run)
    for reference, expect in (("previous", [True, True, True]), ("base", [True, False, False])):
        m = start(run.state, MinimizeConfig(finetune_steps=0, strategy="seq", threshold=0.95, layers=False,
                                            reference=reference, max_steps=3), *env)
        base = m.reference
        _scripted(monkeypatch, [base * 0.96, base * 0.96 * 0.96, base * 0.96 ** 3])
        minimize(m, *env)
        assert [d["kept"] for d in m.log] == expect, reference


def test_disabled_frozen_mask_stays_unchanged_while_others_train(trained):
    """Real retraining of an altered copy: the disabled+frozen mask's weights do not move,
    the other masks' do, and the snapshot itself is untouched."""
    from selfscale.minimize.proposal import Candidate

    run, _ = trained
    env = _env(run)
    m = start(run.state, MinimizeConfig(finetune_steps=0, strategy="seq", layers=False), *env)
    before = {k: v.clone() for k, v in m.current.model.state_dict().items()}
    trial = loop.alter(m, Candidate("mask", 0, 0), env[0])
    assert len(trial.optimizer.state) == 0
    loop.retrain(trial, 20, *env)
    after = trial.model.state_dict()
    assert trial.model.enabled_masks()[0][0] is False and trial.model.frozen_masks()[0][0]
    assert torch.equal(after["layers.0.weight"][0], before["layers.0.weight"][0])
    assert torch.equal(after["layers.0.bias"][0], before["layers.0.bias"][0])
    assert not torch.equal(after["layers.2.weight"], before["layers.2.weight"])
    for k, v in m.current.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_layer_removal_keeps_network_valid(trained):
    """Removing hidden layer 2 of (3,3,1) gives (3,1) whose output layer takes 3 inputs."""
    run, _ = trained
    from selfscale.minimize.loop import clone_state

    state = clone_state(run.state)
    state.model.set_enabled(0, 1, False)
    new = remove_hidden_layer(state, 1, 0.05)
    assert new.model.widths == (2, 1)
    assert new.model.layers[1].weight.shape == (1, 2, 3, 3)
    # layer 1's kept masks are copied exactly
    torch.testing.assert_close(new.model.layers[0].weight, run.state.model.layers[0].weight[[0, 2]])
    assert new.model(torch.rand(1, 1, 9, 9)).shape == (1, 1, 9, 9)
    assert len(new.optimizer.state) == 0


def test_layer_phase_after_masks(trained, monkeypatch):
    """After the strategy stops, hidden layers are tried, fewest active masks first."""
    run, _ = trained
    env = _env(run)
    m = start(run.state, MinimizeConfig(finetune_steps=0, strategy="seq", threshold=0.95), *env)
    base = m.reference
    # masks (seq): keep (0,0), fail four, keep (1,2) → active 2/2/1
    # layers: tie at 2 masks → layer 1 first: kept → widths (2, 1); then layer 2: fails
    seen = _scripted(monkeypatch, [base, 0.1, 0.1, 0.1, 0.1, base, base, 0.1])
    minimize(m, *env)
    layer_rows = [d for d in m.log if d["phase"] == "layers"]
    assert [d["tried"] for d in layer_rows][0] == "layer 1"
    assert layer_rows[0]["kept"]
    assert [d["tried"] for d in layer_rows] == ["layer 1", "layer 2"]
    assert m.current.model.widths == (2, 1)
    assert seen[-1]["widths"] == (1,)
    matrix = mask_matrix(m)
    assert matrix == [[False, False, False], [True, True, False], [True]]


def _min_config(**kw):
    return MinimizeConfig(finetune_steps=0, strategy="random", threshold=0.9, retrain_steps=15, random_steps=4,
                          seed=3, **kw)


def test_killed_minimization_resumes_exactly(trained, tmp_path):
    """Kill during the 3rd decision's retrain, resume: same decisions, weights and matrix."""
    run, root = trained
    full = minimize_run(root / "base", _min_config(), out=tmp_path / "full")

    calls = {"n": 0}
    real_retrain = loop.retrain

    def dying(state, steps, spec, data, **judging):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_retrain(state, steps, spec, data, **judging)

    loop.retrain = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            minimize_run(root / "base", _min_config(), out=tmp_path / "part")
    finally:
        loop.retrain = real_retrain
    assert len(json.loads("[" + ",".join((tmp_path / "part/minimize/decisions.jsonl")
                                         .read_text().split("\n")[:-1]) + "]")) == 2
    resumed = minimize_run(tmp_path / "part", _min_config(), resume=True)

    def strip(log):
        return [{k: v for k, v in d.items() if k != "seconds"} for d in log]

    assert strip(resumed.minimization.log) == strip(full.minimization.log)
    a = load_state(tmp_path / "full/minimize/final.pt")
    b = load_state(tmp_path / "part/minimize/final.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert resumed.summary["mask_matrix"] == full.summary["mask_matrix"]


def test_results_files_and_stage_selection(trained, tmp_path):
    """Results land in RUN/minimize; auto stage serves the minimized network, base stays."""
    run, root = trained
    res = minimize_run(root / "base", _min_config(), out=tmp_path / "m")
    mdir = tmp_path / "m/minimize"
    for name in ("state.pt", "final.pt", "decisions.csv", "decisions.jsonl", "summary.json",
                 "masks.txt"):
        assert (mdir / name).is_file(), name
    summary = json.loads((mdir / "summary.json").read_text())
    assert summary["widths_before"] == [3, 3, 1] and summary["decisions"] == len(res.minimization.log)
    header = (mdir / "decisions.csv").read_text().splitlines()[0]
    assert header.startswith("step,phase,strategy,tried")
    _, model, stage = load_network(tmp_path / "m")
    assert stage == "minimized"
    assert list(model.active_widths()) == summary["widths_after"]
    _, base, stage = load_network(tmp_path / "m", "base")
    assert stage == "base" and base.active_widths() == (3, 3, 1)
    with pytest.raises(ConfigError, match="already minimized"):
        minimize_run(tmp_path / "m", _min_config())
    assert not (root / "base/minimize").exists(), "--out leaves the source run untouched"


def test_reset_modes_test_each_mask_once_and_remove_nothing(trained, monkeypatch):
    """disabled / others-frozen redraw the mask (by default) and let it relearn: masks are tested
    once, none is removed, and others-frozen freezes every other mask during the retrain only."""
    run, _ = trained
    env = _env(run)
    for mode in ("disabled", "others-frozen"):
        m = start(run.state, MinimizeConfig(finetune_steps=0, strategy="seq", threshold=0.5, layers=False,
                                            mode=mode), *env)
        _scripted(monkeypatch, [])
        frozen_seen = []

        def fake(state, steps, spec, data, frozen_seen=frozen_seen, m=m, **judging):
            frozen_seen.append(sum(sum(f) for f in state.model.frozen_masks()))
            snapshot = [layer.weight for layer in m.current.model.layers]  # before the change
            changed = [(i, k) for i, (layer, old) in enumerate(zip(state.model.layers, snapshot))
                       for k in range(layer.out_channels)
                       if not torch.equal(layer.weight[k], old[k])]
            assert len(changed) == 1, "exactly the tested mask is redrawn"
            i, k = changed[0]
            assert bool(state.model.layers[i].weight[k].abs().sum() > 0), "redrawn, not zeroed"
            state.history.append({"step": state.step, "f1": m.reference, "mae": 0.1,
                                  "mse": 0.01, "uiqi": 0.5, "loss": 0.1})
            return {**state.history[-1], "trained": steps, "trajectory": [m.reference]}

        monkeypatch.setattr(loop, "retrain", fake)
        minimize(m, *env)
        assert len(m.log) == 6 and all(d["kept"] for d in m.log)
        assert m.current.model.active_widths() == (3, 3, 1)
        assert sum(sum(f) for f in m.current.model.frozen_masks()) == 0
        total = 3 + 3 + 1
        assert frozen_seen == ([0] * 6 if mode == "disabled" else [total - 1] * 6)


def test_a_redrawn_mask_moves_while_retraining(trained):
    """Mode disabled, real retraining: the tested mask is redrawn and then trained."""
    from selfscale.minimize.proposal import Candidate

    run, _ = trained
    spec, data = _env(run)
    m = start(run.state, MinimizeConfig(finetune_steps=0, strategy="seq", mode="disabled"), spec, data)
    before = m.current.model.layers[0].weight[1].detach().clone()
    trial = loop.alter(m, Candidate("mask", 0, 1), spec)
    redrawn = trial.model.layers[0].weight[1].detach().clone()
    assert not torch.equal(redrawn, before) and bool(redrawn.abs().sum() > 0)
    loop.retrain(trial, 30, spec, data)
    assert not torch.equal(trial.model.layers[0].weight[1], redrawn), "it relearns"


def test_others_frozen_retrains_only_the_tested_mask(trained):
    """Mode others-frozen, real retraining: every weight but the tested mask's stays put."""
    from selfscale.minimize.proposal import Candidate

    run, _ = trained
    spec, data = _env(run)
    m = start(run.state, MinimizeConfig(finetune_steps=0, strategy="seq", mode="others-frozen"), spec, data)
    trial = loop.alter(m, Candidate("mask", 0, 0), spec)
    after_alter = {k: v.detach().clone() for k, v in trial.model.state_dict().items()}
    loop.retrain(trial, 30, spec, data)
    now = trial.model.state_dict()
    assert not torch.equal(now["layers.0.weight"][0], after_alter["layers.0.weight"][0])
    assert torch.equal(now["layers.0.weight"][1:], after_alter["layers.0.weight"][1:])
    assert torch.equal(now["layers.0.bias"][1:], after_alter["layers.0.bias"][1:])
    for name in ("layers.1.weight", "layers.1.bias", "layers.2.weight", "layers.2.bias"):
        assert torch.equal(now[name], after_alter[name]), name


def test_a_zeroed_mask_is_dead_reported_and_compacted_away(trained, tmp_path):
    """--no-reinit zeroes the tested mask; it cannot relearn, so after the (real) retrain the kept
    decision reports it dead, the summary counts it removed and compaction drops it."""
    from selfscale.compact import compact_model

    cfg = MinimizeConfig(finetune_steps=0, strategy="seq", mode="others-frozen", reinit=False, threshold=0.1,
                         metric="mae",
                         retrain_steps=10, max_steps=1, layers=False)
    with pytest.warns(UserWarning, match="cannot relearn"):
        res = minimize_run(trained[1] / "base", cfg, out=tmp_path / "z")
    (d,) = res.minimization.log
    assert d["tried"] == "layer 1 mask 1" and d["kept"] and "layer 1 mask 1" in d["dead"]
    assert res.summary["mask_matrix"][0][0] is False
    assert res.summary["widths_after"][0] < 3
    assert compact_model(res.minimization.current.model).widths[0] == res.summary["widths_after"][0]


def test_a_nearly_dead_mask_is_tried_first_without_retraining(trained, monkeypatch):
    """A mask silenced on the training data (a very negative bias) is proposed before the
    strategy's first choice, in the free phase, and judged without a retrain."""
    run, _ = trained
    spec, data = _env(run)
    base = loop.clone_state(run.state)
    with torch.no_grad():
        base.model.layers[1].bias[2] = -100.0
    m = start(base, MinimizeConfig(finetune_steps=0, strategy="l1", threshold=0.5,
                                   layers=False, max_steps=2), spec, data)
    assert m.free == [(1, 2)] and m.phase == "free"
    retrained = []
    real = loop.retrain
    monkeypatch.setattr(loop, "retrain", lambda s, n, sp, d, **kw: retrained.append(n) or
                        real(s, n, sp, d, **kw))
    minimize(m, spec, data)
    first = m.log[0]
    assert (first["phase"], first["tried"], first["kept"]) == ("free", "layer 2 mask 3", True)
    assert first["ratio"] == pytest.approx(1.0) and first["steps_trained"] == 0
    assert retrained[0] == 0 and m.log[1]["phase"] == "masks"


def test_finetune_finishes_the_network_and_resumes_exactly(trained, tmp_path):
    """The fine-tune trains the kept network with the recipe; a kill during it resumes to the
    same weights; --finetune-steps 0 skips it."""
    cfg = dict(strategy="seq", threshold=0.01, retrain_steps=5, max_steps=1, layers=False,
               metric="mae", seed=3)
    root = trained[1]
    full = minimize_run(root / "base", MinimizeConfig(finetune_steps=400, **cfg),
                        out=tmp_path / "full")
    s = full.summary
    assert s["finetune_steps"] == 400 and s["steps_trained"] == 5 + 400
    assert s["scores_before_finetune"]["mae"] != s["scores_after"]["mae"]

    calls = {"n": 0}
    real_train = loop.finetune.__globals__["train_active"]

    def dying(*args, **kw):
        hooks = kw["hooks"]

        def on_checkpoint(state):
            hooks.on_checkpoint(state)
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
        return real_train(*args, **{**kw, "hooks": type(hooks)(on_checkpoint=on_checkpoint)})

    loop.finetune.__globals__["train_active"] = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            minimize_run(root / "base", MinimizeConfig(finetune_steps=400, **cfg),
                         out=tmp_path / "part")
    finally:
        loop.finetune.__globals__["train_active"] = real_train
    resumed = minimize_run(root / "base", MinimizeConfig(finetune_steps=400, **cfg),
                           out=tmp_path / "part", resume=True)
    assert resumed.summary["scores_after"] == s["scores_after"]
    a = load_state(tmp_path / "full/minimize/final.pt")
    b = load_state(tmp_path / "part/minimize/final.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])

    skipped = minimize_run(root / "base", MinimizeConfig(finetune_steps=0, **cfg),
                           out=tmp_path / "none")
    assert skipped.summary["finetune_steps"] == 0
    assert skipped.summary["scores_before_finetune"] is None
    assert skipped.summary["steps_trained"] == 5


def test_judge_best_keeps_a_removal_that_recovers_late_and_judges_by_its_best(trained,
                                                                              monkeypatch):
    """A removal scores low right after the cut; --judge best keeps it when the network
    recovers during the retrain (scripted evaluations), and the weights of that best evaluation
    are the snapshot afterwards. --judge final judges by the last evaluation only."""
    from selfscale import train as train_module

    run, _ = trained
    spec, data = _env(run)
    real_evaluate = train_module.evaluate
    for judge, scripted, kept in (("best", [0.2, 0.3, 1.0, 0.6], True), ("final", [0.6], False)):
        m = start(run.state, MinimizeConfig(finetune_steps=0, strategy="seq", threshold=0.9,
                                            layers=False, max_steps=1, judge=judge,
                                            retrain_steps=8, free_below=2, abort_below=0),
                  spec, data)
        ref = m.reference
        it = iter(scripted)

        def scripted_evaluate(model, images, crop, device, it=it, ref=ref):
            return {**real_evaluate(model, images, crop, device), "f1": next(it) * ref}

        monkeypatch.setattr(train_module, "evaluate", scripted_evaluate)
        minimize(m, spec, data)
        monkeypatch.setattr(train_module, "evaluate", real_evaluate)
        (d,) = m.log
        assert d["kept"] is kept, judge
        assert d["ratio"] == pytest.approx(1.0 if judge == "best" else 0.6)
        if judge == "best":  # the snapshot holds the weights of the best evaluation (step 6)
            best = m.current.best
            assert best["step"] == run.state.step + 6
            assert all(torch.equal(v.cpu(), best["model"][k])
                       for k, v in m.current.model.state_dict().items())


def _scripted_evaluations(monkeypatch, ref, ratios):
    """Evaluations during training score the given ratios of ``ref`` in turn (real otherwise)."""
    from selfscale import train as train_module

    real, it = train_module.evaluate, iter(ratios)
    monkeypatch.setattr(train_module, "evaluate", lambda model, images, crop, device: {
        **real(model, images, crop, device), "f1": next(it) * ref})


@pytest.mark.parametrize("ratios, trained_steps, kept", [
    ([0.5, 0.9, 0.95, 0.95], 2, False),  # hopeless at a quarter: stopped there, stepped back
    ([0.7, 0.5, 0.9, 0.95], 4, False),  # not hopeless at a quarter, hopeless at the half
    ([0.65, 0.8, 0.9, 0.95], 8, True),  # low but not hopeless: retrained in full, recovers
])
def test_abort_below_stops_a_hopeless_retrain_early(trained, monkeypatch, ratios,
                                                    trained_steps, kept):
    """--abort-below 0.7 at threshold 0.9: a retrain is evaluated every quarter (2 of its 8
    steps) and stops at the first evaluation whose ratio is under 0.7 × 0.9 = 0.63. Only the
    steps trained count; the log says it stopped early and shows the evaluations."""
    run, _ = trained
    spec, data = _env(run)
    m = start(run.state, MinimizeConfig(finetune_steps=0, strategy="seq", threshold=0.9,
                                        layers=False, max_steps=1, retrain_steps=8, free_below=2,
                                        abort_below=0.7), spec, data)
    _scripted_evaluations(monkeypatch, m.reference, ratios)
    snapshot = {k: v.clone() for k, v in m.current.model.state_dict().items()}
    minimize(m, spec, data)
    (d,) = m.log
    assert (d["kept"], d["steps_trained"], m.steps_trained) == (kept, trained_steps,
                                                                  trained_steps)
    assert d["stopped_early"] is (trained_steps < 8)
    from selfscale.views import minimization_text
    s = summary(m, m.base_scores)
    assert s["stopped_early"] == int(trained_steps < 8)
    assert (", 1 stopped early, " in minimization_text(s)) is (trained_steps < 8)
    assert d["trajectory"] == pytest.approx([r * m.reference for r in ratios[:trained_steps // 2]])
    if not kept:  # stepped back to the snapshot, step counter included
        assert m.current.step == run.state.step
        assert all(torch.equal(v, snapshot[k]) for k, v in m.current.model.state_dict().items())


def test_evaluations_for_abort_below_do_not_change_the_training(trained):
    """With --abort-below the retrains are evaluated every quarter; when nothing is hopeless the
    minimization trains exactly as with --abort-below 0 (one evaluation per retrain): the same
    decisions, scores and weights."""
    run, _ = trained
    spec, data = _env(run)
    ends = []
    for abort in (0.0, 1e-6):
        m = start(run.state, MinimizeConfig(finetune_steps=0, strategy="seq", threshold=0.5,
                                            layers=False, max_steps=3, retrain_steps=8,
                                            free_below=2, abort_below=abort), spec, data)
        minimize(m, spec, data)
        ends.append(m)
    (a, b) = ends
    assert [len(d["trajectory"]) for d in a.log] == [1, 1, 1]
    assert [len(d["trajectory"]) for d in b.log] == [4, 4, 4]
    assert [(d["tried"], d["kept"], d["score"]) for d in a.log] == \
        [(d["tried"], d["kept"], d["score"]) for d in b.log]
    assert not any(d["stopped_early"] for d in b.log) and a.steps_trained == b.steps_trained == 24
    assert all(torch.equal(v, b.current.model.state_dict()[k])
               for k, v in a.current.model.state_dict().items())


@pytest.mark.parametrize("keep_best", [False, True])
def test_a_short_finetune_pauses_at_least_100_steps_apart_unless_it_keeps_its_best(trained,
                                                                                  keep_best):
    """A 300-step fine-tune from step 200 is evaluated at 300, 400 and 500 (its tenths are 30
    steps, under FINETUNE_GAP); with --keep-best, whose evaluations choose its end, every 30
    steps as before. The scores it returns are its last evaluation's: those of its weights."""
    import dataclasses

    from selfscale.minimize.finish import finetune
    from selfscale.minimize.state import clone_state
    from selfscale.train import evaluate

    run, _ = trained
    spec, data = _env(run)
    spec = dataclasses.replace(spec, keep_best=keep_best)
    state = clone_state(run.state)
    before = len(state.history)
    scores = finetune(state, {"start": 200, "steps": 300}, spec, data, lambda: None)
    steps = [r["step"] for r in state.history[before:]]
    assert steps == ([*range(210, 500, 30), 500] if keep_best else [300, 400, 500])
    if not keep_best:
        fresh = evaluate(state.model, data.eval, spec.eval_crop, spec.device)
        assert scores == {k: v for k, v in fresh.items() if k != "n_images"}


def test_a_finetune_that_lowers_the_score_is_undone(trained, monkeypatch):
    """The fine-tune's result is kept only if the score does not fall; else the network before
    it stays, and the summary says so. Its steps still count."""
    run, _ = trained
    env = _env(run)
    m = start(run.state, MinimizeConfig(finetune_steps=7, strategy="seq", threshold=0.5,
                                        layers=False, max_steps=1), *env)
    _scripted(monkeypatch, [m.reference])

    def harmful(state, info, spec, data, save):
        with torch.no_grad():
            for p in state.model.parameters():
                p.mul_(-1.0)
        state.step += info["steps"]
        return {**info["scores_before"], "f1": info["scores_before"]["f1"] / 2}
    monkeypatch.setattr(loop, "finetune", harmful)
    before = None

    def on_save(mm):
        nonlocal before
        if mm.finetune is not None and before is None:
            before = {k: v.clone() for k, v in mm.current.model.state_dict().items()}
    minimize(m, *env, loop.LoopHooks(on_save=on_save))
    assert m.finetune["kept"] is False and "weights_before" not in m.finetune
    assert all(torch.equal(v, before[k]) for k, v in m.current.model.state_dict().items())
    s = summary(m, m.finetune["scores_after"])
    assert s["finetune_kept"] is False and s["scores_after"] == s["scores_before_finetune"]
    assert s["steps_trained"] == 7000 + 7  # one (scripted) retrain of the default length


def test_no_finetune_when_no_change_was_kept(trained, monkeypatch):
    run, _ = trained
    env = _env(run)
    m = start(run.state, MinimizeConfig(finetune_steps=9, strategy="seq", threshold=0.95,
                                        layers=False, retrain_steps=4), *env)
    _scripted(monkeypatch, [m.reference * 0.5] * 6)
    minimize(m, *env)
    s = summary(m, m.base_scores)
    assert m.finetune is None and s["finetune_steps"] == 0 and s["kept"] == 0
    assert s["steps_trained"] == 6 * 4


def test_judge_paired_compares_with_the_unchanged_network_retrained_on_the_same_batches(
        trained, monkeypatch):
    """A cut scoring 0.49 of the base after the retrain, while the unchanged network retrained the
    same way scores 0.50, is judged 0.98 and kept; the unchanged retrain runs once per snapshot,
    and with --reference base the ratios chain."""
    run, _ = trained
    env = _env(run)
    m = start(run.state, MinimizeConfig(finetune_steps=0, strategy="seq", threshold=0.95,
                                        layers=False, max_steps=3, judge="paired",
                                        retrain_steps=11), *env)
    x = m.reference
    # retrain calls: cut 1, unchanged 1, cut 2, unchanged 2, cut 3 (unchanged 2 reused)
    seen = _scripted(monkeypatch, [0.49 * x, 0.50 * x, 0.45 * x, 0.48 * x, 0.50 * x])
    minimize(m, *env)
    assert len(seen) == 5
    assert [s["active"] for s in seen] == [(2, 3, 1), (3, 3, 1), (1, 3, 1), (2, 3, 1), (1, 3, 1)]
    assert [d["kept"] for d in m.log] == [True, False, True]
    assert [d["ratio"] for d in m.log] == pytest.approx([0.98, 0.98 * 0.45 / 0.48,
                                                         0.98 * 0.50 / 0.48])
    assert [d["paired_reference"] for d in m.log] == pytest.approx([0.5 * x, 0.48 * x, 0.48 * x])
    assert m.steps_trained == 5 * 11


def test_decision_line_says_when_a_retrain_stopped_early():
    """The progress line of a decision names the steps of a retrain --abort-below stopped."""
    from selfscale.views import decision_text

    d = {"step": 6, "tried": "layer 1", "metric": "f1", "score": 0.2, "ratio": 0.22,
         "threshold": 0.95, "kept": False, "active": [5, 4, 1], "seconds": 1.5,
         "steps_trained": 1875, "stopped_early": True, "dead": []}
    assert decision_text(d) == ("  step   6  layer 1              f1 0.2000  ratio 0.220 < 0.95  "
                                "stepped back  active 5/4/1  (1.5 s)  stopped early after "
                                "1875 steps")
    assert "stopped early" not in decision_text({**d, "stopped_early": False})
