"""What the terminal shows: plain-text views of results, and progress while work runs.

Each view is a pure function from the plain dict a library function returned to text; the CLI
prints it. Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import sys
from typing import Any


def scores_text(r: dict[str, Any]) -> str:
    return f"f1 {r['f1']:.4f}  mae {r['mae']:.5f}  mse {r['mse']:.6f}  uiqi {r['uiqi']:.4f}"


def _slash(values) -> str:
    return "/".join(map(str, values))


def train_text(path, task: str, step: int, seconds: float, history: list[dict[str, Any]],
               best: dict[str, Any] | None) -> str:
    lines = [f"run: {path}", f"task: {task}  steps: {step}  time: {seconds:.1f} s"]
    if history and best:
        lines += [f"final  {scores_text(history[-1])}",
                  f"best   f1 {best['f1']:.4f} at step {best['step']}"]
    return "\n".join(lines)


def evaluate_text(path, crop: int | None, scores: dict[str, Any]) -> str:
    return "\n".join([f"{path} ({scores['stage']} network): {scores['n_images']} eval images, "
                      + (f"centre crop {crop}" if crop else "whole images")]
                     + [f"  {k:<5} {scores[k]:.6f}" for k in ("f1", "mae", "mse", "uiqi")])


def info_text(info: dict[str, Any]) -> str:
    arch, cfg, stage = info["architecture"], info["config"], info["stage"]
    params = ", ".join(f"{k}={v}" for k, v in info["task"]["params"].items())
    lines = [f"run        {info['run_dir']}  ({stage} network)",
             f"task       {info['task']['name']}" + (f" ({params})" if params else ""),
             f"network    {arch['layers']} layers, widths {arch['widths']}, kernel "
             f"{arch['kernel']}×{arch['kernel']}, {arch['parameters']} parameters "
             f"({arch['active_parameters']} in enabled masks)"]
    for i, (en, fr) in enumerate(zip(arch["enabled"], arch["frozen"])):
        row = " ".join(("#" if e else ".") + ("*" if f else " ") for e, f in zip(en, fr))
        lines.append(f"  layer {i + 1}  {sum(en)}/{len(en)} active   {row}")
    lines += ["           (# enabled, . disabled, * frozen)",
              f"step       {info['step']} of {info['target_steps']}"]
    for label, rec in (("last eval", info["last_eval"]), ("best eval", info["best_eval"])):
        if rec:
            lines.append(f"{label:<10} step {rec['step']}: {scores_text(rec)}")
    lines.append(f"training   loss {cfg['train']['loss']}, lr {cfg['train']['lr']}, batch "
                 f"{cfg['data']['batch']}, crop {cfg['data']['crop']}, seed "
                 f"{cfg['train']['seed']}, threads {info['threads']}, conv {info['conv']}")
    if info.get("data"):
        d = info["data"]
        lines.append(f"data       {d['source']}: {len(d['train'])} train, {len(d['eval'])} eval "
                     "images")
    if info.get("minimization"):
        lines.append(minimization_text(info["minimization"]))
    return "\n".join(lines)


def decision_text(d: dict[str, Any]) -> str:
    """One line per minimization decision."""
    verdict = "kept" if d["kept"] else "stepped back"
    return (f"  step {d['step']:>3}  {d['tried']:<20} {d['metric']} {d['score']:.4f}  "
            f"ratio {d['ratio']:.3f} {'>=' if d['kept'] else '<'} {d['threshold']}  "
            f"{verdict:<12}  active {_slash(d['active'])}  ({d['seconds']:.1f} s)"
            + (f"  stopped early after {d['steps_trained']} steps" if d.get("stopped_early")
               else "")
            + (f"  dead, removed: {', '.join(d['dead'])}" if d.get("dead") else ""))


def minimization_text(s: dict[str, Any]) -> str:
    before, after = s["scores_before"], s["scores_after"]
    lines = [f"minimization ({s['strategy']}, threshold {s['threshold']} of {s['reference']} "
             f"{s['metric']}, mode {s['mode']}): {s['decisions']} decisions, {s['kept']} kept, "
             + (f"{s['stopped_early']} stopped early, " if s.get("stopped_early") else "")
             + f"{s['steps_trained']} retrain steps, {s['seconds']:.1f} s",
             f"  masks per layer  {_slash(s['widths_before'])} -> {_slash(s['widths_after'])}   "
             f"(prunable masks {s['masks_before']} -> {s['masks_after']}, layers "
             f"{s['layers_before']} -> {s['layers_after']})",
             f"  parameters       {s['parameters_before']} -> {s['parameters_after']}   "
             f"MACs/pixel {s['macs_per_pixel_before']} -> {s['macs_per_pixel_after']}",
             f"  f1 {before['f1']:.4f} -> {after['f1']:.4f}   uiqi {before['uiqi']:.4f} -> "
             f"{after['uiqi']:.4f}   mae {before['mae']:.5f} -> {after['mae']:.5f}"]
    if s.get("scores_before_finetune"):
        ft = s["scores_before_finetune"]
        if s.get("finetune_kept") is False:
            lines.append(f"  fine-tune {s['finetune_steps']} steps lowered {s['metric']}; the "
                         "network before it was kept")
        else:
            lines.append(f"  fine-tune {s['finetune_steps']} steps: f1 {ft['f1']:.4f} -> "
                         f"{after['f1']:.4f}   uiqi {ft['uiqi']:.4f} -> {after['uiqi']:.4f}")
    for i, row in enumerate(s["mask_matrix"]):
        lines.append(f"  layer {i + 1}: " + " ".join("1" if on else "0" for on in row)
                     + ("  (removed)" if not any(row) else ""))
    return "\n".join(lines)


ONNX_TIP = ("  run it with onnxruntime's NchwcTransformer off (selfscale.compact.onnx_session): "
            "it pads every layer to 16 channels")


def export_text(r, stage: str, n_crops: int, speed: dict[str, float]) -> str:
    onnx = (f", max |onnxruntime - torch| = {r.onnx_max_abs_diff:.2e}"
            if r.onnx_max_abs_diff is not None else "")
    return "\n".join([
        f"wrote {r.path} ({r.format}, {stage} network)",
        f"  widths      {_slash(r.widths_before)} -> {_slash(r.widths_after)}",
        f"  parameters  {r.params_before} -> {r.params_after}   MACs/pixel "
        f"{r.macs_before} -> {r.macs_after}",
        f"  checked on {n_crops} eval crops: max |masked - compact| = {r.max_abs_diff:.2e}{onnx}",
        f"  inference on the same crops (median of 20): masked {speed['masked_s'] * 1e3:.2f} ms,"
        f" compact {speed['compact_s'] * 1e3:.2f} ms ({speed['speedup']:.2f}x)",
        *([ONNX_TIP] if r.format == "onnx" else [])])


def demo_text(task: str, res: dict[str, Any]) -> str:
    sp, sb, t = res["speed_masked_vs_compact"], res["speed_base_vs_compact"], res["seconds"]
    return "\n".join([
        "", f"selfscale demo: task {task}, run directory {res['run_dir']}",
        minimization_text(res["summary"]),
        f"  inference on the {res['n_eval']} eval crops: masked {sp['masked_s'] * 1e3:.2f} ms, "
        f"compact {sp['compact_s'] * 1e3:.2f} ms ({sp['speedup']:.2f}x); full base network "
        f"{sb['masked_s'] * 1e3:.2f} ms against compact {sb['compact_s'] * 1e3:.2f} ms timed "
        f"with it ({sb['speedup']:.2f}x)",
        f"  exports: {res['exports']['torch']}, {res['exports']['onnx']} (max |masked - compact| "
        f"{res['export_max_abs_diff']:.1e}, onnxruntime {res['onnx_max_abs_diff']:.1e})",
        f"  pictures: {', '.join(res['pictures'])}",
        f"  time: train {t['train']} s, minimize {t['minimize']} s, total {t['total']} s"])


def train_progress(total: int, *, quiet: bool, start: int = 0):
    """A tqdm bar over training steps on stderr, and the TrainHooks that drive it (a line per
    evaluation unless ``quiet``)."""
    from tqdm import tqdm

    from selfscale.train import TrainHooks

    bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=quiet,
               dynamic_ncols=True, file=sys.stderr)
    last: dict[str, str] = {}

    def on_step(step: int, loss: float) -> None:
        bar.update(step - bar.n)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss:.4f}", **last, refresh=False)

    def on_eval(state, r: dict[str, Any]) -> None:
        last["f1"] = f"{r['f1']:.4f}"
        bar.set_postfix(loss=f"{r['loss']:.4f}", **last)
        if not quiet:
            bar.write(f"step {r['step']:>6}  loss {r['loss']:.5f}  f1 {r['f1']:.4f}  "
                      f"mae {r['mae']:.5f}  uiqi {r['uiqi']:.4f}", file=sys.stderr)

    return bar, TrainHooks(on_step=on_step, on_eval=on_eval, on_step_reads_state=False)


def decision_printer(quiet: bool):
    """A minimization ``on_decision`` hook printing :func:`decision_text` to stderr."""
    def on_decision(m, d: dict[str, Any]) -> None:
        if not quiet:
            print(decision_text(d), file=sys.stderr, flush=True)
    return on_decision
