# SPDX-License-Identifier: Apache-2.0
"""Mistakes in a config or on the command line: refused in one line, exit 2, before any work, with
the fix in the message (a typo's likely meaning, what to write instead of a list, where a line breaks)."""
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from otarena.search import config as config_lib
from otarena.search.cli import build_parser, main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BASE = {"name": "c", "threat_model": {"norm": "Linf", "eps": 0.2}, "methods": ["pgd_at", "trades"],
        "budget": {"trials": 2, "max_epochs": 2, "grace_epochs": 1}}


def _refused(**changes) -> str:
    with pytest.raises(config_lib.ConfigError) as caught:
        config_lib.parse({**BASE, **changes})
    message = str(caught.value)
    assert "\n" not in message
    return message


TYPOS = {   # one misspelt name at every level of a config, and what it must suggest
    "top level": (dict(budgte={"trials": 3}), "unknown key 'budgte' (did you mean 'budget'?)"),
    "budget": (dict(budget={"trails": 3}), "budget: unknown key 'trails' (did you mean 'trials'?)"),
    "threat model": (dict(threat_model={"norm": "Linf", "epss": 0.1}), "threat_model: unknown key 'epss'"),
    "final_eval.thresholds": (dict(final_eval={"thresholds": {"aagap": 0.1}}), "(did you mean 'aa_gap'?)"),
    "space section": (dict(space={"trdes": {"trades_beta": 3.0}}), "space: unknown section 'trdes' "
                                                                   "(did you mean 'trades'?)"),
    "space.common": (dict(space={"common": {"lrr": {"low": 1e-3, "high": 1e-2}}}),
                     "space.common: unknown hyperparameter 'lrr' (did you mean 'lr'?)"),
    "space.<method>": (dict(space={"trades": {"trades_bta": 3.0}}), "(did you mean 'trades_beta'?)"),
    "range key": (dict(space={"trades": {"trades_beta": {"lo": 3.0}}}),
                  "space.trades.trades_beta: unknown range key 'lo' (did you mean 'low'?)"),
    "train": (dict(train={"weight_decy": 0.1}), "train: unknown hyperparameter 'weight_decy' "
                                                "(did you mean 'weight_decay'?)"),
    "a hyperparameter at the top": (dict(lr=0.1), "a hyperparameter goes under train (fixed: train.lr)"),
}


@pytest.mark.parametrize("level", sorted(TYPOS))
def test_an_unknown_key_at_any_level_is_refused_with_its_likely_meaning(level):
    changes, expected = TYPOS[level]
    assert expected in _refused(**changes)


def test_a_common_knob_of_another_method_is_not_a_typo():
    # TRADES' beta under common is skipped for PGD-AT (which lacks it); only a name no method has is refused.
    cfg = config_lib.parse({**BASE, "space": {"common": {"trades_beta": {"low": 1.0, "high": 6.0}}}})
    assert cfg.spaces()["trades"]["trades_beta"].high == 6.0 and "trades_beta" not in cfg.spaces()["pgd_at"]


