"""How fast selfscale trains, retrains, infers and minimizes, as ratios measured within one run.

Machines are shared and noisy, so every figure is a RATIO of things measured in the same run: the
things compared run in alternating chunks (``--chunk-seconds`` each, ``--repeats`` rounds) and
each keeps its best chunk (:func:`best_rate`). Raw rates go to the JSON, never into claims.

* ``train``: ``selfscale.train.train_step`` vs a plain PyTorch port of the thesis's training
  (:class:`PlainPort`) at 256² and 128² crops, batch 3; with ``--conv direct`` also against the
  same step on PyTorch's convolutions (``--conv torch``); the step's GFLOP/s as a share of sgemm's;
  both as whole processes (``selfscale train`` vs ``--plain-port-child``: marginal steps/s between
  two step counts); ``torch.compile`` of forward + loss (compile time, steps to pay it back).
* ``retrain``: ``minimize.loop.retrain`` (active channels only) with k of the 10 prunable masks
  off vs the masked ``train`` loop with none off, against the MAC reduction (efficiency target
  ≥ 0.7); the masked loop with k off is in the JSON (on ``--conv direct`` it skips them too), and
  so is one ``train_step`` of the narrow network on a fixed batch (what a step costs without
  sampling its batch and the loop around it).
* ``inference``: 5/5/1 vs a compact 3/2/1 in PyTorch and ONNX Runtime (≥ 0.8 × MAC reduction).
* ``minimize``: a small minimization's wall time (400-step retrains and fine-tune) by training
  steps, evaluation, checkpointing, batch sampling and the rest (target: all but training steps,
  a step being its batch and its update, ≤ 10 %).
* ``study``: ``selfscale study strategies --scale laptop --strategies l1 --thresholds 0.9,0.98``
  (``--quick``: ``--scale smoke``), 2 workers vs 1 (target ≤ 0.6; CPU); left out of
  ``--quick`` unless named in ``--only``.

    python benchmarks/speed.py --out /tmp/speed.json --threads 1
    python benchmarks/speed.py --quick --only train,retrain,inference --out /tmp/quick.json
    # retrains and a minimization as today's default recipe runs them (3 crops, 7000/17 500)
    python benchmarks/speed.py --only retrain,minimize --retrain-batch 3 --retrain-steps 7000 \\
        --min-steps 2000,7000,17500 --out /tmp/speed-b3.json
    python benchmarks/speed.py --device cuda --only train,retrain,inference --out /tmp/gpu.json
    python benchmarks/speed.py --conv torch --out /tmp/speed-torch.json   # before the kernels

``--conv`` (default auto) picks the CPU convolution for every section, as ``selfscale train
--conv`` does (:mod:`selfscale.direct`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

SECTIONS = ("train", "retrain", "inference", "minimize", "study")
WIDTHS, KERNEL = (5, 5, 1), 5
RETRAIN_KS = (0, 2, 4, 6, 8)
COMPACT_OFF = ((0, 3), (0, 4), (1, 2), (1, 3), (1, 4))
"""Masks switched off for the inference section: 5/5/1 → 3/2/1."""
TIMED = {"training steps": (("selfscale.train", "train_step"),
                            ("selfscale.direct_step", "train_steps")),
         "evaluation": (("selfscale.train", "evaluate"),),
         "checkpointing": (("selfscale.checkpoint", "save_state"),
                           ("selfscale.checkpoint", "atomic_write_text"),
                           ("selfscale.checkpoint", "atomic_write_bytes")),
         "batch sampling": (("selfscale.crops", "sample_batch"),
                            ("selfscale.crops", "BatchStream.take"))}
"""What the minimize section times, by category: (module, function or Class.method), wrapped
wherever imported (a method: on its class). ``direct_step.train_steps`` is several steps with
their batches, sampled in the same call."""
STUDY_TIMEOUT = 1200


@dataclass(frozen=True)
class Sizes:
    """The sizes of a run (FULL, or QUICK for tests and CI)."""

    crops: tuple[int, int]  # the train section's crops (the first: whole processes, compile)
    batch: int
    e2e_steps: tuple[int, int]  # step counts of the whole-process runs; the larger one grows
    e2e_seconds: float  # until its extra steps take this long in-process (a GPU's are fast)
    rounds: int | None  # rounds of whole-process runs (None: --repeats)
    retrain_steps: int  # steps per timed retrain call
    data: dict[str, int]  # data overrides of the capacity recipe (retrain, minimize)
    infer: tuple[int, int]  # images, side
    min_steps: tuple[int, int, int]  # minimize: base, retrain, fine-tune steps
    repeats: int
    chunk_seconds: float
    compile: bool  # weigh torch.compile (a first compile takes tens of seconds)
    study: tuple[str, ...]  # the study compared on 1 and 2 workers


# FULL's retrains and minimization use 12 crops of 64² per step: selfscale 0.2.0's default recipe,
# with which the README's first table was measured (today's default is 3 crops: --retrain-batch).
FULL = Sizes((256, 128), 3, (100, 600), 20.0, None, 400, {"batch": 12}, (4, 512),
             (2000, 400, 400), 3, 2.0, True,
             ("--scale", "laptop", "--strategies", "l1", "--thresholds", "0.9,0.98"))
QUICK = Sizes((64, 32), 3, (10, 40), 0.0, 1, 5, {"train_crop": 32, "crop": 64, "batch": 4},
              (2, 128), (100, 10, 10), 2, 0.05, False, ("--scale", "smoke"))


# --- pure helpers -------------------------------------------------------------------------------
def step_flops(widths=WIDTHS, kernel=KERNEL, crop=256, batch=3) -> int:
    """FLOPs of one training step: 3 (forward, two backward products) × 2 × MACs × pixels."""
    from selfscale.model import macs_per_pixel

    return 3 * 2 * macs_per_pixel(widths, kernel) * crop * crop * batch


def disabled_masks(k: int) -> list[tuple[int, int]]:
    """(layer, mask) of k masks off, alternately in layers 1 and 2, last first; mask 0 stays."""
    if not 0 <= k <= 2 * (WIDTHS[0] - 1):
        raise ValueError(f"k must be in 0..{2 * (WIDTHS[0] - 1)}, got {k}")
    return [(i % 2, WIDTHS[0] - 1 - i // 2) for i in range(k)]


def widths_without(off) -> tuple[int, ...]:
    return tuple(w - sum(1 for layer, _ in off if layer == i) for i, w in enumerate(WIDTHS))


def mac_reduction(off) -> float:
    """MACs per pixel of 5/5/1 over those left when the masks ``off`` are disabled."""
    from selfscale.model import macs_per_pixel

    return macs_per_pixel(WIDTHS, KERNEL) / macs_per_pixel(widths_without(off), KERNEL)


def best_rate(fns: dict[str, Callable[[], int | None]], *, repeats: int, chunk_seconds: float,
              warmup: int = 1, clock: Callable[[], float] = time.perf_counter,
              sync: Callable[[], None] = lambda: None) -> dict[str, dict[str, Any]]:
    """Units per second of each callable, in alternating chunks: each of ``repeats`` rounds runs
    every fn in turn, repeatedly for at least ``chunk_seconds`` (at least once); each keeps its
    best chunk. ``fn()`` returns the units of work it did as an int (anything else: 1); ``sync`` runs when a chunk's
    clock starts and stops (torch.cuda.synchronize on CUDA). → {name: {"chunks", "best"}}."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    chunks: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start, units = clock(), 0
            while True:
                done = fn()
                units += done if isinstance(done, int) else 1
                if clock() - start >= chunk_seconds:
                    break
            sync()
            elapsed = clock() - start
            chunks[name].append(units / elapsed if elapsed > 0 else float("inf"))
    return {name: {"chunks": c, "best": max(c)} for name, c in chunks.items()}


