# SPDX-License-Identifier: Apache-2.0
"""``otarena reproduce``: one paper's table, claimed against measured.

A claim set is one table of one claims file (``003:Table 1``; ``claims/*.yaml``, read by
:mod:`otarena.leaderboard.claims`). Reproducing it:

1. groups its claims into the models the table needs (method, network, training radius and the
   training setting the paper states) and trains each once with the paper's own hyperparameters
   (a reproduction, not a search), through ``methods.build_run`` and ``methods.fit`` as
   ``otarena train`` does. What the paper does not state takes a stated default; what otarena
   cannot do is a stated deviation;
2. evaluates each model twice on the test split: with the paper's metrics as the paper ran them
   (FGSM, PGD-k with its steps, restarts and step size, AutoAttack; on predicted labels where the
   paper attacked those) and with otarena's protocol (``methods.evaluate``: true labels,
   multi-targeted PGD, AutoAttack standard, the flags, and an eps sweep at the table's radii whose
   grey-image candidate bounds every radius of 0.5 and more);
3. writes the table, claimed against measured, as Markdown and JSON, each row with its verdict
   (:data:`VERDICTS`), and logs one MLflow run per model in the experiment ``reproduce-<paper>``,
   as ``otarena evaluate`` logs its runs, with the deviations from the paper as a tag.

``--budget paper`` is the paper's setting (for a GPU); ``--budget reduced`` is what a 2-core CPU
can do (:data:`REDUCED`): fewer epochs, a training subset, fewer test points. Every reduction is
said in the table and in the runs.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

# The run tags, declared once where the leaderboard reads them.
from otarena.leaderboard.tags import DEVIATIONS as DEVIATIONS_TAG
from otarena.leaderboard.tags import REPRODUCES as REPRODUCES_TAG
from otarena.leaderboard.tags import REPRODUCTION_BUDGET as BUDGET_TAG
from otarena.leaderboard.tags import REPRODUCTION_SETTING as SETTING_TAG

VERDICTS = {
    "reproduced": "the claim lies within the measured value's 95% interval",
    "below claim": "the whole 95% interval lies below the claim",
    "above claim": "the whole 95% interval lies above the claim",
    "impossible": "no classifier can reach the claim: at L-inf eps >= 0.5 the constant grey image lies in "
                  "every ball, so robust accuracy cannot exceed the largest class's share of the test set; "
                  "the measured grey-image candidate confirms it for the model trained here",
    "not comparable": "the claim cannot be set against a measurement; the row names the protocol difference",
}
"""Each verdict and what it means (the README's table of them)."""


class ReproduceError(ValueError):
    """A claim set or budget that cannot be reproduced; the message is one line."""


@dataclass(frozen=True)
class Budget:
    """How much of the paper's setting a reproduction runs; ``None``: the paper's own."""

    name: str
    epochs: Optional[int] = None
    """Training epochs, at most (the paper's when fewer)."""
    train_n: Optional[int] = None
    """The first ``train_n`` training images (the split is shuffled with a fixed seed)."""
    test_n: Optional[int] = None
    """The first ``test_n`` test images, for every metric."""
    val_n: Optional[int] = None
    """Validation images attacked after each epoch."""
    autoattack: bool = True
    """False: AutoAttack is not run (its claims become not comparable)."""

    def reductions(self) -> list[str]:
        """Each reduction from the paper's setting, in words."""
        out = []
        if self.epochs is not None:
            out.append(f"at most {self.epochs} training epoch{'s' * (self.epochs != 1)} (the papers train for more)")
        if self.train_n is not None:
            out.append(f"the first {self.train_n:,} training images instead of the whole training split")
        if self.val_n is not None:
            out.append(f"validation after each epoch on {self.val_n:,} images")
        if self.test_n is not None:
            out.append(f"the first {self.test_n:,} test images instead of the whole test split, for every metric")
        if not self.autoattack:
            out.append("no AutoAttack (its claims are not comparable)")
        return out


PAPER = Budget("paper")
REDUCED = Budget("reduced", epochs=1, train_n=1000, test_n=100, val_n=100)
"""What a shared 2-core CPU does in minutes per model: PGD-40 training of the Carlini & Wagner CNN
costs about 37 ms per image on one core (benchmarks/results/method_cost-mnist.json)."""
BUDGETS = {"paper": PAPER, "reduced": REDUCED}


# ---------------------------------------------------------------------------------------------- claim sets
def claim_sets(folder=None) -> dict[str, list]:
    """Every claim set of the claims files: ``003:Table 1`` -> its claims, in file order."""
    from otarena.leaderboard import claims as claims_lib

    sets: dict[str, list] = {}
    for claim in claims_lib.load(folder):
        sets.setdefault(f"{claim.paper[:3]}:{claim.table}", []).append(claim)
    return sets


def resolve(text: str, folder=None, table: Optional[str] = None) -> tuple[str, list]:
    """The claim set ``text`` names: ``PAPER:TABLE`` (``003:Table 6``, ``003:6``, ``004_langevin:Table 1``),
    or ``PAPER`` with ``table``. :class:`ReproduceError` (one line, listing the choices) otherwise."""
    from otarena.leaderboard import claims as claims_lib

    paper, _, name = text.partition(":")
    name = name or table or ""
    try:
        sets = claim_sets(folder)
    except claims_lib.ClaimsError as err:  # a malformed claims file: its own one line
        raise ReproduceError(str(err)) from None
    choices = ", ".join(sets) or "none"
    try:
        chosen = claims_lib.select(folder, paper.strip()) if paper.strip() else []
    except claims_lib.ClaimsError:
        chosen = []
    if not chosen or not name.strip():
        raise ReproduceError(f"unknown claim set {text!r}; give PAPER:TABLE, one of: {choices}")
    wanted = _table_key(name)
    for key, members in sets.items():
        if any(p.stem.startswith(key[:3]) for p in chosen) and _table_key(key.partition(":")[2]) == wanted:
            return key, members
    raise ReproduceError(f"unknown claim set {text!r}; give PAPER:TABLE, one of: {choices}")


def _table_key(name: str) -> str:
    """``Table 1``, ``table1`` and ``1`` alike."""
    name = re.sub(r"\s+", "", name.lower())
    return name if not name.isdigit() else f"table{name}"


# ---------------------------------------------------------------------------------------------- the models
@dataclass
class Model:
    """One network the table needs: a method, trained once with the paper's setting."""

    method: str
    """otarena's name for the paper's method (``got_pgd_s``)."""
    arch: str
    dataset: str
    norm: str
    """``Linf`` or ``L2``, otarena's spelling."""
    train_eps: float
    training: Any = None
    """The claims' :class:`~otarena.leaderboard.claims.Training` (all the model's claims share it)."""
    claims: list = field(default_factory=list)
    """The table's claims this model answers."""
    hparams: dict = field(default_factory=dict)
    deviations: list[str] = field(default_factory=list)
    """How its training departs from the paper's (:func:`paper_hyperparameters`)."""
    run_id: Optional[str] = None
    seconds: dict[str, float] = field(default_factory=dict)
    flags: dict[str, str] = field(default_factory=dict)
    """otarena's flags on it (``masking:aa-gap`` -> why), from its protocol's evaluation."""
    setting: str = "paper"
    """``paper``: trained with the paper's hyperparameters; ``tuned``: the best trial of an otarena search."""

    @property
    def name(self) -> str:
        return f"{self.method} ({self.arch}, {self.norm} eps={self.train_eps:g})" + (
            ", tuned" if self.setting == "tuned" else "")


def not_comparable(claim, data_missing: Callable[[str], Optional[str]]) -> Optional[str]:
    """Why ``claim`` cannot be reproduced here, or None."""
    from otarena import methods

    if claim.relative_to is not None:
        return f"a relative claim ({claim.value:+g} points over {claim.relative_to}); otarena measures absolute accuracies"
    if claim.arch is None:
        return f"otarena has no {claim.architecture}"
    if claim.method not in methods.REGISTRY:
        return f"otarena does not implement {claim.row} ({claim.method})"
    if claim.metric.name == "train_adversarial":
        return "accuracy on the training set under the training attack: reproduce measures the test split only"
    if claim.metric.name == "certified":
        return "a certified accuracy: reproduce measures empirical attacks only"
    return data_missing(claim.dataset)


def plan(claims: list, data_missing: Callable[[str], Optional[str]]) -> tuple[list[Model], dict[str, str]]:
    """The models ``claims`` need, each with its claims, and the claims none can answer (key -> why)."""
    models: dict[tuple, Model] = {}
    skipped: dict[str, str] = {}
    for claim in claims:
        why = not_comparable(claim, data_missing)
        if why:
            skipped[claim.key] = why
            continue
        train_eps = claim.training.attack_eps or claim.eps
        norm = {"linf": "Linf", "l2": "L2"}[claim.norm]
        key = (claim.method, claim.arch, claim.dataset, norm, round(train_eps, 6), claim.training.model_dump_json())
        models.setdefault(key, Model(claim.method, claim.arch, claim.dataset, norm, train_eps,
                                     claim.training)).claims.append(claim)
    return list(models.values()), skipped


def paper_hyperparameters(model: Model, budget: Budget) -> tuple[dict, list[str]]:
    """The hyperparameters of ``model`` as its paper states them, and each deviation from the paper
    (an unstated setting and the default it takes, a setting otarena lacks, a budget reduction)."""
    from otarena import methods

    defaults, t = methods.defaults(model.method), model.training
    # The papers train without weight averaging, otarena's default.
    hparams, deviations = {"schedule": "constant", "augment": "none", "ema_decay": 0.0}, []
    deviations.append("learning-rate schedule: not stated, constant")
    stated = {"epochs": t.epochs, "optimizer": t.optimizer, "lr": t.lr, "batch_size": t.batch_size,
              "attack_steps": t.attack_steps, "attack_step_size": t.attack_step_size}
    unstated = {"weight_decay": (t.weight_decay, 0.0)}
    if (t.optimizer or defaults["optimizer"]) == "sgd":
        unstated["momentum"] = (t.momentum, defaults["momentum"])
    for name, value in stated.items():
        if value is not None:
            hparams[name] = value
        elif name == "attack_step_size":
            deviations.append("training attack step size: not stated, otarena's 2.5 eps / K")
        else:
            hparams[name] = defaults[name]
            deviations.append(f"{name.replace('_', ' ')}: not stated, otarena's {defaults[name]!r}")
    for name, (value, default) in unstated.items():
        hparams[name] = default if value is None else value
        if value is None:
            deviations.append(f"{name.replace('_', ' ')}: not stated, {default!r}")
    for name, value in t.hyperparameters.items():
        if name in defaults:
            hparams[name] = value
        else:
            deviations.append(f"{name}={value!r}: {model.method} has no such setting here")
    if budget.epochs is not None and hparams["epochs"] > budget.epochs:
        deviations.append(f"epochs: {budget.epochs} instead of {hparams['epochs']} (reduced budget)")
        hparams["epochs"] = budget.epochs
    if budget.val_n is not None:
        hparams["val_n_ex"] = budget.val_n
    if budget.train_n is not None:
        deviations.append(f"training images: the first {budget.train_n:,} (reduced budget)")
    if budget.test_n is not None:
        deviations.append(f"test images: the first {budget.test_n:,} (reduced budget)")
    return hparams, deviations


# ---------------------------------------------------------------------------------------------- measuring
@dataclass(frozen=True)
class Count:
    """An accuracy as an exact count, with its 95% Wilson interval."""

    hits: int
    n: int

    @property
    def value(self) -> float:
        return self.hits / self.n if self.n else float("nan")

    @property
    def ci95(self) -> tuple[float, float]:
        from otarena.methods.common.evaluate import confidence_interval

        return confidence_interval(self.value, self.n)


def _paper_step(metric, eps: float) -> tuple[float, str]:
    from otarena.methods.common.attacks import madry_step

    if metric.step_size is not None:
        return metric.step_size, f"step {metric.step_size:g}"
    step = madry_step(eps, metric.steps)
    return step, f"step {step:g} (not stated: 2.5 eps / k)"


def paper_metric(model, x, y, claim, *, batch_size: int, seed: int, autoattack: bool) -> tuple[Optional[Count], str]:
    """The claim's metric as the paper ran it, on ``x, y``: the count of points still classified as
    their true label, and how it was measured. None when the budget leaves it out."""
    import torch

    from otarena.methods.common import attacks
    from otarena.methods.common.attacks import ThreatModel, eval_mode

    m, norm = claim.metric, {"linf": "Linf", "l2": "L2"}[claim.norm]
    how = [m.describe()]
    with eval_mode(model):
        with torch.no_grad():
            pred = torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(y), batch_size)])
        clean = pred == y
        if m.name == "clean":
            return Count(int(clean.sum()), len(y)), "clean"
        if m.name == "autoattack" and not autoattack:
            return None, "AutoAttack not run (--no-autoattack)"
        # The paper's attacks run on the model's predictions where it says so, and count the true label.
        labels = pred if m.labels == "predicted" else y
        how.append("predicted labels" if m.labels == "predicted" else "true labels")
        if m.name == "autoattack":
            from otarena.methods.common.autoattack import autoattack_cascade

            if m.version != "standard":
                how.append(f"standard (the paper's version: {m.version})")
            # AutoAttack only reports whether it changed the label it was given, so a point counts when
            # that label is the true one and survives: on the points classified correctly, where the
            # predicted label is the true one. A misclassified point, whose predicted label could be
            # attacked toward the true one, counts as wrong (the paper's count can only be higher there).
            rows = clean.nonzero()[:, 0]
            if not len(rows):
                return Count(0, len(y)), ", ".join(how)
            cascade = autoattack_cascade(model, x[rows], y[rows], ThreatModel(norm, claim.eps), version="standard",
                                         batch_size=batch_size, seed=seed)
            return Count(int((cascade.stages > len(cascade.attacks)).sum()), len(y)), ", ".join(how)
        generator = torch.Generator(device=x.device).manual_seed(seed)
        correct = []
        for i in range(0, len(y), batch_size):
            xb, lb = x[i:i + batch_size], labels[i:i + batch_size]
            if m.name == "fgsm":
                x_adv = attacks.fgsm(model, xb, lb, eps=claim.eps, norm=norm)
            else:
                step, text = _paper_step(m, claim.eps)
                restarts = m.restarts or 1
                x_adv = attacks.pgd(model, xb, lb, eps=claim.eps, norm=norm, steps=m.steps, step_size=step,
                                    restarts=restarts, keep_best=restarts > 1, generator=generator)
            with torch.no_grad():
                correct.append(model(x_adv).argmax(1) == y[i:i + batch_size])
        if m.name == "pgd":
            how.append(text + (", best of the restarts" if (m.restarts or 1) > 1 else ", last iterate")
                       + ("" if m.restarts else ", 1 random start (restarts not stated)"))
        return Count(int(torch.cat(correct).sum()), len(y)), ", ".join(how)


