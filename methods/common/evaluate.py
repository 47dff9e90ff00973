# SPDX-License-Identifier: Apache-2.0
"""The small evaluation core: clean, PGD-k, AutoAttack, eps-sweep and certified accuracy, with flags and checks.

``evaluate(model, data, threat_model, attacks=..., n_ex=...)`` is the one entry point, in the
spirit of RobustBench's ``benchmark()``: it takes any ``nn.Module`` on [0, 1] inputs and a dataset
split and returns accuracies with 95% confidence intervals and the automatic flags that catch the
classic evaluation errors of [2] and [4] (gradient masking, accuracy above chance at huge eps,
unsound certificates, small samples). Attacks always use true labels and random starts. Five cheap
checks of [4]'s checklist (:data:`CHECKS`: FGSM, uniform noise, transfer from a surrogate, PGD's
convergence [5], an unbounded attack) each add a flag when the white-box attacks failed where they
should not have. A point counts as correct only where its true class has the strictly largest
logit (docs/metrics.md: what counts as correct).

Each measurement is a :class:`Stage` of the table :data:`STAGES`: its name, the stages whose
results it reads, its function, the result keys it writes, its MLflow metrics and the metric its
leaderboard column shows. ``evaluate()`` runs the stages asked for, in table order, with one
:class:`EvalSettings`. Adding an attack is one entry in :data:`STAGES` (docs/architecture.md).

Every accuracy is an exact count over the number of points (:func:`share`): 132 of 200 is the
double nearest 0.66, as ``132 / 200`` is, and flags compare those counts exactly.

Sharding (multi-GPU AutoAttack, fra31/auto-attack#94; docs/cluster.md). The costly per-point stages,
those with a :attr:`Stage.measure` (clean, PGD, the AutoAttack cascade), can run split over workers:
:func:`evaluate_shard` measures one contiguous slice of whole batches of the evaluated points
(:func:`shard_bounds`), and ``evaluate(..., shards=...)`` merges the slices (:func:`merge_shards`) and
runs the rest once on the whole set. The result equals the unsharded one point for point, for a
deterministic model: PGD's random starts are seeded per batch from the batch's place among all the
points (:func:`batch_seed`), AutoAttack seeds each batch's attacks itself, and the checks that look at
"the first batch" (the randomness checks, pyautoattack's checks) look at the whole set's first batch in
every shard. What needs the whole set runs once, after the merge: the steps check and the eps sweep,
the checks of [4]'s checklist (the transfer check's quick surrogate trains on all the points, the
unbounded check compares every point's class; each check's "only" share reads the merged PGD and
AutoAttack outcomes), the certificate (one forward pass), the flags with the aa-gap rule, the
confidence intervals (from the merged counts) and, for a randomized model, AutoAttack's ``rand`` run
on the points the merged cascade left standing. A randomized model's own draws are not seeded, so its
numbers agree between sharded and unsharded runs only in distribution.

References:
    [1] Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
        parameter-free attacks", ICML 2020 (AutoAttack; we use the pyautoattack package).
    [2] Croce et al., "RobustBench: a standardized adversarial robustness benchmark", NeurIPS 2021 D&B.
    [3] Gowal et al., "An alternative surrogate loss for PGD-based adversarial testing", 2019
        (multi-targeted PGD).
    [4] Carlini et al., "On evaluating adversarial robustness", 2019, Section 5 (the sanity checks:
        more iterations never help, accuracy reaches chance at large eps, black-box <= white-box,
        single-step <= iterative, random noise and transfer never beat gradients, an unbounded attack
        always succeeds).
    [5] Pintor et al., "Indicators of Attack Failure: Debugging and Improving Optimization of
        Adversarial Examples", NeurIPS 2022 (incomplete optimization: the loss still rising).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from otarena.methods.common.attacks import (ThreatModel, ce_loss, correct, eval_mode, fgsm, frozen, loss_path,
                                            madry_step, pgd, pgd_best, project, random_start)

METRIC_PREFIX = "test/"
"""The MLflow namespace of an evaluation's metrics (docs/mlflow-schema.md)."""


