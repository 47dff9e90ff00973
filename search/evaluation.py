# SPDX-License-Identifier: Apache-2.0
"""Test-split evaluation of trained weights and the records it leaves.

One evaluation (``methods.evaluate``: clean, PGD-k with restarts, the AutoAttack cascade, the eps
sweep, the steps check and, for Lipschitz nets, the certificate) becomes:

- MLflow metrics ``test/*`` with 95% confidence intervals and the per-attack cascade, the flags
  as tags (``otarena.flags`` and ``otarena.flag_reasons``), and artifacts: the weights, the full
  JSON report, the eps sweep as JSON and as a plot (docs/mlflow-schema.md);
- the same report as a JSON file for ``otarena evaluate``.

The search's final evaluation, its multi-seed confirmation and ``otarena evaluate`` all go
through here, so the same weights and seed give the same numbers whichever ran them.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import statistics
import tempfile
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from otarena import methods
from otarena.leaderboard import per_example as per_example_format
from otarena.leaderboard import stats
from otarena.leaderboard import tags as tag
from otarena.methods.common import evaluate as stages
from otarena.search.config import FinalEval

ACCURACIES = stages.ACCURACIES
CHECKPOINT_ARTIFACT = "checkpoint/model.pt"
PER_EXAMPLE_ARTIFACT = "evaluation/per_example.npz"
"""The per-point outcomes of an evaluation (``methods.evaluate``'s ``per_example``; docs/mlflow-schema.md)."""
SINGLE_SEED = "single-seed"


def _switches(eval_cfg: FinalEval) -> dict[str, bool]:
    """Default stages that a FinalEval field turns off (``autoattack: null``, ``eps_sweep: false``, a check
    left out of ``checks``)."""
    return {"autoattack": bool(eval_cfg.autoattack), "eps-sweep": eval_cfg.eps_sweep,
            **{check: check in eval_cfg.checks for check in stages.CHECKS}}


def attacks_for(method: Optional[str], eval_cfg: FinalEval | Mapping[str, Any],
                certified: Optional[bool] = None) -> tuple[str, ...]:
    """The stages a final evaluation runs: the default ones the config leaves on, and the certificate
    for a method that certifies."""
    on = _switches(FinalEval.model_validate(eval_cfg))
    certified = methods.get(method).certified if certified is None else certified
    return tuple(stage.name for stage in stages.STAGES
                 if (stage.default and on.get(stage.name, True)) or (stage.name == "certified" and certified))


def settings_from(eval_cfg: FinalEval | Mapping[str, Any]) -> stages.EvalSettings:
    """The :class:`EvalSettings` of a FinalEval: its fields of the same name, its AutoAttack version
    and its thresholds (FinalEval's defaults are EvalSettings' own)."""
    cfg = FinalEval.model_validate(eval_cfg)
    same = {f.name for f in dataclasses.fields(stages.EvalSettings)} & (set(FinalEval.model_fields) - {"thresholds"})
    version = {"aa_version": cfg.autoattack} if cfg.autoattack else {}
    return stages.EvalSettings(**{name: getattr(cfg, name) for name in same}, **version,
                               thresholds=stages.Thresholds(**cfg.thresholds.model_dump()))


def evaluate_weights(weights: Mapping[str, torch.Tensor], *, arch: str, test_data,
                     device: Optional[torch.device] = None,
                     surrogate_weights: Optional[Mapping[str, torch.Tensor]] = None, **evaluation: Any) -> dict:
    """Build ``arch``, load ``weights`` and :func:`evaluate_model` them on ``test_data`` (``evaluation``:
    its other keyword arguments); ``surrogate_weights`` (the campaign's ERM model, same ``arch``) are
    the transfer check's surrogate."""
    info = test_data.info

    def build(state):
        model = methods.nets.build(arch, in_channels=info.in_channels, num_classes=info.num_classes,
                                   mean=info.mean, std=info.std)
        model.load_state_dict(state)
        return model.to(device).eval()

    device = device or methods.pick_device()
    surrogate = build(surrogate_weights) if surrogate_weights is not None else None
    return evaluate_model(build(weights), test_data=test_data, device=device, surrogate=surrogate, **evaluation)


@functools.lru_cache(maxsize=None)
def _state_shapes(arch: str, in_channels: int, num_classes: int) -> dict[str, tuple[int, ...]]:
    """The names and shapes of ``arch``'s state dict for such inputs (read only), built on the meta
    device (no memory, no time) where the architecture allows it."""
    build = {"in_channels": in_channels, "num_classes": num_classes, "mean": (0.5,) * in_channels,
             "std": (0.5,) * in_channels}
    try:
        with torch.device("meta"):
            net = methods.nets.build(arch, **build)
    except RuntimeError:  # deel-torchlip's spectral initialisation reads values: build it for real
        net = methods.nets.build(arch, **build)
    return {name: tuple(value.shape) for name, value in net.state_dict().items()}


def weights_mismatch(weights: Any, arch: str, dataset: str) -> Optional[str]:
    """None when ``weights`` load into ``arch`` built for ``dataset``; else why not, in one line, naming
    the registered architectures and input shapes they do fit, if any (tried by names and shapes)."""
    if not (isinstance(weights, Mapping) and weights and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items())):
        return "they are not a state dict (a mapping of names to tensors)"
    shapes = {name: tuple(value.shape) for name, value in weights.items()}
    info = methods.data.INFO[dataset]
    if _state_shapes(arch, info.in_channels, info.num_classes) == shapes:
        return None
    inputs: dict[tuple[int, int], list[str]] = {}
    for name, other in methods.data.INFO.items():
        inputs.setdefault((other.in_channels, other.num_classes), []).append(name)
    fits = []
    for candidate in methods.nets.ARCHS:
        for (channels, classes), datasets in inputs.items():
            expected = _state_shapes(candidate, channels, classes)
            if expected.keys() != shapes.keys():
                break  # the names do not depend on the input shape
            if expected == shapes:
                fits.append(f"{candidate} for {channels}-channel {classes}-class inputs ({', '.join(datasets)})")
    where = f"{arch} for {dataset} ({info.in_channels}-channel {info.num_classes}-class inputs)"
    return f"they do not fit {where}; " + (f"they fit {' and '.join(fits)}" if fits else
                                          f"they fit no registered architecture ({', '.join(methods.nets.ARCHS)})")


