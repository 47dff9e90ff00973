# SPDX-License-Identifier: Apache-2.0
"""``otarena``: the one command-line entry point.

Every input problem is reported as one line on stderr with exit code 2, before Ray, MLflow or
training start.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Any, Optional

import yaml

EXIT_USAGE = 2
DEFAULT_URI = "sqlite:///mlflow.db"


class UsageError(ValueError):
    pass


def _fail(message: str) -> int:
    print(f"otarena: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _parse_sets(pairs: list[str]) -> dict[str, Any]:
    values = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--set expects key=value, got {pair!r}")
        from otarena.search.config import load_yaml

        values[key.strip()] = load_yaml(text, f"--set {key.strip()}") if text else None
    return values


# ---------------------------------------------------------------------------------------------- methods
def cmd_methods(args) -> int:
    from otarena import methods

    listing = {}
    shared = set(methods.defaults("erm"))
    for name, cls in methods.REGISTRY.items():
        config_defaults = methods.defaults(name)
        listing[name] = {
            "paper": cls.paper.citation, "link": cls.paper.link, "title": cls.paper.title,
            "authors": cls.paper.authors, "venue": cls.paper.venue,
            "search_space": {k: d.describe() for k, d in cls.SEARCH_SPACE.items()},
            "optional_space": {k: d.describe() for k, d in cls.OPTIONAL_SPACE.items()},
            "fixed_defaults": {k: v for k, v in config_defaults.items()
                               if k not in shared and k not in cls.SEARCH_SPACE and k not in cls.OPTIONAL_SPACE},
        }
    if args.json:
        print(json.dumps(listing, indent=2, default=str))
        return 0
    for name, item in listing.items():
        print(f"{name}: {item['paper']}" + (f" <{item['link']}>" if item["link"] else ""))
        for key, text in item["search_space"].items():
            print(f"    {key:<20} {text}")
        for key, text in item["optional_space"].items():
            print(f"    {key:<20} {text}; searchable, fixed at {methods.defaults(name)[key]!r} unless a config "
                  f"gives it a range")
        for key, value in item["fixed_defaults"].items():
            print(f"    {key:<20} {value!r} (a setting, not searched)")
    print("\nShared knobs (fixed unless a config gives them a range): "
          + ", ".join(f"{k}" for k in methods.TRAIN_SPACE))
    from otarena.methods.common.nets import ARCHS, INPUT_SIZE

    print("Architectures (a config's arch, --arch): " + ", ".join(
        f"{a} ({INPUT_SIZE[a]}x{INPUT_SIZE[a]} only)" if a in INPUT_SIZE else a for a in ARCHS))
    return 0


# ---------------------------------------------------------------------------------------------- train
DATASET_TRAIN = {
    # configs/demo.yaml's settings. TrainConfig's defaults are the CIFAR-10 recipe (SGD at lr 0.05 on
    # batches of 128): on digits' 1,300 training images an epoch is 10 such steps and ends at chance;
    # Adam at 2e-3 on batches of 32 with a 5-step attack learns in one epoch.
    "digits": {"optimizer": "adam", "lr": 2e-3, "batch_size": 32, "weight_decay": 0.0, "attack_steps": 5},
}
"""``otarena train``'s defaults per dataset, used without a config file (``--set`` overrides them)."""


def _train_config(args):
    from otarena.search import config as config_lib

    if args.config:
        raw = config_lib.read_mapping(args.config)
        method = args.method or (raw.get("methods") or [None])[0]
        raw["methods"] = [method]
        # Keep the config's defaults for this method (and the common ones), drop other methods'.
        space = raw.get("space") or {}
        raw["space"] = {k: v for k, v in space.items() if k in (config_lib.COMMON, method)}
    else:
        if not args.method:
            raise UsageError("give a CONFIG file or --method")
        dataset = args.dataset or "digits"
        raw = {"name": "train", "methods": [args.method], "dataset": dataset, "arch": args.arch or "small_cnn",
               "threat_model": {"norm": args.norm, "eps": args.eps}, "train": dict(DATASET_TRAIN.get(dataset, {}))}
    for key, value in (("dataset", args.dataset), ("arch", args.arch), ("data_dir", args.data_dir)):
        if value is not None:
            raw[key] = value
    if args.download:
        raw["download"] = True
    raw.setdefault("train", {})
    raw["train"] = {**(raw["train"] or {}), **_parse_sets(args.set)}
    if args.epochs is not None:
        budget = raw.setdefault("budget", {})
        budget["max_epochs"] = args.epochs
        # At most the epochs; it also places rung_cosine's first cycle end (the budget's 2 where it fits).
        budget["grace_epochs"] = min(budget.get("grace_epochs", config_lib.Budget.model_fields["grace_epochs"].default),
                                     args.epochs)
    cfg = config_lib.parse(raw)
    space = cfg.spaces()[cfg.methods[0]]
    return cfg, {name: domain.default for name, domain in space.items()}


def _cifar_recipe_note(dataset: str, hparams: dict) -> str:
    """Says that a dataset without its own ``DATASET_TRAIN`` entry trains with the CIFAR-10 defaults."""
    recipe = ", ".join(f"{k}={hparams[k]}" for k in ("optimizer", "lr", "batch_size", "weight_decay"))
    return (f"note: {dataset} has no training recipe of its own here, so the CIFAR-10 defaults apply ({recipe}); "
            "--set KEY=VALUE or a config file changes them")