def share(hits: torch.Tensor) -> float:
    """The share of true entries of ``hits``: an exact count over n, as a Python float.

    A float32 mean would store 132 / 200 as 0.6600000262 and make 0.66 - 0.61 exceed 0.05.
    """
    n = hits.numel()
    return int(hits.sum()) / n if n else float("nan")


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([correct(model(x[i:i + batch_size]), y[i:i + batch_size])
                      for i in range(0, len(y), batch_size)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Clean accuracy (an exact fraction), in eval mode; a point counts only where its true class has the
    strictly largest logit (:func:`~otarena.methods.common.attacks.correct`)."""
    with eval_mode(model):
        return share(_correct(model, x, y, batch_size))


def pgd_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, *, steps: int = 10,
                step_size: Optional[float] = None, restarts: int = 1, targets: int = 0, keep_best: bool = True,
                batch_size: int = 512, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per point: still correct under PGD-``steps`` with random start, on true labels.

    The attack runs ``restarts`` random starts on cross-entropy, then one start per target on the
    margin toward each of the ``targets`` most likely wrong classes (multi-targeted PGD; at most
    every wrong class the data has); a point
    counts as robust only if it survives all of them. Like AutoAttack, each run attacks only the
    points that are still standing. With ``keep_best`` each run keeps its most adversarial iterate,
    else (as most published evaluations) its last one.
    """
    keep_best = keep_best or restarts > 1
    attack = dict(eps=threat.eps, norm=threat.norm, steps=steps, step_size=step_size, generator=generator)

    def fooled(xs, ys, **kwargs):
        if keep_best:  # the attack scored its kept iterate already
            return pgd_best(model, xs, ys, **attack, **kwargs)[1]
        return ~_correct(model, pgd(model, xs, ys, **attack, **kwargs), ys, len(ys))

    with eval_mode(model):
        standing = []
        for i in range(0, len(y), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            with torch.no_grad():
                clean_logits = model(xb)
            survived = correct(clean_logits, yb)
            wrong = clean_logits.scatter(1, yb[:, None], -float("inf"))
            likeliest = wrong.argsort(1, descending=True)[:, :min(targets, wrong.shape[1] - 1)]
            # First the cross-entropy starts (target None), then one margin start per likeliest wrong class.
            for target in [None, *likeliest.T]:
                rows = survived.nonzero()[:, 0]
                if not len(rows):
                    break
                run = dict(restarts=restarts) if target is None else dict(target=target[rows])
                survived[rows] = ~fooled(xb[rows], yb[rows], **run)
            standing.append(survived)
        return torch.cat(standing)


def pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, **kwargs) -> float:
    """Robust accuracy (an exact fraction) under :func:`pgd_correct`."""
    return share(pgd_correct(model, x, y, threat, **kwargs))


def expected_pgd_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, *, draws: int,
                         steps: int = 10, step_size: Optional[float] = None, restarts: int = 1, targets: int = 0,
                         batch_size: int = 512, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per point, for a randomized model: of ``draws`` forward passes, how many classify it correctly
    at its worst input among the clean one and the last iterates of :func:`pgd_correct`'s runs.

    Scoring every iterate by one noisy pass, as :func:`pgd_correct` does, counts a point as broken if
    any of some hundred draws misclassified it, so any randomized model scores near 0. Here each run's
    last iterate is scored by its expected accuracy over ``draws`` passes, as Expectation over
    Transformation does (Athalye et al., ICML 2018, Section 4); the points some draw still classifies
    correctly meet the next run. ``sum / (n * draws)`` is the expected accuracy.
    """
    attack = dict(eps=threat.eps, norm=threat.norm, steps=steps, step_size=step_size, generator=generator)
    with eval_mode(model):
        counts = []
        for i in range(0, len(y), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            with torch.no_grad():
                wrong = model(xb).scatter(1, yb[:, None], -float("inf"))
            likeliest = wrong.argsort(1, descending=True)[:, :min(targets, wrong.shape[1] - 1)]
            count = count_correct(model, xb, yb, draws)
            for target in [None] * restarts + list(likeliest.T):
                rows = (count > 0).nonzero()[:, 0]
                if not len(rows):
                    break
                x_adv = pgd(model, xb[rows], yb[rows], **attack, target=None if target is None else target[rows])
                count[rows] = torch.minimum(count[rows], count_correct(model, x_adv, yb[rows], draws))
            counts.append(count)
        return torch.cat(counts)


@torch.no_grad()
def count_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int) -> torch.Tensor:
    """Per point: how many of ``draws`` forward passes answer its true class (:func:`correct`)."""
    return sum(correct(model(x), y).long() for _ in range(draws))


def _randomized(run: "StageInput") -> Optional[str]:
    """Why the model is randomized (the same clean input, or random point of the eps-ball, gives other
    logits twice), or None: checked afresh for every evaluation."""
    from otarena.methods.common.autoattack import eps_ball_points, randomness

    x = run.first_batch()[0]
    with eval_mode(run.model):
        return randomness(run.model, {"clean": x, "random eps-ball": eps_ball_points(x, run.threat, run.seed)})


def confidence_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of an accuracy measured on ``n`` points (95% by default).

    Unlike the normal approximation it stays inside [0, 1] and is sound at 0% and 100%.
    """
    if n <= 0:
        return 0.0, 1.0
    center = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, center - half), min(1.0, center + half)


def chance_eps(norm: str, x: torch.Tensor) -> float:
    """The smallest radius whose ball around every image in [0, 1] holds the constant grey image.

    There, every input can become the same image, so no classifier beats the share of the class
    it predicts for it (at most the largest class): robust accuracy must fall to chance.
    """
    return 0.5 if norm == "Linf" else 0.5 * math.sqrt(x[0].numel())


def sweep_radii(threat: ThreatModel, x: torch.Tensor) -> list[float]:
    """0, eps/2, eps, 2 eps, 4 eps (within the norm's valid range), and the chance radius."""
    top = chance_eps(threat.norm, x)
    radii = [0.0] + [f * threat.eps for f in (0.5, 1, 2, 4)] + [top]
    limit = 1.0 if threat.norm == "Linf" else float("inf")
    return sorted({round(r, 6) for r in radii if r <= limit})


def eps_sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, *,
              radii: Optional[Iterable[float]] = None, steps: int = 20, batch_size: int = 512,
              seed: int = 0) -> dict:
    """Robust accuracy against radius, by PGD-``steps`` (cross-entropy, random start).

    ``pgd_acc`` is the white-box curve. ``robust_acc`` also counts the gradient-free candidate
    that moves each image toward the constant grey image as far as the ball allows; it reaches
    the chance bound at the largest radius for any model, masked or not, so the gap between the
    two curves measures how much the gradients hide.
    """
    radii = list(radii) if radii is not None else sweep_radii(threat, x)
    curve = {"eps": radii, "pgd_acc": [], "robust_acc": [], "steps": steps, "norm": threat.norm,
             "chance_bound": torch.bincount(y.cpu()).max().item() / len(y)}
    with eval_mode(model):
        clean = _correct(model, x, y, batch_size)
        for eps in radii:
            if eps == 0:
                correct = grey = clean
            else:
                at = ThreatModel(threat.norm, eps)
                generator = torch.Generator(device=x.device).manual_seed(seed)
                correct = pgd_correct(model, x, y, at, steps=steps, step_size=madry_step(eps, steps),
                                      batch_size=batch_size, generator=generator)
                grey = _correct(model, project(torch.full_like(x, 0.5), x, eps, threat.norm), y, batch_size)
            curve["pgd_acc"].append(share(correct))
            curve["robust_acc"].append(share(correct & grey))
    return curve


@dataclass(frozen=True)
class Thresholds:
    """When an evaluation raises a flag (accuracies as fractions)."""

    aa_gap: float = 0.05
    """``masking:aa-gap``: AutoAttack more than this far below PGD, beyond sampling noise: the lower end of
    the 95% interval of the gap exceeds it (:func:`aa_gap_interval`)."""
    plateau: float = 0.10
    """``masking:eps-plateau``: PGD accuracy at the chance radius more than this above the chance bound..."""
    rise: float = 0.02
    """...or PGD accuracy rising by more than this from one radius to the next."""
    steps: float = 0.015
    """``masking:steps``: a longer or restarted PGD more than this *more* accurate than a shorter one."""
    blackbox: float = 0.01
    """``masking:blackbox``: Square fools at least this share of the points the white-box attacks could not."""
    small_sample: int = 1000
    """``small-sample``: fewer test points than this."""
    lipschitz: float = 0.02
    """``unsound-certificate``: a measured Lipschitz bound above 1 + this."""
    fgsm: float = 0.01
    """``masking:fgsm``: FGSM's accuracy more than this below PGD's (a single step beats the iterative attack)."""
    noise: float = 0.01
    """``masking:noise``: uniform noise in the eps-ball fools at least this share of the points that PGD and
    AutoAttack both failed on."""
    transfer: float = 0.01
    """``masking:transfer``: examples crafted on a surrogate model fool at least this share of the points that
    PGD and AutoAttack both failed on."""
    convergence: float = 0.05
    """``masking:convergence``: PGD's best loss still rising over its last steps on more than this share of
    the points (of all points) it failed on."""
    convergence_rise: float = 0.05
    """...where "rising" is a gain of more than this share of the point's loss range over the last steps."""
    unbounded: float = 0.0
    """``masking:unbounded``: PGD with a radius that spans the whole input space leaves more than this share
    correct."""
    robust_overfitting: float = 0.03
    """``robust-overfitting`` (a note): the selected trial's last epoch scored more than this below its best epoch
    in validation PGD accuracy (Rice et al., ICML 2020); judged from the training curve, not the test split."""
    catastrophic_overfitting: float = 0.2
    """``catastrophic-overfitting`` (a note): a single-step method's last epoch left FGSM accuracy more than this
    above PGD accuracy on validation (Wong et al., ICLR 2020)."""


_LARGEST_N = 10 ** 6
"""The most test points an accuracy is assumed to count when ``n_ex`` is not known."""


def _exact(accuracy: float, n: Optional[int]) -> Fraction | float:
    """The exact fraction k / n that an accuracy stands for (the nearest one with a denominator <= n).

    An accuracy from :func:`share` is k / n rounded to the nearest double; two fractions with
    denominators up to n differ by at least 1 / n^2, far more than that rounding, so this
    recovers k / n itself.
    """
    if not math.isfinite(accuracy):
        return accuracy
    return Fraction(accuracy).limit_denominator(n or _LARGEST_N)


def _beyond(high: float, low: float, threshold: float, n: Optional[int]) -> bool:
    """``high - low > threshold``, exactly: 0.66 - 0.61 is not more than 0.05."""
    return _exact(high, n) - _exact(low, n) > Fraction(str(threshold))


def _points(delta: float) -> str:
    return f"{100 * delta:.1f} points"


