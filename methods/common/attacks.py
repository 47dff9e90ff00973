# SPDX-License-Identifier: Apache-2.0
"""FGSM and PGD (L-inf and L2): the one attack loop every method and evaluation shares.

Every input-space ascent runs through :func:`ascent` (or, for evaluation's keep-best PGD, through
the same single step): it freezes the weights, takes the gradient of the summed per-example loss
at the iterate and hands it to a ``move``. PGD's move is a steepest-ascent step projected onto the
ball; ARMOR's UDR transport and Langevin sampling pass their own moves (``methods.common.dro``,
``methods.langevin``).

Conventions, as in torchattacks and RobustBench:
- inputs are images in [0, 1]; ``eps`` and ``step_size`` are in the same pixel units;
- every PGD iterate is projected onto the eps-ball around ``x`` and onto [0, 1];
- attacks use true labels ``y``, never the model's predictions;
- the model's parameters are frozen during the attack, so its backward pass computes input
  gradients only and no ``.grad`` of a parameter is touched.

References:
    [1] Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018,
        arXiv:1706.06083 (PGD with random start).
    [2] Goodfellow et al., "Explaining and Harnessing Adversarial Examples", ICLR 2015 (FGSM).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss_fn(logits, y) -> per-example loss (N,)``; the attack ascends its sum."""