def test_a_space_common_typo_stops_the_search_before_any_work(tmp_path, capsys):
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump({**BASE, "space": {"common": {"lrr": {"low": 1e-3, "high": 1e-2}}}}))
    assert main(["search", str(path), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "otarena: error: space.common: unknown hyperparameter 'lrr' (did you mean 'lr'?)"
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("where", ["train", "space.common"])
def test_a_list_where_a_range_belongs_says_how_to_write_the_range(where):
    override = {"lr": [1e-3, 1e-2]}
    message = _refused(**({"train": override} if where == "train" else {"space": {"common": override}}))
    assert "is not a range; to search it write {low: 0.001, high: 0.01}" in message
    assert "valid domain" not in message   # it was: outside its valid domain (the default search range)


def test_a_list_of_options_says_how_to_write_a_choice():
    assert "write {options: ['sgd', 'adam']}" in _refused(train={"optimizer": ["sgd", "adam"]})


def test_a_word_where_a_number_belongs_is_a_type_error(capsys):
    assert main(["train", "--method", "pgd_at", "--set", "lr=fast"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("lr: expected a number, got 'fast'") and "valid domain" not in err
    assert _refused(train={"lr": -0.1}) == "train: lr=-0.1 is outside its valid domain [1e-07, 10]"


def test_fractions_written_as_text_are_the_float_they_mean(tmp_path):
    # The README writes radii as 8/255; YAML reads 8/255 (quoted or not) as text.
    path = tmp_path / "eps.yaml"
    path.write_text("name: c\nthreat_model: {norm: Linf, eps: 8/255}\nmethods: [pgd_at]\n"
                    "budget: {trials: 2, max_epochs: 2, grace_epochs: 1}\n")
    assert config_lib.load(str(path)).threat_model.eps == 8 / 255
    assert config_lib.load(str(path), overrides={"threat_model.eps": "4/255"}).threat_model.eps == 4 / 255
    space = config_lib.parse({**BASE, "methods": ["pgd_at"], "train": {"attack_step_size": "2/255"}}).spaces()["pgd_at"]
    assert space["attack_step_size"].value == 2 / 255
    assert build_parser().parse_args(["train", "--eps", "8/255"]).eps == 8 / 255
    message = _refused(threat_model={"norm": "Linf", "eps": "8/x"})
    assert message == "threat_model.eps: expected a number such as 0.03 or 8/255, got '8/x'"


MALFORMED = {   # text, and the line:column and problem the one-line error names
    "unclosed list": ("name: c\nmethods: [pgd_at\n  bad: : :\n", ":3:6: malformed YAML: expected ',' or ']'"),
    "a tab": ("name: c\n\tmethods: [pgd_at]\n", ":2:1: malformed YAML: found character '\\t'"),
    "a key twice": ("name: c\nmethods: [pgd_at]\nname: d\n", ":3:1: malformed YAML: key 'name' repeats the one on line 1"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
@pytest.mark.parametrize("command", ["train", "search"])
def test_malformed_yaml_is_one_line_with_file_line_and_column(case, command, tmp_path, capsys):
    text, expected = MALFORMED[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main([command, str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"otarena: error: {path}{expected}" or (err.startswith(f"otarena: error: {path}{expected}")
                                                          and "\n" not in err), err


def test_a_binary_file_and_a_malformed_set_value_are_one_line(tmp_path, capsys):
    path = tmp_path / "weights.yaml"
    path.write_bytes(b"name: \x80\x81\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"otarena: error: {path}: malformed YAML: ")
    assert main(["train", "--method", "pgd_at", "--set", "lr=[1,"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("otarena: error: --set lr:1:4: malformed YAML") and "\n" not in err


def test_a_closed_pipe_ends_quietly():
    """``otarena methods --json | head``: the reader goes away; no traceback, the status of SIGPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    exe = os.path.join(os.path.dirname(sys.executable), "otarena")
    proc = subprocess.run([exe, "methods", "--json"], stdout=write_end, stderr=subprocess.PIPE, text=True,
                          timeout=120)
    os.close(write_end)
    assert (proc.returncode, proc.stderr) == (141, "")


def test_the_l2_demo_searches_only_margins_that_certify_its_radius():
    # A logit gap M certifies the L2 radius M / sqrt(2) (methods/common/certify.py), and HKR's hinge is
    # met once every gap reaches hkr_margin: below sqrt(2) eps a trial aims at uncertifiable margins.
    raw = config_lib.read_mapping(str(CONFIGS / "demo-l2.yaml"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", config_lib.ConfigWarning)
        cfg = config_lib.parse(raw)
    margin = cfg.spaces()["hkr"]["hkr_margin"]
    assert margin.low > math.sqrt(2) * cfg.threat_model.eps
    assert margin.low <= margin.default


def test_hkr_margins_below_what_certifies_eps_are_warned_about(tmp_path, capsys):
    raw = {**BASE, "arch": "lipschitz_small", "threat_model": {"norm": "L2", "eps": 0.3}, "methods": ["hkr"]}
    with pytest.warns(config_lib.ConfigWarning, match=r"hkr_margin .* below sqrt\(2\) x eps = 0.424"):
        config_lib.parse(raw)   # the method's own range, 0.05-1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", config_lib.ConfigWarning)
        config_lib.parse({**raw, "space": {"hkr": {"hkr_margin": {"low": 0.43, "high": 1.0}}}})
        config_lib.parse({**raw, "threat_model": {"norm": "L2", "eps": 0.03}})   # 0.05 certifies 0.035
    # The command line prints it as one warning line and goes on (here to a missing store's error).
    path = tmp_path / "hkr.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["search", str(path), "--tracking-uri", "sqlite:////nonexistent/dir/mlflow.db"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("otarena: warning: hkr: hkr_margin float [0.05, 1]")
    assert lines[0].endswith("(give hkr_margin 0.43 or more)") and lines[1].startswith("otarena: error: ")
