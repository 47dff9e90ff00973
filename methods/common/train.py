# SPDX-License-Identifier: Apache-2.0
"""The one training loop: ``fit(run, on_epoch_end)``, shared by ``otarena train`` and Ray trials.

The loop owns model mode, data order, the learning-rate schedule, validation and checkpoint state;
methods own one optimizer step. It reports through an injected ``on_epoch_end(metrics, run)``
callback, so it knows nothing of Ray or MLflow (cleanrl's decoupling, without argv patching).

The fast path (``augment``, ``precision``, ``channels_last``, ``compile``) is off by default: the
data already sit on the device, augmentation runs there as one gather, bf16 autocast puts the
convolutions on tensor cores, channels-last spares them layout transposes, and ``torch.compile``
fuses the elementwise rest. None of it changes what a checkpoint holds: fp32 weights under their
usual names (``prepare``, ``train_step``).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Mapping, Optional

import torch

from otarena.methods.common.attacks import ThreatModel, eval_mode, fgsm
from otarena.methods.common.data import AUGMENTS, TensorData, augment, batches
from otarena.methods.common.evaluate import accuracy, pgd_accuracy
from otarena.methods.space import Choice, Float, Int


PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    """Knobs every method shares (unprefixed names; a method's own knobs carry its prefix)."""

    epochs: int = 10
    """Training epochs (the ASHA budget ``max_t`` in a search)."""
    batch_size: int = 128
    lr: float = 0.05
    """Peak learning rate of SGD (or Adam)."""
    momentum: float = 0.9
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    """``sgd`` (Nesterov-free momentum SGD, the AT standard) or ``adam``."""
    schedule: str = "cosine"
    """``cosine`` decay to zero over ``epochs``, ``rung_cosine`` (cosine cycles that end at the ASHA
    rungs: :class:`RungCosine`), ``multistep`` (x0.1 at 50% and 75%) or ``constant``."""
    rung_grace_epochs: int = 2
    """First rung of ``rung_cosine``: a search pins it to ``budget.grace_epochs``; ``otarena train``
    keeps this default, which is the budget's."""
    rung_reduction_factor: int = 3
    """Rung spacing of ``rung_cosine``: a search pins it to ``budget.reduction_factor`` (default as
    the budget's)."""
    ema_decay: float = 0.99
    """Decay of the exponential moving average of the weights (:class:`WeightAverage`); 0 is off.
    When on, validation, ``best_model`` and so the final evaluation use the averaged weights. On by
    default: of the options ``benchmarks/search_efficiency.py`` measured on MNIST, it gave ASHA the
    best rank fidelity at every rung and no regret against FIFO (README, "Does ASHA prune on the
    right signal?")."""
    attack_steps: int = 10
    """K: PGD steps of the training attack."""
    attack_step_size: Optional[float] = None
    """a: PGD step in [0, 1] pixel units; ``None`` means 2.5 * eps / K."""
    val_n_ex: int = 512
    """Validation images attacked each epoch (a fixed subset: the first ``val_n_ex``)."""
    val_pgd_steps: int = 10
    """PGD steps of the per-epoch validation attack."""
    seed: int = 0
    augment: str = "none"
    """Augmentation of training batches, on their device (``data.augment``): ``none``, ``crop``
    (random crop of the 4-px zero-padded image) or ``crop_flip`` (then a random horizontal flip).
    Use ``crop_flip`` for CIFAR-10/100, ``crop`` for SVHN (digits must not flip), ``none`` for
    digits, MNIST and Fashion-MNIST."""
    precision: str = "fp32"
    """``bf16``: each training step, attack included, runs under bfloat16 autocast (weights and
    optimizer stay fp32); validation and evaluation always run in fp32."""
    channels_last: bool = False
    """Model and training batches in channels-last memory format (faster convolutions on GPUs)."""
    compile: bool = False
    """``torch.compile`` the model in place (state_dict keys unchanged); skipped with a warning
    where compilation is unavailable. The first epoch pays the compilation time."""

    def __post_init__(self):
        step = self.attack_step_size
        if step is not None and not (isinstance(step, (int, float)) and 0 < step <= 1):
            raise ValueError(f"attack_step_size must be null or in (0, 1] pixel units, got {step!r}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, got {self.augment!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("channels_last", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name, least in (("rung_grace_epochs", 1), ("rung_reduction_factor", 2)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if not (isinstance(self.ema_decay, (int, float)) and 0 <= self.ema_decay < 1):
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in hparams.items() if k in names})


