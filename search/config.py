# SPDX-License-Identifier: Apache-2.0
"""Search configs: parsed and fully validated before Ray starts.

Every problem becomes a ``ConfigError`` whose message is one line; the CLI prints it and exits 2.
Nothing is started, downloaded or written before validation passes, so bad input loses no data.
"""
from __future__ import annotations

import difflib
import math
import os
import warnings
from dataclasses import replace
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from otarena import methods
from otarena.methods.common import data as data_lib
from otarena.methods.common.attacks import check_eps
from otarena.methods.common.evaluate import CHECKS, EvalSettings, Thresholds
from otarena.methods.common.nets import ARCHS, input_size_error
from otarena.methods.space import RANGE_KEYS, Choice, Fixed, Float, Int, as_number, narrow
from otarena.search.objectives import DEFAULT_OBJECTIVES, Condition, Selection, check_metric

COMMON = "common"
"""Key of ``space`` whose overrides apply to every method."""


class ConfigError(ValueError):
    """A one-line description of what is wrong with a config."""


class ConfigWarning(UserWarning):
    """A valid config that likely does not do what it is run for (the CLI prints one line)."""


Number = Annotated[float, BeforeValidator(as_number)]
"""A float that may be written as a fraction, ``eps: 8/255`` (YAML reads it as text)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ThreatModelConfig(_Strict):
    norm: Literal["Linf", "L2"] = "Linf"
    eps: Number

    @model_validator(mode="after")
    def _eps_in_pixel_units(self):
        check_eps(self.norm, self.eps)
        return self


class Budget(_Strict):
    trials: int = Field(8, ge=1, description="trials per method (the same for every method)")
    max_epochs: int = Field(10, ge=1, description="epochs of a trial that is never pruned (ASHA max_t)")
    grace_epochs: int = Field(2, ge=1, description="epochs before ASHA may prune (grace_period)")
    reduction_factor: int = Field(3, ge=2)
    scheduler: Literal["asha", "fifo"] = Field("asha", description="asha prunes weak trials (MO-ASHA when there are "
                                               "several objectives); fifo trains every trial max_epochs (a baseline "
                                               "for what pruning costs)")
    sampler: Literal["tpe", "nsga2"] = Field("tpe", description="Optuna's sampler: TPE (multi-objective TPE with "
                                             "several objectives) or NSGA-II")
    max_concurrent: Optional[int] = Field(None, ge=1, description="trials at once; default: as resources allow")
    max_failures: int = Field(0, ge=0, description="retries of a trial that raised, from its last checkpoint")
    compare: Literal["trials", "equal_device_hours"] = Field(
        "trials", description="trials: every method gets budget.trials; equal_device_hours: every method gets the "
        "device-hours of budget.trials trials of the config's cheapest method, its trials in inverse proportion to "
        "its measured cost per epoch (search/budget.py)")


class Resources(_Strict):
    cpu: Number = Field(1, description="CPUs per trial; torch uses this many threads")
    gpu: Number = Field(0, description="GPUs per trial; fractions (0.25) pack trials on one GPU")

    @field_validator("cpu")
    @classmethod
    def _positive_cpu(cls, cpu: float) -> float:
        if not (math.isfinite(cpu) and cpu > 0):
            raise ValueError(f"cpu per trial must be > 0, got {cpu}")
        return cpu

    @field_validator("gpu")
    @classmethod
    def _gpu_fraction_or_whole(cls, gpu: float) -> float:
        if not (math.isfinite(gpu) and gpu >= 0):
            raise ValueError(f"gpu per trial must be >= 0, got {gpu}")
        if gpu > 1 and gpu != int(gpu):
            raise ValueError(f"gpu per trial above 1 must be a whole number, got {gpu}")
        return gpu


_THRESHOLDS = Thresholds()


class FlagThresholds(_Strict):
    """When the final evaluation raises a flag; the defaults are methods.common.evaluate.Thresholds'."""

    aa_gap: Number = Field(_THRESHOLDS.aa_gap, ge=0, le=1, description="AutoAttack this far below PGD: masking:aa-gap")
    plateau: Number = Field(_THRESHOLDS.plateau, ge=0, le=1, description="PGD above chance at the chance radius")
    rise: Number = Field(_THRESHOLDS.rise, ge=0, le=1, description="PGD accuracy rising this much with eps")
    steps: Number = Field(_THRESHOLDS.steps, ge=0, le=1, description="more PGD steps raising accuracy this much")
    blackbox: Number = Field(_THRESHOLDS.blackbox, ge=0, le=1, description="share of points only Square breaks")
    small_sample: int = Field(_THRESHOLDS.small_sample, ge=1)
    lipschitz: Number = Field(_THRESHOLDS.lipschitz, ge=0, description="Lipschitz bound tolerance of a certificate")
    fgsm: Number = Field(_THRESHOLDS.fgsm, ge=0, le=1, description="FGSM this far below PGD: masking:fgsm")
    noise: Number = Field(_THRESHOLDS.noise, ge=0, le=1, description="share of points only noise breaks")
    transfer: Number = Field(_THRESHOLDS.transfer, ge=0, le=1, description="share of points only transfer breaks")
    convergence: Number = Field(_THRESHOLDS.convergence, ge=0, le=1,
                                description="share of points whose PGD loss still rises at the last steps")
    convergence_rise: Number = Field(_THRESHOLDS.convergence_rise, ge=0, le=1,
                                     description="a rise of this share of a point's loss range counts")
    unbounded: Number = Field(_THRESHOLDS.unbounded, ge=0, le=1, description="PGD accuracy left at an unbounded eps")
    robust_overfitting: Number = Field(_THRESHOLDS.robust_overfitting, ge=0, le=1,
                                       description="validation PGD accuracy of the last epoch this far below the best")
    catastrophic_overfitting: Number = Field(_THRESHOLDS.catastrophic_overfitting, ge=0, le=1,
                                             description="a single-step method's last FGSM accuracy this far above PGD")


