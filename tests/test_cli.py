"""End to end through the command line on tiny crops in tmp_path, and one-line user errors."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from selfscale.cli import main


@pytest.fixture(scope="module")
def images(rect_folder):
    """Five 36×40 images: a bright rectangle on black."""
    return rect_folder("cli-imgs", 5, (36, 40), seed=1, corner=(2, 16), size=(14, 16),
                       level=220 / 255)


TRAIN = ["--task", "sobel", "--crop", "24", "--train-crop", "24", "--batch", "2", "--widths", "3,3,1", "--kernel", "3",
         "--init-std", "0.1", "--lr", "0.003", "--loss", "mse", "--eval-every", "10", "--threads", "1",
         "--quiet"]


@pytest.fixture(scope="module")
def trained(images, tmp_path_factory):
    """A 20-step run made by `selfscale train` (tests copy it before changing it)."""
    run = tmp_path_factory.mktemp("cli-run") / "run"
    assert main(["train", "--data", str(images), "--steps", "20", "--out", str(run), *TRAIN]) == 0
    return run


@pytest.fixture(scope="module")
def minimized(trained, tmp_path_factory):
    """The trained run minimized by seq at threshold 0.5 with 5 retrain steps, into a copy."""
    run = tmp_path_factory.mktemp("cli-min") / "run"
    assert main(["minimize", str(trained), "--out", str(run), "--strategy", "seq",
                 "--threshold", "0.5", "--retrain-steps", "5", "--finetune-steps", "10",
                 "--quiet"]) == 0
    return run


def _copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "copy")
    return tmp_path / "copy"


def test_train_writes_a_run_directory(trained):
    """The run directory holds the config (in config.toml only), metadata, state and history."""
    for name in ("config.toml", "run.json", "state.pt", "state.pt.sha256", "history.csv"):
        assert (trained / name).is_file(), name
    assert "[train]" in (trained / "config.toml").read_text()
    assert "config" not in json.loads((trained / "run.json").read_text())


def test_evaluate_prints_json_scores(trained, capsys):
    assert main(["evaluate", str(trained), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert set(scores) == {"f1", "mae", "mse", "uiqi", "n_images", "stage"}
    assert scores["n_images"] == 1 and scores["stage"] == "base"


def test_evaluate_refuses_a_crop_larger_than_an_image(trained, capsys):
    assert main(["evaluate", str(trained), "--crop", "500"]) == 2
    assert "--crop: 500 does not fit 1 eval image(s), e.g. im" in capsys.readouterr().err


def test_predict_writes_one_png_per_image_and_never_overwrites(trained, images, tmp_path, capsys):
    out = tmp_path / "pred"
    assert main(["predict", str(trained), str(images), "--out", str(out)]) == 0
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == [f"im{i}.png" for i in range(5)]
    arr = np.asarray(Image.open(pngs[0]))
    assert arr.shape == (36, 40) and arr.dtype == np.uint8
    assert main(["predict", str(trained), str(images), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["predict", str(trained), str(images), "--out", str(pngs[0])]) == 2
    assert "is a file" in capsys.readouterr().err


def test_info_shows_architecture_and_step(trained, capsys):
    assert main(["info", str(trained), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["step"] == 20 and info["architecture"]["parameters"] == 3 * 9 + 3 + 27 * 3 + 3 + 28
    assert main(["info", str(trained)]) == 0
    assert "layer 1  3/3 active" in capsys.readouterr().out


def test_resume_extends_the_run(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path)
    assert main(["train", "--out", str(run), "--resume", "--steps", "30", "--quiet"]) == 0
    assert "steps: 30" in capsys.readouterr().out


def test_resume_accepts_the_original_commands_flags(trained, images, tmp_path, capsys):
    """The original command repeated with --resume (and more --steps) continues the run."""
    run = _copy(trained, tmp_path)
    assert main(["train", "--data", str(images), "--steps", "25", "--out", str(run), *TRAIN,
                 "--resume"]) == 0
    assert "steps: 25" in capsys.readouterr().out


def test_resume_refuses_a_changed_flag_naming_both_values(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path)
    assert main(["train", "--out", str(run), "--resume", "--lr", "0.01", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--lr: cannot be changed when resuming (the run has 0.003, given 0.01)" in err
    assert main(["train", "--out", str(run), "--resume", "--task-param", "normalize=max"]) == 2
    assert "--task-param: cannot be changed" in capsys.readouterr().err


def test_minimize_writes_results_and_info_serves_the_minimized_network(minimized, capsys):
    """The seeded seq minimization at threshold 0.5 of a 20-step network keeps every change:
    four masks, then both hidden layers go, leaving one 3×3 convolution (which scores better)."""
    summary = json.loads((minimized / "minimize" / "summary.json").read_text())
    assert (summary["decisions"], summary["kept"]) == (6, 6)
    log = [json.loads(line) for line in (minimized / "minimize/decisions.jsonl").open()]
    assert [d["tried"] for d in log] == ["layer 1 mask 1", "layer 1 mask 2", "layer 2 mask 1",
                                         "layer 2 mask 2", "layer 1", "layer 2"]
    assert all(d["dead"] == [] for d in log)
    assert summary["widths_after"] == [1] and summary["parameters_after"] == 10
    assert summary["mask_matrix"] == [[False] * 3, [False] * 3, [True]]
    assert summary["scores_after"]["f1"] > summary["scores_before"]["f1"]
    assert main(["info", str(minimized)]) == 0
    text = capsys.readouterr().out
    assert "(minimized network)" in text and "masks per layer  3/3/1 -> 1 " in text


@pytest.mark.parametrize("fmt, ext", [("torch", "pt"), ("onnx", "onnx")])
def test_export_writes_the_compact_network(minimized, tmp_path, capsys, fmt, ext):
    assert main(["export", str(minimized), "--format", fmt, "--out", str(tmp_path / f"m.{ext}"),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_abs_diff"] <= 1e-5
    assert report["speed"]["masked_s"] > 0 and report["speed"]["compact_s"] > 0
    assert report["widths_after"] == [1] and report["params_after"] == 10


def test_predict_takes_a_compact_model_file(minimized, images, tmp_path):
    assert main(["export", str(minimized), "--out", str(tmp_path / "m.pt")]) == 0
    assert main(["predict", str(tmp_path / "m.pt"), str(images / "im0.png"),
                 "--out", str(tmp_path / "pred")]) == 0
    assert np.asarray(Image.open(tmp_path / "pred/im0.png")).shape == (36, 40)


def test_minimize_resume_with_nothing_saved_starts_from_the_beginning(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path)
    assert main(["minimize", str(run), "--resume", "--strategy", "seq", "--max-steps", "1",
                 "--finetune-steps", "0",
                 "--retrain-steps", "2", "--quiet"]) == 0
    assert "no minimization was saved" in capsys.readouterr().err
    assert json.loads((run / "minimize/summary.json").read_text())["decisions"] == 1


@pytest.mark.parametrize("recipe, steps", [("capacity", 7000), ("thesis", 2000)])
def test_minimize_retrains_as_long_as_the_runs_recipe_says(images, tmp_path, capsys, recipe,
                                                           steps):
    """Without --retrain-steps, a capacity-recipe run is retrained 7000 steps per decision and a
    thesis-recipe run the thesis's 2000 (a thesis step is 4× the pixels)."""
    run = tmp_path / "run"
    assert main(["train", "--data", str(images), "--steps", "2", "--recipe", recipe,
                 "--out", str(run), *TRAIN]) == 0
    capsys.readouterr()
    assert main(["minimize", str(run), "--max-steps", "0"]) == 0
    assert f"{steps} retrain steps" in capsys.readouterr().err


