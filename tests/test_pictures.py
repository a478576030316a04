"""``selfscale visualize`` and the pictures it draws: panel counts follow the network, removed masks
are crossed out and the kernels reading them greyed, training snapshots are stored (and resume
to the same bytes), and bad input is one line with exit code 2."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from selfscale import visualize as V
from selfscale.cli import main
from selfscale.config import DataConfig, ModelConfig, RunConfig, TaskConfig, TrainConfig
from selfscale.model import FCN
from selfscale.run import load_run, prepare_data, resume_run, start_run, train_run
from selfscale.snapshots import read_snapshots

WIDTHS, KERNEL = (3, 2, 1), 3


def _config(imgs, cache, steps):
    return RunConfig(
        data=DataConfig(data=imgs, crop=32, train_crop=None, batch=2, eval_fraction=0.34,
                        cache_dir=cache),
        task=TaskConfig(name="sobel"), model=ModelConfig(widths=WIDTHS, kernel=KERNEL),
        train=TrainConfig(steps=steps, eval_every=10, lr=0.003, schedule="constant", seed=0,
                          device="cpu", threads=1, snapshot_every=10))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, rect_folder):
    """A 3/2/1 run (kernel 3) trained 30 steps with a snapshot every 10 steps."""
    root = tmp_path_factory.mktemp("pictures")
    imgs = rect_folder("pic-imgs", 6, (40, 44), seed=1, corner=(3, 20), size=(15, 17), level=0.9)
    run = start_run(_config(imgs, root / "c", 30), root / "run")
    train_run(run, prepare_data(run.config))
    return run.path


def grid_size(rows: list[list[tuple[int, int]]]) -> tuple[int, int]:
    """(width, height) of a tile grid whose tiles have these (height, width), from the layout
    constants documented in selfscale.visualize.tile_grid."""
    width = V.LEFT + max(sum(w for _, w in r) + V.GAP * (len(r) + 1) for r in rows)
    return width, V.GAP + sum(V.LABEL_H + r[0][0] + V.GAP for r in rows)


def mask_tile(inputs: int) -> tuple[int, int]:
    return KERNEL * V.CELL, inputs * KERNEL * V.CELL + (inputs - 1) * V.SEP


def test_mask_picture_has_one_tile_per_mask_and_marks_removed_ones():
    """Rows of 3, 2, 1 tiles; the removed mask 2 of layer 1 is a crossed grey tile, and in
    layer 2 the kernels reading it are grey while the others are coloured."""
    model = FCN(WIDTHS, KERNEL)
    model.set_enabled(0, 1, False)
    tiles = V.mask_tiles(model)
    assert [len(r) for r in tiles] == list(WIDTHS)
    assert [t.shape[:2] for t in tiles[1]] == [mask_tile(3)] * 2
    removed = tiles[0][1]
    assert (removed == V.CROSS).all(axis=-1).any() and (removed == V.DISABLED).all(axis=-1).any()
    pitch = KERNEL * V.CELL + V.SEP
    for c in range(3):
        kernel = tiles[1][0][:, c * pitch:c * pitch + KERNEL * V.CELL]
        assert (kernel == V.UNUSED).all() == (c == 1)
    picture = V.mask_picture(model)
    assert picture.size == grid_size([[mask_tile(i)] * w for i, w in zip((1, 3, 2), WIDTHS)])


def test_outputs_picture_has_the_input_and_every_mask_of_every_layer():
    model = FCN(WIDTHS, KERNEL)
    model.set_enabled(1, 0, False)
    image = np.linspace(0, 1, 30 * 36, dtype=np.float32).reshape(30, 36)
    outs = V.layer_outputs(model, image)
    assert [o.shape for o in outs] == [(w, 30, 36) for w in WIDTHS]
    assert not outs[1][0].any()  # a removed mask outputs zero
    picture = V.outputs_picture(model, image, side=20)
    assert picture.size == grid_size([[(20, 20)]] + [[(20, 20)] * w for w in WIDTHS])


def test_training_stores_snapshots_that_resume_to_the_same_bytes(run_dir, tmp_path,
                                                                 rect_folder):
    inputs, targets, steps = read_snapshots(run_dir)
    assert sorted(steps) == [0, 10, 20, 30]
    assert inputs.dtype == targets.dtype == steps[30].dtype == np.uint8
    assert inputs.shape == targets.shape == steps[0].shape and inputs.shape[1:] == (40, 40)  # SIDE 64 > the 40-pixel images
    # the same run stopped at step 20 and resumed to 30 stores the same snapshots
    config = load_run(run_dir).config
    half = start_run(_config(config.data.data, tmp_path / "c", 20), tmp_path / "half")
    train_run(half, prepare_data(half.config))
    whole = resume_run(half.path, {"train": {"steps": 30}})
    train_run(whole, prepare_data(whole.config))
    again = read_snapshots(half.path)[2]
    assert sorted(again) == sorted(steps) and all((again[s] == steps[s]).all() for s in steps)


def test_visualize_writes_every_picture(run_dir, tmp_path, capsys):
    out = tmp_path / "pics"
    assert main(["visualize", str(run_dir), "--out", str(out), "--steps", "0,30"]) == 0
    assert "base network" in capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == ["curves.png", "curves.svg", "masks.png", "outputs.png", "snapshots.png"]
    for name in ("curves.png", "masks.png", "outputs.png", "snapshots.png"):
        with Image.open(out / name) as im:
            im.verify()
    with Image.open(out / "masks.png") as im:
        assert im.size == grid_size([[mask_tile(i)] * w for i, w in zip((1, 3, 2), WIDTHS)])
    with Image.open(out / "snapshots.png") as im:  # input, target, 2 steps × the eval crops
        n = len(read_snapshots(run_dir)[0])
        assert im.size == (4 * (40 + 4) + 4, n * (40 + 4) + 4 + 14)
    image = tmp_path / "in.png"
    Image.fromarray(np.full((20, 24), 128, np.uint8)).save(image)
    assert main(["visualize", str(run_dir), "--image", str(image), "--out", str(out)]) == 0
    with Image.open(out / "outputs.png") as im:
        assert im.size == grid_size([[(V.TILE, V.TILE)]]
                                    + [[(V.TILE, V.TILE)] * w for w in WIDTHS])


@pytest.mark.parametrize("extra, message", [
    (["--stage", "minimized"], "has not been minimized"),
    (["--image", "missing.png"], "--image: "),
    (["--steps", "5"], "--steps: no snapshot at step 5"),
])
def test_bad_input_is_one_line_and_exit_2(run_dir, tmp_path, capsys, extra, message):
    assert main(["visualize", str(run_dir), *extra, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_folder_that_is_not_a_run_or_a_broken_image_is_refused(tmp_path, run_dir, capsys):
    assert main(["visualize", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a selfscale run directory" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    assert main(["visualize", str(run_dir), "--image", str(bad), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--image: " in err and err.count("\n") == 1


def test_decision_points_separate_retrains_stopped_early(tmp_path):
    """decisions.png: kept, stepped back after a whole retrain, and stopped early
    (--abort-below) are three kinds of marker; a log from before --abort-below has no third."""
    from selfscale.pictures import decision_points, decisions_figure

    log = [{"kept": True, "score": 0.9, "stopped_early": False},
           {"kept": False, "score": 0.8, "stopped_early": False},
           {"kept": False, "score": 0.2, "stopped_early": True},
           {"kept": False, "score": 0.7}]
    assert decision_points(log) == {"kept": [(1, 0.9)], "stepped back": [(2, 0.8), (4, 0.7)],
                                    "stopped early": [(3, 0.2)]}
    for d in log:
        d |= {"reference": 1.0, "threshold": 0.95, "tried": "layer 1", "metric": "f1"}
    png = decisions_figure(log, tmp_path / "decisions")
    assert png.is_file() and Image.open(png).size[0] > 100
