# SPDX-License-Identifier: Apache-2.0
"""What tuning bought (docs/mlflow-schema.md, ``default/*``): the 'Default → tuned' column, its model_info
object and the site's arrow plot, from rows whose search scored its paper-default trial too."""
from __future__ import annotations

from otarena.leaderboard import html, plots, render
from otarena.leaderboard.robustbench import model_info
from otarena.leaderboard.schema import Campaign, Row, Table

TUNED = Row(run_id="r1", experiment_id="0", dataset="digits", norm="Linf", eps=0.2, method="trades", arch="small_cnn",
            aa_acc=0.5, clean_acc=0.9, pgd_acc=0.55, epochs=10.0, n_ex=200.0, default_aa_acc=0.4,
            default_clean_acc=0.95, default_pgd_acc=0.45, default_epochs=3.0, default_run_id="r0", default_p=0.012)
ITSELF = Row(run_id="r2", experiment_id="0", dataset="digits", norm="Linf", eps=0.2, method="pgd_at", arch="small_cnn",
             aa_acc=0.45, clean_acc=0.85, pgd_acc=0.5, epochs=10.0, n_ex=200.0, default_aa_acc=0.45,
             default_clean_acc=0.85, default_pgd_acc=0.5, default_epochs=10.0, default_run_id="r2", default_p=1.0)
BARE = Row(run_id="r3", experiment_id="0", dataset="digits", norm="Linf", eps=0.2, method="erm", arch="small_cnn",
           aa_acc=0.0, clean_acc=0.99, pgd_acc=0.0, epochs=10.0, n_ex=200.0)


def test_the_column_gives_both_numbers_the_difference_and_the_p_value():
    assert TUNED.tuning == ("aa_acc", 0.4, 0.5) and BARE.tuning is None
    md = render.to_markdown([Table("digits", "Linf", 0.2, (TUNED, ITSELF, BARE))])
    assert "40.00 → 50.00 (+10.00, McNemar p 0.012), default stopped at 3 epochs" in md
    assert "45.00 → 45.00 (+0.00, McNemar p 1), the default itself" in md
    assert "$\\to$" in render.to_latex([Table("digits", "Linf", 0.2, (TUNED,))])
    tuning = model_info(TUNED)["otarena"]["tuning"]
    assert tuning["default_aa_acc"] == 0.4 and tuning["gain"] == 0.1 and tuning["p_value"] == 0.012
    assert model_info(BARE)["otarena"]["tuning"] is None


def test_the_site_draws_one_arrow_per_method_only_where_a_default_was_scored():
    table = Table("digits", "Linf", 0.2, (TUNED, ITSELF, BARE))
    svg = plots.tuning_plot(table, plots.colors(["trades", "pgd_at", "erm"]))
    assert "tuning bought +10.00 points of AutoAttack" in svg and "run r0" in svg
    assert svg.count("<title>") == 4   # a default ring and a tuned dot per row with a default
    page = html.to_html([table], Campaign(table.rows, ()), title="t", run_url=None)
    assert "Paper defaults to tuned" in page
    bare = Table("digits", "Linf", 0.2, (BARE,))
    assert "Paper defaults to tuned" not in html.to_html([bare], Campaign(bare.rows, ()), title="t", run_url=None)