def flags_for(result: dict, thresholds: Thresholds = Thresholds()) -> dict[str, str]:
    """Automatic warnings about an evaluation: flag name -> one-line reason.

    The checks of RobustBench's and AutoAttack's flags_doc, and the sanity checks of [4]:
    gradient masking shows as AutoAttack far below PGD, accuracy that does not fall to chance as
    eps grows, more PGD steps that help the defense, or the black-box attack succeeding where the
    white-box ones failed. Accuracies are compared as the exact counts they stand for
    (:func:`_exact`), so a gap of exactly a threshold is never beyond it.
    """
    t, flags, n_ex = thresholds, {}, result.get("n_ex")
    pgd_name = f"PGD-{result.get('settings', {}).get('pgd_steps', 'k')}"
    if "aa_acc" in result and "pgd_acc" in result and _beyond(result["pgd_acc"], result["aa_acc"], t.aa_gap, n_ex):
        low, high = aa_gap_interval(result["pgd_acc"], result["aa_acc"], n_ex)
        if low > t.aa_gap:
            flags["masking:aa-gap"] = (f"AutoAttack {_points(result['pgd_acc'] - result['aa_acc'])} below {pgd_name} "
                                       f"(95% interval {100 * low:.1f} to {100 * high:.1f})")
    sweep = result.get("eps_sweep")
    if sweep:
        eps, acc, bound = sweep["eps"], sweep["pgd_acc"], sweep["chance_bound"]
        rises = [i for i in range(len(acc) - 1) if _beyond(acc[i + 1], acc[i], t.rise, n_ex)]
        if _beyond(acc[-1], bound, t.plateau, n_ex):
            flags["masking:eps-plateau"] = (f"PGD accuracy {acc[-1]:.1%} at eps={eps[-1]:g}, where no classifier "
                                            f"beats {bound:.1%}")
        elif rises:
            i = rises[0]
            flags["masking:eps-plateau"] = (f"PGD accuracy rises from {acc[i]:.1%} at eps={eps[i]:g} to "
                                            f"{acc[i + 1]:.1%} at eps={eps[i + 1]:g}")
    ladder = result.get("pgd_steps_check")
    if ladder:
        runs = list(ladder.items())
        for (short, short_acc), (long, long_acc) in zip(runs, runs[1:]):
            if _beyond(long_acc, short_acc, t.steps, n_ex):
                flags["masking:steps"] = f"{long} is {_points(long_acc - short_acc)} more accurate than {short}"
                break
    blackbox_only = result.get("aa_blackbox_only", 0.0)
    if blackbox_only > 0 and _exact(blackbox_only, n_ex) >= Fraction(str(t.blackbox)):
        flags["masking:blackbox"] = (f"Square (black-box) fooled {result['aa_blackbox_only']:.1%} of the points "
                                     f"that every white-box attack failed on")
    flags.update(_checklist_flags(result, t, n_ex))
    flags.update(result.get("aa_checks", {}))
    n = result.get("n_ex", t.small_sample)
    if n < t.small_sample:
        low, high = result.get("ci95", {}).get("aa_acc", result.get("ci95", {}).get("clean_acc", (0, 0)))
        flags["small-sample"] = f"n_ex = {n} < {t.small_sample}: 95% CI is {_points((high - low) / 2)} wide each way"
    bound = result.get("lipschitz_bound")
    attacked = min(result.get("aa_acc", 1.0), result.get("pgd_acc", 1.0))
    beaten = _exact(attacked, n_ex) < _exact(result.get("certified_acc", 0.0), n_ex)
    if "certified_refused" in result:
        flags["unsound-certificate"] = result["certified_refused"]
    elif bound is not None and bound > 1 + t.lipschitz:
        flags["unsound-certificate"] = f"measured Lipschitz bound {bound:.3f} > 1 + {t.lipschitz:g}"
    elif beaten:
        flags["unsound-certificate"] = "an attack beats the certified accuracy"
    return flags


def aa_gap_interval(pgd_acc: float, aa_acc: float, n: Optional[int]) -> tuple[float, float]:
    """95% interval of the gap ``pgd_acc - aa_acc``, both measured on the same ``n`` points.

    The gap is the share of points AutoAttack breaks and PGD does not, less the (usually no) points
    PGD breaks and AutoAttack does not: a paired difference. Its interval is taken as the Wilson
    interval of that share, which assumes the second kind is empty; any such point only widens the
    true interval, so this errs toward flagging. A gap the sample cannot tell from a weaker PGD
    (12 of 200 points, 95% interval 3.5 to 10.2 points) is not called masking.
    """
    gap = float(_exact(pgd_acc, n) - _exact(aa_acc, n))
    if n is None:
        return gap, gap
    low, high = confidence_interval(min(max(gap, 0.0), 1.0), n)
    return low, high


def _checklist_flags(result: Mapping, t: Thresholds, n_ex: Optional[int]) -> dict[str, str]:
    """The flags of the cheap checks of [4]'s checklist (:data:`CHECKS`): each stage's one rule."""
    flags = {}
    pgd_name = f"PGD-{result.get('settings', {}).get('pgd_steps', 'k')}"
    if "fgsm_acc" in result and "pgd_acc" in result and _beyond(result["pgd_acc"], result["fgsm_acc"], t.fgsm, n_ex):
        flags["masking:fgsm"] = (f"FGSM leaves {result['fgsm_acc']:.1%} correct, "
                                 f"{_points(result['pgd_acc'] - result['fgsm_acc'])} below {pgd_name}: "
                                 f"one step beats the iterative attack")
    for key, flag, what in (("noise_only", "masking:noise", "uniform noise in the eps-ball"),
                            ("transfer_only", "masking:transfer", "examples transferred from the surrogate")):
        only, threshold = result.get(key), getattr(t, flag.split(":")[1])
        if only and _exact(only, n_ex) >= Fraction(str(threshold)):
            flags[flag] = f"{what} fooled {only:.1%} of the points that PGD and AutoAttack both failed on"
    rising = result.get("convergence_rising")
    if rising is not None and _beyond(rising, 0.0, t.convergence, n_ex):
        flags["masking:convergence"] = (f"PGD's best loss still rising over its last steps on {rising:.1%} of the "
                                        f"points: the attack had not converged")
    unbounded = result.get("unbounded_pgd_acc")
    if unbounded is not None and _beyond(unbounded, 0.0, t.unbounded, n_ex):
        flags["masking:unbounded"] = (f"PGD with an unbounded radius leaves {unbounded:.1%} correct: an attack that "
                                      f"cannot fool the model anywhere in the input space has failed")
    return flags


@dataclass(frozen=True)
class EvalSettings:
    """How hard an evaluation attacks: the one home of its defaults (search's ``FinalEval`` reads them)."""

    n_ex: Optional[int] = None
    """Evaluate the first ``n_ex`` points of the split (``None``: all of them)."""
    pgd_steps: int = 50
    """Iterations of each run of the ``pgd`` stage."""
    pgd_restarts: int = 1
    """Random starts on cross-entropy."""
    pgd_targets: int = 9
    """Then one run on the margin toward each of this many likeliest wrong classes (multi-targeted PGD [3]);
    9 as AutoAttack's APGD-T, or every wrong class when the data has fewer."""
    pgd_step_size: Optional[float] = None
    """``None``: eps / 4. Each run keeps its most adversarial iterate, so a large step never weakens a long attack."""
    aa_version: str = "standard"
    """The pyautoattack version of the ``autoattack`` stage: ``standard`` or ``plus``."""
    eot_iters: int = 20
    """For a randomized model: the draws of AutoAttack's ``rand`` version (each gradient's Expectation
    over Transformation), and the draws that score each point's expected accuracy, there and in PGD."""
    sweep_steps: int = 20
    """PGD iterations at each radius of the eps sweep."""
    sweep_radii: Optional[tuple[float, ...]] = None
    """Radii of the eps sweep (``None``: :func:`sweep_radii`)."""
    noise_draws: int = 20
    """Uniform draws in the eps-ball per point of the ``noise`` check."""
    transfer_steps: int = 10
    """PGD iterations on the surrogate of the ``transfer`` check."""
    surrogate_epochs: int = 5
    """Epochs of the quick ERM surrogate the ``transfer`` check trains when it is given none."""
    convergence_window: float = 0.1
    """The last share of PGD's steps over which the ``convergence`` check looks for a rising loss."""
    batch_size: int = 500
    thresholds: Thresholds = Thresholds()
    """When flags are raised."""