@pytest.mark.parametrize("argv, imports", [(["info"], False), (["evaluate"], False),
                                           (["minimize", "--max-steps", "0", "--finetune-steps",
                                             "0"], True)])
def test_only_minimizing_commands_import_the_minimize_package(trained, tmp_path, argv, imports):
    """evaluate, predict, info and export reach a run's networks without selfscale.minimize."""
    run = _copy(trained, tmp_path)
    code = ("import sys; from selfscale.cli import main; "
            f"main({[argv[0], str(run), *argv[1:], '--quiet'][:None if imports else 2]!r}); "
            "print('selfscale.minimize' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == str(imports)


@pytest.mark.parametrize("argv, needle", [
    (["train", "--task", "nope"], "invalid choice"),
    (["train", "--crop", "-3"], "--crop"),
    (["train", "--widths", "5,x,1"], "--widths"),
    (["train", "--widths", "5,5,2"], "--widths"),
    (["train", "--lr", "0"], "--lr"),
    (["train", "--conv", "fast"], "--conv"),
    (["train", "--data", "/does/not/exist", "--steps", "1"], "/does/not/exist"),
    (["train", "--task-param", "sigma"], "--task-param"),
    (["train", "--config", "/no/such.toml"], "--config"),
    (["evaluate", "/no/run"], "run directory not found"),
    (["minimize", "/no/run"], "run directory not found"),
    (["minimize", "/tmp", "--threshold", "1.5"], "--threshold"),
    (["minimize", "/tmp", "--strategy", "magic"], "--strategy"),
    (["minimize", "/tmp", "--abort-below", "1"], "--abort-below"),
    (["train", "--resume"], "--resume"),
])
def test_user_errors_are_one_line_with_exit_code_2(argv, needle, tmp_path, capsys, monkeypatch):
    """Bad flags, missing files and unknown names: one line on stderr, exit 2, no traceback."""
    monkeypatch.chdir(tmp_path)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert needle in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_corrupt_checkpoint_is_reported(images, tmp_path, capsys):
    """A flipped byte in state.pt → 'checkpoint is corrupt', exit 2."""
    run = tmp_path / "run"
    assert main(["train", "--data", str(images), "--steps", "2", "--out", str(run), *TRAIN]) == 0
    data = bytearray((run / "state.pt").read_bytes())
    data[100] ^= 0xFF
    (run / "state.pt").write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["info", str(run)]) == 2
    assert "checkpoint is corrupt" in capsys.readouterr().err