TRAIN_SPACE = {
    "epochs": Int(1, 200, 10, valid=(1, 10_000)),
    "batch_size": Int(16, 512, 128, log=True, valid=(1, 1 << 16)),
    "lr": Float(0.005, 0.2, 0.05, log=True, valid=(1e-7, 10.0)),
    "momentum": Float(0.0, 0.99, 0.9, valid=(0.0, 0.999)),
    "weight_decay": Float(1e-5, 1e-3, 5e-4, log=True, valid=(0.0, 0.1)),
    "optimizer": Choice(("sgd", "adam")),
    "schedule": Choice(("cosine", "rung_cosine", "multistep", "constant")),
    "attack_steps": Int(1, 20, 10, valid=(1, 1000)),
    # Fixed at None (2.5 eps / K) unless a config gives a range; the range's default is the CIFAR
    # literature's a = 2/255 (1.5, 2 and 2.5/255 are common there; eps/4 style steps on MNIST).
    "attack_step_size": Float(1e-3, 0.1, 2 / 255, log=True, valid=(1e-6, 1.0)),
    "val_n_ex": Int(16, 10_000, 512, valid=(1, 1_000_000)),
    "val_pgd_steps": Int(1, 100, 10, valid=(1, 1000)),
    "seed": Int(0, 2**31 - 1, 0, valid=(0, 2**31 - 1)),
    # Fixed at 0.99 unless a config gives a range, e.g. {low: 0.99, high: 0.999}; 0 turns it off.
    "ema_decay": Float(0.0, 0.999, 0.99, valid=(0.0, 0.9999)),
}
"""Domains of the shared knobs: fixed at their defaults unless a config searches them.

``augment``, ``precision``, ``channels_last`` and ``compile`` have no domain on purpose: they are
settings of the run (a config fixes them under ``train:``), not hyperparameters to search."""


_AUGMENT_STREAM = 0x5EED_0A06
"""Offset of the augmentation generator's seed from the shuffling generator's."""


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def rung_milestones(epochs: int, grace: int, reduction_factor: int) -> list[int]:
    """The epochs at which ASHA judges a trial, then ``epochs``: grace, grace * eta, grace * eta^2, ...
    below ``epochs`` (Li et al. 2020, "A System for Massively Parallel Hyperparameter Tuning",
    Algorithm 2; Ray's ASHAScheduler puts its rungs there, with ``max_t = epochs``)."""
    milestones, rung = [], grace
    while rung < epochs:
        milestones.append(rung)
        rung *= reduction_factor
    return milestones + [epochs]


class RungCosine:
    """Learning-rate factor of optimizer step ``s`` under ``schedule: rung_cosine``: cosine cycles
    with warm restarts (Loshchilov & Hutter 2017, SGDR, Eq. 5, with eta_min = 0) whose ends are the
    ASHA rungs (:func:`rung_milestones`).

    Each step trains at the cosine's value where the step ends, so the last step before a
    milestone trains at exactly 0 (the minimum) and ASHA judges every rung at the end of a decay; the
    next step restarts near the peak, so a promoted trial simply continues into the next cycle.
    The schedule advances once per optimizer step; ``LambdaLR`` saves this object's fields and the
    step count in its ``state_dict``, so a trial resumed mid-cycle continues its cycle exactly.
    """

    def __init__(self, milestones: list[int], steps_per_epoch: int):
        self.milestones = list(milestones)
        self.steps_per_epoch = steps_per_epoch

    def __call__(self, step: int) -> float:
        done = step + 1   # steps completed when this one ends (integers: a milestone is exact)
        start = 0
        for end in self.milestones:
            if done <= end * self.steps_per_epoch:
                fraction = (done - start * self.steps_per_epoch) / ((end - start) * self.steps_per_epoch)
                return 0.5 * (1 + math.cos(math.pi * fraction))
            start = end
        return 0.0


