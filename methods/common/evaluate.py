# SPDX-License-Identifier: Apache-2.0
"""The small evaluation core: clean, PGD-k, AutoAttack, eps-sweep and certified accuracy, with flags.

``evaluate(model, data, threat_model, attacks=..., n_ex=...)`` is the one entry point, in the
spirit of RobustBench's ``benchmark()``: it takes any ``nn.Module`` on [0, 1] inputs and a dataset
split and returns accuracies with 95% confidence intervals and the automatic flags that catch the
errors of methods-spec section 10 (gradient masking, accuracy above chance at huge eps, unsound
certificates, small samples). Attacks always use true labels and random starts.

References:
    [1] Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
        parameter-free attacks", ICML 2020 (AutoAttack; we use the pyautoattack package).
    [2] Croce et al., "RobustBench: a standardized adversarial robustness benchmark", NeurIPS 2021 D&B.
    [3] Gowal et al., "An alternative surrogate loss for PGD-based adversarial testing", 2019
        (multi-targeted PGD).
    [4] Carlini et al., "On evaluating adversarial robustness", 2019, Section 5 (the sanity checks:
        more iterations never help, accuracy reaches chance at large eps, black-box <= white-box).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn

from methods.common.attacks import ThreatModel, eval_mode, pgd, pgd_best, project

ATTACKS = ("clean", "pgd", "autoattack", "eps-sweep", "steps-check", "certified")
DEFAULT_ATTACKS = ATTACKS[:-1]
"""Everything but the certificate, which only Lipschitz nets have."""
ACCURACIES = ("clean_acc", "pgd_acc", "aa_acc", "certified_acc")


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]
                      for i in range(0, len(y), batch_size)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Clean accuracy (fraction), in eval mode."""
    with eval_mode(model):
        return _correct(model, x, y, batch_size).float().mean().item()


def pgd_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, *, steps: int = 10,
                step_size: Optional[float] = None, restarts: int = 1, targets: int = 0, keep_best: bool = True,
                batch_size: int = 512, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per point: still correct under PGD-``steps`` with random start, on true labels.

    The attack runs ``restarts`` random starts on cross-entropy, then one start per target on the
    margin toward each of the ``targets`` most likely wrong classes (multi-targeted PGD); a point
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
        correct = []
        for i in range(0, len(y), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            with torch.no_grad():
                clean_logits = model(xb)
            survived = clean_logits.argmax(1) == yb
            wrong = clean_logits.scatter(1, yb[:, None], -float("inf"))
            # First the cross-entropy starts (target None), then one margin start per likeliest wrong class.
            for target in [None, *wrong.argsort(1, descending=True)[:, :targets].T]:
                rows = survived.nonzero()[:, 0]
                if not len(rows):
                    break
                run = dict(restarts=restarts) if target is None else dict(target=target[rows])
                survived[rows] = ~fooled(xb[rows], yb[rows], **run)
            correct.append(survived)
        return torch.cat(correct)


def pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, **kwargs) -> float:
    """Robust accuracy (fraction) under :func:`pgd_correct`."""
    return pgd_correct(model, x, y, threat, **kwargs).float().mean().item()


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
                correct = pgd_correct(model, x, y, at, steps=steps, step_size=2.5 * eps / steps,
                                      batch_size=batch_size, generator=generator)
                grey = _correct(model, project(torch.full_like(x, 0.5), x, eps, threat.norm), y, batch_size)
            curve["pgd_acc"].append(correct.float().mean().item())
            curve["robust_acc"].append((correct & grey).float().mean().item())
    return curve


@dataclass(frozen=True)
class Thresholds:
    """When an evaluation raises a flag (accuracies as fractions)."""

    aa_gap: float = 0.05
    """``masking:aa-gap``: AutoAttack more than this far below PGD."""
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


def _beyond(delta: float, threshold: float) -> bool:
    """``delta > threshold`` for differences of accuracies: 0.66 - 0.61 is not more than 0.05."""
    return delta > threshold + 1e-9


def _points(delta: float) -> str:
    return f"{100 * delta:.1f} points"