def cmd_train(args) -> int:
    cfg, hparams = _train_config(args)
    if not args.config and cfg.dataset not in DATASET_TRAIN:
        print(_cifar_recipe_note(cfg.dataset, hparams), file=sys.stderr)
    import torch

    from otarena import methods
    from otarena.methods.common.train import set_threads

    threads = set_threads(args.threads)
    method = cfg.methods[0]
    threat = methods.ThreatModel(cfg.threat_model.norm, cfg.threat_model.eps)
    run = methods.build_run(method, hparams, dataset=cfg.dataset, arch=cfg.arch, threat=threat,
                            data_dir=cfg.data_dir, download=cfg.download, device=args.device)
    print(f"training {method} on {cfg.dataset} ({cfg.arch}, {threat.norm} eps={threat.eps:g}) on "
          f"{next(run.model.parameters()).device} ({threads} CPU threads): "
          + ", ".join(f"{k}={v}" for k, v in sorted(hparams.items())), flush=True)

    def show(metrics, run):
        print(f"epoch {metrics['epoch']}/{run.cfg.epochs}: loss {metrics['train/loss']:.4f}  "
              f"val clean {metrics['val/clean_acc']:.1%}  val pgd {metrics['val/pgd_acc']:.1%}  "
              f"({metrics['time/epoch_s']:.1f}s)", flush=True)

    methods.fit(run, show)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{method}.pt")
    torch.save(run.best_model, path)
    print(f"best epoch {run.best['epoch']} (val pgd {run.best['val/pgd_acc']:.1%}); weights saved to {path}")
    if args.test:
        run.model.load_state_dict(run.best_model)
        test = methods.data.load(cfg.dataset, "test", data_dir=cfg.data_dir, download=cfg.download)
        attacks = ("clean", "pgd") + (("autoattack",) if args.autoattack else ()) \
            + (("certified",) if methods.get(method).certified else ())
        result = methods.evaluate(run.model, test, threat, attacks, seed=cfg.seed, log=_progress)
        print("test: " + "  ".join(f"{k} {v:.1%}" for k, v in result.items() if k.endswith("_acc"))
              + f" on {result['n_ex']} images" + (f"  flags: {', '.join(result['flags'])}" if result["flags"] else ""))
    return 0


# ---------------------------------------------------------------------------------------------- search
def cmd_search(args) -> int:
    from otarena.search import config as config_lib
    from otarena.search.tracking import check_reachable

    overrides = _parse_sets(args.set)
    for key, value in (("tracking_uri", args.tracking_uri), ("storage_path", args.storage)):
        if value:
            overrides[key] = value
    configs = [config_lib.load(path, overrides=overrides, local=args.address in (None, "local"))
               for path in args.config]
    for cfg in configs:
        check_reachable(cfg.tracking_uri)
        _check_writable(cfg.storage_path)
    from otarena.search.run import INTERRUPT_EXIT, Interrupted, run_search

    try:
        run_search(configs, address=args.address, out_dir=None if args.no_leaderboard else args.out,
                   resume=args.resume, sequential=True if args.sequential else None)
    except Interrupted as stop:
        if stop.resumable:
            print(f"otarena: stopped by Ctrl-C; resume with: {_resume_command(args)}", file=sys.stderr, flush=True)
        else:
            print("otarena: stopped by Ctrl-C after every search and evaluation was recorded; no site built "
                  "(otarena leaderboard builds it)", file=sys.stderr, flush=True)
        return INTERRUPT_EXIT
    return 0


def _resume_command(args) -> str:
    """The exact ``otarena search`` command line that continues this one."""
    import shlex

    words = ["otarena", "search", *args.config]
    for flag, value in (("--address", args.address), ("--tracking-uri", args.tracking_uri),
                        ("--storage", args.storage), ("--out", None if args.out == "site" else args.out)):
        if value:
            words += [flag, value]
    for pair in args.set or []:
        words += ["--set", pair]
    return shlex.join(words + ["--no-leaderboard"] * args.no_leaderboard + ["--sequential"] * args.sequential
                      + ["--resume"])


def _check_writable(path: str) -> None:
    """Write a file into the storage folder before the search writes anything elsewhere (mlflow.db, a
    parent run). A real write, not ``os.access``: as root, or on /proc, access() says yes to folders
    that refuse every file."""
    import tempfile

    if "://" in path:
        return
    target = os.path.abspath(path)
    try:
        os.makedirs(target, exist_ok=True)
        with tempfile.TemporaryFile(dir=target):
            pass
    except OSError as err:
        raise UsageError(f"storage path {path!r} is not writable: cannot create a file there "
                         f"({err.strerror or err})") from None