_EVAL = EvalSettings()


class FinalEval(_Strict):
    """The test-split evaluation; the defaults of its attack settings are methods.common.evaluate.EvalSettings'."""

    top_k: Union[int, Literal["pareto"]] = Field(
        1, description="trials per method evaluated on the test split, chosen by select; pareto: every trial of the "
        "search's Pareto set (docs/mlflow-schema.md, search/pareto.json)")
    select: Optional[str] = Field(None, description="the rule choosing the evaluated trials and the leaderboard row "
                                  "on validation, e.g. 'max val/pgd_acc where val/clean_acc >= 0.8' (default: the "
                                  "first objective under the constraints, ties by the other objectives)")
    autoattack: Optional[Literal["standard", "plus"]] = Field(_EVAL.aa_version, description="null: no AutoAttack")
    eot_iters: int = Field(_EVAL.eot_iters, ge=1, description="a randomized model's EOT draws: AutoAttack's rand "
                           "version, and the draws scoring each point's expected accuracy (docs/metrics.md)")
    n_ex: Optional[int] = Field(_EVAL.n_ex, ge=1, description="test examples (default: the whole test split)")
    pgd_steps: int = Field(_EVAL.pgd_steps, ge=1)
    pgd_restarts: int = Field(_EVAL.pgd_restarts, ge=1, description="random starts on cross-entropy")
    pgd_targets: int = Field(_EVAL.pgd_targets, ge=0,
                             description="extra starts on the margin to each of the likeliest wrong classes")
    eps_sweep: bool = Field(True, description="PGD accuracy at 0, eps/2, eps, 2 eps, 4 eps and the chance radius")
    sweep_steps: int = Field(_EVAL.sweep_steps, ge=1)
    checks: list[Literal[CHECKS]] = Field(list(CHECKS), description="the cheap checks of Carlini et al.'s "
                                          "checklist to run, each with its flag ([] runs none; docs/metrics.md)")
    seeds: int = Field(1, ge=1, description="retrain the selected configuration with this many seeds (mean +- std)")
    rank_certified: bool = Field(False, description="rank a certified method's rows (HKR) by certified accuracy, "
                                 "in an L2 table of their own on the leaderboard")
    batch_size: int = Field(_EVAL.batch_size, ge=1)
    shards: int = Field(1, ge=1, description="split each evaluation's points into this many shards of whole batches, "
                        "each a Ray task with an evaluation's resources (a GPU each), merged into the unsharded result "
                        "(docs/cluster.md: multi-GPU AutoAttack)")
    thresholds: FlagThresholds = FlagThresholds()

    @field_validator("top_k", mode="before")
    @classmethod
    def _count_or_pareto(cls, top_k: Any) -> Any:
        if top_k != "pareto" and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"expected a whole number >= 1 or 'pareto', got {top_k!r}")
        return top_k

    @field_validator("select")
    @classmethod
    def _rule(cls, select: Optional[str]) -> Optional[str]:
        if select is not None:
            Selection.parse(select, DEFAULT_OBJECTIVES)
        return select