def otarena_protocol(model, test, claims: list, train_eps: float, norm: str, *, budget: Budget, seed: int,
                     log=None) -> tuple[dict, Any]:
    """``methods.evaluate`` at the training radius, with its eps sweep at the table's radii too, and
    the FinalEval settings it ran with."""
    from otarena import methods
    from otarena.methods.common import evaluate as stages
    from otarena.search import evaluation
    from otarena.search.config import FinalEval

    cfg = FinalEval(n_ex=budget.test_n, autoattack="standard" if budget.autoattack else None)
    threat = methods.ThreatModel(norm, train_eps)
    radii = {round(c.eps, 6) for c in claims} | set(stages.sweep_radii(threat, test.x[:1]))
    settings = dataclasses.replace(evaluation.settings_from(cfg), sweep_radii=tuple(sorted(radii)))
    attacks = evaluation.attacks_for(None, cfg, certified=False)
    return methods.evaluate(model, test, threat, attacks, settings, seed=seed, log=log), cfg


def otarena_value(result: dict, claim) -> tuple[Optional[Count], str]:
    """What otarena's protocol measured for ``claim``'s radius: its clean accuracy, AutoAttack (else
    its PGD) at the training radius, else the eps sweep's PGD with the grey-image candidate."""
    n = result["n_ex"]
    count = lambda acc: Count(round(acc * n), n)  # noqa: E731 - accuracies are exact counts over n
    if claim.metric.name == "clean":
        return count(result["clean_acc"]), "clean"
    if math.isclose(claim.eps, result["settings"]["eps"], abs_tol=1e-6):
        if "aa_acc" in result:
            return count(result["aa_acc"]), "AutoAttack standard"
        return count(result["pgd_acc"]), f"PGD-{result['settings']['pgd_steps']} multi-targeted"
    sweep = result.get("eps_sweep") or {}
    for eps, acc in zip(sweep.get("eps", []), sweep.get("robust_acc", [])):
        if math.isclose(eps, claim.eps, abs_tol=1e-6):
            return count(acc), f"PGD-{sweep['steps']} or the grey image"
    return None, "not measured"