# ---------------------------------------------------------------------------------------------- evaluate
def _eval_settings(args, logged: dict) -> dict:
    """FinalEval settings: the config defaults, then what the run logged, then the command line."""
    from otarena.search.config import ConfigError, FinalEval

    settings = FinalEval().model_dump()
    for key, value in logged.items():
        *group, name = key.removeprefix("eval.").split(".")
        target = settings.get(group[0]) if group else settings
        if key.startswith("eval.") and isinstance(target, dict) and name in target and len(group) <= 1:
            target[name] = yaml.safe_load(value) if value not in ("None", "") else None
    for key, value in (("n_ex", args.n_ex), ("pgd_steps", args.pgd_steps), ("batch_size", args.batch_size)):
        if value is not None:
            settings[key] = value
    if args.no_autoattack:
        settings["autoattack"] = None
    if args.no_sweep:
        settings["eps_sweep"] = False
    try:
        return FinalEval.model_validate(settings).model_dump()
    except Exception as err:  # noqa: BLE001 - pydantic's message, in one line
        raise ConfigError(f"evaluation settings: {str(err).splitlines()[-1].strip()}") from None


def _run_target(args, client) -> dict:
    """Weights, model, threat model and settings of a logged trial run."""
    import torch

    from otarena.leaderboard import tags as tag
    from otarena.search import evaluation
    from otarena.search.trainable import load_state

    try:
        run = client.get_run(args.run_id)
    except Exception:  # noqa: BLE001 - MLflow raises its own error for an unknown id
        raise UsageError(f"no MLflow run {args.run_id!r} in {args.tracking_uri}") from None
    params, tags = run.data.params, run.data.tags
    missing = [k for k in ("method", "dataset", "arch", "norm", "eps") if k not in params]
    if missing:
        raise UsageError(f"run {args.run_id} is not an otarena trial (no {', '.join(missing)} params)")
    weights = None
    try:
        import mlflow.artifacts

        path = mlflow.artifacts.download_artifacts(run_id=args.run_id, artifact_path=evaluation.CHECKPOINT_ARTIFACT,
                                                   tracking_uri=args.tracking_uri)
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - no logged weights: fall back to the Ray checkpoint
        folder = tags.get(tag.CHECKPOINT)
        if folder and os.path.isdir(folder):
            weights = load_state(folder)["best_model"]
    if weights is None:
        raise UsageError(f"run {args.run_id} has no weights: neither a {evaluation.CHECKPOINT_ARTIFACT} artifact "
                         f"nor a readable Ray checkpoint")
    seed = int(args.seed if args.seed is not None else params.get("eval.seed", params.get("seed", 0)))
    return {"weights": weights, "method": params["method"], "dataset": params["dataset"], "arch": params["arch"],
            "norm": params["norm"], "eps": float(params["eps"]), "seed": seed, "run": run,
            "settings": _eval_settings(args, params)}


def _checkpoint_target(args) -> dict:
    import torch

    if not (args.arch and args.dataset):
        raise UsageError("--checkpoint needs --arch and --dataset")
    if not os.path.isfile(args.checkpoint):
        raise UsageError(f"checkpoint {args.checkpoint!r} not found")
    try:
        weights = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a text file, or a pickle with code in it: never unpickled
        raise UsageError(f"cannot load {args.checkpoint}: it is not a state dict "
                         f"({_not_weights(args.checkpoint)})") from None
    if isinstance(weights, dict) and "best_model" in weights:  # a Ray trial checkpoint's state.pt
        weights = weights["best_model"]
    return {"weights": weights, "method": args.method, "dataset": args.dataset, "arch": args.arch,
            "norm": args.norm, "eps": args.eps, "seed": args.seed or 0, "run": None,
            "settings": _eval_settings(args, {})}


def _not_weights(path: str) -> str:
    """Why a file that weights-only loading refused is not a state dict (torch's own message would
    suggest loading it with code execution allowed)."""
    import zipfile

    with open(path, "rb") as f:
        pickled = f.read(1) == b"\x80"  # a pickle's protocol opcode: torch.save's legacy format
    if zipfile.is_zipfile(path) or pickled:
        return "it holds Python objects besides tensors; save model.state_dict(), not the model"
    return "not a file written by torch.save"


def cmd_evaluate(args) -> int:
    from otarena import methods
    from otarena.methods.common import data as data_lib
    from otarena.methods.common.attacks import check_eps
    from otarena.methods.common.nets import ARCHS, input_size_error

    if bool(args.run_id) == bool(args.checkpoint):
        raise UsageError("give a RUN_ID or --checkpoint PATH (not both)")
    if args.method and args.method not in methods.REGISTRY:
        raise UsageError(f"unknown method {args.method!r}; choose from {sorted(methods.REGISTRY)}")
    client = None
    if args.run_id or not args.no_mlflow:
        from otarena.search.tracking import check_reachable

        check_reachable(args.tracking_uri)
    if args.run_id:
        from otarena.leaderboard.collect import open_client

        try:
            client = open_client(args.tracking_uri)  # an existing store: a typo must not create one
        except (ValueError, RuntimeError) as err:
            raise UsageError(str(err)) from None
        target = _run_target(args, client)
    else:
        target = _checkpoint_target(args)
    if target["arch"] not in ARCHS:
        raise UsageError(f"unknown arch {target['arch']!r}; choose from {sorted(ARCHS)}")
    if target["dataset"] not in data_lib.INFO:
        raise UsageError(f"unknown dataset {target['dataset']!r}; choose from {sorted(data_lib.INFO)}")
    unfit = input_size_error(target["arch"], data_lib.INFO[target["dataset"]].image_size)
    if unfit:
        raise UsageError(f"{unfit} (dataset {target['dataset']!r})")
    try:
        check_eps(target["norm"], target["eps"])
    except ValueError as err:
        raise UsageError(str(err)) from None
    reason = None if args.download else data_lib.missing(target["dataset"], args.data_dir)
    if reason:
        raise UsageError(reason)
    from otarena.search.evaluation import weights_mismatch

    mismatch = weights_mismatch(target["weights"], target["arch"], target["dataset"])
    if mismatch:
        raise UsageError(f"the weights of {args.checkpoint or f'run {args.run_id}'}: {mismatch}")
    from otarena.methods.common.train import set_threads

    set_threads(args.threads)
    return _evaluate_target(args, client, target)