def build_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: Optional[int] = None):
    """The learning-rate schedule of ``cfg``; ``rung_cosine`` steps once per batch, so it needs
    ``steps_per_epoch`` (batches per epoch), the others once per epoch."""
    if cfg.schedule == "rung_cosine":
        if not steps_per_epoch:
            raise ValueError("schedule rung_cosine needs steps_per_epoch (batches per epoch)")
        milestones = rung_milestones(cfg.epochs, cfg.rung_grace_epochs, cfg.rung_reduction_factor)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, RungCosine(milestones, steps_per_epoch))
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda e: 0.5 * (1 + math.cos(math.pi * e / cfg.epochs)))
    if cfg.schedule == "multistep":
        milestones = [int(cfg.epochs * 0.5), int(cfg.epochs * 0.75)]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0)


def pick_device(requested: str = "auto") -> torch.device:
    """CUDA when present (or asked for), else CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def usable_cpus() -> int:
    """The cores this process may run on: its CPU affinity, capped by a readable cgroup CPU quota.

    ``os.cpu_count()`` counts the host's cores; a container or ``taskset`` may grant far fewer, and
    torch's default of one thread per host core then makes the threads wait on each other.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota()
    return max(1, min(cores, math.ceil(quota)) if quota else cores)


def _cgroup_quota(root: str = "/sys/fs/cgroup") -> Optional[float]:
    """CPUs of the cgroup quota (cgroup v2 ``cpu.max``, else v1 ``cfs_quota_us``); None without one."""
    for quota_file, period_file in (("cpu.max", None), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            with open(os.path.join(root, quota_file)) as f:
                numbers = f.read().split()
            if period_file:
                with open(os.path.join(root, period_file)) as f:
                    numbers += f.read().split()
            quota, period = numbers[0], float(numbers[1])
        except (OSError, IndexError, ValueError):
            continue
        if quota in ("max", "-1") or period <= 0:
            return None
        return float(quota) / period
    return None


def set_threads(threads: Optional[float] = None) -> int:
    """Give torch ``threads`` intra-op threads (at least one) and return the number set: a trial its
    CPU reservation, ``otarena train`` and ``evaluate`` their ``--threads``. By default, the cores this
    process may use (:func:`usable_cpus`), or torch's own count if lower (``OMP_NUM_THREADS``)."""
    count = max(1, int(threads)) if threads is not None else min(usable_cpus(), torch.get_num_threads())
    torch.set_num_threads(count)
    return count


class WeightAverage:
    """An exponential moving average of a model's weights (``ema_decay``), held in a copy of the model.

    After every optimizer step each floating-point entry of the state_dict moves toward the training
    model's: ``avg = d * avg + (1 - d) * live`` with ``d = min(decay, (1 + t) / (10 + t))`` after t
    updates (the ``num_updates`` warm-up of TensorFlow's ``ExponentialMovingAverage``), so that in a
    short run the average is not dominated by the initial weights.

    BatchNorm: the running mean and variance are averaged the same way as the weights (timm's
    ``ModelEmaV2`` does so too); ``num_batches_tracked`` is copied. Those statistics are of the
    training batches, which for adversarial training are the attacked ones: a clean ``update_bn``
    pass over the training set would measure a different distribution unless it ran the attack again
    (an epoch's cost). Averaging them costs nothing, and with a decay close to 1 the weights they
    were measured under drift slowly, so they track the averaged weights.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        live = model.state_dict()
        for name, average in self.model.state_dict().items():
            if average.is_floating_point():
                average.lerp_(live[name], 1 - decay)
            else:
                average.copy_(live[name])

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]


@dataclass
class Run:
    """Everything one training run needs, and everything its checkpoint holds."""

    method: Any
    """A ``methods.common.method.Method`` (it holds the model, optimizer and threat model)."""
    schedule: Any
    train: TensorData
    val: TensorData
    cfg: TrainConfig
    epoch: int = 0
    """Epochs completed."""
    best: Optional[dict] = None
    """Validation metrics of the best epoch so far (by PGD accuracy, then clean accuracy)."""
    best_model: Optional[dict] = None
    """A CPU copy of the weights of the best epoch (the averaged ones when ``cfg.ema_decay`` > 0):
    what the final evaluation scores."""
    ema: Optional[WeightAverage] = None
    """The average of the weights, created when ``cfg.ema_decay`` > 0."""

    def __post_init__(self):
        if self.ema is None and self.cfg.ema_decay > 0:
            self.ema = WeightAverage(self.model, self.cfg.ema_decay)

    @property
    def model(self):
        return self.method.model

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.method.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "method": self.method.state_dict(),
                "epoch": self.epoch, "best": self.best, "best_model": self.best_model,
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "train_config": asdict(self.cfg)}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.method.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.method.load_state_dict(state["method"])
        self.epoch, self.best, self.best_model = state["epoch"], state["best"], state["best_model"]
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])


def validate(model: torch.nn.Module, val: TensorData, threat: ThreatModel, cfg: TrainConfig,
             single_step: bool = False) -> dict:
    """Clean and PGD accuracy on the fixed validation subset; seeded, so epochs compare fairly.

    ``single_step`` (a method trained on one-step attacks, ``Method.single_step``): FGSM accuracy too, the
    curve that shows catastrophic overfitting, FGSM accuracy climbing while PGD's collapses (Wong et al.,
    ICLR 2020)."""
    subset = val.subset(cfg.val_n_ex)
    generator = torch.Generator(device=subset.x.device).manual_seed(cfg.seed)
    metrics = {
        "val/clean_acc": accuracy(model, subset.x, subset.y),
        "val/pgd_acc": pgd_accuracy(model, subset.x, subset.y, threat, steps=cfg.val_pgd_steps,
                                    generator=generator),
    }
    if single_step:
        with eval_mode(model):
            attacked = torch.cat([fgsm(model, x, y, eps=threat.eps, norm=threat.norm)
                                  for x, y in zip(subset.x.split(512), subset.y.split(512))])
        metrics["val/fgsm_acc"] = accuracy(model, attacked, subset.y)
    return metrics


def prepare(run: Run) -> None:
    """Put ``run.model`` on the fast path its ``cfg`` asks for: channels-last, then compiled.

    Both act in place and keep the parameters' identity and names, so the optimizer, the
    checkpoint and ``best_model`` are unaffected; calling it again does nothing.
    """
    cfg, model = run.cfg, run.model
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)   # 4-d weights only; values unchanged
    if cfg.compile and getattr(model, "_compiled_call_impl", None) is None and \
            compile_available(next(model.parameters()).device):
        model.compile()   # in place: unlike torch.compile(model), no "_orig_mod." key prefix


def compile_available(device: torch.device) -> bool:
    """Whether ``torch.compile`` works here; if not, say why in one warning line.

    Compilation is lazy, so a missing compiler toolchain or an unsupported Python would only fail
    at the first training step; a two-element probe finds out at once.
    """
    try:
        torch.compile(lambda t: t * 2 + 1)(torch.ones(2, device=device))
    except Exception as err:   # noqa: BLE001 (any failure means: train without compiling)
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        warnings.warn(f"compile: skipped, torch.compile is unavailable here ({type(err).__name__}: {reason})",
                      RuntimeWarning, stacklevel=3)
        return False
    return True


def autocast(device: torch.device, precision: str):
    """bfloat16 autocast on ``device`` for ``precision="bf16"`` (CUDA or CPU), else nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, *,
               generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
    """One ``method.step`` on a training batch, on the fast path of ``run.cfg``.

    The batch is augmented (with ``generator``), put in channels-last, and the whole step runs
    under autocast: the method owns its forward, attack, backward and optimizer step, so the
    autocast region cannot stop at the loss. Backward ops still run in the dtypes their forward
    ops chose, and the optimizer updates fp32 weights.
    """
    cfg = run.cfg
    x = augment(x, cfg.augment, generator=generator)
    if cfg.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(x.device, cfg.precision):
        return run.method.step(x, y, idx)


