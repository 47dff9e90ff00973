# SPDX-License-Identifier: Apache-2.0
"""The small evaluation core: clean, PGD-k and AutoAttack accuracy of any classifier on [0, 1] inputs.

``evaluate(model, data, threat_model, attacks=..., n_ex=...)`` is the one entry point, in the
spirit of RobustBench's ``benchmark()``: it takes any ``nn.Module`` and a dataset split and returns
accuracies and automatic flags. Attacks always use true labels and a random start.

References:
    [1] Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
        parameter-free attacks", ICML 2020 (AutoAttack; we use the pyautoattack package).
    [2] Croce et al., "RobustBench: a standardized adversarial robustness benchmark", NeurIPS 2021 D&B.
"""
from __future__ import annotations

import logging
import re
from typing import Iterable, Optional

import torch
import torch.nn as nn

from methods.common.attacks import ThreatModel, eval_mode, pgd

ATTACKS = ("clean", "pgd", "autoattack", "certified")
AA_GAP_THRESHOLD = 0.05
"""AutoAttack this far (fraction) below PGD suggests gradient masking."""
SMALL_SAMPLE = 1000


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]
                      for i in range(0, len(y), batch_size)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Clean accuracy (fraction), in eval mode."""
    with eval_mode(model):
        return _correct(model, x, y, batch_size).float().mean().item()


def pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, *, steps: int = 10,
                 step_size: Optional[float] = None, restarts: int = 1, batch_size: int = 512,
                 generator: Optional[torch.Generator] = None) -> float:
    """Robust accuracy under PGD-``steps`` with random start, keeping each example's worst iterate."""
    with eval_mode(model):
        correct = []
        for i in range(0, len(y), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            x_adv = pgd(model, xb, yb, eps=threat.eps, norm=threat.norm, steps=steps, step_size=step_size,
                        restarts=restarts, keep_best=True, generator=generator)
            correct.append(_correct(model, x_adv, yb, batch_size))
        return torch.cat(correct).float().mean().item()


class _AALog(logging.Handler):
    """Collects pyautoattack's per-attack robust accuracy, which it only logs at DEBUG level."""

    pattern = re.compile(r"robust accuracy after ([\w-]+): ([\d.]+)%")

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.per_attack: dict[str, float] = {}

    def emit(self, record):
        match = self.pattern.search(record.getMessage())
        if match:
            self.per_attack[match.group(1).lower()] = float(match.group(2)) / 100


def autoattack_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, *,
                        version: str = "standard", batch_size: int = 500, seed: int = 0) -> tuple[float, dict]:
    """AutoAttack robust accuracy and the accuracy after each attack of the cascade."""
    from pyautoattack import AutoAttack

    logger = logging.getLogger("auto-attack")
    handler, level = _AALog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    # Its DEBUG lines are for us, not for the terminal.
    propagate, logger.propagate = logger.propagate, False
    try:
        with eval_mode(model):
            adversary = AutoAttack(model, norm=threat.norm, eps=threat.eps, version=version, seed=seed,
                                   device=x.device)
            _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
    return (y_adv.to(y.device) == y).float().mean().item(), handler.per_attack


def flags_for(result: dict) -> list[str]:
    """Automatic warnings about an evaluation (a subset of AutoAttack's and RobustBench's checks)."""
    flags = []
    if "aa_acc" in result and "pgd_acc" in result and result["pgd_acc"] - result["aa_acc"] > AA_GAP_THRESHOLD:
        flags.append("masking:aa-gap")
    if result.get("n_ex", SMALL_SAMPLE) < SMALL_SAMPLE:
        flags.append("small-sample")
    # A refused certificate, or an attack that beats it: either way no certified number is sound.
    beaten = min(result.get("aa_acc", 1.0), result.get("pgd_acc", 1.0)) < result.get("certified_acc", 0.0) - 1e-9
    if "certified_refused" in result or beaten:
        flags.append("unsound-certificate")
    return flags


def evaluate(model: nn.Module, data, threat_model: ThreatModel, attacks: Iterable[str] = ATTACKS, *,
             n_ex: Optional[int] = None, pgd_steps: int = 50, pgd_restarts: int = 1,
             pgd_step_size: Optional[float] = None, aa_version: str = "standard",
             batch_size: int = 500, seed: int = 0, device: Optional[torch.device | str] = None) -> dict:
    """Evaluate any classifier on [0, 1] inputs.

    Args:
        model: an ``nn.Module`` mapping (N, C, H, W) in [0, 1] to logits; normalization inside.
        data: a ``TensorData`` split or an ``(x, y)`` pair of tensors.
        threat_model: norm and eps of the attacks.
        attacks: any of ``clean``, ``pgd``, ``autoattack``, ``certified`` (the L2 certificate of a
            Lipschitz net at eps, refused when its measured Lipschitz bound exceeds 1 + 2%).
        n_ex: evaluate the first ``n_ex`` examples (``None``: all of them).
        pgd_steps, pgd_restarts: PGD-k settings (random start, true labels).
        pgd_step_size: default eps / 4 (2/255 at 8/255, as in RobustBench-era evaluations); the
            most adversarial iterate is kept, so a large step never weakens a long attack.
        aa_version: pyautoattack version (``standard``, ``plus``, ``rand``).
        seed: seeds PGD's random start and AutoAttack.

    Returns:
        ``{"n_ex", "clean_acc", "pgd_acc", "aa_acc", "aa_per_attack", "certified_acc",
        "lipschitz_bound", "flags"}`` (those asked for), accuracies as fractions. A refused
        certificate gives ``certified_refused`` (the reason) and the ``unsound-certificate`` flag
        instead of a number.
    """
    unknown = set(attacks) - set(ATTACKS)
    if unknown:
        raise ValueError(f"unknown attacks {sorted(unknown)}; choose from {ATTACKS}")
    x, y = (data.x, data.y) if hasattr(data, "x") else data
    if n_ex is not None:
        x, y = x[:n_ex], y[:n_ex]
    device = torch.device(device) if device is not None else next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    certified_model, model = model, (model.inference() if hasattr(model, "inference") else model)
    result: dict = {"n_ex": len(y)}
    if "clean" in attacks:
        result["clean_acc"] = accuracy(model, x, y, batch_size)
    if "pgd" in attacks:
        generator = torch.Generator(device=device).manual_seed(seed)
        step_size = pgd_step_size if pgd_step_size is not None else threat_model.eps / 4
        result["pgd_acc"] = pgd_accuracy(model, x, y, threat_model, steps=pgd_steps, step_size=step_size,
                                         restarts=pgd_restarts, batch_size=batch_size, generator=generator)
    if "autoattack" in attacks:
        result["aa_acc"], result["aa_per_attack"] = autoattack_accuracy(
            model, x, y, threat_model, version=aa_version, batch_size=batch_size, seed=seed)
    if "certified" in attacks:
        from methods.common.certify import UncertifiableError, certify

        try:
            certificate = certify(certified_model, x, y, [threat_model.eps], batch_size=batch_size)
            result["certified_acc"] = certificate["certified_acc"][threat_model.eps]
            result["lipschitz_bound"] = certificate["lipschitz_bound"]
        except UncertifiableError as err:
            result["certified_refused"] = err.reason
            if err.bound is not None:
                result["lipschitz_bound"] = err.bound
    result["flags"] = flags_for(result)
    return result