def _evaluate_target(args, client, target: dict) -> int:
    from otarena import methods
    from otarena.search import evaluation

    test = methods.data.load(target["dataset"], "test", data_dir=args.data_dir, download=args.download)
    settings, certified = target["settings"], args.certified or (bool(target["method"]) and
                                                                  methods.get(target["method"]).certified)
    print(f"evaluating {target['arch']} on {target['dataset']} test ({settings['n_ex'] or len(test)} images), "
          f"{target['norm']} eps={target['eps']:g}, seed {target['seed']}", flush=True)
    result = evaluation.evaluate_weights(
        target["weights"], method=target["method"], certified=certified, arch=target["arch"], norm=target["norm"],
        eps=target["eps"], test_data=test, eval_cfg=settings, seed=target["seed"],
        state_path=args.state, log=None if args.quiet else _progress)
    source = {"run_id": args.run_id} if args.run_id else {"checkpoint": os.path.abspath(args.checkpoint)}
    context = {"title": f"{target['method'] or target['arch']} on {target['dataset']}, {target['norm']} "
                        f"eps={target['eps']:g}", "method": target["method"], "dataset": target["dataset"],
               "arch": target["arch"], "seed": target["seed"], "split": "test", **source}
    report_path = args.report or os.path.join("evaluations", f"{args.run_id or _stem(args.checkpoint)}.json")
    written = evaluation.write_report(evaluation.report(result, **context), report_path)
    logged_to = None
    if not args.no_mlflow:
        logged_to = _log_evaluation(args, client, target, result, context)
    print("test: " + "  ".join(f"{k.removesuffix('_acc')} {result[k]:.1%} "
                               f"[{result['ci95'][k][0]:.1%}, {result['ci95'][k][1]:.1%}]"
                               for k in evaluation.ACCURACIES if k in result) + f" on {result['n_ex']} images")
    if result.get("aa_per_attack"):
        print("AutoAttack cascade: " + " -> ".join(f"{k} {v:.1%}" for k, v in result["aa_per_attack"].items()))
    if result.get("aa_eot_per_attack"):  # a randomized model: the EOT number is the one that ranks
        print("AutoAttack rand (EOT): " + " -> ".join(f"{k} {v:.1%}" for k, v in result["aa_eot_per_attack"].items())
              + f"; without EOT {result['aa_acc_deterministic']:.1%}")
    for flag, why in result["flag_reasons"].items():
        print(f"flag {flag}: {why}")
    print(f"report: {', '.join(written)}" + (f"; MLflow run {logged_to}" if logged_to else ""))
    return 0


def _log_evaluation(args, client, target: dict, result: dict, context: dict) -> str:
    from otarena.leaderboard import tags as tag
    from otarena.search import evaluation
    from otarena.search.tracking import Tracker, flatten

    params = {f"eval.{k}": v for k, v in flatten(target["settings"]).items()} | {"eval.seed": target["seed"]}
    if args.run_id and args.into_run:
        run = target["run"]
        tracker = Tracker(args.tracking_uri, client.get_experiment(run.info.experiment_id).name)
        evaluation.log_evaluation(tracker, args.run_id, result, params=params, context=context)
        return args.run_id
    if args.run_id:
        run = target["run"]
        tracker = Tracker(args.tracking_uri, client.get_experiment(run.info.experiment_id).name)
        tags = {k: v for k, v in run.data.tags.items() if k in tag.SEARCH_KEYS}
        tags |= {"mlflow.parentRunId": args.run_id, tag.EVALUATES: args.run_id}
    else:
        tracker = Tracker(args.tracking_uri, args.experiment)
        tags = {tag.DATASET: target["dataset"], tag.ARCH: target["arch"], tag.NORM: target["norm"],
                tag.EPS: repr(target["eps"]), tag.CHECKPOINT: context["checkpoint"]} \
            | ({tag.METHOD: target["method"]} if target["method"] else {})
    run_id = tracker.evaluation_run(f"evaluate-{args.run_id[:8] if args.run_id else _stem(args.checkpoint)}", tags)
    evaluation.log_evaluation(tracker, run_id, result, params=params, context=context,
                              weights=None if args.run_id else target["weights"])
    tracker.finish(run_id)
    return run_id


def _progress(line: str) -> None:
    """An evaluation's progress line (each stage, each AutoAttack update), on stderr beside the results."""
    print(f"  {line}", file=sys.stderr, flush=True)


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


