"""Training and evaluation: one flat loop of Adam steps on random crops, evaluated every N steps.

The whole resumable state is one :class:`TrainState` (model with its mask switches, optimizer,
step, random generators, score history); :func:`TrainState.to_dict` is what a checkpoint holds.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from selfscale import direct, direct_step
from selfscale.crops import BatchStream, center_crop_chunks
from selfscale.data import ImageSet
from selfscale.errors import TrainingError
from selfscale.metrics import LOSSES, METRICS
from selfscale.model import FCN, Init

EVAL_BATCH = 8  # eval crops per forward pass
EVAL_METRICS = ("f1", "mae", "mse", "uiqi")


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is a usage error. On CUDA,
    cuDNN is held to deterministic algorithms (reproducible runs, exact resume)."""
    from selfscale.errors import ConfigError

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: cuda was requested but no CUDA device is available")
    if name == "cuda":  # same seed, same GPU → same weights: cuDNN's deterministic kernels only
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    return torch.device(name)


def to_device(model: FCN, device: torch.device) -> FCN:
    """Move the model; channels_last is ~3× faster for these small convolutions on CPU."""
    return model.to(device=device, memory_format=torch.channels_last)


def as_input(array: np.ndarray, device: torch.device) -> Tensor:
    return torch.from_numpy(array).to(device).contiguous(memory_format=torch.channels_last)


def make_optimizer(model: FCN, lr: float) -> torch.optim.Adam:
    """A fresh Adam: zero moments and step count (thesis 2.4: reset after every alteration).

    On ``--conv direct`` (selfscale's CPU path) it is PyTorch's fused CPU Adam: the same update
    in one kernel for all parameters instead of a dozen small ops per tensor (equal to the loop
    to about 1e-8). The fused kernel walks a parameter, its gradient and its moments in memory
    order, so a moment stored in another layout than its parameter (a channels_last weight with
    moments restored in NCHW order, as a checkpoint or a narrow copy gives) would be mixed up:
    every load of a state therefore copies the moments into their parameter's layout
    (:func:`_moments_like_params`), whichever Adam loads it, since a loaded state keeps the
    choice it was saved with. On ``--conv torch`` it stays the default Adam, so runs made before
    ``--conv`` existed resume and minimize exactly as before (the per-tensor update does not
    depend on the layout)."""
    optimizer = None
    if direct.current() == "direct" and next(model.parameters()).device.type == "cpu":
        try:
            optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
        except (RuntimeError, TypeError):  # a torch without fused CPU Adam (before 2.4)
            optimizer = None
    if optimizer is None:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    optimizer.register_load_state_dict_post_hook(_moments_like_params)
    return optimizer