def grey_bound(test_y) -> tuple[float, int]:
    """The largest class's share of the whole test split and that class: the most any classifier
    keeps robust once the constant grey image lies in every ball."""
    import torch

    counts = torch.bincount(test_y.cpu())
    return counts.max().item() / len(test_y), int(counts.argmax())


def grey_class(model, like) -> int:
    """The class ``model`` gives the constant grey image."""
    import torch

    from otarena.methods.common.attacks import eval_mode

    with eval_mode(model), torch.no_grad():
        return int(model(torch.full_like(like[:1], 0.5)).argmax(1))


def verdict(claim, measured: Optional[Count], *, impossible: Optional[str] = None,
            skipped: Optional[str] = None) -> tuple[str, str]:
    """One of :data:`VERDICTS` and why."""
    if skipped:
        return "not comparable", skipped
    if impossible:
        return "impossible", impossible
    if measured is None:
        return "not comparable", "not measured"
    low, high = (100 * v for v in measured.ci95)
    if low <= claim.value <= high:
        return "reproduced", ""
    return ("below claim", "") if high < claim.value else ("above claim", "")


# ---------------------------------------------------------------------------------------------- the run
def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "processor": _cpu_model() or platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _cpu_model() -> Optional[str]:
    """The CPU's name as Linux reports it (``AMD EPYC``), or None elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def reproduce(claim_set: str, claims: list, *, budget: Budget, out: str, tracking_uri: Optional[str],
              device: str = "auto", seed: int = 0, say: Callable[[str], None] = print,
              progress: Optional[Callable[[str], None]] = None, tuned_trials: int = 0,
              storage_path: str = "ray_results") -> dict:
    """Train and measure what ``claims`` (one table) need; write the table to ``out``; return it.

    ``tuned_trials`` > 0 also searches each model's method with otarena (that many trials, the same
    budget: :func:`tune`) and measures its best trial the same way, as a second row per claim.
    """
    import torch

    from otarena import methods

    started = time.time()
    models, skipped = plan(claims, lambda name: methods.data.missing(name, None))
    tracker = None
    if tracking_uri and models:
        from otarena.search.tracking import Tracker

        tracker = Tracker(tracking_uri, f"reproduce-{claims[0].paper[:3]}")
    if tuned_trials and tracker is None and models:
        raise ReproduceError("a tuned row is an otarena search, which logs to MLflow: give a tracking URI")
    rows: dict[str, dict] = {}
    tuned_rows: dict[str, dict] = {}
    tuned_models: list[Model] = []
    for i, model in enumerate(models, 1):
        model.hparams, model.deviations = paper_hyperparameters(model, budget)
        say(f"[{i}/{len(models)}] training {model.name}: "
            + ", ".join(f"{k}={v}" for k, v in sorted(model.hparams.items())))
        train = methods.data.load(model.dataset, "train").subset(budget.train_n)
        run = methods.build_run(model.method, model.hparams, dataset=model.dataset, arch=model.arch,
                                threat=methods.ThreatModel(model.norm, model.train_eps), device=device, train=train)
        begin = time.time()
        methods.fit(run, lambda metrics, r: say(
            f"  epoch {metrics['epoch']}/{r.cfg.epochs}: loss {metrics['train/loss']:.4f}  val clean "
            f"{metrics['val/clean_acc']:.1%}  val pgd {metrics['val/pgd_acc']:.1%} ({metrics['time/epoch_s']:.0f}s)"))
        model.seconds["train"] = time.time() - begin
        run.model.load_state_dict(run.best_model)
        net = run.model.eval()
        result, cfg, paper_metrics = _measure(model, net, rows, budget=budget, seed=seed, say=say, progress=progress)
        if tracker is not None:
            model.run_id = _log(tracker, model, net, result, cfg, paper_metrics, claim_set, budget, seed)
        del run, net
        if tuned_trials:
            say(f"[{i}/{len(models)}] tuning {model.method} with otarena: {tuned_trials} trials, the same budget")
            searched, net, trial_run = tune(model, budget, trials=tuned_trials, tracker=tracker,
                                            experiment=f"reproduce-{claims[0].paper[:3]}", storage=storage_path,
                                            device=device, seed=seed)
            tuned_models.append(searched)
            result, cfg, paper_metrics = _measure(searched, net, tuned_rows, budget=budget, seed=seed, say=say,
                                                  progress=progress)
            searched.run_id = _log_tuned(tracker, searched, trial_run, net, result, cfg, paper_metrics, claim_set,
                                         budget, seed)
            del net
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    for claim in claims:
        if claim.key in skipped:
            row_verdict, why = verdict(claim, None, skipped=skipped[claim.key])
            rows[claim.key] = _row(claim, None, "", None, "", row_verdict, why, None)
    table = {
        "otarena_reproduction": 1, "claim_set": claim_set, "paper": claims[0].paper, "citation": claims[0].citation,
        "source": claims[0].source, "budget": budget.name, "reductions": budget.reductions(), "machine": machine(),
        "seconds": round(time.time() - started, 1), "verdicts": VERDICTS,
        "models": [_model_record(m) for m in models + tuned_models],
        "rows": [row for c in claims for row in (rows[c.key], tuned_rows.get(c.key)) if row is not None],
    }
    write(table, out)
    if tracker is not None:
        for model in models + tuned_models:
            for path in paths(out, claim_set, budget.name):
                tracker.log_artifact(model.run_id, path, "reproduction")
    return table


def _model_record(m: Model) -> dict:
    return {"name": m.name, "setting": m.setting, "method": m.method, "arch": m.arch, "train_eps": m.train_eps,
            "hparams": m.hparams, "deviations": m.deviations, "flags": m.flags, "mlflow_run_id": m.run_id,
            "seconds": {k: round(v, 1) for k, v in m.seconds.items()}}


def _measure(model: Model, net, rows: dict, *, budget: Budget, seed: int, say: Callable[[str], None],
             progress: Optional[Callable[[str], None]]) -> tuple[dict, Any, dict]:
    """Evaluate ``net`` both ways for every claim of ``model``; one row per claim into ``rows``.

    Returns otarena's evaluation, the FinalEval it ran with, and the paper's metrics (``paper/*``)."""
    from otarena import methods

    begin = time.time()
    test_full = methods.data.load(model.dataset, "test")
    bound, _ = grey_bound(test_full.y)
    test = test_full.subset(budget.test_n).to(next(net.parameters()).device)
    result, cfg = otarena_protocol(net, test, model.claims, model.train_eps, model.norm, budget=budget,
                                   seed=seed, log=progress)
    grey = grey_class(net, test.x)
    model.flags = dict(result["flag_reasons"])
    paper_metrics = {}
    for claim in model.claims:
        say(f"  {claim.row} / {claim.column}: {claim.metric.describe(how=True)} at eps {claim.eps:g}")
        n = claim.metric.n_examples  # the paper measured its first n points (AutoAttack on 1,000)
        measured, how = paper_metric(net, test.x[:n], test.y[:n], claim, batch_size=500, seed=seed,
                                     autoattack=budget.autoattack)
        ours, ours_how = otarena_value(result, claim)
        impossible = None
        robust = claim.metric.name != "clean"
        if robust and claim.norm == "linf" and claim.eps >= 0.5 and claim.value > 100 * bound:
            here, _ = grey_bound(test.y)
            impossible = (f"at eps {claim.eps:g} >= 0.5 the grey image is in every ball, so at most "
                          f"{100 * bound:.2f}% of the {len(test_full):,} test images (their largest class) "
                          f"and {100 * here:.2f}% of the {len(test):,} measured; this model calls the grey "
                          f"image {grey}, and with it otarena measures {100 * ours.value:.2f}%")
        row_verdict, why = verdict(claim, measured, impossible=impossible,
                                   skipped=how if measured is None else None)
        rows[claim.key] = _row(claim, measured, how, ours, ours_how, row_verdict, why, model)
        if measured is not None:
            paper_metrics[f"paper/{_metric_name(claim)}"] = measured.value
    model.seconds["evaluate"] = time.time() - begin
    return result, cfg, paper_metrics


TUNED_KEEPS = ("batch_size", "attack_steps", "attack_step_size", "val_n_ex")
"""What a tuned row keeps of the paper's setting besides its epochs and data: the budget, not the
choices a search makes (learning rate, optimizer, the method's own knobs, the schedule)."""


def tune(model: Model, budget: Budget, *, trials: int, tracker, experiment: str, storage: str,
         device: str = "auto", seed: int = 0) -> tuple[Model, Any, str]:
    """An otarena search of ``model``'s method with the reproduction's budget: the same epochs (ASHA's
    ``max_epochs``), training images, radius, network and training attack, its own search space for
    the rest. Returns the tuned model (its hyperparameters, deviations and seconds), the best trial's
    best-epoch network, chosen on validation as every search chooses, and that trial's MLflow run."""
    import ray

    from otarena import methods
    from otarena.search import run as search_run
    from otarena.search.config import Budget as SearchBudget
    from otarena.search.config import SearchConfig
    from otarena.search.trainable import load_state

    epochs = model.hparams["epochs"]
    kept = {k: model.hparams[k] for k in TUNED_KEEPS if k in model.hparams}
    cfg = SearchConfig(
        name=experiment, dataset=model.dataset, arch=model.arch, methods=[model.method],
        threat_model={"norm": model.norm, "eps": model.train_eps}, train=kept,
        budget={"trials": trials, "max_epochs": epochs, "grace_epochs": min(SearchBudget().grace_epochs, epochs)},
        resources={"gpu": 1 if device.startswith("cuda") or (device == "auto" and _cuda()) else 0},
        tracking_uri=tracker.tracking_uri, storage_path=storage, seed=seed)
    begin = time.time()
    search_run.init_ray()
    train = methods.data.load(model.dataset, "train").subset(budget.train_n)
    val = methods.data.load(model.dataset, "val")
    outcome = search_run.search_method(cfg, model.method, tracker, ray.put(train), ray.put(val))
    best = search_run.top_k(outcome.results, 1)
    if not best:
        raise ReproduceError(f"the tuned search of {model.method} finished no trial (MLflow parent run "
                             f"{outcome.parent_id})")
    best = best[0]
    hparams = {**outcome.spec.fixed, **best.config}
    with best.checkpoint.as_directory() as folder:
        weights = load_state(folder)["best_model"]
    info = train.info
    net = methods.nets.build(model.arch, in_channels=info.in_channels, num_classes=info.num_classes,
                             mean=info.mean, std=info.std)
    net.load_state_dict(weights)
    net = net.to(methods.pick_device(device)).eval()
    searched = dataclasses.replace(
        model, setting="tuned", hparams=hparams, run_id=None, flags={}, seconds={"search": time.time() - begin},
        deviations=[d for d in model.deviations if "reduced budget" in d] + [
            f"tuned: an otarena search of {trials} trial{'s' * (trials != 1)} (TPE + ASHA) over "
            f"{', '.join(sorted(best.config)) or 'nothing'}, keeping the paper's "
            f"{', '.join(sorted(kept))}, epochs and data; trial {best.metrics['trial_id']} chosen on validation PGD "
            f"accuracy (MLflow parent run {outcome.parent_id})"])
    return searched, net, outcome.run_ids[best.metrics["trial_id"]]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _metric_name(claim) -> str:
    from otarena.methods.common.evaluate import metric_key

    return metric_key(f"{claim.metric.describe()} eps {claim.eps:g}" + (
        " predicted labels" if claim.metric.labels == "predicted" else ""))


def _row(claim, measured: Optional[Count], how: str, ours: Optional[Count], ours_how: str, row_verdict: str,
         why: str, model: Optional[Model]) -> dict:
    pct = lambda c: None if c is None else round(100 * c.value, 2)  # noqa: E731
    ci = lambda c: None if c is None else [round(100 * v, 2) for v in c.ci95]  # noqa: E731
    return {"key": claim.key, "row": claim.row, "column": claim.column, "metric": claim.metric.describe(how=True),
            "eps": claim.eps, "claimed": claim.value, "relative_to": claim.relative_to,
            "measured": pct(measured), "ci95": ci(measured), "n": measured.n if measured else None,
            "difference": None if measured is None else round(100 * measured.value - claim.value, 2),
            "measured_how": how, "verdict": row_verdict, "why": why,
            "otarena": {"value": pct(ours), "ci95": ci(ours), "how": ours_how} if ours else None,
            "model": model.name if model else None, "setting": model.setting if model else "paper"}


def _log(tracker, model: Model, net, result: dict, cfg, paper_metrics: dict, claim_set: str, budget: Budget,
         seed: int) -> str:
    """One MLflow run per model, as ``otarena evaluate`` logs one: the otarena evaluation, the paper's
    metrics as ``paper/*`` and the deviations from the paper as ``otarena.deviations``."""
    from otarena.leaderboard import tags as tag

    tags = {tag.METHOD: model.method, tag.DATASET: model.dataset, tag.ARCH: model.arch, tag.NORM: model.norm,
            tag.EPS: repr(model.train_eps)} | _reproduction_tags(model, claim_set, budget)
    run_id = tracker.evaluation_run(f"reproduce-{model.method}", tags)
    tracker.log_params(run_id, model.hparams)
    _log_measurements(tracker, run_id, model, net, result, cfg, paper_metrics, claim_set, budget, seed)
    tracker.finish(run_id)
    return run_id


def _log_tuned(tracker, model: Model, run_id: str, net, result: dict, cfg, paper_metrics: dict, claim_set: str,
               budget: Budget, seed: int) -> str:
    """The tuned row's measurements go into its best trial's own run, as a search's final evaluation
    does, so the search's leaderboard shows it too."""
    from otarena.leaderboard import tags as tag

    tracker.set_tags(run_id, _reproduction_tags(model, claim_set, budget))
    _log_measurements(tracker, run_id, model, net, result, cfg, paper_metrics, claim_set, budget, seed)
    parent = tracker.client.get_run(run_id).data.tags.get("mlflow.parentRunId")
    if parent:
        tracker.set_tags(parent, {tag.EVALUATED: "true"})
    return run_id


def _reproduction_tags(model: Model, claim_set: str, budget: Budget) -> dict:
    return {REPRODUCES_TAG: claim_set, BUDGET_TAG: budget.name, SETTING_TAG: model.setting,
            DEVIATIONS_TAG: json.dumps(model.deviations)}


def _log_measurements(tracker, run_id: str, model: Model, net, result: dict, cfg, paper_metrics: dict,
                      claim_set: str, budget: Budget, seed: int) -> None:
    from otarena.search import evaluation
    from otarena.search.tracking import flatten

    # The hyperparameters are the run's own (a tuned trial logged them as it started).
    params = {f"eval.{k}": v for k, v in flatten(cfg.model_dump()).items()} | {"eval.seed": seed}
    context = {"title": f"{model.name}, {claim_set} ({budget.name} budget)", "method": model.method,
               "dataset": model.dataset, "arch": model.arch, "seed": seed, "split": "test",
               "reproduces": claim_set, "setting": model.setting, "deviations": model.deviations}
    evaluation.log_evaluation(tracker, run_id, result, params=params, weights=net.state_dict(), context=context)
    tracker.log_metrics(run_id, paper_metrics)


# ---------------------------------------------------------------------------------------------- the table
def slug(claim_set: str) -> str:
    """``003:Table 6`` -> ``003-table6``."""
    return "-".join(re.sub(r"[^a-z0-9]+", "", part.lower()) for part in claim_set.split(":"))


def paths(out: str, claim_set: str, budget: str) -> tuple[str, str]:
    """The table's Markdown and JSON files: ``OUT/003-table6-reduced.md`` and ``.json``."""
    stem = os.path.join(out, f"{slug(claim_set)}-{budget}")
    return f"{stem}.md", f"{stem}.json"


def write(table: dict, out: str) -> tuple[str, str]:
    os.makedirs(out, exist_ok=True)
    md, js = paths(out, table["claim_set"], table["budget"])
    with open(js, "w") as f:
        json.dump(table, f, indent=2, ensure_ascii=False)
        f.write("\n")
    with open(md, "w") as f:
        f.write(markdown(table))
    return md, js


def _interval(row: dict) -> str:
    if row["measured"] is None:
        return "-"
    low, high = row["ci95"]
    return f"{row['measured']:.2f} [{low:.2f}, {high:.2f}] (n={row['n']:,})"


def markdown(table: dict) -> str:
    """The claimed-against-measured table, with the budget, the machine and every deviation."""
    m = table["machine"]
    lines = [f"# {table['claim_set']}: claimed against measured", "",
             f"{table['citation']}. Source of the claims: {table['source']}.", "",
             f"Budget: **{table['budget']}**" + (": " + "; ".join(table["reductions"]) + "." if table["reductions"]
                                                else " (the paper's setting)."),
             f"Machine: {m['platform']}, {m.get('processor') or 'CPU'} x {m['cpu_count']}, torch {m['torch']} ({m['torch_threads']} threads)"
             + (f", GPU {m['cuda']}" if m["cuda"] else ", no GPU") + f"; {table['seconds']:.0f} s in all.", "",
             "Measured: the paper's metric as the paper ran it, in percent, with its 95% Wilson interval over the "
             "test points used. otarena: the same radius under otarena's protocol (true labels; AutoAttack "
             "standard at the training radius, elsewhere PGD or the constant grey image, whichever fools)."
             + (" Rows marked otarena-tuned measure the best trial of an otarena search of the same method with the "
                "same budget, chosen on validation." if any(r.get("setting") == "tuned" for r in table["rows"]) else ""),
             "",
             "| Row | Column | Metric (the paper's) | eps | Claimed | Measured [95% CI] | Difference | Verdict | otarena | Why |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table["rows"]:
        ours = r["otarena"]
        ours_text = "-" if not ours or ours["value"] is None else f"{ours['value']:.2f} ({ours['how']})"
        claimed = f"{r['claimed']:+g} vs {r['relative_to']}" if r["relative_to"] else f"{r['claimed']:g}"
        diff = "-" if r["difference"] is None else f"{r['difference']:+.2f}"
        row_name = r["row"] + (", otarena-tuned" if r.get("setting") == "tuned" else "")
        lines.append(f"| {row_name} | {r['column'] or ''} | {r['metric']} | {r['eps']:g} | {claimed} | {_interval(r)} "
                     f"| {diff} | {r['verdict']} | {ours_text} | {r['why'].replace('|', '/')} |")
    lines += ["", "## The models and their deviations from the paper", ""]
    for model in table["models"]:
        seconds = ", ".join(f"{k} {v:.0f} s" for k, v in model["seconds"].items())
        run = f", MLflow run {model['mlflow_run_id']}" if model["mlflow_run_id"] else ""
        lines.append(f"- **{model['name']}** ({seconds}{run}): "
                     + ", ".join(f"{k}={v}" for k, v in sorted(model["hparams"].items())))
        lines += [f"  - {d}" for d in model["deviations"]]
        lines += [f"  - otarena flags it `{flag}`: {why}" for flag, why in model.get("flags", {}).items()]
    lines += ["", "## Verdicts", ""] + [f"- `{k}`: {v}." for k, v in table["verdicts"].items()]
    return "\n".join(lines) + "\n"
