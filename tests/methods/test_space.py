# SPDX-License-Identifier: Apache-2.0
import pytest

from otarena.methods.space import Choice, Fixed, Float, Int, narrow


def test_narrow_pins_widens_and_rejects():
    beta = Float(1.0, 12.0, 6.0, log=True, valid=(0.0, 100.0))
    assert narrow("b", beta, 3) == Fixed(3.0)
    assert narrow("b", beta, "1e-1") == Fixed(0.1)          # YAML 1.1 reads 1e-1 as a string
    wider = narrow("b", beta, {"low": 0.5, "high": 50})
    assert (wider.low, wider.high, wider.default, wider.log) == (0.5, 50.0, 6.0, True)
    assert narrow("b", beta, {"high": 4.0}).default == 4.0   # the default is clipped into the range
    with pytest.raises(ValueError, match="valid domain"):
        narrow("b", beta, {"low": -1.0})
    with pytest.raises(ValueError, match="outside its valid domain"):
        narrow("b", beta, 101.0)
    with pytest.raises(ValueError, match="unknown range keys"):
        narrow("b", beta, {"lo": 1.0})
    with pytest.raises(ValueError, match="low 5.0 > high 2.0"):
        narrow("b", beta, {"low": 5.0, "high": 2.0})


def test_int_and_choice():
    steps = Int(1, 20, 10, valid=(1, 1000))
    assert narrow("k", steps, 7.0) == Fixed(7)
    assert not steps.contains(7.5) and not steps.is_valid(0)
    opt = Choice(("sgd", "adam"))
    assert opt.default == "sgd"
    assert narrow("o", opt, {"options": ["adam"]}) == Choice(("adam",), "adam")
    with pytest.raises(ValueError, match="not among"):
        narrow("o", opt, {"options": ["rmsprop"]})
    with pytest.raises(ValueError):
        Float(1.0, 2.0, 3.0)                                  # default outside the range
    with pytest.raises(ValueError):
        Float(0.0, 1.0, 0.5, log=True)                        # log scale needs low > 0