class SearchConfig(_Strict):
    name: str = Field(..., min_length=1, description="the MLflow experiment")
    dataset: str = "digits"
    data_dir: Optional[str] = None
    download: bool = False
    arch: str = "small_cnn"
    threat_model: ThreatModelConfig
    methods: list[str] = Field(..., min_length=1)
    train: dict[str, Any] = Field(default_factory=dict, description="fixed values of the shared knobs")
    space: dict[str, dict[str, Any]] = Field(default_factory=dict)
    budget: Budget = Budget()
    resources: Resources = Resources()
    final_eval: FinalEval = FinalEval()
    objectives: list[str] = Field(list(DEFAULT_OBJECTIVES), min_length=1, description="validation metrics the search "
                                  "maximizes; several make a multi-objective search (search/objectives.py)")
    constraints: list[str] = Field(default_factory=list, description="'<metric> >= <number>' or '<= <number>' a "
                                   "trial should meet, for the sampler (Optuna's constraints) and the selection")
    tracking_uri: str = "sqlite:///mlflow.db"
    storage_path: str = "ray_results"
    optuna_storage: Optional[str] = Field(None, description="database URL of the searches' Optuna studies, e.g. "
                                          "postgresql://user@host/optuna (default: optuna.db beside a sqlite MLflow "
                                          "store; search/studies.py)")
    seed: int = 0
    orchestration: Literal["concurrent", "sequential"] = Field(
        "concurrent", description="concurrent: every method search of the campaign at once, with a fair share of "
        "the trial slots; sequential: one after another (docs/cluster.md)")

    @field_validator("objectives")
    @classmethod
    def _known_objectives(cls, objectives: list[str]) -> list[str]:
        for metric in objectives:
            check_metric(metric)
        if len(set(objectives)) < len(objectives):
            raise ValueError(f"an objective is listed twice: {objectives}")
        return objectives

    @field_validator("constraints")
    @classmethod
    def _parsed_constraints(cls, constraints: list[str]) -> list[str]:
        for text in constraints:
            Condition.parse(text)
        return constraints

    def selection(self) -> Selection:
        """The rule that chooses the evaluated trials on validation (``final_eval.select``)."""
        return Selection.parse(self.final_eval.select, self.objectives, self.constraints)

    def spaces(self) -> dict[str, dict[str, Any]]:
        """Per method: every hyperparameter's domain after the config's overrides."""
        return {m: resolve_space(self, m) for m in self.methods}


RENAMED = {"langevin_K": "langevin_k", "langevin_T": "langevin_t", "ot_cost_weight": "armor_ot_cost_weight",
           "natural_weight": "armor_natural_weight", "wasserstein_radius": "ot_mdr_radius",
           "wasserstein_ratio": "ot_mdr_ratio", "weight_noise_std": "ot_mdr_noise_std",
           "n_particles": "ot_mdr_particles"}
"""Hyperparameters renamed in 0.1 (README, Methods): an old config gets the new name as its hint."""


def _closest(value: str, options) -> Optional[str]:
    """The option a typo most likely meant: a renamed key, the same name in other case, else the nearest."""
    options = list(options)
    if RENAMED.get(value) in options:
        return RENAMED[value]
    same = [o for o in options if o.lower() == value.lower()]
    hint = same or difflib.get_close_matches(value, options, n=1)
    return hint[0] if hint else None