def evaluate_model(model: torch.nn.Module, *, norm: str, eps: float, test_data, eval_cfg: Mapping[str, Any], seed: int,
                   method: Optional[str] = None, certified: Optional[bool] = None, state_path: Optional[str] = None,
                   log: Optional[Callable[[str], None]] = None, device: Optional[torch.device] = None,
                   surrogate: Optional[torch.nn.Module] = None, shard: Optional[int] = None,
                   shards: Sequence[Mapping[str, Any]] = ()) -> dict:
    """Evaluate ``model`` on ``test_data`` with ``eval_cfg`` (a FinalEval mapping); ``surrogate``: the
    transfer check's (``None``: a quick ERM model the check trains).

    Sharded (``final_eval.shards``; methods/common/evaluate.py, Sharding): ``shard`` (from 0) measures only
    that shard's points (:func:`methods.common.evaluate.evaluate_shard`); ``shards``, every shard's
    measurements, are merged into the one result the unsharded evaluation gives.
    """
    threat, attacks, settings = methods.ThreatModel(norm, eps), attacks_for(method, eval_cfg, certified), \
        settings_from(eval_cfg)
    if shard is not None:
        return stages.evaluate_shard(model, test_data, threat, attacks, settings, shard=shard,
                                     shards=FinalEval.model_validate(eval_cfg).shards, seed=seed, device=device,
                                     state_path=state_path, log=log)
    return methods.evaluate(model, test_data, threat, attacks, settings, seed=seed, device=device,
                            state_path=state_path, log=log, surrogate=surrogate, shards=shards)


