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
classes, zero gradients) are captured from its logger and returned as named checks. Two of them are
ours, run afresh for every cascade so that nothing carries over from one evaluation to the next in
the same process: the dynamic-defense check counts autograd calls in a tracer of its own
(pyautoattack's counts in a module-level dict that is never reset, so after one dynamic model every
later model in the process would be flagged), and the randomness check runs not only on clean inputs
(where pyautoattack looks) but also on random points of the eps-ball and on every perturbed point the
attacks produce: the same input twice must give the same logits.

A randomized defense is attacked by AutoAttack's ``rand`` version (APGD-CE and APGD-DLR, each
gradient an Expectation over Transformation of ``eot_iters`` draws, Athalye et al., ICML 2018,
Section 4), and every point is scored by its expected accuracy: the share of ``eot_iters`` draws
that classify it correctly, at the clean input and at each attack's output, the lowest share
counting (:attr:`CascadeResult.correct_draws`).

The cascade runs with the model's parameters frozen: the attacks need input gradients only, and
FAB's ``.backward()`` would otherwise leave (and spend time on) gradients on the weights.

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
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch
import torch.nn as nn

from otarena.methods.common.attacks import ThreatModel, correct, eval_mode, frozen, random_start
from otarena.methods.common.evaluate import count_correct, share

CHECKS = {
    "aa-check:randomized": re.compile(r"randomized defense"),
    "aa-check:softmax-output": re.compile(r"probability distribution"),
    "aa-check:dynamic": re.compile(r"dynamic defense"),
    "aa-check:n-classes": re.compile(r"classes"),
    "masking:zero-gradient": re.compile(r"zero gradient"),
}
"""Flag name -> the pyautoattack warning it stands for (checks.py, flags_doc.md)."""

RANDOMIZED, DYNAMIC = "aa-check:randomized", "aa-check:dynamic"

WHITE_BOX = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t")

VERSIONS = ("standard", "plus", "rand")