def _moments_like_params(optimizer: torch.optim.Optimizer) -> None:
    """After a state is loaded: every state tensor shaped like its parameter gets the
    parameter's strides (values unchanged)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            entry = optimizer.state.get(p, {})
            for key, value in entry.items():
                if (isinstance(value, Tensor) and value.shape == p.shape
                        and value.stride() != p.stride()):
                    entry[key] = torch.empty_like(p).copy_(value)


@dataclass
class TrainState:
    """Everything a training run needs to continue exactly where it stopped."""

    model: FCN
    optimizer: torch.optim.Adam
    rng: np.random.Generator  # batch sampling
    torch_gen: torch.Generator  # re-initialization draws (minimization)
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    lr: float = 1e-3
    best: dict[str, Any] | None = None
    """With --keep-best: the best evaluation of the current training so far (step, score, and
    the weights on the CPU), restored when the training ends."""

    def reset_optimizer(self) -> None:
        self.optimizer = make_optimizer(self.model, self.lr)

    def to_dict(self) -> dict[str, Any]:
        return {
            "widths": list(self.model.widths),
            "kernel": self.model.kernel,
            "in_channels": self.model.in_channels,
            "model": {k: v.detach().cpu().contiguous() for k, v in
                      self.model.state_dict().items()},
            "optimizer": _optimizer_cpu(self.optimizer.state_dict()),
            "rng": self.rng.bit_generator.state,
            "torch_gen": self.torch_gen.get_state(),
            "step": self.step,
            "history": list(self.history),
            "lr": self.lr,
            "best": self.best,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any], device: torch.device) -> TrainState:
        model = FCN(raw["widths"], raw["kernel"], raw["in_channels"])
        model.load_state_dict(raw["model"])
        model = to_device(model, device)
        optimizer = make_optimizer(model, raw["lr"])
        optimizer.load_state_dict(raw["optimizer"])
        rng = np.random.default_rng()
        rng.bit_generator.state = raw["rng"]
        gen = torch.Generator()
        gen.set_state(raw["torch_gen"])
        return cls(model, optimizer, rng, gen, int(raw["step"]), list(raw["history"]),
                   float(raw["lr"]), raw.get("best"))


def _optimizer_cpu(sd: dict[str, Any]) -> dict[str, Any]:
    state = {k: {n: (t.detach().cpu() if isinstance(t, Tensor) else t) for n, t in v.items()}
             for k, v in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def new_state(model: FCN, lr: float, seed: int, device: torch.device) -> TrainState:
    """Initial state: generators derived from ``seed`` (init uses its own generator in model.py)."""
    model = to_device(model, device)
    rng = np.random.default_rng([seed, 1])
    gen = torch.Generator().manual_seed(seed + 7919)
    return TrainState(model, make_optimizer(model, lr), rng, gen, 0, [], lr)


def revive_dead_init(state: TrainState, probe: Tensor, init: Init | float,
                     max_redraws: int = 100) -> int:
    """Redraw the initialization while the network's output is exactly zero on ``probe``.

    The thesis's initialization (truncated normal, std 0.05) with ReLU after the output layer can
    start *dead*: every output pixel is 0, every gradient is 0, and training never moves. Such a
    draw is replaced by the next one from ``state.torch_gen`` (deterministic for a seed).
    Returns the number of redraws (stored in the run metadata).
    """
    for redraws in range(max_redraws + 1):
        with torch.no_grad():
            alive = bool((state.model(probe) > 0).any())
        if alive:
            if redraws:
                state.reset_optimizer()
            return redraws
        state.model.reset_parameters(init, state.torch_gen)
    raise RuntimeError(f"the network output stayed zero after {max_redraws} initializations")


def train_step(model: FCN, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
               loss_fn: Callable[[Tensor, Tensor], Tensor], clip: float = 0.0) -> float:
    """One Adam step on one batch (gradient norm clipped to ``clip`` when > 0); returns the loss
    before the update. On ``--conv direct`` the whole step is one kernel call where it can be
    (:mod:`selfscale.direct_step`)."""
    fused = direct_step.train_step(model, optimizer, x, y, loss_fn, clip)
    if fused is not None:
        return fused
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return float(loss.detach())


def learning_rate(spec: TrainSpec, step: int) -> float:
    """The learning rate of the step that follows ``step`` completed steps.

    ``constant``: ``spec.lr``. ``cosine``: over the schedule's window of ``spec.schedule_steps``
    steps from ``spec.schedule_start``, step i (0-based) gets ``lr·(i+1)/W`` during the W =
    ⌊warmup·n⌋ warm-up steps, then ``lr·(0.01 + 0.99·(1 + cos(π·p))/2)`` with p = (i − W)/(n − W)
    going from 0 to 1 (so the rate ends at 1% of ``lr``; past the window it stays there).
    """
    if spec.schedule == "constant":
        return spec.lr
    n = max(spec.schedule_steps, 1)
    i = step - spec.schedule_start
    warm = int(spec.warmup * n)
    if i < warm:
        return spec.lr * (i + 1) / warm
    p = min((i - warm) / max(n - warm, 1), 1.0)
    return spec.lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * p)))


@torch.no_grad()
def predict_batches(model: FCN, images: ImageSet, crop: int | None,
                    device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """Network output and target per chunk of eval images (centre crops, or whole images);
    the targets may be the set's own held crops, not to be written to."""
    model.eval()
    if crop is None:  # whole images, one at a time (sizes differ)
        pairs = ((np.array(x, dtype=np.float32)[None, None], np.array(y)[None, None])
                 for x, y in zip(images.inputs, images.targets))
    else:
        pairs = center_crop_chunks(images, crop, EVAL_BATCH)
    for x_np, y_np in pairs:
        yield model(as_input(x_np, device)).float().cpu(), torch.from_numpy(y_np)
    model.train()