def to_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The ``test/*`` metrics of one evaluation (docs/mlflow-schema.md): ``test/n_ex``, then each stage's."""
    metrics = {f"{stages.METRIC_PREFIX}n_ex": result["n_ex"]}
    for stage in stages.STAGES:
        metrics.update(stage.metrics(result))
    return metrics


def seed_summary(results: list[Mapping[str, Any]]) -> dict[str, float]:
    """``test/n_seeds`` and, over two or more seeds, ``test/<acc>_mean`` and ``test/<acc>_std``."""
    summary: dict[str, float] = {"test/n_seeds": len(results)}
    if len(results) < 2:
        return summary
    for name in ACCURACIES:
        values = [r[name] for r in results if name in r]
        if len(values) == len(results):
            summary[f"test/{name}_mean"] = statistics.fmean(values)
            summary[f"test/{name}_std"] = statistics.stdev(values)
    return summary


def single_seed_reason(seeds: int) -> dict[str, str]:
    return {SINGLE_SEED: "trained with one seed; set final_eval.seeds (e.g. 3) to report mean +- std"} \
        if seeds < 2 else {}


ROBUST_OVERFITTING, CATASTROPHIC_OVERFITTING = "robust-overfitting", "catastrophic-overfitting"


def tuning_p_value(default: Mapping[str, Any], tuned: Mapping[str, Any]) -> Optional[float]:
    """The exact McNemar p-value (:func:`leaderboard.stats.mcnemar_exact`) between the paper-default and the tuned
    trial's per-point outcomes under AutoAttack (else PGD), when both evaluations kept them on the same points;
    ``None`` otherwise, and for a randomized model, whose AutoAttack number is an expectation over draws."""
    first, second = default.get("per_example"), tuned.get("per_example")
    if not first or not second or str(first["index_hash"]) != str(second["index_hash"]) or \
            "aa_acc_deterministic" in default or "aa_acc_deterministic" in tuned:
        return None
    key = "aa" if "aa" in first and "aa" in second else "pgd"
    if key not in first or key not in second:
        return None
    return stats.mcnemar_exact(*stats.discordant(first[key].tolist(), second[key].tolist()))


def curve_end(result: Mapping[str, Any]) -> dict[str, float]:
    """Where a trial's validation curve ended, from its last epoch's result (``methods.common.train.fit``): the
    last PGD accuracy (``val/last_pgd_acc``), its fall below the best epoch's (``val/overfit_gap``) and, for a
    single-step method, the last FGSM accuracy (``val/last_fgsm_acc``)."""
    end = {"val/last_pgd_acc": result.get("val/pgd_acc"), "val/overfit_gap": result.get("val/overfit_gap"),
           "val/last_fgsm_acc": result.get("val/fgsm_acc")}
    return {k: float(v) for k, v in end.items() if v is not None}


def overfitting_reasons(end: Mapping[str, float], thresholds) -> dict[str, str]:
    """The notes a :func:`curve_end` earns (``thresholds``: ``final_eval.thresholds``): ``robust-overfitting``
    when the last epoch fell more than ``robust_overfitting`` below the best in validation PGD accuracy (Rice et
    al., ICML 2020); ``catastrophic-overfitting`` when a single-step method's last FGSM accuracy is more than
    ``catastrophic_overfitting`` above its PGD accuracy (Wong et al., ICLR 2020). Notes, not warnings: the
    selected weights are the best epoch's, and the test numbers stay right."""
    reasons = {}
    gap, last = end.get("val/overfit_gap"), end.get("val/last_pgd_acc")
    if gap is not None and gap > thresholds.robust_overfitting:
        reasons[ROBUST_OVERFITTING] = (f"validation PGD accuracy fell {gap:.1%} from its best epoch to the last "
                                       f"(more than {thresholds.robust_overfitting:.1%}): the best epoch is scored")
    fgsm = end.get("val/last_fgsm_acc")
    if fgsm is not None and last is not None and fgsm - last > thresholds.catastrophic_overfitting:
        reasons[CATASTROPHIC_OVERFITTING] = (f"single-step training: the last epoch's validation FGSM accuracy "
                                             f"{fgsm:.1%} is {fgsm - last:.1%} above PGD's {last:.1%} (more than "
                                             f"{thresholds.catastrophic_overfitting:.1%})")
    return reasons


def to_tags(result: Mapping[str, Any], extra_flags: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    reasons = {**result.get("flag_reasons", {}), **(extra_flags or {})}
    tags = {tag.EVALUATED: "true", tag.FLAGS: ",".join(reasons),
            tag.FLAG_REASONS: json.dumps(reasons)}
    if "certified_refused" in result:
        tags[tag.CERTIFICATE_REFUSED] = result["certified_refused"]
    if result.get("per_example"):
        tags[tag.TEST_POINTS] = f"{result['n_ex']}:{result['per_example']['index_hash']}"
        tags[tag.PER_EXAMPLE_HASH] = per_example_hash(result["per_example"])
    if result.get("eps_sweep"):
        # Also a tag, so that a leaderboard of thousands of runs plots it without an artifact download each.
        sweep = result["eps_sweep"]
        tags[tag.EPS_SWEEP] = json.dumps({k: [round(v, 5) for v in sweep[k]] if isinstance(sweep[k], list)
                                                else sweep[k] for k in sweep}, separators=(",", ":"))
    return tags


def report(result: Mapping[str, Any], **context: Any) -> dict:
    """The JSON report: where the numbers came from, then the numbers."""
    # The per-point outcomes are an artifact of their own (write_per_example): thousands of booleans in JSON
    # would make the report unreadable.
    return {"otarena_report": 1, **context, **{k: v for k, v in result.items() if k != "per_example"}}


def per_example_hash(points: Mapping[str, Any]) -> str:
    """SHA-256 (16 hex digits) of the per-point arrays, in name order: the leaderboard's cache key with the run id."""
    digest = hashlib.sha256()
    for name in sorted(points):
        digest.update(name.encode() + np.ascontiguousarray(points[name]).tobytes())
    return digest.hexdigest()[:16]


def write_per_example(points: Mapping[str, Any], path: str) -> str:
    """Write ``methods.evaluate``'s ``per_example`` as a compressed ``.npz``, its booleans as bits (a few kB for
    10,000 points; ``leaderboard.per_example.unpack`` reads them back)."""
    np.savez_compressed(path, **per_example_format.pack(dict(points)))
    return path


def write_report(content: Mapping[str, Any], path: str) -> list[str]:
    """Write the report to ``path`` and the eps-sweep curve beside it (JSON and PNG); returns the files."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(content, f, indent=2, default=_jsonable)
    written = [path]
    sweep = content.get("eps_sweep")
    if sweep:
        stem = os.path.splitext(path)[0]
        with open(f"{stem}.eps_sweep.json", "w") as f:
            json.dump(sweep, f, indent=2)
        written += [f"{stem}.eps_sweep.json", plot_sweep(sweep, f"{stem}.eps_sweep.png",
                                                          title=content.get("title", ""))]
    return written


def plot_sweep(sweep: Mapping[str, Any], path: str, title: str = "") -> str:
    """Robust accuracy against eps, with the chance bound: a curve that stays flat is masking.

    Drawn by :func:`leaderboard.plots.eps_sweep_png`, the plotting the leaderboard site uses too.
    """
    from otarena.leaderboard.plots import eps_sweep_png

    return eps_sweep_png(dict(sweep), path, title=title)


def log_evaluation(tracker, run_id: str, result: Mapping[str, Any], *, params: Mapping[str, Any],
                   weights: Optional[Mapping[str, torch.Tensor]] = None, context: Optional[dict] = None,
                   extra_flags: Optional[Mapping[str, str]] = None) -> None:
    """Write one evaluation into an MLflow run: metrics, params, flags and artifacts."""
    tracker.log_metrics(run_id, to_metrics(result))
    tracker.log_params(run_id, params)
    tracker.set_tags(run_id, to_tags(result, extra_flags))
    with tempfile.TemporaryDirectory() as folder:
        if weights is not None:
            path = os.path.join(folder, "model.pt")
            torch.save(dict(weights), path)
            tracker.log_artifact(run_id, path, os.path.dirname(CHECKPOINT_ARTIFACT))
        reasons = {**result.get("flag_reasons", {}), **(extra_flags or {})}
        content = report({**result, "flags": list(reasons), "flag_reasons": reasons},
                         **{"mlflow_run_id": run_id, **(context or {})})
        for path in write_report(content, os.path.join(folder, "report.json")):
            tracker.log_artifact(run_id, path, "evaluation")
        if result.get("per_example"):
            path = os.path.join(folder, os.path.basename(PER_EXAMPLE_ARTIFACT))
            write_per_example(result["per_example"], path)
            tracker.log_artifact(run_id, path, os.path.dirname(PER_EXAMPLE_ARTIFACT))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)