# ---------------------------------------------------------------------------------------------- leaderboard / ui
def cmd_leaderboard(args) -> int:
    from otarena import leaderboard
    from otarena.search.tracking import check_reachable

    check_reachable(args.tracking_uri)  # a server that is down: one line now, not after MLflow's retries
    # build() checks the formats before it opens the store: a bad one is a one-line error (exit 2).
    chosen = ",".join(leaderboard.FORMATS) if args.format is None else args.format
    formats = [f.strip() for f in chosen.split(",") if f.strip()]
    try:
        tables = leaderboard.build(args.tracking_uri, args.out, experiments=args.experiment or None,
                                   filter_string=args.filter or "", formats=formats, title=args.title,
                                   mlflow_url=args.mlflow_url, allow_empty=args.allow_empty,
                                   reproductions_dir=args.reproductions)
    except leaderboard.EmptySelection as err:  # the site already there stays as it was
        raise UsageError(f"{err}; --allow-empty writes an empty leaderboard anyway") from err
    print(leaderboard.format_text(tables))
    for fmt in dict.fromkeys(formats):
        print(leaderboard.FORMATS[fmt].describe(os.path.join(args.out, leaderboard.FORMATS[fmt].file)))
    return 0


# ---------------------------------------------------------------------------------------------- claims
def cmd_claims(args) -> int:
    from otarena.leaderboard import claims
    from otarena.leaderboard.formatting import eps

    try:
        papers = [claims.read(p) for p in claims.select(args.dir, args.paper)]
    except claims.ClaimsError as err:  # a malformed row: file, row and problem on one line (exit 2)
        raise UsageError(str(err)) from None
    if args.json:
        print(json.dumps([c.as_dict() for p in papers for c in p.claims], indent=2, ensure_ascii=False))
        return 0
    rows = [("paper", "table", "row / column", "setting", "metric", "value")]
    for p in papers:
        for c in p.claims:
            value = f"{c.value:+g} points over {c.relative_to}" if c.relative_to else f"{c.value:g}"
            setting = f"{c.dataset} {c.norm} {eps(c.eps)} {c.arch or c.architecture} {c.method}"
            rows.append((c.paper[:3], c.table, " / ".join(filter(None, (c.row, c.column))), setting,
                         c.metric.describe(how=True), value))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1])
    for p in papers:
        if not p.claims:
            print(f"{p.paper.seed[:3]}: no published number ({p.path.name}): {' '.join((p.note or '').split())}")
    return 0


# ---------------------------------------------------------------------------------------------- reproduce
def cmd_reproduce(args) -> int:
    import dataclasses

    from otarena.search import reproduce

    try:
        claim_set, chosen = reproduce.resolve(args.claim_set, args.dir, args.table)
    except reproduce.ReproduceError as err:
        raise UsageError(str(err)) from None
    budget = reproduce.BUDGETS[args.budget]
    changes = {k: v for k, v in (("epochs", args.epochs), ("train_n", args.train_n), ("test_n", args.test_n))
               if v is not None}
    for key, value in changes.items():
        if value < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be at least 1, got {value}")
    if args.no_autoattack:
        changes["autoattack"] = False
    if args.tuned < 0:
        raise UsageError(f"--tuned takes a number of trials of at least 1, got {args.tuned}")
    if args.tuned and args.no_mlflow:
        raise UsageError("--tuned runs an otarena search, which logs to MLflow: drop --no-mlflow")
    if args.tuned:
        _check_writable(args.storage)
    if changes:  # a budget changed by hand is no longer the named one
        budget = dataclasses.replace(budget, name="custom", **changes)
    uri = None if args.no_mlflow else args.tracking_uri
    if uri:
        from otarena.search.tracking import check_reachable

        check_reachable(uri)
    from otarena.methods.common.train import set_threads

    threads = set_threads(args.threads)
    print(f"reproducing {claim_set} ({len(chosen)} claims), {budget.name} budget"
          + (": " + "; ".join(budget.reductions()) if budget.reductions() else "") + f"; {threads} CPU threads",
          flush=True)
    table = reproduce.reproduce(claim_set, chosen, budget=budget, out=args.out, tracking_uri=uri,
                                device=args.device, seed=args.seed, tuned_trials=args.tuned,
                                storage_path=args.storage,
                                say=lambda line: print(line, flush=True), progress=None if args.quiet else _progress)
    counts: dict[str, int] = {}
    for row in table["rows"]:
        counts[row["verdict"]] = counts.get(row["verdict"], 0) + 1
    print("verdicts: " + ", ".join(f"{v} {n}" for v, n in counts.items()))
    print("table: " + ", ".join(reproduce.paths(args.out, claim_set, budget.name))
          + (f"; MLflow experiment reproduce-{chosen[0].paper[:3]}" if uri else ""))
    return 0


TRAINING_VIEW = "#/experiments?workflowType=machine_learning"
"""The MLflow UI page that lists the experiments in its "Model training" view (MLflow 3 opens its GenAI
view unless the address or the browser's last choice of the switch at its top left says otherwise)."""
UI_APP = "otarena"
"""``mlflow ui --app-name``: MLflow's server, opening in the training view (search/mlflow_app.py)."""