Move = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``move(x_adv, grad, x) -> next iterate``: one update from an iterate, its loss gradient and the clean ``x``."""

NORMS = ("Linf", "L2")


@dataclass(frozen=True)
class ThreatModel:
    """Where an adversary may move an input: an ``norm`` ball of radius ``eps`` in [0, 1] pixels."""

    norm: str = "Linf"
    """``Linf`` or ``L2``."""
    eps: float = 8 / 255
    """Radius in [0, 1] pixel units (8/255 for CIFAR L-inf, 0.3 for MNIST, 0.5 for CIFAR L2)."""
    steps: int = 10
    """PGD iterations of the training attack (the training knob ``attack_steps``)."""
    step_size: Optional[float] = None
    """PGD step in pixel units (the training knob ``attack_step_size``, as ``steps`` is ``attack_steps``).
    Pass ``None`` for 2.5 * eps / steps (Madry et al.'s rule): it is resolved on construction, so
    every reader sees the step actually taken."""

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        check_eps(self.norm, self.eps)
        if self.step_size is None:   # frozen: set once, here, through object.__setattr__
            object.__setattr__(self, "step_size", madry_step(self.eps, self.steps))


def madry_step(eps: float, steps: int) -> float:
    """2.5 * eps / steps: Madry et al.'s PGD step, which lets the attack cross the ball and back."""
    return 2.5 * eps / max(steps, 1)


def check_eps(norm: str, eps: float) -> None:
    """L-inf radii live in (0, 1] pixel units; L2 radii may exceed 1 (2.0 is common on MNIST)."""
    if norm == "Linf" and not 0 < eps <= 1:
        raise ValueError(f"eps must be in (0, 1] in [0, 1] pixel units (8/255 = {8 / 255:.4f}), got {eps}")
    if norm == "L2" and not 0 < eps < float("inf"):
        raise ValueError(f"an L2 eps must be a positive number of [0, 1] pixel units, got {eps}")


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def targeted_margin(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``z_target - z_y``: the margin toward one wrong class (multi-targeted PGD, Gowal et al. 2019).

    It is a difference of logits, so it neither saturates like cross-entropy on a confident
    model nor changes with a rescaling of the logits.
    """
    return logits.gather(1, target[:, None])[:, 0] - logits.gather(1, y[:, None])[:, 0]


@contextlib.contextmanager
def frozen(model: nn.Module):
    """Freeze parameters for the attack: no weight gradients are computed or stored."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Attack in eval mode so that batch-norm statistics are not polluted by adversarial inputs."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _flat_norm(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (v.dim() - 1)))


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project onto the eps-ball around ``x`` and onto [0, 1]."""
    delta = x_adv - x
    if norm == "Linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _flat_norm(delta)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def random_start(x: torch.Tensor, eps: float, norm: str, generator: Optional[torch.Generator] = None):
    """A uniform point of the L-inf ball, or a point of the L2 ball with uniform radius fraction."""
    if norm == "Linf":
        delta = (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * eps
    else:
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        radius = torch.rand((x.shape[0],), generator=generator, device=x.device, dtype=x.dtype)
        delta = direction / _flat_norm(direction) * eps * radius.view(-1, *([1] * (x.dim() - 1)))
    return project(x + delta, x, eps, norm)


def ascent_step(x_adv: torch.Tensor, grad: torch.Tensor, step_size: float, norm: str) -> torch.Tensor:
    """A step of length ``step_size`` in the steepest-ascent direction of ``norm`` (sign, or g / ||g||_2)."""
    if norm == "Linf":
        return x_adv + step_size * grad.sign()
    return x_adv + step_size * grad / _flat_norm(grad)


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "Linf",
    steps: int = 10,
    step_size: Optional[float] = None,
    random_init: bool = True,
    restarts: int = 1,
    loss_fn: LossFn = ce_loss,
    target: Optional[torch.Tensor] = None,
    keep_best: bool = False,
    init: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Projected gradient ascent on ``loss_fn`` within the ``norm`` eps-ball, on true labels.

    Args:
        model: a classifier on (N, C, H, W) inputs in [0, 1]; its mode is left to the caller.
        x: clean inputs (N, C, H, W) in [0, 1].
        y: true labels (N,), or any target ``loss_fn`` understands (TRADES passes clean logits).
        eps, norm, steps: the threat model; ``step_size`` defaults to 2.5 * eps / steps.
        random_init: start from a random point of the ball (else from ``x``, or ``init``).
        restarts: independent starts (the first from ``init`` when given, the others random);
            they need ``keep_best``, which keeps the most adversarial.
        target: classes (N,) to attack toward: the ascent is then on :func:`targeted_margin`
            instead of ``loss_fn``, still with the true labels ``y``.
        keep_best: keep, per example, the most adversarial iterate seen (a misclassified one
            first, then the highest loss). This makes a longer or restarted attack never weaker
            than a shorter one with the same seed, which evaluation relies on. With class labels
            the attack also stops on a point once it is misclassified, as AutoAttack's attacks do:
            its verdict cannot change, and the points still standing run alone, which is where
            evaluation saves most of its time. Training leaves it off and takes the last iterate
            of every point, as in Madry et al.
        init: a starting point (e.g. TRADES' x + 0.001 N(0, I)).

    Returns:
        adversarial inputs, (N, C, H, W) in [0, 1] and within eps of ``x``.
    """
    kwargs = dict(eps=eps, norm=norm, steps=steps, step_size=step_size, random_init=random_init, restarts=restarts,
                  loss_fn=loss_fn, target=target, init=init, generator=generator)
    if keep_best:
        return _pgd_keep_best(model, x, y, **kwargs)[0]
    if restarts > 1:
        raise ValueError("restarts > 1 needs keep_best=True (otherwise which restart to return is undefined)")
    x = x.detach()
    move = pgd_move(eps, norm, step_size if step_size is not None else madry_step(eps, steps))
    return ascent(model, _start(x, eps, norm, init, random_init, generator), x, y, steps=steps, move=move,
                  loss_fn=loss_fn, target=target)


def pgd_move(eps: float, norm: str, step_size: float) -> Move:
    """PGD's move: :func:`ascent_step`, then the projection onto the eps-ball around ``x`` and onto [0, 1]."""
    def move(x_adv, grad, x):
        return project(ascent_step(x_adv, grad, step_size, norm), x, eps, norm)
    return move


def ascent(model: nn.Module, start: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, steps: int, move: Move,
           loss_fn: LossFn = ce_loss, target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The one ascent loop: ``steps`` times, the input gradient of the summed loss at the iterate, then ``move``.

    Args:
        model: the classifier; its weights are frozen for the loop, its mode is left to the caller.
        start: the first iterate, used as given (``move`` owns every constraint).
        x, y, loss_fn, target: the clean inputs, and the loss ascended, as in :func:`pgd`.

    Returns:
        the last iterate, detached.
    """
    x_adv = start.detach()
    with frozen(model):
        for _ in range(steps):
            x_adv = _step(model, x_adv, x, y, target, loss_fn, move)[0]
    return x_adv.detach()


def pgd_best(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pgd` with ``keep_best`` on class labels ``y``, also returning which kept iterates are misclassified.

    The verdict comes from the forward pass that scored each iterate, so an evaluation needs no
    further pass over the adversarial inputs.
    """
    x_adv, score = _pgd_keep_best(model, x, y, **kwargs)
    return x_adv, score >= _FOOLED_FLOOR


def loss_path(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "Linf", steps: int = 10,
              step_size: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The cross-entropy of every iterate of one PGD run from a random start: (steps + 1, N), for the
    convergence check (Pintor et al., "Indicators of Attack Failure", NeurIPS 2022)."""
    move = pgd_move(eps, norm, step_size if step_size is not None else madry_step(eps, steps))
    x = x.detach()
    x_adv, path = random_start(x, eps, norm, generator), []
    with frozen(model):
        for _ in range(steps):
            x_adv, _, losses = _step(model, x_adv, x, y, None, ce_loss, move)
            path.append(losses)
        with torch.no_grad():
            path.append(ce_loss(model(x_adv), y))
    return torch.stack(path)


def _start(x, eps, norm, init, random_init, generator):
    if init is not None:
        return project(init.detach(), x, eps, norm)
    return random_start(x, eps, norm, generator) if random_init else x.clone()


def _step(model, x_adv, x, y, target, loss_fn, move):
    """One ascent step from ``x_adv``; also returns the logits and losses of ``x_adv`` itself."""
    x_adv.requires_grad_(True)
    logits = model(x_adv)
    losses = _loss(logits, y, target, loss_fn)
    grad, = torch.autograd.grad(losses.sum(), x_adv)
    return move(x_adv.detach(), grad, x), logits.detach(), losses.detach()


def _loss(logits, y, target, loss_fn):
    return loss_fn(logits, y) if target is None else targeted_margin(logits, y, target)


def _pgd_keep_best(model, x, y, *, eps, norm="Linf", steps=10, step_size=None, random_init=True, restarts=1,
                   loss_fn=ce_loss, target=None, init=None, generator=None):
    move = pgd_move(eps, norm, step_size if step_size is not None else madry_step(eps, steps))
    x = x.detach()
    best = x.clone()
    best_score = torch.full((x.shape[0],), -float("inf"), device=x.device)
    stops = _is_labels(y)
    with frozen(model):
        for restart in range(max(restarts, 1)):
            # Drawn for the whole batch, so that no point's start depends on which others are left.
            start = _start(x, eps, norm, init if restart == 0 else None, random_init or restart > 0, generator)
            rows = (best_score < _FOOLED_FLOOR).nonzero()[:, 0] if stops else torch.arange(len(x), device=x.device)
            if not len(rows):
                break
            x_adv, xs, ys = start[rows], x[rows], y[rows]
            ts = None if target is None else target[rows]
            for step in range(steps + 1):
                if step < steps:
                    next_adv, logits, losses = _step(model, x_adv, xs, ys, ts, loss_fn, move)
                else:
                    with torch.no_grad():
                        logits = model(x_adv)
                        losses = _loss(logits, ys, ts, loss_fn)
                best[rows], best_score[rows] = _keep(best[rows], best_score[rows], x_adv.detach(), logits, losses, ys)
                if step == steps:
                    break
                x_adv = next_adv
                if stops:
                    standing = best_score[rows] < _FOOLED_FLOOR
                    if not standing.all():
                        rows, x_adv, xs, ys = rows[standing], x_adv[standing], xs[standing], ys[standing]
                        ts = None if ts is None else ts[standing]
                        if not len(rows):
                            break
    return best, best_score


def _is_labels(y: torch.Tensor) -> bool:
    return y.dtype in (torch.int64, torch.int32) and y.dim() == 1


_FOOLED = 1e6
_LOSS_CLAMP = 1e5
_FOOLED_FLOOR = _FOOLED - _LOSS_CLAMP
"""Every misclassified iterate scores at least this, every other one less."""


def correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per point: the output counts as the true class ``y`` only if that class's logit is strictly the largest.

    otarena's one rule of a correct answer (docs/metrics.md). A tie at the top (all-zero or constant
    logits, where argmax would pick the first class), a NaN, or an extra "reject" output that wins
    counts as wrong: a defence that declines to answer is not robust on that point.
    """
    true = logits.gather(1, y[:, None])[:, 0]
    return true > logits.scatter(1, y[:, None], -float("inf")).amax(1)


def _keep(best, best_score, x_adv, logits, losses, y):
    """Per-example running argmax of (misclassified, loss)."""
    fooled = (~correct(logits, y)).float() if _is_labels(y) else torch.zeros_like(losses)
    # A misclassified iterate always beats a correctly classified one, whatever its loss.
    score = fooled * _FOOLED + losses.float().clamp(-_LOSS_CLAMP, _LOSS_CLAMP)
    better = score > best_score
    mask = better.view(-1, *([1] * (x_adv.dim() - 1)))
    return torch.where(mask, x_adv, best), torch.where(better, score, best_score)


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "Linf",
         loss_fn: LossFn = ce_loss) -> torch.Tensor:
    """One full-size step from ``x``: FGSM for L-inf, the fast gradient method for L2."""
    return pgd(model, x, y, eps=eps, norm=norm, steps=1, step_size=eps, random_init=False, loss_fn=loss_fn)
