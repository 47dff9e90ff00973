# SPDX-License-Identifier: Apache-2.0
"""The Method contract: one object per training run that owns one optimizer step.

Simple methods (PGD-AT, TRADES, MART) define ``perturb`` (the inner maximization) and ``loss`` (the
outer objective) and inherit ``step``. Methods that must control their own update (SAM-like weight
perturbations, persistent adversarial buffers, learned potentials or dual variables) override
``step`` and, for exact resume, ``state_dict``/``load_state_dict``; their ``step`` still runs the
inner maximization through ``attack`` and the model's update through ``update``, so the mode
switches and the optimizer calls live here only.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, Mapping, Optional

import torch
import torch.nn as nn

from otarena.methods.common.attacks import ThreatModel, eval_mode


def hits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Correct predictions and examples, as the integer pair ``(hits, n)``: a training accuracy.

    The training loop sums an epoch's pairs and divides once, so that ``train/<key>`` is an exact
    count over the examples seen, not a float32 mean of batch means. ``n`` is filled on the device
    (no host-to-device copy, hence no sync, per step).
    """
    return torch.stack(((logits.argmax(1) == y).sum(), y.new_full((), y.numel())))


@dataclass(frozen=True)
class Paper:
    """A method's paper as data, in RobustBench's ``model_info`` spelling: the search writes these
    fields as MLflow tags (docs/mlflow-schema.md) and the leaderboard fills ``name``, ``authors``,
    ``venue`` and ``link`` from them."""

    title: str
    """The title alone (RobustBench's ``name``)."""
    authors: str = ""
    """Every author, comma-separated, as the paper lists them; ``Anonymous`` under double-blind review."""
    venue: str = ""
    """``ICLR 2018``; a preprint as ``arXiv, Sep 2023``; ``N/A`` for no paper (RobustBench's usage)."""
    link: str = ""
    """The paper (its arXiv or OpenReview page), else its official code; ``""`` when there is neither."""

    @property
    def citation(self) -> str:
        """Short citation shown by ``otarena methods`` and on the leaderboard: ``Madry et al., Title (ICLR 2018)``."""
        names = [a.strip() for a in self.authors.split(",") if a.strip()]
        surnames = [n.split()[-1] for n in names]
        who = (surnames[0] if len(names) == 1 else " & ".join(surnames) if len(names) == 2
               else f"{surnames[0]} et al." if names else "")
        venue = f" ({self.venue})" if self.venue and self.venue != "N/A" else ""
        return f"{who + ', ' if who else ''}{self.title}{venue}"

    def __str__(self) -> str:
        return self.citation


@dataclass(frozen=True)
class NoConfig:
    """A method without hyperparameters of its own."""


class Method:
    """Base class. Subclasses set ``Config``, ``SEARCH_SPACE`` and ``paper``.

    Args:
        model: the classifier (inputs in [0, 1]); its mode is owned by ``step``.
        optimizer: the model's optimizer, built by the training loop from the shared knobs.
        threat: the threat model of the training attack (norm, eps, steps, step size).
        cfg: an instance of ``Config``.
        n_train: training-set size, for methods that keep per-example state.
        device: where per-example state lives.
    """

    Config: ClassVar[type] = NoConfig
    SEARCH_SPACE: ClassVar[Mapping[str, Any]] = {}
    """Domains searched by default (the paper's advice on what to tune)."""
    OPTIONAL_SPACE: ClassVar[Mapping[str, Any]] = {}
    """Domains a config may search instead (e.g. Langevin's lambda in place of sigma); when not
    searched, the parameter keeps its ``Config`` default."""
    paper: ClassVar[Paper] = Paper("")
    """The method's paper: title, authors, venue and link, the one place they are written."""
    archs: ClassVar[Optional[tuple]] = None
    """Architectures (``nets.ARCHS`` keys) the method runs on; None: any architecture."""
    certified: ClassVar[bool] = False
    """True when the method's models come with certificates (``methods.common.certify``)."""
    norm: ClassVar[Optional[str]] = None
    """The one threat-model norm (``Linf`` or ``L2``) the method is defined for; None: any norm."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, threat: ThreatModel, cfg=None,
                 *, n_train: int = 0, device: torch.device | str = "cpu"):
        self.model = model
        self.optimizer = optimizer
        self.threat = threat
        self.cfg = cfg if cfg is not None else self.Config()
        self.n_train = n_train
        self.device = torch.device(device)

    @classmethod
    def config_from(cls, hparams: Mapping[str, Any]):
        """Build ``Config`` from a flat hyperparameter dict, ignoring the shared training knobs."""
        names = {f.name for f in fields(cls.Config)}
        return cls.Config(**{k: v for k, v in hparams.items() if k in names})

    @classmethod
    def space_warnings(cls, space: Mapping[str, Any], norm: str, eps: float) -> list[str]:
        """What a resolved search space (name to ``methods.space`` domain) does wrong at a threat
        model without being invalid, one line each (HKR: margins too small to certify eps); the
        search config prints them as warnings. None by default."""
        return []

    @property
    def single_step(self) -> bool:
        """Whether the training attack takes one gradient step: FGSM-based training (a method whose attack
        takes ``attack_steps`` = 1 steps; Langevin overrides it for T = 1). Such training can overfit
        catastrophically (Wong et al., "Fast is better than free", ICLR 2020), so validation
        tracks FGSM accuracy beside PGD's (``methods.common.train.validate``)."""
        return type(self).perturb is not Method.perturb and self.threat.steps == 1

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The inner maximization; the default is no attack."""
        return x

    def loss(self, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def step(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """One update on a minibatch: ``attack``, ``loss``, ``update``; returns detached tensors to log:
        scalars, and for accuracies ``(hits, n)`` integer pairs (:func:`hits`).

        Tensors rather than floats, so that the loop averages them on the device and syncs with
        the host once per epoch instead of once per batch.
        """
        x_adv = self.attack(x, y)
        loss, metrics = self.loss(x, y, x_adv)
        self.update(loss)
        return {"loss": loss.detach(), **metrics}

    def attack(self, x: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """``perturb(x, y, **kwargs)`` in eval mode, then the model back in train mode for the update.

        Eval mode keeps adversarial inputs out of the batch-norm statistics (every method here).
        """
        with eval_mode(self.model):
            x_adv = self.perturb(x, y, **kwargs)
        self.model.train()
        return x_adv

    def update(self, loss: torch.Tensor) -> None:
        """One optimizer step on ``loss``: zero the gradients, backward, step."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def passes(self) -> float | None:
        """Forward+backward passes over a minibatch per step, in theory.

        A forward pass without backward counts 1/3. ``benchmarks/method_cost.py`` compares it with
        the measured cost; ``None`` when a method does not declare it.
        """
        return None

    def state_dict(self) -> dict:
        """Method state beyond model and optimizer (buffers, potentials, duals)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