def flags_for(result: dict, thresholds: Thresholds = Thresholds()) -> dict[str, str]:
    """Automatic warnings about an evaluation: flag name -> one-line reason.

    The checks of RobustBench's and AutoAttack's flags_doc, and the sanity checks of
    methods-spec section 8: gradient masking shows as AutoAttack far below PGD, accuracy that
    does not fall to chance as eps grows, more PGD steps that help the defense, or the black-box
    attack succeeding where the white-box ones failed.
    """
    t, flags = thresholds, {}
    pgd_name = f"PGD-{result.get('settings', {}).get('pgd_steps', 'k')}"
    if "aa_acc" in result and "pgd_acc" in result and _beyond(result["pgd_acc"] - result["aa_acc"], t.aa_gap):
        flags["masking:aa-gap"] = f"AutoAttack {_points(result['pgd_acc'] - result['aa_acc'])} below {pgd_name}"
    sweep = result.get("eps_sweep")
    if sweep:
        eps, acc, bound = sweep["eps"], sweep["pgd_acc"], sweep["chance_bound"]
        rises = [(i, acc[i + 1] - acc[i]) for i in range(len(acc) - 1) if _beyond(acc[i + 1] - acc[i], t.rise)]
        if _beyond(acc[-1] - bound, t.plateau):
            flags["masking:eps-plateau"] = (f"PGD accuracy {acc[-1]:.1%} at eps={eps[-1]:g}, where no classifier "
                                            f"beats {bound:.1%}")
        elif rises:
            i, _ = rises[0]
            flags["masking:eps-plateau"] = (f"PGD accuracy rises from {acc[i]:.1%} at eps={eps[i]:g} to "
                                            f"{acc[i + 1]:.1%} at eps={eps[i + 1]:g}")
    ladder = result.get("pgd_steps_check")
    if ladder:
        runs = list(ladder.items())
        for (short, short_acc), (long, long_acc) in zip(runs, runs[1:]):
            if _beyond(long_acc - short_acc, t.steps):
                flags["masking:steps"] = f"{long} is {_points(long_acc - short_acc)} more accurate than {short}"
                break
    if result.get("aa_blackbox_only", 0.0) >= t.blackbox and result.get("aa_blackbox_only", 0.0) > 0:
        flags["masking:blackbox"] = (f"Square (black-box) fooled {result['aa_blackbox_only']:.1%} of the points "
                                     f"that every white-box attack failed on")
    flags.update(result.get("aa_checks", {}))
    n = result.get("n_ex", t.small_sample)
    if n < t.small_sample:
        low, high = result.get("ci95", {}).get("aa_acc", result.get("ci95", {}).get("clean_acc", (0, 0)))
        flags["small-sample"] = f"n_ex = {n} < {t.small_sample}: 95% CI is {_points((high - low) / 2)} wide each way"
    bound = result.get("lipschitz_bound")
    beaten = min(result.get("aa_acc", 1.0), result.get("pgd_acc", 1.0)) < result.get("certified_acc", 0.0) - 1e-9
    if "certified_refused" in result:
        flags["unsound-certificate"] = result["certified_refused"]
    elif bound is not None and bound > 1 + t.lipschitz:
        flags["unsound-certificate"] = f"measured Lipschitz bound {bound:.3f} > 1 + {t.lipschitz:g}"
    elif beaten:
        flags["unsound-certificate"] = "an attack beats the certified accuracy"
    return flags