@dataclass
class CascadeResult:
    attacks: tuple[str, ...]
    stages: torch.Tensor
    """Per point: 0 misclassified clean, i + 1 first fooled by ``attacks[i]``, len + 1 robust."""
    checks: dict[str, str] = field(default_factory=dict)
    """pyautoattack check name -> its message."""
    resumed_batches: int = 0
    """Batches read back from the state file instead of attacked."""
    draws: int = 1
    """Forward passes that score each point (``eot_iters`` for the ``rand`` version, else 1)."""
    correct_draws: Optional[torch.Tensor] = None
    """``rand`` only, per point and column (clean, then after each attack): how many of the ``draws``
    classified it correctly at its worst input so far. A point's stage is the first column at 0."""

    def _share(self, column: int) -> float:
        """Accuracy after ``column`` (0: clean, i + 1: after attack i): an exact count over the points,
        or for ``rand`` over the points times the draws (the expected accuracy)."""
        if self.correct_draws is None:
            return share(self.stages > column)
        counts = self.correct_draws[:, column]
        return int(counts.sum()) / (counts.numel() * self.draws) if counts.numel() else float("nan")

    @property
    def robust_acc(self) -> float:
        return self._share(len(self.attacks))

    @property
    def clean_acc(self) -> float:
        return self._share(0)

    def per_attack(self) -> dict[str, float]:
        """Robust accuracy after each attack of the cascade, in order."""
        return {name: self._share(i + 1) for i, name in enumerate(self.attacks)}

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
                       version: str = "standard", batch_size: int = 500, seed: int = 0, eot_iters: int = 20,
                       state_path: Optional[str] = None,
                       progress: Optional[Callable[[CascadeProgress], None]] = None,
                       check_points: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> CascadeResult:
    """Run AutoAttack's cascade batch by batch, checkpointing each batch to ``state_path``.

    Args:
        model: logits of inputs in [0, 1]; attacked in eval mode, with its parameters frozen.
        x, y: test points and their true labels, on the model's device.
        version: ``standard`` (APGD-CE, APGD-T, FAB-T, Square with 5000 queries), ``plus``, or
            ``rand`` (APGD-CE and APGD-DLR with EOT, for randomized defenses).
        eot_iters: ``rand`` only: the draws each gradient averages and each point is scored by.
        state_path: a file that records finished batches; an evaluation that is started again
            with it resumes after the last finished batch. It belongs to one evaluation (model,
            data and settings): another one refuses it rather than mixing results.
        progress: called with a :class:`CascadeProgress` after each attack of each batch, and after
            each batch, with the time left estimated.
        check_points: the points (and labels) the checks before the first batch look at; ``None``: the first
            batch. A shard of a larger evaluation passes that evaluation's first batch, so that every shard
            finds what the unsharded cascade would (``methods.common.evaluate.evaluate_shard``).
    """
    from pyautoattack import AutoAttack

    if version not in VERSIONS:
        raise ValueError(f"AutoAttack version must be one of {VERSIONS}, got {version!r}")
    draws = eot_iters if version == "rand" else 1
    logger = logging.getLogger("auto-attack")
    warnings, level, propagate = _Warnings(), logger.level, logger.propagate
    logger.addHandler(warnings)
    logger.setLevel(logging.WARNING)
    logger.propagate = False  # the checks become flags; they need not also reach the terminal
    try:
        with eval_mode(model), frozen(model):
            adversary = AutoAttack(model, norm=threat.norm, eps=threat.eps, version=version, seed=seed,
                                   device=x.device)
            adversary.apgd.eot_iter = draws
            attacks = tuple(adversary.attacks_to_run)
            settings = {"norm": threat.norm, "eps": threat.eps, "version": version, "seed": seed,
                        "batch_size": batch_size, "attacks": attacks, **({"eot_iters": draws} if draws > 1 else {})}
            state = _load_state(state_path, _fingerprint(model, x, y, settings) if state_path else "")
            found = state.setdefault("checks", {})  # our own checks, kept with the batches they ran on
            head_x, head_y = check_points if check_points is not None else (x[:batch_size], y[:batch_size])
            found.update(_run_checks(adversary, head_x, head_y, attacks, threat, seed, logger))
            stages = torch.zeros(len(y), dtype=torch.long)
            counts = torch.zeros(len(y), len(attacks) + 1, dtype=torch.long) if draws > 1 else None
            n_batches = (len(y) + batch_size - 1) // batch_size
            result = CascadeResult(attacks, stages, draws=draws, correct_draws=counts)
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
                    if counts is not None:
                        counts[span] = state["correct"][b]
                    result.resumed_batches += 1
                else:
                    _cascade_batch(model, adversary, attacks, x[span], y[span], stages[span],
                                   counts[span] if counts is not None else None, found, clock,
                                   functools.partial(report, b, span))
                    state["batches"][b] = stages[span].clone()
                    if counts is not None:
                        state.setdefault("correct", {})[b] = counts[span].clone()
                    _save_state(state_path, state)
                report(b, span, None)
    finally:
        logger.removeHandler(warnings)
        logger.setLevel(level)
        logger.propagate = propagate
    for name, pattern in CHECKS.items():
        hits = [m for m in warnings.messages if pattern.search(m)]
        if hits and name != DYNAMIC:  # the dynamic check is ours (_uses_autograd)
            result.checks[name] = hits[0]
    result.checks.update(found)
    return result


def differs(a: torch.Tensor, b: torch.Tensor, alpha: float = 1e-4) -> torch.Tensor:
    """Per row: two outputs for the same input disagree, by pyautoattack's ``check_randomized`` rule
    (another predicted class, or L2-normalized logits more than ``alpha`` apart)."""
    def unit(logits):
        flat = logits.flatten(1)
        return flat / (flat.norm(dim=1, keepdim=True) + 1e-10)
    return (a.argmax(1) != b.argmax(1)) | ((unit(a) - unit(b)).norm(dim=1) > alpha)


