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
        values[key.strip()] = yaml.safe_load(text) if text else None
    return values


# ---------------------------------------------------------------------------------------------- methods
def cmd_methods(args) -> int:
    import methods

    listing = {}
    shared = set(methods.defaults("erm"))
    for name, cls in methods.REGISTRY.items():
        config_defaults = methods.defaults(name)
        listing[name] = {
            "paper": cls.paper, "link": cls.link,
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
    return 0


# ---------------------------------------------------------------------------------------------- train
def _train_config(args):
    from search import config as config_lib

    if args.config:
        with open(args.config) as f:
            raw = yaml.safe_load(f)
        if not isinstance(raw, dict):
            raise config_lib.ConfigError(f"{args.config}: a config must be a YAML mapping")
        method = args.method or (raw.get("methods") or [None])[0]
        raw["methods"] = [method]
        # Keep the config's defaults for this method (and the common ones), drop other methods'.
        space = raw.get("space") or {}
        raw["space"] = {k: v for k, v in space.items() if k in (config_lib.COMMON, method)}
    else:
        if not args.method:
            raise UsageError("give a CONFIG file or --method")
        raw = {"name": "train", "methods": [args.method], "dataset": args.dataset or "digits",
               "arch": args.arch or "small_cnn", "threat_model": {"norm": args.norm, "eps": args.eps}}
    for key, value in (("dataset", args.dataset), ("arch", args.arch), ("data_dir", args.data_dir)):
        if value is not None:
            raw[key] = value
    if args.download:
        raw["download"] = True
    raw.setdefault("train", {})
    raw["train"] = {**(raw["train"] or {}), **_parse_sets(args.set)}
    if args.epochs is not None:
        raw.setdefault("budget", {})["max_epochs"] = args.epochs
        raw["budget"]["grace_epochs"] = 1
    cfg = config_lib.parse(raw)
    space = cfg.spaces()[cfg.methods[0]]
    return cfg, {name: domain.default for name, domain in space.items()}


def cmd_train(args) -> int:
    cfg, hparams = _train_config(args)
    import torch

    import methods

    method = cfg.methods[0]
    threat = methods.ThreatModel(cfg.threat_model.norm, cfg.threat_model.eps)
    run = methods.build_run(method, hparams, dataset=cfg.dataset, arch=cfg.arch, threat=threat,
                            data_dir=cfg.data_dir, download=cfg.download, device=args.device)
    print(f"training {method} on {cfg.dataset} ({cfg.arch}, {threat.norm} eps={threat.eps:g}) on "
          f"{next(run.model.parameters()).device}: "
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
        result = methods.evaluate(run.model, test, threat, attacks, seed=cfg.seed)
        print("test: " + "  ".join(f"{k} {v:.1%}" for k, v in result.items() if k.endswith("_acc"))
              + f" on {result['n_ex']} images" + (f"  flags: {', '.join(result['flags'])}" if result["flags"] else ""))
    return 0


# ---------------------------------------------------------------------------------------------- search
def cmd_search(args) -> int:
    from search import config as config_lib
    from search.tracking import check_reachable

    overrides = _parse_sets(args.set)
    for key, value in (("tracking_uri", args.tracking_uri), ("storage_path", args.storage)):
        if value:
            overrides[key] = value
    configs = [config_lib.load(path, overrides=overrides, local=args.address in (None, "local"))
               for path in args.config]
    for cfg in configs:
        check_reachable(cfg.tracking_uri)
        _check_writable(cfg.storage_path)
    from search.run import run_search

    run_search(configs, address=args.address, out_dir=None if args.no_leaderboard else args.out)
    return 0


def _check_writable(path: str) -> None:
    if "://" in path:
        return
    target = os.path.abspath(path)
    while not os.path.exists(target):
        target = os.path.dirname(target)
    if not os.access(target, os.W_OK):
        raise UsageError(f"storage path {path!r} is not writable")


# ---------------------------------------------------------------------------------------------- leaderboard / ui
def cmd_leaderboard(args) -> int:
    import leaderboard

    tables = leaderboard.build(args.tracking_uri, args.out, experiments=args.experiment or None,
                               filter_string=args.filter or "", formats=args.format)
    print(leaderboard.format_text(tables))
    print(f"written to {args.out}/")
    return 0


def cmd_ui(args) -> int:
    import shutil
    import subprocess

    mlflow = shutil.which("mlflow", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if mlflow is None:
        raise UsageError("the mlflow command is not installed in this environment")
    command = [mlflow, "ui", "--backend-store-uri", args.tracking_uri, "--host", args.host, "--port", str(args.port)]
    print(f"MLflow UI for {args.tracking_uri} at http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="otarena", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="list methods, their papers and search spaces")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("train", help="train one configuration, without Ray")
    p.add_argument("config", nargs="?", help="a search config (its first method, at its defaults)")
    p.add_argument("--method")
    p.add_argument("--dataset")
    p.add_argument("--arch")
    p.add_argument("--norm", default="Linf", choices=["Linf", "L2"])
    p.add_argument("--eps", type=float, default=0.2, help="radius in [0, 1] pixel units")
    p.add_argument("--epochs", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="fix a hyperparameter (repeatable)")
    p.add_argument("--data-dir")
    p.add_argument("--download", action="store_true", help="download a missing torchvision dataset")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:i]")
    p.add_argument("--out", default="runs", help="folder for the trained weights")
    p.add_argument("--test", action="store_true", help="evaluate the best epoch on the test split")
    p.add_argument("--autoattack", action="store_true", help="with --test, also run AutoAttack")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("search", help="run search configs: Ray Tune + Optuna + ASHA, logged to MLflow")
    p.add_argument("config", nargs="+", help="one or more search configs, run in one Ray session")
    p.add_argument("--address", help="Ray cluster address (auto, ray://host:10001); default: a local cluster")
    p.add_argument("--tracking-uri", help=f"MLflow store (default: the config's, else {DEFAULT_URI})")
    p.add_argument("--storage", help="Ray storage_path for checkpoints (shared storage on clusters)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (budget.trials=4)")
    p.add_argument("--out", default="site", help="where the leaderboard is written")
    p.add_argument("--no-leaderboard", action="store_true")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("leaderboard", help="build the leaderboard tables from an MLflow store")
    p.add_argument("--tracking-uri", default=DEFAULT_URI)
    p.add_argument("--out", default="site")
    p.add_argument("--experiment", action="append", help="experiment name (repeatable; default: all)")
    p.add_argument("--filter", help="an MLflow filter string on the trial runs")
    p.add_argument("--format", default="md,csv", help="comma-separated formats (md, csv)")
    p.set_defaults(func=cmd_leaderboard)

    p = sub.add_parser("ui", help="open the MLflow UI for a store, on 127.0.0.1")
    p.add_argument("--tracking-uri", default=DEFAULT_URI)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from search.config import ConfigError

    try:
        return args.func(args)
    except (ConfigError, UsageError, FileNotFoundError) as err:
        return _fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    except Exception as err:  # noqa: BLE001 - the tracking and leaderboard layers raise plain errors
        from search.tracking import TrackingError

        if isinstance(err, TrackingError) or (args.command == "leaderboard" and isinstance(err, (ValueError, RuntimeError))):
            return _fail(str(err).splitlines()[0])
        raise


if __name__ == "__main__":
    sys.exit(main())