def marginal_rate(n1: int, t1: float, n2: int, t2: float) -> float | None:
    """Steps/s between runs of n1 < n2 steps (start-up costs cancel); None when the longer run
    was not slower (noise above the steps' cost)."""
    return (n2 - n1) / (t2 - t1) if t2 > t1 else None


def payback_steps(compile_s: float, eager: float, compiled: float) -> float | None:
    """Steps after which compiling (``compile_s``) has paid for itself; None if never."""
    return compile_s / (1 / eager - 1 / compiled) if compiled > eager else None


def row(what: str, ratio: float | None, target: tuple[str, float] | None = None,
        note: str = "") -> dict[str, Any]:
    """One table row; ``target`` = (">=" or "<=", value)."""
    met = None
    if target is not None and ratio is not None:
        met = ratio >= target[1] if target[0] == ">=" else ratio <= target[1]
    return {"what": what, "ratio": ratio, "target": target, "met": met, "note": note}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| figure | ratio | target | met |", "| --- | --- | --- | --- |"]
    for r in rows:
        ratio = "–" if r["ratio"] is None else f"{r['ratio']:.3g}"
        target = "–" if r["target"] is None else \
            f"{'≥' if r['target'][0] == '>=' else '≤'} {r['target'][1]:g}"
        met = {None: "–", True: "yes", False: "no"}[r["met"]]
        note = f" ({r['note']})" if r["note"] else ""
        lines.append(f"| {r['what']}{note} | {ratio} | {target} | {met} |")
    return "\n".join(lines)


def failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"