def test_existing_run_directory_is_never_overwritten(images, tmp_path, capsys):
    """train --out into a non-empty directory refuses and leaves the files alone."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "mine.txt").write_text("keep me")
    assert main(["train", "--data", str(images), "--steps", "2", "--out", str(run), *TRAIN]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (run / "mine.txt").read_text() == "keep me"


def test_config_file_is_used_and_flags_override_it(images, tmp_path, capsys):
    """--config TOML values apply; a flag given on the command line wins."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[data]\ndata = "{images}"\ncrop = 24\n[train]\nsteps = 4\nlr = 0.002\n')
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--steps", "3", "--out", str(run), *TRAIN]) == 0
    capsys.readouterr()
    assert main(["info", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["step"] == 3 and info["config"]["train"]["lr"] == 0.003  # TRAIN's --lr wins


def test_demo_runs_end_to_end_on_bundled_images(tmp_path, capsys):
    """`selfscale demo` with tiny settings writes the run, exports and pictures."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "20", "--train-crop", "32",
                 "--retrain-steps", "5", "--finetune-steps", "5", "--threads", "1",
                 "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "masks per layer  5/5/1 ->" in text and "onnxruntime" in text
    for name in ("minimize/summary.json", "export/compact.pt", "export/compact.onnx",
                 "preview.png", "masks_base.png", "masks_minimized.png",
                 "pictures/masks.png", "pictures/outputs.png", "pictures/decisions.png"):
        assert (out / name).is_file(), name
    preview = Image.open(out / "preview.png")
    assert preview.size[0] > 4 * 256 and preview.size[1] > 4 * 256


def test_a_runs_config_toml_reproduces_the_run(images, tmp_path, capsys):
    """--config RUN/config.toml (canny: parameters that default to None included) gives a run
    with the same config and, with the same seed and threads, the same weights."""
    from selfscale.checkpoint import load_state

    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", "--data", str(images), "--steps", "4", "--out", str(a),
                 *[x if x != "sobel" else "canny" for x in TRAIN]]) == 0
    assert main(["train", "--config", str(a / "config.toml"), "--out", str(b), "--quiet"]) == 0
    capsys.readouterr()
    infos = []
    for run in (a, b):
        assert main(["info", str(run), "--json"]) == 0
        infos.append(json.loads(capsys.readouterr().out)["config"])
    assert infos[0] == infos[1]
    sa, sb = load_state(a / "state.pt"), load_state(b / "state.pt")
    assert all(sa["model"][k].equal(sb["model"][k]) for k in sa["model"])


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "info", "minimize",
                                     "export", "demo"])
def test_every_subcommand_has_help(command, capsys):
    """`selfscale COMMAND --help` documents its options and exits 0."""
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "--" in capsys.readouterr().out


def test_resume_and_output_path_errors(images, tmp_path, capsys):
    """Resume below the current step, a bool where a number belongs, --out under a file, and
    train --resume on a minimized run are one-line errors with exit code 2."""
    run = tmp_path / "run"
    assert main(["train", "--data", str(images), "--steps", "4", "--out", str(run), *TRAIN]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--steps", "2", "--quiet"]) == 2
    assert "already at step 4" in capsys.readouterr().err
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nlr = true\n")
    assert main(["train", "--config", str(cfg), "--quiet"]) == 2
    assert "--lr" in capsys.readouterr().err
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert main(["predict", str(run), str(images), "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("selfscale: error:") and len(err.strip().splitlines()) == 1
    assert main(["minimize", str(run), "--strategy", "seq", "--retrain-steps", "2",
                 "--finetune-steps", "4",
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--steps", "9", "--quiet"]) == 2
    assert "has been minimized" in capsys.readouterr().err
    (run / "minimize" / "final.pt").unlink()
    assert main(["evaluate", str(run)]) == 2
    assert "has not finished" in capsys.readouterr().err


@pytest.mark.parametrize("command, classes", [
    ("train", ("DataConfig", "TaskConfig", "ModelConfig", "TrainConfig")),
    ("minimize", ("MinimizeConfig",)), ("demo", ("DemoConfig",))])
def test_flags_are_generated_from_every_documented_config_field(command, classes, capsys):
    """Each field whose docstring names a flag is an option of the subcommand, with that text."""
    import selfscale.config
    import selfscale.demo
    from selfscale.flags import field_docs, flag_help

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in classes:
        cls = getattr(selfscale.config, name, None) or getattr(selfscale.demo, name)
        for doc in field_docs(cls).values():
            flag, help_ = flag_help(doc)
            if flag is not None:
                assert flag in text and help_[:30] in text, (name, flag)