@torch.no_grad()
def randomness(model: nn.Module, points: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Two forward passes on each named set of ``points``: the one-line reason of the first set whose
    logits differ (a randomized defense), else None. ``model`` should be in eval mode."""
    for where, x in points.items():
        if len(x) and bool(differs(model(x), model(x)).any()):
            return f"the same {where} input gave different logits in two forward passes: a randomized defense"
    return None


def eps_ball_points(x: torch.Tensor, threat: ThreatModel, seed: int) -> torch.Tensor:
    """Random points of the eps-ball around ``x`` (a seeded draw), where a defense that is deterministic
    on clean data may show its randomness."""
    return random_start(x, threat.eps, threat.norm, torch.Generator(device=x.device).manual_seed(seed))


_AUTOGRAD_CALLS = frozenset({"grad", "backward", "_make_grads"})
"""The functions whose call in a forward pass makes pyautoattack call a defense dynamic (checks.funcs)."""


def _uses_autograd(model: nn.Module, x: torch.Tensor) -> bool:
    """pyautoattack's ``check_dynamic`` with a counter of its own: does one forward pass call autograd?

    A tracer sees every Python call of the pass. The count starts at zero for each model, and the
    tracer in place before (a debugger's, coverage's) is put back even when the forward pass fails.
    """
    calls = []

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code.co_name in _AUTOGRAD_CALLS:
            calls.append(frame.f_code.co_name)

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        model(x)
    finally:
        sys.settrace(previous)
    return bool(calls)


def _run_checks(adversary, x, y, attacks, threat: ThreatModel, seed: int, logger) -> dict[str, str]:
    """pyautoattack's checks on the first batch, as run_standard_evaluation runs them (its warnings go
    to ``logger``), then ours: the dynamic check, and the randomness check on clean inputs (in our words)
    and on random points of their eps-ball."""
    from pyautoattack import checks

    checks.check_randomized(adversary.get_logits, x, y, bs=len(y), logger=logger)
    n_classes = checks.check_range_output(adversary.get_logits, x, logger=logger)
    checks.check_n_classes(n_classes, list(attacks), adversary.apgd_targeted.n_target_classes,
                           adversary.fab.n_target_classes, logger=logger)
    found = {}
    if _uses_autograd(adversary.model, x):
        found[DYNAMIC] = ("the forward pass calls autograd (a dynamic defense): AutoAttack may be insufficient "
                          "(pyautoattack's check_dynamic)")
    random = randomness(adversary.model, {"clean": x, "random eps-ball": eps_ball_points(x, threat, seed)})
    if random:
        found[RANDOMIZED] = random
    return found


def _cascade_batch(model, adversary, attacks, x, y, stages: torch.Tensor, counts: Optional[torch.Tensor],
                   found: dict, clock: _TimeLeft, report: Callable[[Optional[int]], None]) -> None:
    """Fill ``stages`` (this batch's view of the cascade's) attack by attack, timing each on ``clock``
    and calling ``report`` with its index after it.

    With ``counts`` (the ``rand`` version) each point is scored by its correct draws and keeps the
    lowest count so far; an attack meets the points that some draw still classifies correctly.
    Otherwise every perturbed point is passed twice, and logits that differ are noted in ``found``.
    """
    draws = adversary.apgd.eot_iter
    still = count_correct(model, x, y, draws)
    stages[:] = torch.where(still > 0, len(attacks) + 1, 0).cpu()
    if counts is not None:
        counts[:, 0] = still.cpu()
    for i, attack in enumerate(attacks):
        index = (still > 0).nonzero().flatten()
        if len(index) == 0:
            if counts is not None:
                counts[:, i + 1:] = 0
            break
        begin = time.perf_counter()
        x_adv = _perturb(adversary, attack, x[index], y[index])
        if counts is None:
            with torch.no_grad():
                logits = model(x_adv)
            now = correct(logits, y[index]).long()
            random = RANDOMIZED not in found and randomness(model, {"perturbed": x_adv})
            if random:
                found[RANDOMIZED] = f"{random} (after {attack})"
        else:
            now = count_correct(model, x_adv, y[index], draws)
        clock.record(i, len(index), time.perf_counter() - begin)
        before = still[index]
        still[index] = torch.minimum(before, now)
        fallen = index[(still[index] == 0) & (before > 0)]
        stages[fallen.cpu()] = i + 1
        if counts is not None:
            counts[:, i + 1] = still.cpu()
        report(i)


def _load_state(path: Optional[str], fingerprint: str) -> dict:
    if not path or not os.path.exists(path):
        return {"fingerprint": fingerprint, "batches": {}, "checks": {}}
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
