# SPDX-License-Identifier: Apache-2.0
"""AutoAttack as a resumable cascade, with the robust accuracy after each attack.

pyautoattack's ``run_standard_evaluation`` returns only the final robust accuracy, logs the
per-attack numbers at DEBUG level, and its state file cannot be reloaded. So we
drive its attack objects ourselves: each batch of test points goes through the attacks of the
chosen version in order (APGD-CE, APGD-T, FAB-T, Square for ``standard``), each attack only on the
points that are still robust, and after every batch the outcome is written to a state file. A
preempted evaluation started again with the same state file skips the finished batches.

Each point's outcome is a *stage*: 0 if it is misclassified clean, ``i + 1`` if attack ``i``
fooled it first, and ``len(attacks) + 1`` if it survived them all. Every number of the cascade,
and the share of points only the black-box Square attack could break, follows from the stages, as
an exact count over the number of points.

pyautoattack's own sanity checks (randomized or dynamic defenses, softmax outputs, too few
classes, zero gradients) are captured from its logger and returned as named checks.

Reference:
    Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
    parameter-free attacks", ICML 2020, Section 4 (the cascade, "worst case over attacks").
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

from otarena.methods.common.attacks import ThreatModel, eval_mode
from otarena.methods.common.evaluate import share

CHECKS = {
    "aa-check:randomized": re.compile(r"randomized defense"),
    "aa-check:softmax-output": re.compile(r"probability distribution"),
    "aa-check:dynamic": re.compile(r"dynamic defense"),
    "aa-check:n-classes": re.compile(r"classes"),
    "masking:zero-gradient": re.compile(r"zero gradient"),
}
"""Flag name -> the pyautoattack warning it stands for (checks.py, flags_doc.md)."""

WHITE_BOX = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t")


@dataclass
class CascadeResult:
    attacks: tuple[str, ...]
    stages: torch.Tensor
    """Per point: 0 misclassified clean, i + 1 first fooled by ``attacks[i]``, len + 1 robust."""
    checks: dict[str, str] = field(default_factory=dict)
    """pyautoattack check name -> its message."""
    resumed_batches: int = 0
    """Batches read back from the state file instead of attacked."""

    @property
    def robust_acc(self) -> float:
        return share(self.stages > len(self.attacks))

    @property
    def clean_acc(self) -> float:
        return share(self.stages > 0)

    def per_attack(self) -> dict[str, float]:
        """Robust accuracy after each attack of the cascade, in order."""
        return {name: share(self.stages > i + 1) for i, name in enumerate(self.attacks)}

    def blackbox_only(self) -> float:
        """Share of points that a black-box attack (Square) fooled first.

        In the standard order Square runs last, so these are the points every white-box attack
        failed on: a sign that the gradients mislead (pyautoattack's check_square_sr).
        """
        black = torch.tensor([i + 1 for i, name in enumerate(self.attacks) if name not in WHITE_BOX])
        return share(torch.isin(self.stages, black))


@dataclass(frozen=True)
class CascadeProgress:
    """Where a cascade stands, after each attack of each batch and after each batch."""

    batch: int
    """The batch (from 1) just attacked."""
    batches: int
    attack: Optional[str]
    """The attack that just finished on this batch; None once the whole batch is done (or read back)."""
    robust: int
    """Points still robust, among the ``seen`` points of the finished batches and this one (this
    batch's survivors have not met its later attacks yet)."""
    seen: int
    elapsed: float
    """Seconds since the cascade started."""
    left: Optional[float]
    """Estimated seconds left; None until some attack has been timed."""
    result: "CascadeResult"


def _cost_per_point(adversary, attack: str) -> float:
    """An attack's work on one point, in forward-backward passes: the prior for the time of an
    attack not yet timed. Measured on an 8x8 CNN: a FAB iteration costs about three APGD
    iterations, and a Square query about one (small nets are dominated by per-call overhead)."""
    if attack in ("apgd-ce", "apgd-dlr"):
        return adversary.apgd.n_iter * adversary.apgd.n_restarts
    if attack == "apgd-t":
        targeted = adversary.apgd_targeted
        return targeted.n_iter * targeted.n_target_classes * targeted.n_restarts
    if attack in ("fab", "fab-t"):
        runs = adversary.fab.n_target_classes if attack == "fab-t" else adversary.fab.n_restarts
        return 3.0 * adversary.fab.n_iter * runs
    return float(adversary.square.n_queries * adversary.square.n_restarts)


class _TimeLeft:
    """Estimates a cascade's time left: each attack's measured seconds per attacked point (before its
    first run, the timed attacks' rate scaled by :func:`_cost_per_point`), times the points it will
    still attack, as many as the points seen so far suggest."""

    def __init__(self, adversary, attacks: tuple[str, ...]):
        self.attacks = attacks
        self.cost = [_cost_per_point(adversary, attack) for attack in attacks]
        self.seconds = [0.0] * len(attacks)
        self.points = [0] * len(attacks)

    def record(self, attack: int, points: int, seconds: float) -> None:
        self.seconds[attack] += seconds
        self.points[attack] += points

    def _rate(self, attack: int) -> Optional[float]:
        if self.points[attack]:
            return self.seconds[attack] / self.points[attack]
        timed = [i for i in range(len(self.attacks)) if self.points[i]]
        if not timed:
            return None
        per_cost = sum(self.seconds[i] for i in timed) / sum(self.points[i] * self.cost[i] for i in timed)
        return per_cost * self.cost[attack]

    def left(self, stages: torch.Tensor, seen: int, batch: slice, next_attack: int, batch_size: int,
             batches_after: int) -> Optional[float]:
        """Seconds left when this ``batch`` still faces attacks from ``next_attack`` on, and
        ``batches_after`` batches of ``batch_size`` points follow. ``stages[:seen]`` are the points
        seen so far, this batch's survivors counted as robust."""
        rates = [self._rate(i) for i in range(len(self.attacks))]
        if None in rates:  # nothing timed yet
            return None
        standing = int((stages[batch] > len(self.attacks)).sum())
        reach = [share(stages[:seen] > i) for i in range(len(self.attacks))]  # attack i meets stage > i
        now = sum(rates[i] * standing for i in range(next_attack, len(self.attacks)))
        return now + batches_after * batch_size * sum(r * f for r, f in zip(rates, reach))


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _fingerprint(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: dict) -> str:
    """Identifies an evaluation, so that a state file is never applied to another one."""
    digest = hashlib.sha256(repr(sorted(settings.items())).encode())
    for tensor in (x, y, *model.state_dict().values()):
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _perturb(adversary, attack: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One attack of pyautoattack's cascade on one batch, as its run_standard_evaluation does it."""
    if attack in ("apgd-ce", "apgd-dlr"):
        adversary.apgd.loss = attack.removeprefix("apgd-")
        adversary.apgd.seed = adversary.get_seed()
        return adversary.apgd.perturb(x, y)
    if attack == "apgd-t":
        adversary.apgd_targeted.seed = adversary.get_seed()
        return adversary.apgd_targeted.perturb(x, y)
    if attack in ("fab", "fab-t"):
        adversary.fab.targeted = attack == "fab-t"
        if adversary.fab.targeted:
            adversary.fab.n_restarts = 1
        adversary.fab.seed = adversary.get_seed()
        return adversary.fab.perturb(x, y)
    if attack == "square":
        adversary.square.seed = adversary.get_seed()
        return adversary.square.perturb(x, y)
    raise ValueError(f"unknown AutoAttack attack {attack!r}")


def autoattack_cascade(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, *,
                       version: str = "standard", batch_size: int = 500, seed: int = 0,
                       state_path: Optional[str] = None,
                       progress: Optional[Callable[[CascadeProgress], None]] = None) -> CascadeResult:
    """Run AutoAttack's cascade batch by batch, checkpointing each batch to ``state_path``.

    Args:
        model: logits of inputs in [0, 1]; attacked in eval mode.
        x, y: test points and their true labels, on the model's device.
        version: ``standard`` (APGD-CE, APGD-T, FAB-T, Square with 5000 queries) or ``plus``.
        state_path: a file that records finished batches; an evaluation that is started again
            with it resumes after the last finished batch. It belongs to one evaluation (model,
            data and settings): another one refuses it rather than mixing results.
        progress: called with a :class:`CascadeProgress` after each attack of each batch, and after
            each batch, with the time left estimated.
    """
    from pyautoattack import AutoAttack

    if version not in ("standard", "plus"):
        raise ValueError(f"AutoAttack version must be 'standard' or 'plus', got {version!r}")
    logger = logging.getLogger("auto-attack")
    warnings, level, propagate = _Warnings(), logger.level, logger.propagate
    logger.addHandler(warnings)
    logger.setLevel(logging.WARNING)
    logger.propagate = False  # the checks become flags; they need not also reach the terminal
    try:
        with eval_mode(model):
            adversary = AutoAttack(model, norm=threat.norm, eps=threat.eps, version=version, seed=seed,
                                   device=x.device)
            attacks = tuple(adversary.attacks_to_run)
            settings = {"norm": threat.norm, "eps": threat.eps, "version": version, "seed": seed,
                        "batch_size": batch_size, "attacks": attacks}
            state = _load_state(state_path, _fingerprint(model, x, y, settings) if state_path else "")
            _run_checks(adversary, x[:batch_size], y[:batch_size], attacks, logger)
            stages = torch.zeros(len(y), dtype=torch.long)
            n_batches = (len(y) + batch_size - 1) // batch_size
            result = CascadeResult(attacks, stages)
            clock, start = _TimeLeft(adversary, attacks), time.perf_counter()

            def report(b: int, span: slice, attack: Optional[int]) -> None:
                if progress:
                    follows = attack + 1 if attack is not None else len(attacks)
                    progress(CascadeProgress(
                        b + 1, n_batches, attacks[attack] if attack is not None else None,
                        int((stages[:span.stop] > len(attacks)).sum()), span.stop, time.perf_counter() - start,
                        clock.left(stages, span.stop, span, follows, batch_size, n_batches - b - 1), result))

            for b in range(n_batches):
                span = slice(b * batch_size, min((b + 1) * batch_size, len(y)))
                if b in state["batches"]:
                    stages[span] = state["batches"][b]
                    result.resumed_batches += 1
                else:
                    _cascade_batch(model, adversary, attacks, x[span], y[span], stages[span], clock,
                                   functools.partial(report, b, span))
                    state["batches"][b] = stages[span].clone()
                    _save_state(state_path, state)
                report(b, span, None)
    finally:
        logger.removeHandler(warnings)
        logger.setLevel(level)
        logger.propagate = propagate
    for name, pattern in CHECKS.items():
        hits = [m for m in warnings.messages if pattern.search(m)]
        if hits:
            result.checks[name] = hits[0]
    return result


def _run_checks(adversary, x, y, attacks, logger) -> None:
    """pyautoattack's checks on the first batch, as run_standard_evaluation runs them."""
    from pyautoattack import checks

    checks.check_randomized(adversary.get_logits, x, y, bs=len(y), logger=logger)
    n_classes = checks.check_range_output(adversary.get_logits, x, logger=logger)
    checks.check_dynamic(adversary.model, x, False, logger=logger)
    checks.check_n_classes(n_classes, list(attacks), adversary.apgd_targeted.n_target_classes,
                           adversary.fab.n_target_classes, logger=logger)


def _cascade_batch(model, adversary, attacks, x, y, stages: torch.Tensor, clock: _TimeLeft,
                   report: Callable[[Optional[int]], None]) -> None:
    """Fill ``stages`` (this batch's view of the cascade's) attack by attack, timing each on ``clock``
    and calling ``report`` with its index after it."""
    with torch.no_grad():
        robust = model(x).argmax(1) == y
    stages[:] = torch.where(robust, len(attacks) + 1, 0).cpu()
    for i, attack in enumerate(attacks):
        index = robust.nonzero().flatten()
        if len(index) == 0:
            break
        begin = time.perf_counter()
        x_adv = _perturb(adversary, attack, x[index], y[index])
        with torch.no_grad():
            fooled = model(x_adv).argmax(1) != y[index]
        clock.record(i, len(index), time.perf_counter() - begin)
        robust[index[fooled]] = False
        stages[index[fooled].cpu()] = i + 1
        report(i)


def _load_state(path: Optional[str], fingerprint: str) -> dict:
    if not path or not os.path.exists(path):
        return {"fingerprint": fingerprint, "batches": {}}
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != fingerprint:
        raise ValueError(f"AutoAttack state file {path} belongs to another evaluation (model, data or "
                         f"settings differ); delete it or choose another path")
    return state


def _save_state(path: Optional[str], state: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = f"{path}.partial"
    torch.save(state, partial)
    os.replace(partial, path)  # atomic: a kill mid-write leaves the previous state intact