def cmd_ui(args) -> int:
    import shutil
    import subprocess
    import urllib.parse

    from otarena.leaderboard.collect import open_client
    from otarena.search.tracking import check_reachable

    if urllib.parse.urlparse(args.tracking_uri).scheme in ("http", "https"):
        raise UsageError(f"{args.tracking_uri} is an MLflow server already: open {args.tracking_uri.rstrip('/')}/"
                         f"{TRAINING_VIEW} in a browser")
    check_reachable(args.tracking_uri)
    try:
        open_client(args.tracking_uri)  # an existing store: `mlflow ui` would create an empty one
    except (ValueError, RuntimeError) as err:
        raise UsageError(str(err)) from None
    mlflow = shutil.which("mlflow", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if mlflow is None:
        raise UsageError("the mlflow command is not installed in this environment")
    from mlflow.utils.plugins import get_entry_points

    command = [mlflow, "ui", "--backend-store-uri", args.tracking_uri, "--host", args.host, "--port", str(args.port)]
    if any(app.name == UI_APP for app in get_entry_points("mlflow.app")):
        command += ["--app-name", UI_APP]
    else:  # an install older than the entry point: the address still asks for the training view
        print("otarena: MLflow's own app (reinstall otarena, `make install`, to open in the training view)",
              file=sys.stderr)
    print(f"MLflow UI for {args.tracking_uri} at http://{args.host}:{args.port}/{TRAINING_VIEW} (Ctrl-C to stop)",
          flush=True)
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0


# ---------------------------------------------------------------------------------------------- studies
def cmd_studies(args) -> int:
    import shlex

    from otarena.search import studies

    if args.config:
        from otarena.search import config as config_lib

        storage = studies.for_config(config_lib.load(args.config))
    elif args.storage:
        storage = studies.Storage(studies.absolute_sqlite(args.storage), "--storage")
    else:
        storage = studies.storage_url(args.tracking_uri, args.storage)
    try:
        rows = studies.list_studies(storage.url)
    except studies.StudiesError as err:
        raise UsageError(str(err)) from None
    if args.json:
        print(json.dumps({"storage": storage.public, "studies": [r.as_dict() for r in rows]}, indent=2))
        return 0
    print(f"Optuna studies in {storage.public} ({storage.why}): {len(rows)}")
    for line in studies.format_rows(rows) if rows else []:
        print(f"  {line}")
    print(f"open them in a browser: {_dashboard_command()} {shlex.quote(storage.public)} (then http://127.0.0.1:8080/)")
    return 0


def _dashboard_command() -> str:
    """``optuna-dashboard``, or its path in this environment when the shell's PATH does not find it (a virtual
    environment that is not activated)."""
    import shutil

    beside = os.path.join(os.path.dirname(sys.executable), "optuna-dashboard")
    return "optuna-dashboard" if shutil.which("optuna-dashboard") or not os.path.exists(beside) else beside


class _FormatsHelp(str):
    """The ``--format`` help, completed from the leaderboard's writer registry (``leaderboard.FORMATS``)
    only when help is printed: importing ``leaderboard`` imports mlflow, a second every command would pay."""

    def __mod__(self, params):  # argparse expands every help string with `help % params`
        from otarena.leaderboard.writers import help_text

        return str.__mod__(self, params) + help_text()


def _threads(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of threads >= 1, got {text!r}")
    return int(text)


def _threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=_threads, metavar="N",
                        help="torch's CPU threads (default: the cores this process may use, by its CPU "
                             "affinity and cgroup quota, at most OMP_NUM_THREADS; fewer run faster on a busy "
                             "machine)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default after its help, unless there is none to show (None, a flag's False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _number(text: str) -> float:
    """A command-line number, written as a decimal or a fraction (``--eps 8/255``)."""
    from otarena.methods.space import as_number

    value = as_number(text)
    if not isinstance(value, float):
        raise ValueError(text)
    return value


_number.__name__ = "number"   # argparse names the type in its error: "invalid number value: 'x'"
EXIT_BROKEN_PIPE = 141
"""128 + SIGPIPE: the status a shell reports for a Unix tool whose reader went away."""


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from otarena import __version__

    parser = argparse.ArgumentParser(
        prog="otarena", formatter_class=_HelpFormatter,
        description="otarena: search, track and rank adversarially robust training methods "
                    "(Ray Tune + Optuna + ASHA, logged to MLflow, published as a leaderboard).",
        epilog="Run 'otarena COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=summary, formatter_class=_HelpFormatter)

    p = command("methods", "list methods, their papers and search spaces")
    p.add_argument("--json", action="store_true", help="print the listing as JSON, for scripts")
    p.set_defaults(func=cmd_methods)

    p = command("train", "train one configuration, without Ray")
    p.add_argument("config", nargs="?", help="a search config (its first method, at its defaults)")
    p.add_argument("--method", help="the method to train ('otarena methods' lists them); "
                                    "default: the config's first")
    p.add_argument("--dataset", help="digits, mnist, fashion_mnist, cifar10, cifar100 or svhn; default: the config's, else digits")
    p.add_argument("--arch", help="the network (small_cnn, preact_resnet18, wrn34_10, lipschitz_small, "
                                  "lipschitz_cifar, and for MNIST cw_mnist, madry_mnist, langevin_mnist_a, "
                                  "langevin_mnist_b); default: the config's, else small_cnn")
    p.add_argument("--norm", default="Linf", choices=["Linf", "L2"], help="threat model norm, without a config")
    p.add_argument("--eps", type=_number, default=0.2,
                   help="radius in [0, 1] pixel units, a decimal or a fraction such as 8/255 (without a config)")
    p.add_argument("--epochs", type=int, help="epochs to train; default: the config's budget.max_epochs, else 10")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="fix a hyperparameter, e.g. lr=0.01 or trades_beta=6 (repeatable)")
    p.add_argument("--data-dir", help="folder holding the dataset's files (not needed for digits or mnist)")
    p.add_argument("--download", action="store_true", help="download a missing torchvision dataset")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:i]")
    p.add_argument("--out", default="runs", help="folder for the trained weights")
    p.add_argument("--test", action="store_true", help="evaluate the best epoch on the test split")
    p.add_argument("--autoattack", action="store_true", help="with --test, also run AutoAttack")
    _threads_option(p)
    p.set_defaults(func=cmd_train)

    p = command("search", "run search configs: Ray Tune + Optuna + ASHA, logged to MLflow")
    p.add_argument("config", nargs="+", help="one or more search configs, run in one Ray session")
    p.add_argument("--address", help="Ray cluster address (auto, ray://host:10001); default: a local cluster")
    p.add_argument("--tracking-uri", help=f"MLflow store (default: the config's, else {DEFAULT_URI})")
    p.add_argument("--storage", help="Ray storage_path for checkpoints (shared storage on clusters)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (budget.trials=4)")
    p.add_argument("--out", default="site", help="where the leaderboard is written")
    p.add_argument("--no-leaderboard", action="store_true", help="do not build the leaderboard at the end")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished searches of these configs (after Ctrl-C, a crash or a kill)")
    p.add_argument("--sequential", action="store_true",
                   help="search the methods one after another (config orchestration: sequential) instead of all at "
                        "once with a fair share of the trial slots (docs/cluster.md)")
    p.set_defaults(func=cmd_search)

    p = command("evaluate", "evaluate a logged trial (RUN_ID) or any checkpoint on the test split")
    p.add_argument("run_id", nargs="?", help="an MLflow trial run to re-evaluate with its logged settings")
    p.add_argument("--checkpoint", help="a state_dict file (loaded with weights_only=True) instead of a run")
    p.add_argument("--arch", help="with --checkpoint: the architecture")
    p.add_argument("--dataset", help="with --checkpoint: the dataset whose test split is used")
    p.add_argument("--norm", default="Linf", choices=["Linf", "L2"], help="with --checkpoint: the threat model norm")
    p.add_argument("--eps", type=_number, default=0.3,
                   help="with --checkpoint: radius in [0, 1] pixel units, a decimal or a fraction such as 8/255")
    p.add_argument("--method", help="with --checkpoint: the method that trained it (recorded; certifies HKR)")
    p.add_argument("--certified", action="store_true", help="also certify (1-Lipschitz nets)")
    p.add_argument("--n-ex", type=int, help="test examples (default: the run's setting, else all)")
    p.add_argument("--pgd-steps", type=int, help="PGD steps (default: the run's setting, else 50)")
    p.add_argument("--batch-size", type=int, help="images per attack batch (default: the run's setting, else 500)")
    p.add_argument("--seed", type=int, help="evaluation seed (default: the run's, else 0)")
    p.add_argument("--no-autoattack", action="store_true", help="skip AutoAttack")
    p.add_argument("--no-sweep", action="store_true", help="skip the eps sweep")
    p.add_argument("--state", help="AutoAttack per-batch state file: a preempted evaluation resumes from it")
    p.add_argument("--report", help="JSON report path (default: evaluations/<run or checkpoint>.json)")
    p.add_argument("--tracking-uri", default=DEFAULT_URI, help="MLflow store that holds the run and gets the result")
    p.add_argument("--experiment", default="evaluations", help="with --checkpoint: the MLflow experiment")
    p.add_argument("--into-run", action="store_true", help="write into the trial's own run, not a new child run")
    p.add_argument("--no-mlflow", action="store_true", help="with --checkpoint: only write the JSON report")
    p.add_argument("--data-dir", help="folder holding the dataset's files (not needed for digits or mnist)")
    p.add_argument("--download", action="store_true", help="download a missing torchvision dataset")
    _threads_option(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines (stages, AutoAttack) on stderr")
    p.set_defaults(func=cmd_evaluate)

    p = command("leaderboard", "build the leaderboard tables from an MLflow store")
    p.add_argument("--tracking-uri", default=DEFAULT_URI, help="MLflow store to read")
    p.add_argument("--out", default="site", help="folder for the page and the table files")
    p.add_argument("--experiment", action="append", help="experiment name (repeatable; default: all)")
    p.add_argument("--filter", help="an MLflow filter string on the trial runs; one that matches no evaluated "
                                    "trial is refused (exit 2) and leaves --out as it was")
    p.add_argument("--allow-empty", action="store_true",
                   help="write an empty leaderboard even when --filter matches no evaluated trial")
    p.add_argument("--format", help=_FormatsHelp("comma-separated subset of the formats (default: all): "))
    p.add_argument("--title", default="otarena leaderboard", help="heading of the page and the LaTeX captions")
    p.add_argument("--reproductions", metavar="DIR", help="also show the otarena reproduce tables of DIR "
                   "(e.g. reproductions/) in the site's section \"Do the papers' numbers hold?\"")
    p.add_argument("--mlflow-url", help="base URL of the MLflow UI that run ids link to "
                                        "(default: the tracking URI when it is a server, else no links)")
    p.set_defaults(func=cmd_leaderboard)

    p = command("claims", "list the source papers' published numbers (claims/*.yaml)")
    p.add_argument("paper", nargs="?", help="one paper: its seed number (003), seed file or claims file name")
    p.add_argument("--json", action="store_true", help="print the claims as JSON, for scripts")
    p.add_argument("--dir", help="a folder of claims files to check and list (default: the ones shipped with otarena)")
    p.set_defaults(func=cmd_claims)

    p = command("reproduce", "train and measure one paper's table: its claims against otarena's measurements")
    p.add_argument("claim_set", help="PAPER:TABLE, e.g. '003:Table 6' or 003:6 ('otarena claims' lists them)")
    p.add_argument("--table", help="the table, when CLAIM_SET names only the paper")
    p.add_argument("--budget", default="reduced", choices=["paper", "reduced"],
                   help="paper: the paper's epochs, data and test split (for a GPU); reduced: 1 epoch on 1,000 "
                        "training images, 100 test images (a 2-core CPU)")
    for option, what in (("--epochs", "at most N training epochs"), ("--train-n", "the first N training images"),
                         ("--test-n", "the first N test images, for every metric")):
        p.add_argument(option, type=int, metavar="N", help=f"{what} (changes the budget: stated in the table)")
    p.add_argument("--no-autoattack", action="store_true", help="skip AutoAttack (its claims: not comparable)")
    p.add_argument("--tuned", type=int, nargs="?", const=8, default=0, metavar="TRIALS",
                   help="also search each method with otarena (TRIALS trials, default 8, the same budget) and "
                        "measure its best trial as a second row")
    p.add_argument("--storage", default="ray_results", help="Ray storage_path of the --tuned searches")
    p.add_argument("--out", default="reproductions", help="folder for the table (Markdown and JSON)")
    p.add_argument("--dir", help="a folder of claims files (default: the ones shipped with otarena)")
    p.add_argument("--seed", type=int, default=0, help="training and attack seed")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:i]")
    p.add_argument("--tracking-uri", default=DEFAULT_URI, help="MLflow store for the runs (reproduce-<paper>)")
    p.add_argument("--no-mlflow", action="store_true", help="only write the table")
    _threads_option(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no evaluation progress lines on stderr")
    p.set_defaults(func=cmd_reproduce)

    p = command("studies", "list the searches' Optuna studies: trials by state, best values, MLflow parent runs")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--config", help="a search config: the studies of its searches (its optuna_storage, else "
                                        "optuna.db beside its MLflow store)")
    where.add_argument("--storage", help="an Optuna storage URL, e.g. sqlite:///optuna.db")
    p.add_argument("--tracking-uri", default=DEFAULT_URI,
                   help="without --config or --storage: the MLflow store whose studies are listed (optuna.db beside it)")
    p.add_argument("--json", action="store_true", help="print the listing as JSON, for scripts")
    p.set_defaults(func=cmd_studies)

    p = command("ui", "open the MLflow UI for a store, on 127.0.0.1")
    p.add_argument("--tracking-uri", default=DEFAULT_URI, help="MLflow store to show")
    p.add_argument("--host", default="127.0.0.1", help="bind address; the default, loopback, serves this machine only")
    p.add_argument("--port", type=int, default=5000, help="port of the UI")
    p.set_defaults(func=cmd_ui)
    return parser


def _print_config_warnings(shown_as_usual):
    """ConfigWarnings as one line each, like the errors; other warnings as Python shows them."""
    from otarena.search.config import ConfigWarning

    def show(message, category, *rest):
        if issubclass(category, ConfigWarning):
            print(f"otarena: warning: {message}", file=sys.stderr, flush=True)
        else:
            shown_as_usual(message, category, *rest)
    return show


def _reader_gone() -> int:
    """``otarena methods --json | head``: the reader closed the pipe. Stop quietly, as Unix tools do;
    stdout goes to /dev/null so that Python's flush at exit does not report the closed pipe again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):   # a stdout without a file descriptor (tests)
        pass
    return EXIT_BROKEN_PIPE


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from otarena.search.config import ConfigError

    try:
        with warnings.catch_warnings():
            warnings.showwarning = _print_config_warnings(warnings.showwarning)
            code = args.func(args)
            sys.stdout.flush()   # a closed pipe shows here, inside the handler, not at exit
            return code
    except BrokenPipeError:
        return _reader_gone()
    except (ConfigError, UsageError, FileNotFoundError) as err:
        return _fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    except Exception as err:  # noqa: BLE001 - the tracking and leaderboard layers raise plain errors
        from otarena.search.tracking import TrackingError

        if isinstance(err, TrackingError) or (args.command == "leaderboard" and isinstance(err, (ValueError, RuntimeError))):
            return _fail(str(err).splitlines()[0])
        raise


if __name__ == "__main__":
    sys.exit(main())