def evaluate(model: nn.Module, data, threat_model: ThreatModel, attacks: Iterable[str] = DEFAULT_ATTACKS, *,
             n_ex: Optional[int] = None, pgd_steps: int = 50, pgd_restarts: int = 1, pgd_targets: int = 3,
             pgd_step_size: Optional[float] = None, aa_version: str = "standard", sweep_steps: int = 20,
             sweep_radii: Optional[Iterable[float]] = None, thresholds: Thresholds = Thresholds(),
             batch_size: int = 500, seed: int = 0, device: Optional[torch.device | str] = None,
             state_path: Optional[str] = None, log: Optional[Callable[[str], None]] = None) -> dict:
    """Evaluate any classifier on [0, 1] inputs, the way RobustBench's ``benchmark()`` does, and flag it.

    Args:
        model: an ``nn.Module`` mapping (N, C, H, W) in [0, 1] to logits; normalization inside.
        data: a ``TensorData`` split or an ``(x, y)`` pair of tensors.
        threat_model: norm and eps of the attacks.
        attacks: any of ``clean``, ``pgd``, ``autoattack`` (the cascade, with the accuracy after
            each attack), ``eps-sweep``, ``steps-check`` and ``certified`` (the L2 certificate of
            a Lipschitz net at eps, refused when its measured Lipschitz bound exceeds 1 + 2%).
        n_ex: evaluate the first ``n_ex`` examples (``None``: all of them).
        pgd_steps, pgd_restarts, pgd_targets: PGD-k on true labels with random starts: the
            restarts ascend cross-entropy, then one run per target class ascends the margin to
            each of the ``pgd_targets`` likeliest wrong classes; the worst case counts.
        pgd_step_size: default eps / 4; each run keeps its most adversarial iterate, so a large
            step never weakens a long attack.
        aa_version: pyautoattack version (``standard`` or ``plus``).
        sweep_steps, sweep_radii: PGD of the eps sweep (default radii: :func:`sweep_radii`).
        thresholds: when flags are raised.
        seed: seeds PGD's random starts and AutoAttack.
        state_path: AutoAttack's per-batch state file, so that a preempted evaluation resumes.
        log: called with one line per stage and per AutoAttack batch (progress).

    Returns:
        ``{"n_ex", "clean_acc", "pgd_acc", "aa_acc", "aa_per_attack", "aa_blackbox_only",
        "aa_checks", "eps_sweep", "pgd_steps_check", "certified_acc", "lipschitz_bound",
        "ci95", "settings", "flags", "flag_reasons"}`` (those asked for), accuracies as
        fractions and ``ci95`` their 95% Wilson intervals. A refused certificate gives
        ``certified_refused`` and the ``unsound-certificate`` flag instead of a number.
    """
    attacks = tuple(attacks)
    unknown = set(attacks) - set(ATTACKS)
    if unknown:
        raise ValueError(f"unknown attacks {sorted(unknown)}; choose from {ATTACKS}")
    say = log or (lambda line: None)
    x, y = (data.x, data.y) if hasattr(data, "x") else data
    if n_ex is not None:
        x, y = x[:n_ex], y[:n_ex]
    device = torch.device(device) if device is not None else next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    certified_model, model = model, (model.inference() if hasattr(model, "inference") else model)
    step_size = pgd_step_size if pgd_step_size is not None else threat_model.eps / 4
    settings = {"norm": threat_model.norm, "eps": threat_model.eps, "pgd_steps": pgd_steps,
                "pgd_restarts": pgd_restarts, "pgd_targets": pgd_targets, "pgd_step_size": step_size,
                "autoattack": aa_version, "sweep_steps": sweep_steps, "seed": seed}
    result: dict = {"n_ex": len(y), "settings": settings}
    timed = _Stopwatch(say, len(y))
    if "clean" in attacks:
        with timed("clean"):
            result["clean_acc"] = accuracy(model, x, y, batch_size)
    if "pgd" in attacks:
        with timed(f"PGD-{pgd_steps} ({pgd_restarts} random + {pgd_targets} targeted starts)"):
            generator = torch.Generator(device=device).manual_seed(seed)
            result["pgd_acc"] = pgd_accuracy(model, x, y, threat_model, steps=pgd_steps, step_size=step_size,
                                             restarts=pgd_restarts, targets=pgd_targets, batch_size=batch_size,
                                             generator=generator)
    if "steps-check" in attacks:
        with timed("PGD steps check"):
            short = max(1, pgd_steps // 5)
            ladder = {}
            for steps in (short, pgd_steps):
                generator = torch.Generator(device=device).manual_seed(seed)
                ladder[f"PGD-{steps}"] = pgd_accuracy(model, x, y, threat_model, steps=steps,
                                                      step_size=2.5 * threat_model.eps / steps, keep_best=False,
                                                      batch_size=batch_size, generator=generator)
            if "pgd_acc" in result:
                ladder[f"PGD-{pgd_steps} with restarts"] = result["pgd_acc"]
            result["pgd_steps_check"] = ladder
    if "autoattack" in attacks:
        from methods.common.autoattack import autoattack_cascade

        def progress(done, total, so_far):
            finished = so_far.stages[:min(done * batch_size, len(y))]
            say(f"AutoAttack batch {done}/{total}: robust {(finished > len(so_far.attacks)).float().mean():.1%} "
                f"so far ({timed.elapsed():.0f}s)")

        with timed(f"AutoAttack {aa_version}"):
            cascade = autoattack_cascade(model, x, y, threat_model, version=aa_version, batch_size=batch_size,
                                         seed=seed, state_path=state_path, progress=progress)
        result["aa_acc"] = cascade.robust_acc
        result["aa_per_attack"] = cascade.per_attack()
        result["aa_blackbox_only"] = cascade.blackbox_only()
        result["aa_checks"] = cascade.checks
        result["aa_resumed_batches"] = cascade.resumed_batches
    if "eps-sweep" in attacks:
        with timed(f"eps sweep (PGD-{sweep_steps})"):
            result["eps_sweep"] = eps_sweep(model, x, y, threat_model, radii=sweep_radii, steps=sweep_steps,
                                            batch_size=batch_size, seed=seed)
    if "certified" in attacks:
        from methods.common.certify import UncertifiableError, certify

        with timed("certificate"):
            try:
                certificate = certify(certified_model, x, y, [threat_model.eps], batch_size=batch_size)
                result["certified_acc"] = certificate["certified_acc"][threat_model.eps]
                result["lipschitz_bound"] = certificate["lipschitz_bound"]
            except UncertifiableError as err:
                result["certified_refused"] = err.reason
                if err.bound is not None:
                    result["lipschitz_bound"] = err.bound
    result["ci95"] = {k: confidence_interval(result[k], len(y)) for k in ACCURACIES if k in result}
    result["flag_reasons"] = flags_for(result, thresholds)
    result["flags"] = list(result["flag_reasons"])
    return result


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