@dataclass
class StageInput:
    """What a stage's function gets: the model, the points, the settings and the results so far."""

    model: nn.Module
    """The model the attacks run on (its ``inference()`` form when it has one)."""
    given_model: nn.Module
    """The model as passed to :func:`evaluate`; the certificate exports it itself."""
    x: torch.Tensor
    y: torch.Tensor
    threat: ThreatModel
    settings: EvalSettings
    seed: int
    """Seeds every random start and AutoAttack."""
    state_path: Optional[str]
    """AutoAttack's per-batch state file."""
    say: Callable[[str], None]
    stopwatch: "_Stopwatch"
    result: dict
    """The keys the stages before this one wrote: a stage finds what it ``needs`` here."""
    surrogate: Optional[nn.Module] = None
    """The model the ``transfer`` check crafts its examples on (``None``: it trains a quick ERM one)."""
    survivors: dict = dataclasses.field(default_factory=dict)
    """Per point, still correct after each white-box attack stage (``{"pgd": mask}``): the checks compare
    against the points every one of them failed on. Not part of the result."""
    per_example: dict = dataclasses.field(default_factory=dict)
    """Per point, what the stages measured (``clean``, ``aa_stage``, ...): the result's ``per_example``
    (:func:`per_example`)."""
    offset: int = 0
    """Where ``x`` starts among the evaluated points: a shard's first index (:func:`evaluate_shard`), else 0."""
    head: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    """The whole evaluation's first batch, where the randomness checks look (``None``: ``x``'s own first batch),
    so that every shard decides as the unsharded evaluation does."""
    measured: dict = dataclasses.field(default_factory=dict)
    """Per sharded stage (one with a :attr:`Stage.measure`), its per-point measurements: measured here, or
    merged from the shards (:func:`merge_shards`); the stage's ``run`` reads them."""

    @property
    def pgd_step_size(self) -> float:
        step = self.settings.pgd_step_size
        return step if step is not None else self.threat.eps / 4

    def generator(self) -> torch.Generator:
        """A generator seeded afresh, so that every attack starts from the same random state."""
        return torch.Generator(device=self.x.device).manual_seed(self.seed)

    def first_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole evaluation's first batch (:attr:`head`), where the randomness checks look."""
        size = self.settings.batch_size
        return self.head if self.head is not None else (self.x[:size], self.y[:size])

    def per_batch(self, attack: Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]) -> torch.Tensor:
        """``attack(x, y, generator)`` batch by batch, concatenated; each batch's generator is seeded from the
        batch's place among all the evaluated points (:func:`batch_seed`), so that a point meets the same random
        starts whichever shard attacks it."""
        size = self.settings.batch_size
        return torch.cat([attack(self.x[i:i + size], self.y[i:i + size], torch.Generator(
            device=self.x.device).manual_seed(batch_seed(self.seed, self.offset + i))) for i in range(0, len(self.y), size)])


def batch_seed(seed: int, start: int) -> int:
    """The seed of the batch that starts at point ``start``: ``seed`` for the first batch, else one drawn from both
    (SHA-256), so that no two batches share their random starts."""
    if start == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}:{start}".encode()).digest()[:7], "little")


def _no_metrics(result: Mapping) -> dict[str, float]:
    return {}


@dataclass(frozen=True)
class Stage:
    """One measurement of :func:`evaluate`, declared as data in :data:`STAGES`."""

    name: str
    """How ``evaluate(attacks=...)`` asks for it."""
    label: str
    """Its progress line, formatted with the :class:`EvalSettings` fields (``"PGD-{pgd_steps}"``)."""
    run: Callable[[StageInput], dict]
    """Measures, and returns the result keys it writes."""
    writes: tuple[str, ...]
    """The result keys (those of report.json too) that ``run`` may return."""
    needs: tuple[str, ...] = ()
    """Stages whose results ``run`` reads when they were asked for too; the table lists them first."""
    accuracy: Optional[str] = None
    """Its headline accuracy among ``writes``: it gets a 95% interval, the metrics ``test/<accuracy>``,
    ``test/<accuracy>_ci_low`` and ``_ci_high``, and a mean and std over seeds."""
    details: Callable[[Mapping], dict[str, float]] = _no_metrics
    """Its other MLflow metrics, read from a result (docs/mlflow-schema.md)."""
    column: Optional[str] = None
    """The MLflow metric its leaderboard column shows, if it has one; the leaderboard's column spec
    names the same key (the leaderboard never imports methods/)."""
    default: bool = True
    """Run when ``evaluate`` is not told which stages to run."""
    measure: Optional[Callable[[StageInput], dict]] = None
    """A sharded stage's per-point measurement (:func:`evaluate_shard`): per point tensors, and facts of the
    whole slice, that :func:`merge_shards` joins; ``run`` then reads them from :attr:`StageInput.measured`.
    A stage without one runs once on the whole set (:func:`evaluate`)."""

    def metrics(self, result: Mapping) -> dict[str, float]:
        """Its MLflow metrics: the accuracy and its 95% interval, then the details."""
        metrics = {}
        if self.accuracy in result:
            name = METRIC_PREFIX + self.accuracy
            metrics[name] = result[self.accuracy]
            if self.accuracy in result.get("ci95", {}):
                metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"] = result["ci95"][self.accuracy]
        return metrics | self.details(result)


def metric_key(name: str) -> str:
    """An MLflow-safe metric name ("PGD-50 with restarts" -> "pgd-50_with_restarts")."""
    return "".join(c if c.isalnum() or c in "-_./" else "_" for c in name.lower())


def _measure_clean(run: StageInput) -> dict:
    with eval_mode(run.model):
        return {"clean": _correct(run.model, run.x, run.y, run.settings.batch_size)}


def _clean(run: StageInput) -> dict:
    run.per_example["clean"] = run.measured["clean"]["clean"]
    return {"clean_acc": share(run.per_example["clean"])}


def _measure_pgd(run: StageInput) -> dict:
    """Per point: ``pgd`` (still correct), or for a randomized model ``pgd_counts`` (correct draws); each batch
    with its own random starts (:meth:`StageInput.per_batch`)."""
    cfg = run.settings
    attack = dict(steps=cfg.pgd_steps, step_size=run.pgd_step_size, restarts=cfg.pgd_restarts,
                  targets=cfg.pgd_targets, batch_size=cfg.batch_size)
    randomized = _randomized(run)
    if randomized:
        run.say(f"randomized model: each PGD start's last iterate scored by its expected accuracy over "
                f"{cfg.eot_iters} draws")
        return {"pgd_randomized": randomized, "pgd_counts": run.per_batch(lambda x, y, generator: expected_pgd_correct(
            run.model, x, y, run.threat, draws=cfg.eot_iters, generator=generator, **attack))}
    return {"pgd_randomized": "", "pgd": run.per_batch(lambda x, y, generator: pgd_correct(
        run.model, x, y, run.threat, generator=generator, **attack))}


def _pgd(run: StageInput) -> dict:
    cfg, found = run.settings, run.measured["pgd"]
    if found["pgd_randomized"]:
        counts = found["pgd_counts"]
        # Standing for the checks: the points most draws still answer (one lucky draw is not robustness).
        run.survivors["pgd"] = 2 * counts > cfg.eot_iters
        return {"pgd_acc": int(counts.sum()) / (len(counts) * cfg.eot_iters),
                "pgd_scoring": f"expected accuracy of each run's last iterate over {cfg.eot_iters} draws "
                               f"({found['pgd_randomized']})"}
    run.survivors["pgd"] = found["pgd"]
    return {"pgd_acc": share(run.survivors["pgd"])}


