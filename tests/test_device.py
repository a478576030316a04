"""The command line's whole path on the device of `pytest --device` (cpu by default; run
`pytest --device cuda tests/test_device.py` on a GPU machine): train, exact resume, a
minimization whose retrains run on the active channels, evaluate, export and predict."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from selfscale.checkpoint import load_state
from selfscale.cli import main

TRAIN = ["--task", "sobel", "--crop", "24", "--train-crop", "24", "--batch", "2",
         "--widths", "4,4,1", "--kernel", "3", "--init", "he", "--lr", "0.003", "--schedule", "constant", "--loss", "mse",
         "--eval-every", "10", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def images(rect_folder):
    return rect_folder("device-imgs", 5, (36, 40), seed=4, corner=(2, 16), size=(14, 16),
                       level=220 / 255)


def _weights(run):
    return load_state(run / "state.pt")["model"]


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def trained(images, device, tmp_path_factory):
    run = tmp_path_factory.mktemp("device") / "run"
    assert main(["train", "--data", str(images), "--steps", "30", "--device", device,
                 "--out", str(run), *TRAIN]) == 0
    return run


def test_training_on_the_device_is_reproducible_and_resumes_exactly(trained, images, device,
                                                                    tmp_path):
    again, part = tmp_path / "again", tmp_path / "part"
    assert main(["train", "--data", str(images), "--steps", "30", "--device", device,
                 "--out", str(again), *TRAIN]) == 0
    assert _same(_weights(trained), _weights(again))
    assert main(["train", "--data", str(images), "--steps", "20", "--device", device,
                 "--out", str(part), *TRAIN]) == 0
    assert main(["train", "--out", str(part), "--resume", "--steps", "30",
                 "--device", device, "--quiet"]) == 0
    assert _same(_weights(trained), _weights(part))
    assert json.loads((trained / "run.json").read_text())["device"].startswith(device)


def test_device_training_agrees_with_the_cpu(trained, images, device, tmp_path):
    """Float differences only (cuDNN may use TF32 on recent GPUs): the same seed lands close."""
    if device == "cpu":
        pytest.skip("compares another device with the cpu")
    cpu = tmp_path / "cpu"
    assert main(["train", "--data", str(images), "--steps", "30", "--device", "cpu",
                 "--out", str(cpu), *TRAIN]) == 0
    a, b = _weights(trained), _weights(cpu)
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 5e-3


def test_minimize_evaluate_export_predict_on_the_device(trained, images, device, tmp_path,
                                                        capsys):
    run = tmp_path / "min"
    args = ["minimize", str(trained), "--out", str(run), "--strategy", "seq", "--threshold",
            "0.3", "--retrain-steps", "6", "--finetune-steps", "6", "--device", device,
            "--quiet"]
    assert main(args) == 0
    summary = json.loads((run / "minimize/summary.json").read_text())
    assert summary["masks_after"] < summary["masks_before"]
    again = tmp_path / "min2"
    assert main([*args[:3], str(again), *args[4:]]) == 0
    a = load_state(run / "minimize/final.pt")["model"]
    b = load_state(again / "minimize/final.pt")["model"]
    assert _same(a, b)  # same seed, same device: same decisions and weights

    capsys.readouterr()
    assert main(["evaluate", str(run), "--json", "--device", device]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["f1"] == pytest.approx(summary["scores_after"]["f1"], abs=1e-5)

    assert main(["export", str(run), "--device", device, "--out", str(tmp_path / "net.pt")]) == 0
    assert main(["export", str(run), "--device", device,
                 "--out", str(tmp_path / "net.onnx")]) == 0
    out = tmp_path / "pred"
    first = sorted(images.iterdir())[0]
    assert main(["predict", str(run), str(first), "--out", str(out), "--device", device]) == 0
    pngs = list(out.glob("*.png"))
    assert len(pngs) == 1
    from PIL import Image
    assert np.asarray(Image.open(pngs[0])).shape == (36, 40)
    shutil.rmtree(out)


def test_the_other_tests_run_on_the_cpu_on_a_gpu_machine_too():
    """conftest hides CUDA from every test that does not take ``device`` under ``pytest --device
    cuda``, here and in the processes it starts: on a GPU machine five tests that rely on
    ``--device auto`` meaning the CPU (the recorded --conv, exact resume in a subprocess) failed."""
    from selfscale.train import resolve_device

    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert not torch.cuda.is_available()
    assert resolve_device("auto").type == "cpu"
