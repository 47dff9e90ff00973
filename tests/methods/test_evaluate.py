# SPDX-License-Identifier: Apache-2.0
"""evaluate(): any classifier on [0, 1] inputs, with flags."""
import torch

import methods
from methods.common import nets


def _model(arch="small_cnn"):
    torch.manual_seed(0)
    return nets.build(arch, in_channels=1, num_classes=10, mean=(0.3,), std=(0.4,)).eval()


def test_evaluate_reports_each_attack_and_small_sample():
    data = methods.data.load("digits", "test")
    result = methods.evaluate(_model(), data, methods.ThreatModel("Linf", 0.2), n_ex=20, pgd_steps=3)
    assert result["n_ex"] == 20
    assert 0 <= result["aa_acc"] <= 1
    assert ("masking:aa-gap" in result["flags"]) == (result["pgd_acc"] - result["aa_acc"] > 0.05)
    assert result["aa_acc"] <= result["clean_acc"]
    assert set(result["aa_per_attack"]) <= {"apgd-ce", "apgd-t", "fab-t", "square"}
    assert "small-sample" in result["flags"]


def test_certificate_of_a_non_lipschitz_net_is_refused_and_flagged():
    data = methods.data.load("digits", "test")
    result = methods.evaluate(_model(), data, methods.ThreatModel("L2", 0.3), ("clean", "certified"), n_ex=16)
    assert "certified_acc" not in result and "unsound-certificate" in result["flags"]
    assert result["certified_refused"]


def test_certificate_of_a_lipschitz_net_is_reported():
    data = methods.data.load("digits", "test")
    result = methods.evaluate(_model("lipschitz_small"), data, methods.ThreatModel("L2", 0.3),
                              ("clean", "certified"), n_ex=16)
    assert 0 <= result["certified_acc"] <= result["clean_acc"]
    assert result["lipschitz_bound"] <= 1.02 and "unsound-certificate" not in result["flags"]