def _unknown(kind: str, value: str, options, where: str = "") -> str:
    """The one message for a name a config got wrong at any level (a key, a range key, a space
    section, a hyperparameter, a method, a dataset): the name it most likely meant, else the choices."""
    hint = _closest(str(value), options)
    suggestion = f" (did you mean {hint!r}?)" if hint else f"; choose from {sorted(options)}"
    return f"{where + ': ' if where else ''}unknown {kind} {value!r}{suggestion}"


BUDGET_SET = {"epochs": "budget.max_epochs", "seed": "seed", "rung_grace_epochs": "budget.grace_epochs",
              "rung_reduction_factor": "budget.reduction_factor"}
"""Train knobs a search sets from its budget and seed, never from ``train:`` or ``space:``."""


def resolve_space(cfg: SearchConfig, method: str) -> dict[str, Any]:
    """The method's domains, with ``train`` values pinned and ``space`` overrides applied.

    A parameter is searched when the method declares it in ``SEARCH_SPACE`` or the config gives
    it a range; everything else is ``Fixed``. A ``train`` value that a ``space`` range searches is
    the range's default (the first trial); a range that excludes it is an error. A searched
    default the config leaves alone follows the method's ``Config`` given the fixed values (ARMOR's
    radius follows its divergence).
    """
    declared = methods.hyperparameters(method)
    searched = set(methods.get(method).SEARCH_SPACE)
    config_defaults = methods.defaults(method)
    resolved: dict[str, Any] = {}
    for name, domain in declared.items():
        resolved[name] = domain if name in searched and isinstance(domain, (Float, Int, Choice)) \
            else Fixed(config_defaults[name])
    resolved["epochs"] = Fixed(cfg.budget.max_epochs)
    resolved["seed"] = Fixed(cfg.seed)
    # rung_cosine ends its cycles at this search's ASHA rungs (and FIFO's, for a like-for-like baseline).
    resolved["rung_grace_epochs"] = Fixed(cfg.budget.grace_epochs)
    resolved["rung_reduction_factor"] = Fixed(cfg.budget.reduction_factor)
    overrides = [("train", cfg.train), (f"space.{COMMON}", cfg.space.get(COMMON, {})),
                 (f"space.{method}", cfg.space.get(method, {}))]
    train_values: dict[str, Any] = {}
    chosen_defaults = set(cfg.train)
    for where, values in overrides:
        for name, override in values.items():
            if name not in declared:
                if where.startswith("space.") and where != f"space.{method}":
                    continue  # a common override of a knob this method does not have
                raise ConfigError(_unknown("hyperparameter", name, declared, where))
            if name in BUDGET_SET:
                raise ConfigError(f"{where}.{name}: set it with {BUDGET_SET[name]}")
            domain = declared[name]
            if override is None and config_defaults.get(name) is None:   # null keeps a derived default
                resolved[name] = Fixed(None)
                continue
            if not isinstance(domain, (Float, Int, Choice)):
                if isinstance(override, dict):
                    raise ConfigError(f"{where}.{name}: has no search domain; give a fixed value")
                if type(override) is not type(domain) and domain is not None:
                    raise ConfigError(f"{where}.{name}: expected {type(domain).__name__}, got {override!r}")
                resolved[name] = Fixed(override)
                continue
            for key in override if isinstance(override, dict) else ():
                if key not in RANGE_KEYS:
                    raise ConfigError(_unknown("range key", key, RANGE_KEYS, f"{where}.{name}"))
            try:
                resolved[name] = narrow(name, domain, override)
            except ValueError as err:
                raise ConfigError(f"{where}: {err}") from None
            if where == "train" and isinstance(resolved[name], Fixed):
                train_values[name] = resolved[name].value
            elif isinstance(override, dict):
                if "default" in override:
                    chosen_defaults.add(name)
                if name in train_values:
                    resolved[name] = _train_value_as_default(where, name, resolved[name], train_values[name],
                                                             chose_default="default" in override)
    _follow_config_defaults(method, resolved, chosen_defaults)
    defaults = {name: domain.default for name, domain in resolved.items()}
    try:
        methods.TrainConfig.from_hparams(defaults)
        methods.get(method).config_from(defaults)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{method}: {err}") from None
    return resolved