def evaluate(model: FCN, images: ImageSet, crop: int | None, device: torch.device,
             metrics: tuple[str, ...] = EVAL_METRICS) -> dict[str, float]:
    """Mean of each metric over all eval images (per-image scores averaged, thesis 2.4.2)."""
    sums = dict.fromkeys(metrics, 0.0)
    n = 0
    for out, target in predict_batches(model, images, crop, device):
        for name in metrics:
            sums[name] += float(METRICS[name].fn(out, target).double().sum())
        n += out.shape[0]
    return {name: total / max(n, 1) for name, total in sums.items()} | {"n_images": n}


@dataclass(frozen=True)
class TrainSpec:
    """How a network is trained: everything :func:`train` needs besides the state and the data.

    Built once from the run's config (:meth:`from_config`); a minimization's retrains derive
    theirs with ``dataclasses.replace`` (e.g. ``eval_every`` = the retrain's length)."""

    loss: str
    """Name of the training loss (a key of :data:`selfscale.metrics.LOSSES`)."""
    batch: int
    """Training crops per step."""
    train_crop: int
    """Side of the random training crops."""
    eval_crop: int
    """Side of the centre eval crops."""
    flips: bool
    """Random horizontal and vertical flips of the training crops."""
    eval_every: int
    """Evaluate every N steps (absolute step numbers) and at the end."""
    checkpoint_every: int
    """Checkpoint every N steps; 0 means at every evaluation."""
    device: torch.device
    """Where the model and the batches live."""
    init: Init
    """How masks are (re)drawn: at the start and by the minimization's redraws."""
    lr: float = 1e-3
    """The peak learning rate (see :func:`learning_rate`)."""
    schedule: str = "constant"
    warmup: float = 0.0
    schedule_start: int = 0
    """The step the learning-rate schedule starts at (a retrain restarts it at its first step)."""
    schedule_steps: int = 1
    """The length of the schedule's window."""
    clip: float = 0.0
    keep_best: bool = False
    """Restore the weights of the best evaluation (by ``best_metric``) when training ends."""
    best_metric: str = "f1"
    stop_after: int = 0
    """Stop when F1 has not improved for this many evaluations of the window; 0 never."""

    @classmethod
    def from_config(cls, config: Any, device: torch.device) -> TrainSpec:
        """The spec of a :class:`selfscale.config.RunConfig` whose loss is resolved."""
        if config.train.loss is None:
            raise ValueError("the run config's loss must be resolved before training")
        t, m = config.train, config.model
        return cls(loss=t.loss, batch=config.data.batch,
                   train_crop=config.data.train_crop, eval_crop=config.data.crop,
                   flips=config.data.flips, eval_every=t.eval_every,
                   checkpoint_every=t.checkpoint_every, device=device,
                   init=Init(m.init, m.init_std, m.init_bias), lr=t.lr, schedule=t.schedule,
                   warmup=t.warmup, schedule_start=0, schedule_steps=t.steps, clip=t.clip,
                   keep_best=t.keep_best, stop_after=t.stop_after)

    def for_retrain(self, start: int, steps: int) -> TrainSpec:
        """The spec of a retrain of ``steps`` steps from step ``start``: the schedule restarted
        for its length, one evaluation at its end, no checkpoints."""
        return dataclasses.replace(self, eval_every=steps, checkpoint_every=0,
                                   schedule_start=start, schedule_steps=steps, stop_after=0)