def _steps_check(run: StageInput) -> dict:
    """Last-iterate PGD with a fifth of the steps, with all of them, then the full PGD: more must never help [4]."""
    cfg, ladder = run.settings, {}
    for steps in (max(1, cfg.pgd_steps // 5), cfg.pgd_steps):
        ladder[f"PGD-{steps}"] = pgd_accuracy(run.model, run.x, run.y, run.threat, steps=steps,
                                              step_size=madry_step(run.threat.eps, steps), keep_best=False,
                                              batch_size=cfg.batch_size, generator=run.generator())
    if "pgd_acc" in run.result:
        ladder[f"PGD-{cfg.pgd_steps} with restarts"] = run.result["pgd_acc"]
    return {"pgd_steps_check": ladder}


def _steps_check_metrics(result: Mapping) -> dict[str, float]:
    return {f"{METRIC_PREFIX}pgd_check/{metric_key(k)}": v for k, v in result.get("pgd_steps_check", {}).items()}


def _cascade_progress(run: StageInput) -> Callable:
    """The AutoAttack cascade's progress lines, through ``run.say``."""
    last_line = [-math.inf]

    def progress(step):
        # One line per attack of a batch, but at most one every PROGRESS_EVERY_S: the last always.
        final = step.batch == step.batches and step.attack is None
        if not final and time.time() - last_line[0] < PROGRESS_EVERY_S:
            return
        last_line[0] = time.time()
        where = f"{step.attack} done" if step.attack else "done"
        left = f", about {_duration(step.left)} left" if step.left is not None and not final else ""
        run.say(f"AutoAttack batch {step.batch}/{step.batches} {where}: {step.robust}/{step.seen} robust so far "
                f"({_duration(step.elapsed)}{left})")
    return progress


def _measure_autoattack(run: StageInput) -> dict:
    """Per point, the cascade's ``aa_stage``; and its attacks, checks and batches read back from its state file."""
    from otarena.methods.common.autoattack import autoattack_cascade

    cfg = run.settings
    cascade = autoattack_cascade(run.model, run.x, run.y, run.threat, version=cfg.aa_version,
                                 batch_size=cfg.batch_size, seed=run.seed, state_path=run.state_path,
                                 progress=_cascade_progress(run), check_points=run.first_batch())
    return {"aa_stage": cascade.stages, "aa_attacks": cascade.attacks, "aa_checks": cascade.checks,
            "aa_resumed_batches": cascade.resumed_batches}


def _autoattack(run: StageInput) -> dict:
    from otarena.methods.common.autoattack import RANDOMIZED, CascadeResult, autoattack_cascade

    cfg, found = run.settings, run.measured["autoattack"]
    cascade = CascadeResult(tuple(found["aa_attacks"]), found["aa_stage"].cpu(), dict(found["aa_checks"]),
                            found["aa_resumed_batches"])
    run.per_example["aa_stage"] = cascade.stages
    run.per_example["aa"] = cascade.stages > len(cascade.attacks)
    written = {"aa_acc": cascade.robust_acc, "aa_per_attack": cascade.per_attack(),
               "aa_blackbox_only": cascade.blackbox_only(), "aa_checks": cascade.checks,
               "aa_resumed_batches": cascade.resumed_batches}
    if RANDOMIZED not in cascade.checks:
        return written
    # A randomized defense: the points the cascade left standing meet AutoAttack's rand version (EOT), and
    # that number ranks the row; the deterministic cascade's stays beside it (docs/mlflow-schema.md).
    run.say(f"randomized model: AutoAttack rand (APGD-CE, APGD-DLR with EOT over {cfg.eot_iters} draws)")
    standing = (cascade.stages > len(cascade.attacks)).to(run.x.device)
    ranking = (f"AutoAttack rand on the points the {cfg.aa_version} cascade left standing: APGD-CE and APGD-DLR "
               f"with EOT over {cfg.eot_iters} draws, each point scored by its expected accuracy over as many draws")
    checks = dict(cascade.checks)
    checks[RANDOMIZED] = f"{checks[RANDOMIZED]}; aa_acc is {ranking}"
    eot_per_attack, resumed = {"apgd-ce": 0.0, "apgd-dlr": 0.0}, 0
    if standing.any():
        eot = autoattack_cascade(run.model, run.x[standing], run.y[standing], run.threat, version="rand",
                                 eot_iters=cfg.eot_iters, batch_size=cfg.batch_size, seed=run.seed,
                                 state_path=f"{run.state_path}.rand" if run.state_path else None,
                                 progress=_cascade_progress(run))
        # Expected accuracy over all the points: the fallen ones count 0.
        eot_per_attack = {name: int(eot.correct_draws[:, i + 1].sum()) / (len(run.y) * eot.draws)
                          for i, name in enumerate(eot.attacks)}
        resumed = eot.resumed_batches
    return written | {"aa_acc": list(eot_per_attack.values())[-1], "aa_acc_deterministic": cascade.robust_acc,
                      "aa_eot_per_attack": eot_per_attack, "aa_ranking": ranking, "aa_checks": checks,
                      "aa_resumed_batches": cascade.resumed_batches + resumed}


PROGRESS_EVERY_S = 10.0
"""The shortest time between two AutoAttack progress lines."""


def _duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _autoattack_metrics(result: Mapping) -> dict[str, float]:
    metrics = {f"{METRIC_PREFIX}aa/{metric_key(k)}": v for k, v in result.get("aa_per_attack", {}).items()}
    metrics |= {f"{METRIC_PREFIX}aa_eot/{metric_key(k)}": v for k, v in result.get("aa_eot_per_attack", {}).items()}
    if "aa_acc_deterministic" in result:
        metrics[f"{METRIC_PREFIX}aa_acc_deterministic"] = result["aa_acc_deterministic"]
    if "aa_blackbox_only" in result:
        metrics[f"{METRIC_PREFIX}aa_blackbox_only"] = result["aa_blackbox_only"]
    return metrics


def _eps_sweep(run: StageInput) -> dict:
    cfg = run.settings
    return {"eps_sweep": eps_sweep(run.model, run.x, run.y, run.threat, radii=cfg.sweep_radii,
                                   steps=cfg.sweep_steps, batch_size=cfg.batch_size, seed=run.seed)}


def _certified(run: StageInput) -> dict:
    from otarena.methods.common.certify import UncertifiableError, certify

    try:
        certificate = certify(run.given_model, run.x, run.y, [run.threat.eps], batch_size=run.settings.batch_size)
    except UncertifiableError as err:
        return {"certified_refused": err.reason, **({"lipschitz_bound": err.bound} if err.bound is not None else {})}
    run.per_example["certified"] = certificate["radius"] > run.threat.eps
    return {"certified_acc": certificate["certified_acc"][run.threat.eps],
            "lipschitz_bound": certificate["lipschitz_bound"]}


def _lipschitz_metrics(result: Mapping) -> dict[str, float]:
    return {f"{METRIC_PREFIX}lipschitz_bound": result["lipschitz_bound"]} if "lipschitz_bound" in result else {}


def _standing(run: StageInput) -> Optional[torch.Tensor]:
    """Per point: still correct after every attack stage that ran, PGD and AutoAttack's cascade (``None``:
    neither did). A check that fools only points one of them broke already is no sign of masking."""
    masks = [mask.to(run.x.device) for mask in run.survivors.values()]
    if "aa" in run.per_example:
        masks.append(run.per_example["aa"].to(run.x.device))
    return None if not masks else torch.stack(masks).all(0)


def _only(run: StageInput, key: str, still_correct: torch.Tensor) -> dict:
    """``{key: share}``: the share of all points a check fooled that PGD and AutoAttack left standing."""
    standing = _standing(run)
    return {} if standing is None else {key: share(standing & ~still_correct)}


def _batches(run: StageInput):
    size = run.settings.batch_size
    for i in range(0, len(run.y), size):
        yield run.x[i:i + size], run.y[i:i + size]


def _fgsm(run: StageInput) -> dict:
    """FGSM from the clean point: a single step must never beat the iterative attack [4]."""
    eps, norm = run.threat.eps, run.threat.norm
    with eval_mode(run.model):
        still = torch.cat([_correct(run.model, fgsm(run.model, xb, yb, eps=eps, norm=norm), yb, len(yb))
                           for xb, yb in _batches(run)])
    return {"fgsm_acc": share(still)}


def _noise(run: StageInput) -> dict:
    """``noise_draws`` uniform points of the eps-ball per point: noise must never beat gradients [4]."""
    generator, eps, norm = run.generator(), run.threat.eps, run.threat.norm
    with eval_mode(run.model):
        still = []
        for xb, yb in _batches(run):
            hit = _correct(run.model, xb, yb, len(yb))
            for _ in range(run.settings.noise_draws):
                hit &= _correct(run.model, random_start(xb, eps, norm, generator), yb, len(yb))
            still.append(hit)
    still = torch.cat(still)
    return {"noise_acc": share(still), **_only(run, "noise_only", still)}


def quick_surrogate(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, epochs: int, seed: int = 0) -> nn.Module:
    """A SmallCNN trained by plain ERM (Adam, lr 2e-3, batches of 64) on the evaluated points themselves.

    The transfer check needs some other model with useful gradients on these points, not one that
    generalizes; training on the points it attacks makes it a good one in seconds, and needs no
    other split. Seeded, and the global random state is left as it was.
    """
    from otarena.methods.common import nets

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).clamp_min(1e-3).tolist()
        net = nets.build("small_cnn", in_channels=x.shape[1], num_classes=num_classes, mean=mean, std=std)
    net = net.to(x.device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    order = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(epochs):
            for batch in torch.randperm(len(y), generator=order).to(x.device).split(64):
                optimizer.zero_grad()
                ce_loss(net(x[batch]), y[batch]).mean().backward()
                optimizer.step()
    return net.eval()


def _transfer(run: StageInput) -> dict:
    """PGD on a surrogate model, its examples scored on this one: black-box transfer must never beat white-box [4]."""
    cfg, eps, norm = run.settings, run.threat.eps, run.threat.norm
    if run.surrogate is not None:
        surrogate, which = run.surrogate.to(run.x.device), "the given surrogate"
    else:
        with torch.no_grad():
            num_classes = run.model(run.x[:1]).shape[1]
        surrogate = quick_surrogate(run.x, run.y, num_classes, epochs=cfg.surrogate_epochs, seed=run.seed)
        which = f"a SmallCNN trained by ERM on the evaluated points ({cfg.surrogate_epochs} epochs)"
    generator, steps = run.generator(), cfg.transfer_steps
    with eval_mode(surrogate), eval_mode(run.model):
        still = torch.cat([_correct(run.model, pgd(surrogate, xb, yb, eps=eps, norm=norm, steps=steps,
                                                   step_size=madry_step(eps, steps), generator=generator), yb, len(yb))
                           for xb, yb in _batches(run)])
    return {"transfer_acc": share(still), "transfer_surrogate": which, **_only(run, "transfer_only", still)}


def _convergence(run: StageInput) -> dict:
    """Is PGD's loss still rising at its last steps on the points it failed on? (Pintor et al., NeurIPS 2022)

    One cross-entropy PGD run with the ``pgd`` stage's steps and step size on the points every
    white-box attack left standing (else the clean-correct ones). A point's loss "still rises" when
    its best loss so far gains more than ``convergence_rise`` of its range over the last
    ``convergence_window`` of the steps: more steps would have helped.
    """
    cfg, t = run.settings, run.settings.thresholds
    standing = _standing(run)
    with eval_mode(run.model):
        if standing is None:
            standing = _correct(run.model, run.x, run.y, cfg.batch_size)
        rows, rising = standing.nonzero()[:, 0], torch.zeros_like(standing)
        window = max(1, math.ceil(cfg.convergence_window * cfg.pgd_steps))
        generator = run.generator()
        for chunk in rows.split(cfg.batch_size):
            path = loss_path(run.model, run.x[chunk], run.y[chunk], eps=run.threat.eps, norm=run.threat.norm,
                             steps=cfg.pgd_steps, step_size=run.pgd_step_size, generator=generator)
            best = path.cummax(0).values
            spread = (path.max(0).values - path.min(0).values).clamp_min(1e-12)
            rising[chunk] = (best[-1] - best[-1 - window]) / spread > t.convergence_rise
    return {"convergence_rising": share(rising), "convergence_window_steps": window}


def unbounded_eps(norm: str, x: torch.Tensor) -> float:
    """A radius whose ball around any image in [0, 1] holds every image: 1 for L-inf, sqrt(d) for L2."""
    return 1.0 if norm == "Linf" else math.sqrt(x[0].numel())


def _unbounded(run: StageInput) -> dict:
    """The attack with no bound on the perturbation must succeed on every point [4].

    ``unbounded_pgd_acc``: PGD (cross-entropy, random start in the whole input space) at
    :func:`unbounded_eps`; a model it does not fool is masked, not robust. ``unbounded_acc`` also
    counts the candidates any unbounded adversary has: every other evaluated image and the grey image.
    A point survives only if the model gives its class on all of them, so a defence that answers one
    fixed class far from the data scores at most that class's share.
    """
    cfg, norm = run.settings, run.threat.norm
    eps = unbounded_eps(norm, run.x)
    gradient = pgd_correct(run.model, run.x, run.y, ThreatModel(norm, eps), steps=cfg.sweep_steps,
                           step_size=madry_step(eps, cfg.sweep_steps), batch_size=cfg.batch_size,
                           generator=run.generator())
    with eval_mode(run.model), torch.no_grad():
        logits = torch.cat([run.model(xb) for xb, _ in _batches(run)])
        grey = run.model(torch.full_like(run.x[:1], 0.5))
        classes = logits.shape[1]
        # Class c survives the data candidates only if every evaluated image is classified c.
        kept = torch.stack([correct(torch.cat([logits, grey]), torch.full((len(logits) + 1,), c, device=logits.device))
                            .all() for c in range(classes)])
    return {"unbounded_pgd_acc": share(gradient), "unbounded_acc": share(gradient & kept[run.y]),
            "unbounded_eps": eps}


def _checklist_metrics(*keys: str) -> Callable[[Mapping], dict[str, float]]:
    def metrics(result: Mapping) -> dict[str, float]:
        return {f"{METRIC_PREFIX}{key}": result[key] for key in keys if key in result}
    return metrics


def _in_order(stages: tuple[Stage, ...]) -> tuple[Stage, ...]:
    """The table, once checked: unique names, and every stage after the stages it needs."""
    seen: list[str] = []
    for stage in stages:
        if stage.name in seen:
            raise ValueError(f"stage {stage.name!r} is declared twice")
        late = [need for need in stage.needs if need not in seen]
        if late:
            raise ValueError(f"stage {stage.name!r} needs {late}, which must come before it in STAGES")
        seen.append(stage.name)
    return stages


STAGES: tuple[Stage, ...] = _in_order((
    Stage("clean", "clean", _clean, writes=("clean_acc",), accuracy="clean_acc", column="test/clean_acc",
          measure=_measure_clean),
    Stage("pgd", "PGD-{pgd_steps} ({pgd_restarts} random + {pgd_targets} targeted starts)", _pgd,
          writes=("pgd_acc", "pgd_scoring"), accuracy="pgd_acc", column="test/pgd_acc", measure=_measure_pgd),
    Stage("steps-check", "PGD steps check", _steps_check, writes=("pgd_steps_check",), needs=("pgd",),
          details=_steps_check_metrics),
    Stage("autoattack", "AutoAttack {aa_version}", _autoattack,
          writes=("aa_acc", "aa_per_attack", "aa_blackbox_only", "aa_checks", "aa_resumed_batches",
                  "aa_acc_deterministic", "aa_eot_per_attack", "aa_ranking"),
          accuracy="aa_acc", details=_autoattack_metrics, column="test/aa_acc", measure=_measure_autoattack),
    Stage("eps-sweep", "eps sweep (PGD-{sweep_steps})", _eps_sweep, writes=("eps_sweep",)),
    # The cheap checks of [4]'s checklist, each with its flag (docs/metrics.md: the checks).
    Stage("fgsm", "FGSM check", _fgsm, writes=("fgsm_acc",), needs=("pgd",),
          details=_checklist_metrics("fgsm_acc")),
    Stage("noise", "noise check ({noise_draws} draws)", _noise, writes=("noise_acc", "noise_only"), needs=("pgd",),
          details=_checklist_metrics("noise_acc", "noise_only")),
    Stage("transfer", "transfer check (PGD-{transfer_steps} on a surrogate)", _transfer,
          writes=("transfer_acc", "transfer_only", "transfer_surrogate"), needs=("pgd",),
          details=_checklist_metrics("transfer_acc", "transfer_only")),
    Stage("convergence", "convergence check (PGD-{pgd_steps} loss)", _convergence,
          writes=("convergence_rising", "convergence_window_steps"), needs=("pgd",),
          details=_checklist_metrics("convergence_rising")),
    Stage("unbounded", "unbounded attack (PGD-{sweep_steps})", _unbounded,
          writes=("unbounded_pgd_acc", "unbounded_acc", "unbounded_eps"),
          details=_checklist_metrics("unbounded_pgd_acc", "unbounded_acc")),
    # Only Lipschitz nets have a certificate, so it runs when asked for.
    Stage("certified", "certificate", _certified, writes=("certified_acc", "lipschitz_bound", "certified_refused"),
          accuracy="certified_acc", details=_lipschitz_metrics, column="test/certified_acc", default=False),
))
"""Every stage :func:`evaluate` can run, in the order it runs them (docs/architecture.md: adding a stage)."""
DEFAULT_ATTACKS = tuple(stage.name for stage in STAGES if stage.default)
CHECKS = ("fgsm", "noise", "transfer", "convergence", "unbounded")
"""The stages that are checks of [4]'s checklist: they add a flag, never a headline accuracy."""
ACCURACIES = tuple(stage.accuracy for stage in STAGES if stage.accuracy)
"""The headline accuracies: ``clean_acc``, ``pgd_acc``, ``aa_acc``, ``certified_acc``."""


def evaluate(model: nn.Module, data, threat_model: ThreatModel, attacks: Iterable[str] = DEFAULT_ATTACKS,
             settings: EvalSettings = EvalSettings(), *, seed: int = 0, device: Optional[torch.device | str] = None,
             state_path: Optional[str] = None, log: Optional[Callable[[str], None]] = None,
             surrogate: Optional[nn.Module] = None, shards: Sequence[Mapping] = (), **changes) -> dict:
    """Evaluate any classifier on [0, 1] inputs, the way RobustBench's ``benchmark()`` does, and flag it.

    Args:
        model: an ``nn.Module`` mapping (N, C, H, W) in [0, 1] to logits; normalization inside.
        data: a ``TensorData`` split or an ``(x, y)`` pair of tensors.
        threat_model: norm and eps of the attacks.
        attacks: names of :data:`STAGES`: ``clean``, ``pgd`` (multi-targeted PGD-k with restarts),
            ``steps-check``, ``autoattack`` (the cascade, with the accuracy after each attack),
            ``eps-sweep``, the checks ``fgsm``, ``noise``, ``transfer``, ``convergence`` and
            ``unbounded``, and ``certified`` (the L2 certificate of a Lipschitz net at eps, refused
            when its measured Lipschitz bound exceeds 1 + 2%). They run in the table's order.
        settings: how hard the stages attack; keyword ``changes`` replace some of its fields
            (``evaluate(model, data, threat, n_ex=200, pgd_steps=20)``).
        seed: seeds PGD's random starts and AutoAttack.
        state_path: AutoAttack's per-batch state file, so that a preempted evaluation resumes.
        log: called with one line per stage and per AutoAttack batch (progress).
        surrogate: the model the ``transfer`` check crafts its examples on (a campaign's ERM model);
            ``None``: the check trains a quick ERM one on the evaluated points.
        shards: the results of :func:`evaluate_shard` for every shard of this evaluation (same model,
            data, attacks, settings and seed): the sharded stages read their measurements from them
            instead of attacking, and the rest runs here on the whole set (:func:`merge_shards`).

    Returns:
        ``{"n_ex", "settings"}``, the keys the stages asked for write (``clean_acc``, ``pgd_acc``,
        ``pgd_steps_check``, ``aa_acc``, ``aa_per_attack``, ``aa_blackbox_only``, ``aa_checks``,
        ``eps_sweep``, ``certified_acc``, ``lipschitz_bound``, ...), then ``ci95``, ``flag_reasons``
        and ``flags``: accuracies as exact fractions and ``ci95`` their 95% Wilson intervals. A
        refused certificate gives ``certified_refused`` and the ``unsound-certificate`` flag
        instead of a number. ``stage_seconds`` holds each stage's wall time, so the cost of every
        check is stated beside its result.
    """
    settings = dataclasses.replace(settings, **changes)
    attacks = _known(attacks)
    run = _stage_input(model, data, threat_model, settings, seed, device, state_path, log, surrogate)
    x, y, result = run.x, run.y, run.result
    merged = merge_shards(shards, len(y), x.device) if shards else None
    result["n_ex"] = len(y)
    result["settings"] = {"norm": threat_model.norm, "eps": threat_model.eps, "pgd_steps": settings.pgd_steps,
                          "pgd_restarts": settings.pgd_restarts, "pgd_targets": settings.pgd_targets,
                          "pgd_step_size": run.pgd_step_size, "autoattack": settings.aa_version,
                          "sweep_steps": settings.sweep_steps, "seed": seed}
    seconds = {}
    for stage in STAGES:
        if stage.name in attacks:
            began = time.time()
            with run.stopwatch(stage.label.format_map(vars(settings))):
                if stage.measure is not None and merged is not None:
                    if stage.name not in merged["measured"]:
                        raise ValueError(f"the shards did not run stage {stage.name!r}")
                    run.measured[stage.name] = merged["measured"][stage.name]
                elif stage.measure is not None:
                    run.measured[stage.name] = stage.measure(run)
                written = stage.run(run)
            # A sharded stage's time is its shards' (the work it cost, not the wait).
            seconds[stage.name] = round(time.time() - began, 2) if merged is None or stage.measure is None \
                else merged["stage_seconds"].get(stage.name, 0.0)
            undeclared = set(written) - set(stage.writes)
            if undeclared:
                raise RuntimeError(f"stage {stage.name!r} wrote {sorted(undeclared)}, not in its writes")
            result.update(written)
    result["stage_seconds"] = seconds
    result["per_example"] = per_example(run, getattr(data, "indices", None))
    result["ci95"] = {stage.accuracy: confidence_interval(result[stage.accuracy], len(y))
                      for stage in STAGES if stage.accuracy in result}
    result["flag_reasons"] = flags_for(result, settings.thresholds)
    result["flags"] = list(result["flag_reasons"])
    return result


def _known(attacks: Iterable[str]) -> tuple[str, ...]:
    attacks, known = tuple(attacks), tuple(stage.name for stage in STAGES)
    unknown = set(attacks) - set(known)
    if unknown:
        raise ValueError(f"unknown attacks {sorted(unknown)}; choose from {known}")
    return attacks


def _stage_input(model: nn.Module, data, threat_model: ThreatModel, settings: EvalSettings, seed: int,
                 device: Optional[torch.device | str], state_path: Optional[str],
                 log: Optional[Callable[[str], None]], surrogate: Optional[nn.Module]) -> StageInput:
    """The evaluated points (the split's first ``n_ex``) on ``device``, and what the stages get with them."""
    say = log or (lambda line: None)
    x, y = (data.x, data.y) if hasattr(data, "x") else data
    if settings.n_ex is not None:
        x, y = x[:settings.n_ex], y[:settings.n_ex]
    device = torch.device(device) if device is not None else next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    attacked = model.inference() if hasattr(model, "inference") else model
    return StageInput(attacked, model, x, y, threat_model, settings, seed, state_path, say, _Stopwatch(say, len(y)),
                      result={}, surrogate=surrogate)


def shard_bounds(n: int, batch_size: int, shards: int) -> list[tuple[int, int]]:
    """The ``[start, stop)`` slices of ``n`` evaluated points that ``shards`` shards take: contiguous runs of
    whole batches of ``batch_size``, as even as can be (a shard gets no points when there are fewer batches
    than shards), so that each batch holds the same points, sharded or not."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    batches = math.ceil(n / batch_size)
    return [(min(n, batches * i // shards * batch_size), min(n, batches * (i + 1) // shards * batch_size))
            for i in range(shards)]


def shard_state_path(state_path: Optional[str], shard: int, shards: int) -> Optional[str]:
    """A shard's own AutoAttack state file, beside the unsharded one: a lost shard resumes from its own batches."""
    return f"{state_path}.shard{shard + 1}of{shards}" if state_path else None


def evaluate_shard(model: nn.Module, data, threat_model: ThreatModel, attacks: Iterable[str] = DEFAULT_ATTACKS,
                   settings: EvalSettings = EvalSettings(), *, shard: int, shards: int, seed: int = 0,
                   device: Optional[torch.device | str] = None, state_path: Optional[str] = None,
                   log: Optional[Callable[[str], None]] = None, **changes) -> dict:
    """Measure the sharded stages (:attr:`Stage.measure`: clean, PGD, the AutoAttack cascade) of :func:`evaluate`
    on shard ``shard`` (from 0) of ``shards``: the slice :func:`shard_bounds` gives it of the points ``evaluate``
    would evaluate. ``evaluate(..., shards=[every shard's result])`` then gives the unsharded result.

    The other stages need the whole set or are cheap, and run once there: the steps check and the eps sweep,
    the checks of [4]'s checklist (the transfer check's quick surrogate trains on all the points, the unbounded
    check compares every point's class), the certificate, and a randomized model's AutoAttack ``rand`` run on
    the points the merged cascade left standing. ``state_path``: the unsharded evaluation's AutoAttack state
    file; the shard keeps its own beside it (:func:`shard_state_path`).

    Returns ``{"shard", "shards", "start", "stop", "n_ex", "measured", "stage_seconds"}``, the measurements
    on the CPU.
    """
    settings = dataclasses.replace(settings, **changes)
    attacks = _known(attacks)
    whole = _stage_input(model, data, threat_model, settings, seed, device, state_path, log, None)
    start, stop = shard_bounds(len(whole.y), settings.batch_size, shards)[shard]
    run = dataclasses.replace(whole, x=whole.x[start:stop], y=whole.y[start:stop], offset=start,
                              head=whole.first_batch(), state_path=shard_state_path(state_path, shard, shards),
                              stopwatch=_Stopwatch(whole.say, stop - start))
    measured, seconds = {}, {}
    for stage in STAGES:
        if stage.name in attacks and stage.measure is not None and stop > start:
            began = time.time()
            label = stage.label.format_map(vars(settings))
            with run.stopwatch(f"{label}, shard {shard + 1}/{shards} (points {start} to {stop - 1})"):
                found = stage.measure(run)
            measured[stage.name] = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in found.items()}
            seconds[stage.name] = round(time.time() - began, 2)
    return {"shard": shard, "shards": shards, "start": start, "stop": stop, "n_ex": len(whole.y),
            "measured": measured, "stage_seconds": seconds}


def merge_shards(shards: Sequence[Mapping], n: int, device: Optional[torch.device] = None) -> dict:
    """The shards' measurements as one over all ``n`` points (``{"measured", "stage_seconds"}``).

    Per point tensors are joined in the points' order, so every outcome and every count is the unsharded
    one; the AutoAttack checks are joined in shard order, the first message of each check kept (as the
    unsharded cascade keeps the first batch's); batches read back from state files and seconds add up.
    Refused unless the shards cover the ``n`` points exactly once.
    """
    pieces = sorted((s for s in shards if s["stop"] > s["start"]), key=lambda s: s["start"])
    starts = [s["start"] for s in pieces]
    if not pieces or any(s["n_ex"] != n for s in shards) or starts != [0] + [s["stop"] for s in pieces[:-1]] \
            or pieces[-1]["stop"] != n:
        raise ValueError(f"the shards ({[(s['start'], s['stop']) for s in shards]}) do not cover the {n} "
                         f"evaluated points once each")

    def joined(values: list):
        if isinstance(values[0], torch.Tensor):
            return torch.cat(values).to(device) if device is not None else torch.cat(values)
        if isinstance(values[0], Mapping):
            return {key: value for part in reversed(values) for key, value in part.items()}
        if isinstance(values[0], int) and not isinstance(values[0], bool):
            return sum(values)
        return values[0]  # the same in every shard: the attacks run, the randomness found on the first batch

    measured = {stage: {key: joined([s["measured"][stage][key] for s in pieces]) for key in found}
                for stage, found in pieces[0]["measured"].items()}
    seconds = {stage: round(sum(s["stage_seconds"].get(stage, 0.0) for s in pieces), 2) for stage in measured}
    return {"measured": measured, "stage_seconds": seconds}


PER_EXAMPLE_KEYS = ("clean", "pgd", "aa", "aa_stage", "certified")
"""The per-point outcomes :func:`per_example` keeps, where their stage ran (docs/mlflow-schema.md)."""


def index_hash(indices: np.ndarray) -> str:
    """What identifies a list of test points: the SHA-256 of the indices as little-endian int64 (16 hex digits).

    Two evaluations with the same hash are on the same points in the same order, so their per-point
    outcomes can be paired (the leaderboard's McNemar test).
    """
    return hashlib.sha256(np.ascontiguousarray(indices, dtype="<i8").tobytes()).hexdigest()[:16]


def per_example(run: StageInput, indices: Optional[torch.Tensor] = None) -> dict:
    """The evaluation per test point, as compact numpy arrays in the points' order.

    ``index``: each point's index in the dataset's test split (``indices``, else the first ``n_ex``:
    :func:`evaluate` takes the split's first points); ``index_hash`` (:func:`index_hash`); then, where
    their stage ran, ``clean`` and ``pgd`` (correct clean, and under the whole PGD stage: for a
    randomized model, answered correctly by most draws), ``aa_stage`` (0: wrong clean; i: broken by the
    cascade's i-th attack; one more than the attacks: robust), ``aa`` (robust to the whole cascade,
    the deterministic one for a randomized model) and ``certified`` (certified at eps). The accuracies
    are these arrays' means: nothing here is measured twice.
    """
    n = len(run.y)
    index = np.arange(n) if indices is None else np.asarray(torch.as_tensor(indices).cpu())[:n]
    points = {"index": index.astype(np.int32 if n < 2 ** 31 else np.int64), "index_hash": index_hash(index)}
    found = {**run.per_example, **({"pgd": run.survivors["pgd"]} if "pgd" in run.survivors else {})}
    for key in PER_EXAMPLE_KEYS:
        if key in found:
            values = torch.as_tensor(found[key]).cpu().numpy()
            points[key] = values.astype(np.int8) if key == "aa_stage" else values.astype(bool)
    return points


class _Stopwatch:
    """Times each stage and reports it through ``say``."""

    def __init__(self, say, n):
        self.say, self.n, self.start = say, n, time.time()

    def elapsed(self) -> float:
        return time.time() - self.start

    @contextlib.contextmanager
    def __call__(self, stage: str):
        begin = time.time()
        self.say(f"{stage} on {self.n} images ...")
        yield
        self.say(f"{stage} done in {time.time() - begin:.1f}s")