# --- the plain port (what a user would write from the thesis's TF code) --------------------------
def plain_net(widths=WIDTHS, kernel=KERNEL) -> nn.Sequential:
    layers, c = [], 1
    for w in widths:
        layers += [nn.Conv2d(c, w, kernel, padding=kernel // 2), nn.ReLU()]
        c = w
    return nn.Sequential(*layers)


def plain_f1_loss(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Soft-F1 loss of thesis 2.3.1 written inline: per image E/(2·TP + E), batch mean."""
    tp, e = (p * t).sum(dim=(1, 2, 3)), (p - t).abs().sum(dim=(1, 2, 3))
    return (e / (2 * tp + e)).mean()


class PlainPort:
    """Adam 1e-3 on an NCHW nn.Sequential, crops cut with numpy offsets, loss.item() each step."""

    def __init__(self, inputs, targets, crop: int, batch: int, device, seed: int = 0) -> None:
        self.inputs, self.targets = [np.array(a) for a in inputs], [np.array(a) for a in targets]
        self.crop, self.batch, self.device = crop, batch, device
        self.net = plain_net().to(device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-3)
        self.rng = np.random.default_rng(seed)

    def step(self) -> float:
        xs, ys, c = [], [], self.crop
        for _ in range(self.batch):
            k = self.rng.integers(len(self.inputs))
            h, w = self.inputs[k].shape
            top, left = self.rng.integers(h - c + 1), self.rng.integers(w - c + 1)
            xs.append(self.inputs[k][top:top + c, left:left + c])
            ys.append(self.targets[k][top:top + c, left:left + c])
        x = torch.from_numpy(np.stack(xs)[:, None]).to(self.device)
        y = torch.from_numpy(np.stack(ys)[:, None]).to(self.device)
        self.opt.zero_grad()
        loss = plain_f1_loss(self.net(x), y)
        loss.backward()
        self.opt.step()
        return loss.item()


# --- shared plumbing ------------------------------------------------------------------------------
@dataclass
class Ctx:
    sizes: Sizes
    device: torch.device
    threads: int
    repeats: int
    chunk_seconds: float
    conv: str = "torch"

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def rates(self, fns, **kw) -> dict[str, dict[str, Any]]:
        return best_rate(fns, sync=self.sync, **{"repeats": self.repeats,
                                                 "chunk_seconds": self.chunk_seconds, **kw})


def load_data(overrides: dict[str, Any] | None = None, device: str = "cpu"):
    """The bundled sobel images (cached arrays) and the resolved capacity-recipe config."""
    from selfscale.config import RunConfig
    from selfscale.run import prepare_data, resolve_config

    cfg = resolve_config(RunConfig.from_dict({"task": {"name": "sobel"}, "data": overrides or {},
                                              "train": {"device": device}}))
    return prepare_data(cfg), cfg


def selfscale_stepper(data, crop: int, batch: int, device, compiled: bool = False,
                      conv: str | None = None):
    """One selfscale training step per call (thesis init, Adam 1e-3, soft-F1); ``compiled``:
    train_step's body with forward + loss under torch.compile; ``conv``: run the step on that
    convolution (selfscale.direct.use) and switch back after it."""
    from selfscale.crops import sample_batch
    from selfscale.metrics import LOSSES
    from selfscale.model import build_model
    from selfscale.train import as_input, make_optimizer, to_device, train_step

    model = to_device(build_model(WIDTHS, KERNEL, 1, 0.05, 0), device)
    opt, rng = make_optimizer(model, 1e-3), np.random.default_rng(0)
    fused = torch.compile(lambda x, y: LOSSES["f1"](model(x), y)) if compiled else None

    def step() -> None:
        x, y = (as_input(a, device) for a in sample_batch(data.train, rng, batch, crop, False))
        if fused is None:
            train_step(model, opt, x, y, LOSSES["f1"])
            return
        opt.zero_grad(set_to_none=True)
        loss = fused(x, y)
        loss.backward()
        opt.step()
        float(loss.detach())
    return step if conv is None else partial(on_conv, conv, step)


def process_fn(cmd_for: Callable[[Path], list[str]], root: Path,
               timeout: float | None = None) -> Callable[[], None]:
    """A callable that runs one command (given a fresh --out path under ``root``) to its end."""
    def run() -> None:
        out = Path(tempfile.mkdtemp(dir=root)) / "run"
        done = subprocess.run(cmd_for(out), check=False, capture_output=True, text=True,
                              timeout=timeout)
        shutil.rmtree(out.parent, ignore_errors=True)
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"{' '.join(cmd_for(out)[1:5])} … failed: {last}")
    return run


# --- sections -------------------------------------------------------------------------------------
def section_train(ctx: Ctx) -> tuple[list, dict]:
    s, dev = ctx.sizes, ctx.device
    data, _ = load_data()
    fns: dict[str, Callable] = {}
    vs_torch = ctx.conv == "direct" and dev.type == "cpu"
    for crop in s.crops:
        fns[f"selfscale {crop}"] = selfscale_stepper(data, crop, s.batch, dev)
        if vs_torch:
            fns[f"torch-conv {crop}"] = selfscale_stepper(data, crop, s.batch, dev, conv="torch")
        fns[f"plain {crop}"] = PlainPort(data.train.inputs, data.train.targets, crop, s.batch,
                                         dev).step
    fns["sgemm 1024"] = partial(torch.mm, *torch.rand(2, 1024, 1024, device=dev))
    rates = ctx.rates(fns)
    sgemm = rates["sgemm 1024"]["best"] * 2 * 1024**3
    raw: dict[str, Any] = {"steps_per_s": rates, "sgemm_flops_per_s": sgemm}
    rows = []
    for crop in s.crops:
        ours, plain = rates[f"selfscale {crop}"]["best"], rates[f"plain {crop}"]["best"]
        raw[f"sgemm_share_{crop}"] = share = ours * step_flops(crop=crop, batch=s.batch) / sgemm
        rows += [row(f"train {crop}²×{s.batch}: selfscale / plain port steps/s", ours / plain,
                     (">=", 1.0)),
                 row(f"train {crop}²×{s.batch}: step GFLOP/s / sgemm GFLOP/s", share)]
        if vs_torch:
            rows.append(row(f"train {crop}²×{s.batch}: --conv direct / --conv torch steps/s",
                            ours / rates[f"torch-conv {crop}"]["best"], (">=", 1.0)))
    raw["end_to_end"] = e2e = end_to_end(ctx, rates[f"selfscale {s.crops[0]}"]["best"])
    note = f"steps {e2e['steps'][0]}→{e2e['steps'][1]}" + (
        "; not measurable: the longer run was not slower" if e2e["ratio"] is None else "")
    rows.append(row(f"end-to-end {s.crops[0]}²×3 processes: selfscale train / plain port "
                    "marginal steps/s", e2e["ratio"], (">=", 4.0), note))
    raw["compile"] = c = compile_figures(ctx, data) if s.compile else "skipped in --quick"
    if isinstance(c, str):
        return [*rows, row("torch.compile of forward + loss", None, note=c)], raw
    pay = "never paid back" if c["payback_steps"] is None else \
        f"paid back after {c['payback_steps']:.0f} steps"
    return [*rows, row(f"torch.compile {s.crops[0]}²: compiled / eager steps/s", c["ratio"],
                       note=f"compile {c['compile_s']:.1f} s, {pay}")], raw


def end_to_end(ctx: Ctx, rate: float) -> dict[str, Any]:
    """Marginal steps/s of ``selfscale train`` and of the plain port, each as its own process
    (``rate``: selfscale's in-process steps/s at this crop, which sizes the longer run)."""
    s, dev, t = ctx.sizes, ctx.device.type, str(ctx.threads)
    n1, crop = s.e2e_steps[0], str(s.crops[0])
    n2 = max(s.e2e_steps[1], n1 + round(rate * s.e2e_seconds))

    def ours(n: int, out: Path) -> list[str]:
        return [sys.executable, "-m", "selfscale", "train", "--task", "sobel", "--recipe",
                "thesis", "--steps", str(n), "--out", str(out), "--threads", t, "--eval-every",
                str(n), "--seed", "0", "--device", dev, "--crop", crop, "--conv", ctx.conv,
                "--quiet"]

    def plain(n: int, out: Path) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "--plain-port-child", str(n),
                "--crop", crop, "--threads", t, "--device", dev]

    with tempfile.TemporaryDirectory() as tmp:
        fns = {f"{who} {n}": process_fn(partial(cmd, n), Path(tmp))
               for who, cmd in (("selfscale", ours), ("plain", plain)) for n in (n1, n2)}
        rates = ctx.rates(fns, repeats=s.rounds or ctx.repeats, chunk_seconds=0.0, warmup=0)
    secs = {k: 1 / v["best"] for k, v in rates.items()}
    marg = {who: marginal_rate(n1, secs[f"{who} {n1}"], n2, secs[f"{who} {n2}"])
            for who in ("selfscale", "plain")}
    ratio = None if None in marg.values() else marg["selfscale"] / marg["plain"]
    return {"steps": [n1, n2], "seconds_best": secs, "runs_per_s": rates,
            "marginal_steps_per_s": marg, "ratio": ratio}


def compile_figures(ctx: Ctx, data) -> dict[str, Any] | str:
    """torch.compile of forward + loss at the first crop; any failure → 'unavailable: …'."""
    crop, batch = ctx.sizes.crops[0], ctx.sizes.batch
    try:
        eager = selfscale_stepper(data, crop, batch, ctx.device)
        compiled = selfscale_stepper(data, crop, batch, ctx.device, compiled=True)
        ctx.sync()
        t0 = time.perf_counter()
        compiled()
        ctx.sync()
        first = time.perf_counter() - t0
        rates = ctx.rates({"eager": eager, "compiled": compiled})
    except Exception as exc:  # noqa: BLE001 - no compiler, an unsupported op…: record, go on
        return f"unavailable: {failure(exc)}"
    e, c = rates["eager"]["best"], rates["compiled"]["best"]
    compile_s = max(first - 1 / c, 0.0)
    return {"steps_per_s": rates, "first_step_s": first, "compile_s": compile_s, "ratio": c / e,
            "payback_steps": payback_steps(compile_s, e, c)}


def section_retrain(ctx: Ctx) -> tuple[list, dict]:
    from selfscale.metrics import LOSSES
    from selfscale.model import build_model
    from selfscale.train import (
        TrainSpec,
        TrainState,
        make_optimizer,
        new_state,
        to_device,
        train,
        train_step,
    )

    try:
        from selfscale.minimize.active import train_active  # noqa: F401 - is it there?
        from selfscale.minimize.loop import retrain
    except ImportError as exc:
        retrain, missing = None, f"active-channel training not available ({failure(exc)})"
    data, cfg = load_data(ctx.sizes.data, ctx.device.type)
    spec, n = TrainSpec.from_config(cfg, ctx.device), ctx.sizes.retrain_steps

    def masked(st: TrainState) -> int:
        train(st, data.train, data.eval, spec.for_retrain(st.step, n), until_step=st.step + n)
        return n

    def active(st: TrainState) -> int:
        retrain(st, n, spec, data)
        return n

    fns: dict[str, Callable] = {}
    crops, targets = (torch.rand(cfg.data.batch, 1, cfg.data.train_crop, cfg.data.train_crop,
                                 device=ctx.device).contiguous(memory_format=torch.channels_last)
                      for _ in range(2))
    loss_fn = LOSSES[cfg.train.loss]

    def one_step(model, optimizer) -> None:  # one update on a fixed batch: no sampling, no loop
        train_step(model, optimizer, crops, targets, loss_fn)

    for k in RETRAIN_KS:
        widths = widths_without(disabled_masks(k))
        narrow = to_device(build_model(widths, KERNEL, 1, spec.init, 0), ctx.device)
        fns[f"step k={k}"] = partial(one_step, narrow, make_optimizer(narrow, 1e-6))
        base = new_state(build_model(WIDTHS, KERNEL, 1, spec.init, 0), spec.lr, 0, ctx.device)
        for layer, mask in disabled_masks(k):  # as the minimizer does: disabled and frozen
            base.model.set_enabled(layer, mask, False)
            base.model.set_frozen(layer, mask, True)
        base.reset_optimizer()
        for name, fn in (("masked", masked), ("active", active))[:2 if retrain else 1]:
            clone = TrainState.from_dict(copy.deepcopy(base.to_dict()), ctx.device)
            fns[f"{name} k={k}"] = partial(fn, clone)
    rates = ctx.rates(fns)
    raw: dict[str, Any] = {"steps_per_retrain": n, "crops_per_step": cfg.data.batch,
                           "steps_per_s": rates, "k": {}}
    rows = []
    for k in RETRAIN_KS:
        off = disabled_masks(k)
        red, w = mac_reduction(off), "/".join(map(str, widths_without(off)))
        raw["k"][k] = entry = {"widths": w, "mac_reduction": red}
        if retrain is None:
            rows.append(row(f"retrain k={k} ({w})", None, note=missing))
            continue
        entry["speedup"] = up = rates[f"active k={k}"]["best"] / rates["masked k=0"]["best"]
        entry["active_over_masked"] = rates[f"active k={k}"]["best"] / \
            rates[f"masked k={k}"]["best"]
        entry["efficiency"] = up / red
        entry["step_speedup"] = alone = rates[f"step k={k}"]["best"] / \
            rates["step k=0"]["best"]
        rows.append(row(f"retrain k={k} ({w}), {cfg.data.batch} crops/step: speed-up over "
                        f"k=0 {up:.2f} / MAC reduction {red:.2f}", up / red,
                        None if k == 0 else (">=", 0.7),
                        f"one step on a fixed batch: {alone:.2f}, {alone / red:.2f} of the MACs"))
    return rows, raw


def section_inference(ctx: Ctx) -> tuple[list, dict]:
    from selfscale.compact import compact_model, compare_speed
    from selfscale.model import build_model
    from selfscale.train import to_device

    (n, side), red = ctx.sizes.infer, mac_reduction(COMPACT_OFF)
    full = to_device(build_model(WIDTHS, KERNEL, 1, 0.05, 0), ctx.device).eval()
    masked = copy.deepcopy(full)
    for layer, mask in COMPACT_OFF:
        masked.set_enabled(layer, mask, False)
    small = to_device(compact_model(masked), ctx.device).eval()
    x = torch.rand(n, 1, side, side, device=ctx.device).contiguous(
        memory_format=torch.channels_last)

    def forward(m) -> None:
        with torch.inference_mode():
            m(x)
    fns = {"torch full": partial(forward, full), "torch compact": partial(forward, small)}
    vs_torch = ctx.conv == "direct" and ctx.device.type == "cpu"
    if vs_torch:  # the same forwards on PyTorch's convolutions
        fns["torch-conv full"] = partial(on_conv, "torch", forward, full)
        fns["torch-conv compact"] = partial(on_conv, "torch", forward, small)
    onnx_skip = onnx_fns(ctx, full, masked, x, fns)
    rates = ctx.rates(fns)
    raw: dict[str, Any] = {"images": n, "side": side, "widths": list(small.widths),
                           "mac_reduction": red, "forwards_per_s": rates,
                           "compact_compare_speed": compare_speed(full, small, x)}
    rows = []
    for rt in ("torch", "onnxruntime", "onnxruntime-defaults"):
        what = f"inference {rt} {n}×{side}²: speed-up 5/5/1 → 3/2/1"
        if f"{rt} full" not in rates:
            rows.append(row(what, None, note=f"skipped: {onnx_skip}"))
            continue
        raw[f"{rt}_speedup"] = up = rates[f"{rt} compact"]["best"] / rates[f"{rt} full"]["best"]
        cpu = " (CPU)" if rt.startswith("onnxruntime") and ctx.device.type == "cuda" else ""
        rows.append(row(f"{what}{cpu} {up:.2f} / MAC reduction {red:.2f}", up / red,
                        None if rt.endswith("defaults") else (">=", 0.8)))
    if onnx_skip is None:
        for net in ("full", "compact"):
            raw[f"onnx_session_over_defaults_{net}"] = r = \
                rates[f"onnxruntime {net}"]["best"] / rates[f"onnxruntime-defaults {net}"]["best"]
            rows.append(row(f"inference onnxruntime {n}×{side}² {net}: compact.onnx_session / "
                            "onnxruntime's defaults", r))
    if vs_torch:
        for net in ("full", "compact"):
            raw[f"direct_over_torch_{net}"] = r = rates[f"torch {net}"]["best"] / \
                rates[f"torch-conv {net}"]["best"]
            rows.append(row(f"inference {n}×{side}² {net}: --conv direct / --conv torch", r,
                            (">=", 1.0)))
    return rows, raw


def on_conv(conv: str, fn: Callable, *args) -> None:
    """``fn(*args)`` on convolution ``conv`` (selfscale.direct.use), then back to the process's
    choice."""
    from selfscale import direct

    before = direct.current()
    direct.use(conv)
    try:
        fn(*args)
    finally:
        direct.use(before)


def onnx_fns(ctx: Ctx, full, masked, x, fns: dict) -> str | None:
    """Add ONNX Runtime forwards of both networks (written by compact.export) to ``fns``, run as
    compact.onnx_session runs them ("onnxruntime") and with onnxruntime's default optimizers
    ("onnxruntime-defaults"); returns why not when the onnx extra is missing or the export
    fails."""
    from selfscale.compact import export, onnx_session

    try:
        feed = {"image": x.detach().to("cpu").contiguous().numpy()}
        with tempfile.TemporaryDirectory() as tmp:
            for name, model in (("full", full), ("compact", masked)):
                path = Path(tmp) / f"{name}.onnx"
                export(model, "onnx", path, check_inputs=torch.rand(1, 1, 32, 32))
                for rt, defaults in (("onnxruntime", False), ("onnxruntime-defaults", True)):
                    sess = onnx_session(path, threads=ctx.threads, defaults=defaults)
                    fns[f"{rt} {name}"] = partial(sess.run, None, feed)
    except Exception as exc:  # noqa: BLE001 - no onnx extra, an exporter failure: say why
        return failure(exc)
    return None


@contextlib.contextmanager
def timed_calls(sync: Callable[[], None]) -> Iterator[dict[str, dict[str, float]]]:
    """Wrap each function of :data:`TIMED` under every selfscale module attribute holding it;
    yields {category: {"seconds", "calls"}} (outermost calls only); restores them on exit."""
    totals = {cat: {"seconds": 0.0, "calls": 0} for cat in TIMED}
    depth, swaps = [0], {}

    def wrap(cat: str, orig: Callable) -> Callable:
        def timed(*a, **kw):
            if depth[0]:  # inside another timed call: counted there
                return orig(*a, **kw)
            depth[0] += 1
            sync()
            t0 = time.perf_counter()
            try:
                return orig(*a, **kw)
            finally:
                sync()
                totals[cat]["seconds"] += time.perf_counter() - t0
                totals[cat]["calls"] += 1
                depth[0] -= 1
        return timed

    methods = []
    for cat, where in TIMED.items():
        for mod, name in where:
            owner, _, name = name.rpartition(".")
            home = getattr(importlib.import_module(mod), owner) if owner else None
            orig = getattr(home or importlib.import_module(mod), name)
            if home is None:
                swaps[id(orig)] = (orig, wrap(cat, orig))
            else:
                methods.append((home, name, orig, wrap(cat, orig)))
    modules = [m for n, m in list(sys.modules.items()) if n.split(".")[0] == "selfscale"]
    patched = [(m, attr, *swaps[id(v)]) for m in modules for attr, v in list(vars(m).items())
               if id(v) in swaps and swaps[id(v)][0] is v] + methods
    for m, attr, _, new in patched:
        setattr(m, attr, new)
    try:
        yield totals
    finally:
        for m, attr, orig, _ in patched:
            setattr(m, attr, orig)


def section_minimize(ctx: Ctx) -> tuple[list, dict]:
    from selfscale.config import MinimizeConfig, RunConfig
    from selfscale.minimize.session import minimize_run
    from selfscale.run import prepare_data, start_run, train_run

    # (minimize_run's modules, all importers of the timed functions, load before the wrapping)

    (base, retrain, finetune), result = ctx.sizes.min_steps, []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig.from_dict({"task": {"name": "sobel"}, "data": ctx.sizes.data, "train": {
            "steps": base, "eval_every": max(base // 4, 1), "seed": 0,
            "device": ctx.device.type, "threads": ctx.threads, "conv": ctx.conv}})
        run = start_run(cfg, Path(tmp) / "base")
        data = prepare_data(run.config)
        train_run(run, data)
        mcfg = MinimizeConfig(strategy="l1", retrain_steps=retrain, finetune_steps=finetune)

        def minimize() -> None:
            result.append(minimize_run(run, data, mcfg, out=Path(tmp) / "min"))
        with timed_calls(ctx.sync) as totals:
            rates = ctx.rates({"minimize": minimize}, repeats=1, chunk_seconds=0.0, warmup=0)
    wall = 1 / rates["minimize"]["best"]
    shares = {cat: v["seconds"] / wall for cat, v in totals.items()}
    shares["rest"] = 1 - sum(shares.values())
    summary = result[0].summary
    raw = {"wall_s": wall, "calls": totals, "shares": shares, "steps": ctx.sizes.min_steps,
           **{k: summary.get(k) for k in ("steps_trained", "widths_after", "decisions")}}
    note = ", ".join(f"{k} {v:.0%}" for k, v in shares.items())
    # a training step is its batch (sampled on the CPU) and its update
    outside = 1 - shares["training steps"] - shares.get("batch sampling", 0.0)
    crops = run.config.data.batch
    raw["crops_per_step"] = crops
    return [row(f"minimize, {crops} crops/step, retrains {retrain} steps: share of wall time not "
                "in training steps (batch + update)", outside, ("<=", 0.10), note)], raw


def section_study(ctx: Ctx) -> tuple[list, dict]:
    def cmd(workers: int, out: Path) -> list[str]:
        return [sys.executable, "-m", "selfscale", "study", "strategies", *ctx.sizes.study,
                "--workers", str(workers), "--out", str(out), "--no-report", "--quiet"]

    with tempfile.TemporaryDirectory() as tmp:
        fns = {f"workers {w}": process_fn(partial(cmd, w), Path(tmp), STUDY_TIMEOUT)
               for w in (1, 2)}
        rates = ctx.rates(fns, repeats=1, chunk_seconds=0.0, warmup=0)
    secs = {k: 1 / v["best"] for k, v in rates.items()}
    return [row("study strategies: wall time 2 workers / 1 worker",
                secs["workers 2"] / secs["workers 1"], ("<=", 0.6),
                "CPU, one round: " + " ".join(ctx.sizes.study))], \
        {"seconds": secs, "study": list(ctx.sizes.study)}


RUNNERS = {"train": section_train, "retrain": section_retrain, "inference": section_inference,
           "minimize": section_minimize, "study": section_study}


# --- the command ----------------------------------------------------------------------------------
def machine(device: torch.device) -> dict[str, Any]:
    from selfscale import direct

    cpu = None
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")),
                   None)
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": str(device), "conv": direct.current(),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu}


def plain_port_child(steps: int, crop: int, device: torch.device) -> None:
    """``--plain-port-child``: the plain port trained ``steps`` steps in this process."""
    data, _ = load_data()
    port = PlainPort(data.train.inputs, data.train.targets, crop, 3, device)
    for _ in range(steps):
        port.step()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write every raw number to this JSON file")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--conv", default="auto", choices=("auto", "direct", "torch"),
                   help="CPU convolution, as selfscale train --conv (default auto: direct when "
                        "a C++ compiler builds it)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (tests, CI): seconds")
    p.add_argument("--only", help=f"comma-separated sections of {','.join(SECTIONS)}")
    p.add_argument("--repeats", type=int, help="alternating rounds (default 3; quick 2)")
    p.add_argument("--chunk-seconds", type=float, help="seconds per chunk (default 2; quick 0.05)")
    p.add_argument("--retrain-batch", type=int, metavar="CROPS",
                   help="crops per step in the retrain and minimize sections (default 12, "
                        "selfscale 0.2.0's recipe; today's default recipe trains 3; quick 4)")
    p.add_argument("--retrain-steps", type=int, metavar="STEPS",
                   help="steps per timed retrain in the retrain section (default 400; today's "
                        "default recipe retrains 7000; quick 5)")
    p.add_argument("--min-steps", metavar="BASE,RETRAIN,FINETUNE",
                   help="the minimize section's base, retrain and fine-tune steps (default "
                        "2000,400,400; quick 100,10,10)")
    p.add_argument("--plain-port-child", type=int, metavar="STEPS", help=argparse.SUPPRESS)
    p.add_argument("--crop", type=int, default=256, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def parse_min_steps(text: str) -> tuple[int, int, int]:
    """``--min-steps BASE,RETRAIN,FINETUNE``: three counts, base and retrain at least 1."""
    try:
        base, retrain, finetune = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--min-steps: expected BASE,RETRAIN,FINETUNE (three integers), got "
                         f"{text!r}") from None
    if base < 1 or retrain < 1 or finetune < 0:
        raise ValueError(f"--min-steps: base and retrain steps must be at least 1 and fine-tune "
                         f"steps at least 0, got {text!r}")
    return base, retrain, finetune


def out_folder_ready(out: Path) -> None:
    """``--out``'s folder exists (made if missing) and is writable, or a ValueError says why."""
    if out.parent.exists() and not out.parent.is_dir():
        raise ValueError(f"--out: {out.parent} is a file, not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out: cannot make the folder {out.parent}: {exc.strerror}") from None
    if not os.access(out.parent, os.W_OK):
        raise ValueError(f"--out: the folder {out.parent} is not writable")


def sections_of(only: str | None, quick: bool) -> list[str]:
    if only is None:
        return [s for s in SECTIONS if not (quick and s == "study")]
    names = [s.strip() for s in only.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown or not names:
        raise ValueError(f"--only: unknown section(s) {','.join(unknown) or '(none)'}; choose "
                         f"from {','.join(SECTIONS)}")
    return [s for s in SECTIONS if s in names]


def main(argv: list[str] | None = None) -> int:
    from selfscale import direct
    from selfscale.checkpoint import atomic_write_text
    from selfscale.errors import SelfscaleError
    from selfscale.train import resolve_device

    args = parse_args(argv)
    try:
        if args.threads < 1:
            raise ValueError(f"--threads: must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
        device = resolve_device(args.device)
        conv = direct.use(args.conv if device.type == "cpu" else "torch")
        if args.plain_port_child is not None:
            plain_port_child(args.plain_port_child, args.crop, device)
            return 0
        if args.out is not None and args.out.exists() and not args.force:
            raise ValueError(f"--out: {args.out} already exists; use --force to overwrite it")
        if args.out is not None:  # before the run, not after an hour of it
            out_folder_ready(args.out)
        names, sizes = sections_of(args.only, args.quick), QUICK if args.quick else FULL
        if args.retrain_batch is not None:
            if args.retrain_batch < 1:
                raise ValueError(f"--retrain-batch: must be at least 1, got {args.retrain_batch}")
            sizes = replace(sizes, data={**sizes.data, "batch": args.retrain_batch})
        if args.retrain_steps is not None:
            if args.retrain_steps < 1:
                raise ValueError(f"--retrain-steps: must be at least 1, got {args.retrain_steps}")
            sizes = replace(sizes, retrain_steps=args.retrain_steps)
        if args.min_steps is not None:
            sizes = replace(sizes, min_steps=parse_min_steps(args.min_steps))
        repeats = sizes.repeats if args.repeats is None else args.repeats
        chunk = sizes.chunk_seconds if args.chunk_seconds is None else args.chunk_seconds
        if repeats < 1 or chunk < 0:
            raise ValueError(f"--repeats must be ≥ 1 and --chunk-seconds ≥ 0, got {repeats}, "
                             f"{chunk}")
    except (SelfscaleError, ValueError) as exc:
        print(f"speed.py: error: {exc}", file=sys.stderr)
        return 2
    ctx = Ctx(sizes, device, args.threads, repeats, chunk, conv)
    report: dict[str, Any] = {"command": [sys.executable, *sys.argv], "machine": machine(device),
                              "settings": {"quick": args.quick, "repeats": repeats,
                                           "chunk_seconds": chunk, "sizes": asdict(sizes)},
                              "sections": {}, "rows": []}
    failed = False
    for name in names:
        print(f"[{name}] …", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            rows, raw = RUNNERS[name](ctx)
        except Exception as exc:  # noqa: BLE001 - one broken section must not lose the others
            failed, why = True, failure(exc)
            rows, raw = [row(name, None, note=f"failed: {why}")], {"error": why}
        raw["section_seconds"] = time.perf_counter() - t0
        report["sections"][name], report["rows"] = raw, report["rows"] + rows
    print(table(report["rows"]))
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(report, indent=1, default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