@dataclass
class TrainHooks:
    """What the loop reports to its caller; all optional."""

    on_step: Callable[[int, float], None] | None = None  # (step, loss)
    on_eval: Callable[[TrainState, dict[str, Any]], bool | None] | None = None
    """After each evaluation; returning True stops the training there (marked ``stopped``)."""
    on_checkpoint: Callable[[TrainState], None] | None = None
    on_step_reads_state: bool = True
    """False when ``on_step`` only shows progress (it neither reads nor changes the model,
    optimizer or generator): the loop may then call it for several steps after they ran, as
    the direct kernels run up to 64 steps in one call."""
    every: int = 0
    on_every: Callable[[TrainState], None] | None = None
    """After every ``every``-th step (a pause, like an evaluation: the state is that step's)."""


def train(state: TrainState, train_set: ImageSet, eval_set: ImageSet, spec: TrainSpec, *,
          until_step: int, hooks: TrainHooks | None = None) -> TrainState:
    """Train from ``state.step`` to ``until_step``, evaluating every ``spec.eval_every`` steps and
    at the end; checkpoint (through ``hooks.on_checkpoint``) at every evaluation or every
    ``spec.checkpoint_every`` steps. Evaluation and checkpoint steps are absolute step numbers, so
    a resumed run evaluates at the same steps as an uninterrupted one. With ``spec.stop_after``
    it stops early on stagnation (the last evaluation is marked ``stopped``), as it does when
    ``hooks.on_eval`` returns True, and with
    ``spec.keep_best`` it ends on the weights of its best evaluation."""
    hooks = hooks or TrainHooks()
    device = spec.device
    save_every = spec.checkpoint_every or spec.eval_every
    every = hooks.every if hooks.on_every else 0  # 0: no on_every pauses
    # train_seconds counts on from the last record, so a resumed run reports its whole time
    t0 = time.perf_counter() - (state.history[-1].get("train_seconds", 0.0) if state.history
                                else 0.0)
    stopped = bool(spec.stop_after and state.history and state.history[-1].get("stopped"))
    unwatched = not (hooks.on_step and hooks.on_step_reads_state)  # no hook sees single steps
    with BatchStream(train_set, state.rng, spec.batch, spec.train_crop, spec.flips) as batches:
        while state.step < until_step and not stopped:
            # 1-2. the steps to the next pause (an evaluation, a checkpoint or the end): each a
            #      batch (numpy generator: reproducible, saved with the state) and an optimizer
            #      step at the schedule's learning rate; unwatched, in kernel calls of many
            count = _steps_to_pause(state.step, until_step, spec.eval_every,
                                    save_every if hooks.on_checkpoint else 0, every)
            for value in _steps(state, batches, spec, count, unwatched):
                if not math.isfinite(value):
                    raise diverged(state, f"the training loss is {value}")
                state.step += 1
                if hooks.on_step:
                    hooks.on_step(state.step, value)
            if every and state.step % every == 0:
                hooks.on_every(state)
            # 3. evaluate on the whole eval set every eval_every steps and at the end
            evaluating = state.step % spec.eval_every == 0 or state.step == until_step
            saving = hooks.on_checkpoint and (state.step % save_every == 0
                                              or state.step == until_step)
            if (evaluating or saving) and not finite_weights(state.model):
                raise diverged(state, "a weight became non-finite")
            if evaluating:
                record = {"step": state.step, "loss": value,
                          **evaluate(state.model, eval_set, spec.eval_crop, device),
                          "train_seconds": round(time.perf_counter() - t0, 3)}
                record.pop("n_images")
                if spec.stop_after and _stagnated([*state.history, record], spec):
                    record["stopped"] = stopped = True
                state.history.append(record)
                if spec.keep_best and _improves(state.best, record, spec):
                    state.best = {"step": state.step, "score": record[spec.best_metric],
                                  "model": {k: v.detach().cpu().clone()
                                            for k, v in state.model.state_dict().items()}}
                if hooks.on_eval and hooks.on_eval(state, record):
                    record["stopped"] = stopped = True
            # 4. checkpoint
            if saving or (stopped and hooks.on_checkpoint):
                hooks.on_checkpoint(state)
    if spec.keep_best and state.best and state.best["step"] > spec.schedule_start:
        state.model.load_state_dict(state.best["model"])
    return state