def _train_value_as_default(where: str, name: str, domain, value, *, chose_default: bool):
    """A fixed ``train:`` value and a ``space:`` range for the same knob: the value must lie in the
    range and be its default, or the search would silently start elsewhere than the config says."""
    if not domain.contains(value):
        raise ConfigError(f"{where}.{name}: the range ({domain.describe()}) excludes train.{name} = {value!r}; "
                          f"widen the range or drop one of the two")
    if chose_default and domain.default != value:
        raise ConfigError(f"{where}.{name}: default {domain.default!r} disagrees with train.{name} = {value!r}")
    return Choice(domain.options, value) if isinstance(domain, Choice) else replace(domain, default=value)


def _follow_config_defaults(method: str, resolved: dict[str, Any], chosen: set) -> None:
    """Searched defaults the config did not choose start where the method's ``Config`` puts them
    given the fixed values, when that lies in the range (a ``None`` default resolved from others)."""
    fixed = {name: domain.value for name, domain in resolved.items() if isinstance(domain, Fixed)}
    try:
        derived = methods.get(method).config_from(fixed)
    except (TypeError, ValueError):
        return   # the final check of resolve_space reports it
    for name, domain in resolved.items():
        value = getattr(derived, name, None)
        if isinstance(domain, (Float, Int)) and name not in chosen and value is not None \
                and value != domain.default and domain.contains(value):
            resolved[name] = replace(domain, default=value)


def validate(cfg: SearchConfig, *, local: bool = True) -> SearchConfig:
    """Checks that need the registries, the file system or the machine."""
    if cfg.dataset not in data_lib.INFO:
        raise ConfigError(_unknown("dataset", cfg.dataset, data_lib.DATASETS))
    if cfg.arch not in ARCHS:
        raise ConfigError(_unknown("arch", cfg.arch, ARCHS))
    # The papers' MNIST nets flatten a fixed grid: on other sizes a trial would fail at its first batch.
    unfit = input_size_error(cfg.arch, data_lib.INFO[cfg.dataset].image_size)
    if unfit:
        raise ConfigError(f"{unfit} (dataset {cfg.dataset!r})")
    for method in cfg.methods:
        if method not in methods.REGISTRY:
            raise ConfigError(_unknown("method", method, methods.REGISTRY))
        cls = methods.get(method)
        archs = cls.archs
        if archs and cfg.arch not in archs:
            raise ConfigError(f"method {method!r} runs on {', '.join(archs)} only, got arch {cfg.arch!r}")
        norm = cls.norm
        if norm and norm != cfg.threat_model.norm:
            raise ConfigError(f"method {method!r} certifies {norm} robustness; set threat_model.norm: {norm}")
    for key in cfg.space:
        if key != COMMON and key not in cfg.methods:
            raise ConfigError(_unknown("section", key, [*cfg.methods, COMMON], "space")
                              + f" (space holds {COMMON!r} and this search's methods)")
    # A common override of a knob one method lacks is skipped for that method (resolve_space);
    # one that no method has is a typo, and would silently search the default.
    known = _any_methods_hyperparameters()
    for name in cfg.space.get(COMMON, {}):
        if name not in known:
            raise ConfigError(_unknown("hyperparameter", name, known, f"space.{COMMON}"))
    for method in cfg.methods:
        space = resolve_space(cfg, method)
        for line in methods.get(method).space_warnings(space, cfg.threat_model.norm, cfg.threat_model.eps):
            warnings.warn(f"{method}: {line}", ConfigWarning, stacklevel=2)
    if cfg.budget.grace_epochs > cfg.budget.max_epochs:
        raise ConfigError(f"budget.grace_epochs ({cfg.budget.grace_epochs}) exceeds budget.max_epochs "
                          f"({cfg.budget.max_epochs})")
    if not cfg.download:
        reason = data_lib.missing(cfg.dataset, cfg.data_dir)
        if reason:
            raise ConfigError(reason)
    if cfg.optuna_storage is not None:
        from otarena.search.studies import check_url

        problem = check_url(cfg.optuna_storage, local=local)
        if problem:
            raise ConfigError(problem)
    if local:
        check_local_resources(cfg.resources)
    return cfg