def epoch_value(total: torch.Tensor, n_batches: int) -> float:
    """An epoch's value of a step metric summed over its steps: the mean of a scalar, or, for summed
    ``(hits, n)`` pairs (``methods.common.method.hits``), the exact share hits / n."""
    if total.is_floating_point():
        return float(total) / n_batches
    hit, n = total.tolist()
    return hit / n


def fit(run: Run, on_epoch_end: Optional[Callable[[dict, Run], None]] = None) -> Run:
    """Train ``run`` from ``run.epoch`` to ``run.cfg.epochs``, validating after each epoch.

    ``on_epoch_end(metrics, run)`` gets the epoch's metrics (``train/*``, ``val/*``,
    ``time/epoch_s``, ``epoch``) and the run, whose ``state_dict()`` is the checkpoint. With
    ``ema_decay`` > 0, ``val/*`` and ``best_model`` are the averaged weights', and ``val/raw_*`` the
    training weights' (the same trial scored both ways).
    """
    cfg, model = run.cfg, run.model
    per_step = cfg.schedule == "rung_cosine"
    prepare(run)
    while run.epoch < cfg.epochs:
        start = time.perf_counter()
        model.train()
        # Seeded per epoch, so a run resumed from a checkpoint sees the same batches.
        epoch_seed = cfg.seed * 100_003 + run.epoch
        generator = torch.Generator().manual_seed(epoch_seed)
        # Augmentation draws on the data's device (no host-to-device copy per batch) from its own
        # generator, so the batch order stays that of an unaugmented run with the same seed.
        crops = None if cfg.augment == "none" else \
            torch.Generator(device=run.train.x.device).manual_seed(epoch_seed + _AUGMENT_STREAM)
        sums: dict[str, torch.Tensor] = {}
        n_batches = 0
        for x, y, idx in batches(run.train, cfg.batch_size, shuffle=True, generator=generator):
            for key, value in train_step(run, x, y, idx, generator=crops).items():
                sums[key] = sums[key] + value if key in sums else value
            n_batches += 1
            if run.ema is not None:
                run.ema.update(model)
            if per_step:
                run.schedule.step()
        if not per_step:
            run.schedule.step()
        metrics = {f"train/{k}": epoch_value(v, n_batches) for k, v in sums.items()}
        if not math.isfinite(metrics["train/loss"]):
            raise DivergedError(f"training loss is {metrics['train/loss']} at epoch {run.epoch + 1}")
        scored = model if run.ema is None else run.ema.model
        single_step = run.method.single_step
        metrics.update(validate(scored, run.val, run.method.threat, cfg, single_step))
        if run.ema is not None:
            metrics.update({k.replace("val/", "val/raw_"): v
                            for k, v in validate(model, run.val, run.method.threat, cfg, single_step).items()})
        run.epoch += 1
        metrics["time/epoch_s"] = time.perf_counter() - start
        metrics["epoch"] = run.epoch
        if run.best is None or (metrics["val/pgd_acc"], metrics["val/clean_acc"]) > \
                (run.best["val/pgd_acc"], run.best["val/clean_acc"]):
            run.best = {"val/pgd_acc": metrics["val/pgd_acc"], "val/clean_acc": metrics["val/clean_acc"],
                        "epoch": run.epoch}
            # Contiguous, so that the copy is the same whatever the run's memory format.
            run.best_model = {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
                              for k, v in scored.state_dict().items()}
        # Robust overfitting (Rice et al., ICML 2020): how far this epoch's validation PGD accuracy fell below
        # the best epoch's; at the last epoch, "best - last" on the leaderboard.
        metrics["val/overfit_gap"] = run.best["val/pgd_acc"] - metrics["val/pgd_acc"]
        if on_epoch_end is not None:
            on_epoch_end(metrics, run)
    return run