def _steps_to_pause(step: int, until_step: int, *periods: int) -> int:
    """Steps from ``step`` to ``until_step`` or the next multiple of one of ``periods`` (0:
    none), whichever comes first."""
    return min(until_step, *((step // p + 1) * p for p in periods if p)) - step


def _steps(state: TrainState, batches: BatchStream, spec: TrainSpec, count: int,
           unwatched: bool) -> Iterator[float]:
    """The losses of the next ``count`` training steps, each step made when its loss is asked
    for. ``unwatched`` (nobody looks at the state between two steps): on the direct kernels,
    several steps in one call (:func:`~selfscale.direct_step.steps_per_call`), and otherwise
    each step's next batch drawn ahead and copied during the step (the same results)."""
    lrs = (None if spec.schedule == "constant"
           else [learning_rate(spec, state.step + i) for i in range(count)])
    loss_fn, done = LOSSES[spec.loss], 0
    per_call = direct_step.steps_per_call(state.model, spec.batch, spec.train_crop)
    while unwatched and done < count:
        n = min(count - done, per_call)
        losses = direct_step.train_steps(state.model, state.optimizer, batches,
                                         None if lrs is None else lrs[done:done + n], n,
                                         loss_fn, spec.clip)
        if losses is None:
            break
        done += len(losses)
        yield from losses
    for i in range(done, count):
        x_np, y_np = batches.take(ahead=unwatched and i + 1 < count)
        if lrs is not None:
            for group in state.optimizer.param_groups:
                group["lr"] = lrs[i]
        yield train_step(state.model, state.optimizer, as_input(x_np, spec.device),
                         as_input(y_np, spec.device), loss_fn, spec.clip)


def _improves(best: dict[str, Any] | None, record: dict[str, Any], spec: TrainSpec) -> bool:
    """Whether ``record`` beats the best evaluation of the current schedule window."""
    if best is None or best["step"] <= spec.schedule_start:
        return True
    sign = 1 if METRICS[spec.best_metric].higher_is_better else -1
    return sign * record[spec.best_metric] > sign * best["score"]


def _stagnated(history: list[dict[str, Any]], spec: TrainSpec) -> bool:
    """F1 has not improved for ``spec.stop_after`` evaluations of the current window."""
    window = [r["f1"] for r in history if r["step"] > spec.schedule_start]
    first_best = max(range(len(window)), key=lambda i: (window[i], -i))
    return len(window) - 1 - first_best >= spec.stop_after


def finite_weights(model: FCN) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def diverged(state: TrainState, what: str) -> TrainingError:
    """The one-line error of a training that produced non-finite numbers at its next step."""
    return TrainingError(f"training diverged at step {state.step + 1}: {what}; nothing from this "
                         f"step on was saved, the last checkpoint is kept (hint: lower --lr, now "
                         f"{state.lr:g})")


def is_dead(model: FCN, images: ImageSet, crop: int, device: torch.device) -> bool:
    """True when the network's output is zero on every pixel of the eval crops (a dead ReLU
    output: every gradient is zero, training cannot move it)."""
    return not any(bool((out > 0).any()) for out, _ in predict_batches(model, images, crop,
                                                                         device))


def best_record(history: list[dict[str, Any]], metric: str = "f1") -> dict[str, Any] | None:
    """The evaluation with the best value of ``metric`` (earliest on ties)."""
    if not history:
        return None
    sign = 1 if METRICS[metric].higher_is_better else -1
    return max(history, key=lambda r: (sign * r[metric], -r["step"]))