def check_local_resources(resources: Resources) -> None:
    """A trial must fit on this machine when the search runs here."""
    cpus = os.cpu_count() or 1
    if resources.cpu > cpus:
        raise ConfigError(f"resources.cpu={resources.cpu:g} per trial, but this machine has {cpus} CPUs")
    if resources.gpu > 0:
        import torch

        gpus = torch.cuda.device_count()
        if resources.gpu > gpus:
            raise ConfigError(f"resources.gpu={resources.gpu:g} per trial, but this machine has {gpus} GPUs")


def _pydantic_message(err: ValidationError) -> str:
    errors = err.errors()
    # A misspelt key comes first: `epss: 0.1` also makes `eps` missing, and the typo is the cause.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    where = ".".join(str(p) for p in first["loc"]) or "config"
    if first["type"] == "extra_forbidden":
        return _unknown_key(first["loc"])
    if first["type"] == "missing":
        return f"{where}: required, but missing"
    if first["type"] in ("float_parsing", "float_type"):
        return f"{where}: expected a number such as 0.03 or 8/255, got {first.get('input')!r}"
    message = first["msg"].removeprefix("Value error, ")
    return f"{where}: {message} (got {first.get('input')!r})" if first["type"] != "value_error" \
        else f"{where}: {message}"


def _unknown_key(loc: tuple) -> str:
    """An unknown key in a section of ``SearchConfig``, with the key of that section it likely meant."""
    model: Any = SearchConfig
    for part in loc[:-1]:   # only a section that is a model forbids extra keys
        model = model.model_fields[part].annotation
    key, where = str(loc[-1]), ".".join(str(p) for p in loc[:-1])
    if not where and key in _any_methods_hyperparameters():   # `lr: 0.01` at the top, or `--set lr=0.01`
        return (f"unknown key {key!r}: a hyperparameter goes under train (fixed: train.{key}) "
                f"or space (searched: space.common.{key})")
    return _unknown("key", key, model.model_fields, where)


def _any_methods_hyperparameters() -> set[str]:
    return {name for method in methods.REGISTRY for name in methods.hyperparameters(method)}


def parse(raw: Any, *, local: bool = True) -> SearchConfig:
    """Validate a config mapping; raise ``ConfigError`` with one line on any problem."""
    if not isinstance(raw, dict):
        raise ConfigError("a search config must be a YAML mapping")
    try:
        cfg = SearchConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_pydantic_message(err)) from None
    return validate(cfg, local=local)


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping: the later one would silently win."""


def _mapping_without_repeats(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":   # `<<: *base` may repeat what it merges
            continue
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, (str, int, float, bool)) and key in first_line:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} repeats the one on line "
                                                    f"{first_line[key] + 1}", key_node.start_mark)
        first_line[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_repeats)


def load_yaml(text, source: str) -> Any:
    """YAML text or a binary file's content; ``ConfigError`` naming ``source``, line and column."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(err, "problem", None) or " ".join(str(err).split())
        raise ConfigError(f"{where}: malformed YAML: {problem}") from None


def read_mapping(path: str) -> dict:
    """A YAML config file's top-level mapping; ``ConfigError`` for a missing, malformed or empty file."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found")
    try:
        with open(path, "rb") as f:   # bytes: YAML detects the encoding and reports a bad one
            raw = load_yaml(f, path)
    except OSError as err:
        raise ConfigError(f"config file {path!r}: {err.strerror}") from None
    if raw is None:
        raise ConfigError(f"{path}: the config file is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping")
    return raw


def load(path: str, *, overrides: Optional[dict[str, Any]] = None, local: bool = True) -> SearchConfig:
    """Read and validate a YAML config; ``overrides`` are dotted keys (``budget.trials``) to values."""
    raw = read_mapping(path)
    for dotted, value in (overrides or {}).items():
        apply_override(raw, dotted, value)
    return parse(raw, local=local)


def apply_override(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a mapping")
    node[leaf] = value
