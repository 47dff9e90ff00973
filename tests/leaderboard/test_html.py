# SPDX-License-Identifier: Apache-2.0
"""The static site (leaderboard/html.py, plots.py, svg.py), on a real MLflow sqlite store, then in headless Chromium.

The store (built once per module):

* experiment ``robust <img src=x onerror=alert(2)>``, digits / Linf / eps=0.2: searches for pgd_at
  (with a paper link and an eps sweep), trades (3 seeds, a CI, flag reasons, a hostile flag, reason and
  hyperparameter value, a ``javascript:`` paper link that must be dropped, a hostile run name) and a
  method whose name is itself markup; pruned and failed trials for the plots;
* the same experiment, mnist / L2 / eps=1.5: one search with a categorical hyperparameter.

The browser test needs Debian's ``chromium`` (``scripts/ensure-test-tools.sh``, run by ``make test``) and
the ``playwright`` Python package (dev extras); it never downloads a browser.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from otarena.leaderboard import build, collect_campaign, formatting, html, plots, svg
from otarena.leaderboard.schema import Campaign, Row, Table, TrialPoint

ROOT = Path(__file__).resolve().parents[2]
RUN_URL = "http://mlflow.invalid:5000"
PAPER = "https://arxiv.org/abs/1706.06083"
EXPERIMENT = "robust <img src=x onerror=alert(2)>"
RUN_NAME = "<script>alert(1)</script>"
HOSTILE_VALUE = "</script><script>alert(4)</script>"
HOSTILE_REASON = '"><script>alert(3)</script> & more'
HOSTILE_FLAG = "<i>masking:odd</i>"
HOSTILE_METHOD = "mart<svg onload=alert(6)>"
IMPORTANCE_EVALUATOR = "optuna PED-ANOVA (target_quantile=0.25, maximize val/best_pgd_acc)"
TOO_FEW = "too few completed trials: 2 of 3 trials, the rest pruned or failed, at least 15 needed"
CONSTRAINED_RULE = "max val/pgd_acc where val/clean_acc >= 0.8"
_ids = itertools.count()


def _parent(c, exp, method, *, dataset="digits", norm="Linf", eps="0.2", paper=None, link=None, fidelity=None,
            importance=None, rule=None):
    """A search's parent run; ``fidelity`` maps a rung epoch to its rho, or to the reason it has none;
    ``importance`` maps a hyperparameter to its share of the importance, or is the reason there are none;
    ``rule``: the selection rule it tags (otarena.selection_rule)."""
    tags = {"otarena.role": "search", "otarena.method": method, "otarena.dataset": dataset,
            "otarena.arch": "small_cnn", "otarena.norm": norm, "otarena.eps": eps}
    if paper:
        tags |= {"otarena.paper": paper, "otarena.paper_link": link or ""}
    reasons = {f"otarena.fidelity.rung_{e}": v for e, v in (fidelity or {}).items() if isinstance(v, str)}
    if isinstance(importance, str):
        reasons["otarena.importance_reason"] = importance
    run_id = c.create_run(exp, tags=tags | reasons | ({"otarena.selection_rule": rule} if rule else {}),
                          run_name=f"{method}-search").info.run_id
    c.log_metric(run_id, "search/device_hours", 0.25)
    if isinstance(importance, dict):
        c.log_batch(run_id, metrics=[Metric(f"importance/{k}", v, 0, 0) for k, v in importance.items()],
                    params=[Param("search.importance_evaluator", IMPORTANCE_EVALUATOR)])
    for epoch, rho in (fidelity or {}).items():
        if not isinstance(rho, str):
            c.log_metric(run_id, f"fidelity/rung_{epoch}", rho)
    c.set_terminated(run_id, "FINISHED")
    return SimpleNamespace(exp=exp, id=run_id, tags=tags)


def _trial(c, parent, *, val, params, aa=None, clean=None, outcome="completed", run_name=None, flags="",
           tags=None, metrics=None, epochs=4):
    """A trial run; evaluated (with test metrics) when ``aa`` is given."""
    t = {**parent.tags, "otarena.role": "trial", "mlflow.parentRunId": parent.id, "otarena.outcome": outcome,
         "otarena.trial_id": f"t{next(_ids)}", "otarena.searched": ",".join(params), "otarena.flags": flags,
         **(tags or {})}
    if aa is not None:
        t["otarena.evaluated"] = "true"
    run_id = c.create_run(parent.exp, tags=t, run_name=run_name).info.run_id
    m = {"val/best_pgd_acc": val, "val/best_clean_acc": 0.9, "train/epochs": epochs, **(metrics or {})}
    if aa is not None:
        m |= {"test/aa_acc": aa, "test/clean_acc": clean, "test/pgd_acc": aa + 0.03, "test/n_ex": 500}
    c.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in m.items()],
                params=[Param(k, v) for k, v in params.items()])
    c.set_terminated(run_id, "FAILED" if outcome == "failed" else "FINISHED")
    return run_id


def _cost(hours, epochs=4, images=1293):
    """A trial's training cost metrics (search.run.trial_cost), ``hours`` device-hours over ``epochs`` epochs."""
    return {"cost/train_device_hours": hours, "cost/epoch_device_s": hours * 3600 / epochs,
            "cost/images_per_s": images * epochs / (hours * 3600)}


def _sweep(accs):
    return json.dumps({"eps": [0, 0.1, 0.2, 0.4, 0.8], "pgd_acc": accs, "robust_acc": accs[:-1] + [0.1],
                       "chance_bound": 0.1, "steps": 20})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp}/mlflow.db"
    c = MlflowClient(uri)
    exp = c.create_experiment(EXPERIMENT)
    r = SimpleNamespace(uri=uri, tmp=tmp, exp=exp)

    p = _parent(c, exp, "pgd_at", paper="Towards Deep Learning Models Resistant to Adversarial Attacks", link=PAPER,
                fidelity={2: 0.9, 6: 0.25}, importance={"lr": 0.72, "attack_steps": 0.28},
                rule="highest val/pgd_acc")
    r.pgd = _trial(c, p, val=0.55, params={"lr": "0.1", "attack_steps": "10"}, aa=0.45, clean=0.95,
                   tags={"otarena.eps_sweep": _sweep([0.95, 0.7, 0.45, 0.2, 0.05])}, flags="small-sample",
                   metrics=_cost(0.02))
    _trial(c, p, val=0.35, params={"lr": "0.001", "attack_steps": "5"}, outcome="pruned", epochs=1)
    _trial(c, p, val=0.50, params={"lr": "0.01", "attack_steps": "7"}, aa=0.40, clean=0.90)

    # A two-objective search (val PGD and clean accuracy): its two completed trials are its Pareto set, and the
    # leaderboard row was chosen among them by a constrained rule, tagged on the trial itself.
    p = _parent(c, exp, "trades", paper="TRADES <b>", link="javascript:alert(5)",
                fidelity={2: "too few trials: 2 reached max_epochs, at least 4 needed"}, importance=TOO_FEW,
                rule=CONSTRAINED_RULE)
    pareto = {"otarena.pareto": "true", "otarena.objectives": "val/pgd_acc,val/clean_acc"}
    r.trades = _trial(
        c, p, val=0.60, params={"trades_beta": "6.0", "note": HOSTILE_VALUE}, aa=0.50, clean=0.85,
        run_name=RUN_NAME, flags=f"masking:aa-gap,single-seed,{HOSTILE_FLAG}",
        tags={"otarena.flag_reasons": json.dumps({"masking:aa-gap": HOSTILE_REASON}),
              "otarena.eps_sweep": _sweep([0.85, 0.75, 0.5, 0.3, 0.1]), "otarena.selection_rule": CONSTRAINED_RULE,
              **pareto},
        metrics={"test/n_seeds": 3, "test/aa_acc_mean": 0.49, "test/aa_acc_std": 0.01,
                 "test/aa_acc_ci_low": 0.46, "test/aa_acc_ci_high": 0.54, "val/best_clean_acc": 0.82} | _cost(0.05))
    _trial(c, p, val=0.20, params={"trades_beta": "1.0", "note": "x"}, outcome="pruned", epochs=1,
           tags={"otarena.objectives": pareto["otarena.objectives"]})
    r.trades_front = _trial(c, p, val=0.58, params={"trades_beta": "3.0", "note": "y"}, aa=0.47, clean=0.97,
                            tags=pareto, metrics={"val/best_clean_acc": 0.93})

    p = _parent(c, exp, HOSTILE_METHOD)
    r.mart = _trial(c, p, val=0.50, params={"mart_beta": "5.0"}, aa=0.30, clean=0.99, metrics=_cost(0.01))
    _trial(c, p, val=0.10, params={"mart_beta": "50.0"}, outcome="failed", epochs=2)

    p = _parent(c, exp, "pgd_at", dataset="mnist", norm="L2", eps="1.5", importance={"optimizer": 1.0})
    r.l2 = _trial(c, p, val=0.7, params={"optimizer": "sgd"}, aa=0.65, clean=0.98)
    _trial(c, p, val=0.6, params={"optimizer": "adam"}, outcome="pruned", epochs=1)
    return r


@pytest.fixture(scope="module")
def site(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    tables = build(store.uri, out, formats="html", mlflow_url=RUN_URL)
    return SimpleNamespace(tables=tables, path=out / "index.html", text=(out / "index.html").read_text("utf-8"))


class _Tags(HTMLParser):
    """Every start tag as (name, attrs), plus the text inside <script> and <style>."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.tags, self.raw, self._in = [], [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in = tag if tag in ("script", "style") else None

    def handle_data(self, data):
        if self._in:
            self.raw.append((self._in, data))
            self._in = None

    def find(self, tag, **attrs):
        return [a for t, a in self.tags if t == tag and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())]


def _run_link(exp_id, run_id):
    return f"{RUN_URL}/#/experiments/{exp_id}/runs/{run_id}"


# ----------------------------------------------------------------------------------------------------
# The markup


def test_tables_rows_and_plots(store, site):
    assert [(t.dataset, t.norm, t.eps, len(t.rows)) for t in site.tables] == [
        ("digits", "Linf", 0.2, 3), ("mnist", "L2", 1.5, 1)]
    doc = _Tags(site.text)
    assert len(doc.find("table", **{"class": "board"})) == 2
    assert len(doc.find("tr")) == 2 + 3 + 1  # two header rows, 4 body rows
    assert [a["data-run"] for a in doc.find("tr") if "data-run" in a] == [store.trades, store.pgd, store.mart, store.l2]
    plots = [a["data-plot"] for a in doc.find("svg") if a.get("class") == "plot"]
    # Per table: Pareto, eps sweep, progress, cost; then one sensitivity plot per (method, hyperparameter).
    assert plots.count("pareto") == plots.count("eps-sweep") == plots.count("progress") == plots.count("cost") == 2
    assert sorted((a["data-method"], a["data-param"]) for a in doc.find("svg", data_plot="sensitivity")) == sorted([
        ("trades", "trades_beta"), ("trades", "note"), ("pgd_at", "lr"), ("pgd_at", "attack_steps"),
        (HOSTILE_METHOD, "mart_beta"), ("pgd_at", "optimizer")])
    assert formatting.table_title(site.tables[0]) in site.text and formatting.RULES in site.text.replace("&#39;", "'")


def test_rank_fidelity_is_shown_with_the_search_progress(store, site):
    """Each search's rho per rung in its progress-plot legend, and in words, with the reason where none and the
    warning below 0.5, in the plot's caption; a search without any (the mart one) is not mentioned."""
    progress = site.text.split('data-plot="progress"')[1].split("</figure>")[0]
    assert "pgd_at (ρ +0.90 / +0.25)" in progress and "trades (ρ –)" in progress
    caption = progress.split("<figcaption>")[1]
    assert "pgd_at: epoch 2 +0.90, epoch 6 +0.25 (below 0.5: pruning there may drop the best trials)" in caption
    assert "trades: epoch 2 none (too few trials: 2 reached max_epochs, at least 4 needed)" in caption
    assert "mart" not in caption


def test_which_knobs_matter_beside_the_sensitivity_plots(store, site):
    """Per method, the importance bars of its search come first among its sensitivity plots, largest on top with
    their shares; a search with too few trials says so instead; one logged before importances shows neither."""
    campaign = collect_campaign(store.uri)
    assert {(i.method, i.values, i.reason) for i in campaign.importance} == {
        ("pgd_at", (("lr", 0.72), ("attack_steps", 0.28)), ""), ("trades", (), TOO_FEW),
        ("pgd_at", (("optimizer", 1.0),), "")}
    doc = _Tags(site.text)
    assert [a["data-method"] for a in doc.find("svg", data_plot="importance")] == ["pgd_at", "pgd_at"]
    first = site.text.split('<details class="sensitivity"')[1].split("</details>")[0]
    pgd = first.split("<h4>pgd_at</h4>")[1].split("<h4>")[0]
    assert pgd.index('data-plot="importance"') < pgd.index('data-plot="sensitivity"')
    bars = pgd.split('data-plot="importance"')[1].split("</svg>")[0]
    assert bars.index(">lr<") < bars.index(">attack_steps<") and ">72%<" in bars and ">28%<" in bars
    assert f"Importances: {IMPORTANCE_EVALUATOR}." in pgd
    trades = first.split("<h4>trades</h4>")[1].split("<h4>")[0]
    assert 'data-plot="importance"' not in trades and f"Which knobs matter: not computed: {TOO_FEW}." in trades
    mart = first.split("<h4>mart")[1]
    assert "Which knobs matter" not in mart and 'data-plot="importance"' not in mart


def test_pareto_sets_on_the_validation_trade_off_and_the_selection_rule(store, site):
    """The trades search had two objectives: its Pareto set is joined on the validation clean-vs-PGD plot, shown
    only in the table that has one; each row's selection rule (the trial's tag, else its search's) is stated
    under the table, escaped."""
    campaign = collect_campaign(store.uri)
    assert {p.run_id for p in campaign.trials if p.pareto} == {store.trades, store.trades_front}
    front = {p.run_id: (p.val_clean_acc, p.val_pgd_acc) for p in campaign.trials if p.pareto}
    assert front == {store.trades: (0.82, 0.60), store.trades_front: (0.93, 0.58)}
    first, second = site.text.split('id="table-1"')[1].split('id="table-2"')
    assert first.count('data-plot="validation-pareto"') == 1 and 'data-plot="validation-pareto"' not in second
    plot = first.split('data-plot="validation-pareto"')[1].split("</figure>")[0]
    assert "Pareto set" in plot and "the Pareto set of each multi-objective search" in plot
    tips = re.findall(r"<title>([^<]*)</title>", plot)
    assert len([t for t in tips if "trades: Pareto set" in t]) == 2
    assert any("val clean 82.00, val PGD 60.00" in t for t in tips)
    assert any(t.startswith("leaderboard entry: trades") and "max val/pgd_acc where val/clean_acc &gt;= 0.8" in t
               for t in tips)
    rows = {r.run_id: r.selection_rule for r in site.tables[0].rows}
    assert rows == {store.trades: CONSTRAINED_RULE, store.pgd: "highest val/pgd_acc", store.mart: ""}
    assert ('<p class="note selection">Chosen on validation by: <b>max val/pgd_acc where val/clean_acc &gt;= 0.8</b> '
            '(row 1); <b>highest val/pgd_acc</b> (row 2).</p>') in first
    assert "Chosen on validation by" not in second  # the mnist search tagged no rule (a store from before)


def test_cells_show_headline_numbers_and_sort_values(store, site):
    doc = _Tags(site.text)
    head = [a for a in doc.find("th")][:17]
    assert [a["data-type"] for a in head][:4] == ["num", "text", "num", "num"]
    row = re.search(rf'<tr data-rank="1" data-run="{store.trades}".*?</tr>', site.text).group(0)
    assert "49.0 ± 1.0" in row and 'data-value="0.49"' in row  # the 3-seed mean, as render shows it
    assert "[46.0, 54.0]" in row and 'data-value="0.46"' in row  # AA 95% CI, sorted by its low end
    assert "0.25" in row  # device-hours from the parent
    pgd = re.search(rf'<tr data-rank="2" data-run="{store.pgd}".*?</tr>', site.text).group(0)
    assert '<td class="num">–</td>' in pgd  # no CI: no data-value, sorted last
    # No row has a certified accuracy: no table shows a Certified column (a column of dashes).
    assert ">Certified<" not in site.text and ">AA 95%\u00a0CI<" in site.text


def test_links_and_no_external_resources(store, site):
    doc = _Tags(site.text)
    hrefs = [a["href"] for _, a in doc.tags if "href" in a]
    runs = {_run_link(store.exp, r) for r in (store.pgd, store.trades, store.mart, store.l2)}
    external = [h for h in hrefs if h.lower().startswith(("http:", "https:", "//"))]
    assert set(external) == runs | {PAPER}
    assert all(h.startswith(("#", "data:")) for h in hrefs if h not in external)
    assert not any("src" in a for _, a in doc.tags)  # no image, script, frame or media source at all
    assert [a for t, a in doc.tags if t == "link"] == [{"rel": "icon", "href": "data:,"}]
    lowered = site.text.lower()
    # url( only as the plots' references to their own clip paths and markers (#id), never a resource.
    assert "<script src" not in lowered and "@import" not in lowered and not re.search(r"url\((?!#)", lowered)
    assert not re.search(r"<link[^>]+href=[\"']?https?:", lowered)
    csp = doc.find("meta", http_equiv="Content-Security-Policy")[0]["content"]
    assert "default-src 'none'" in csp
    (a,) = [a for _, a in doc.tags if a.get("href") == PAPER]
    assert a["title"] == "Towards Deep Learning Models Resistant to Adversarial Attacks"


def test_user_text_is_escaped(store, site):
    text, doc = site.text, _Tags(site.text)
    for hostile in (RUN_NAME, HOSTILE_VALUE, HOSTILE_REASON, HOSTILE_FLAG, HOSTILE_METHOD, EXPERIMENT, "TRADES <b>"):
        assert hostile not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text  # the run name
    assert "&lt;/script&gt;&lt;script&gt;alert(4)&lt;/script&gt;" in text  # the hyperparameter value
    assert "&#34;&gt;&lt;script&gt;alert(3)&lt;/script&gt; &amp; more" in text  # the flag reason (a title)
    assert "&lt;i&gt;masking:odd&lt;/i&gt;" in text and "robust &lt;img src=x onerror=alert(2)&gt;" in text
    assert "javascript:" not in text.lower()  # the bad paper link is dropped, its title kept
    assert [t for t, _ in doc.tags].count("script") == 1 and text.count("<script") == 1
    assert not [(t, k) for t, a in doc.tags for k in a if k.startswith("on")]  # no event handler anywhere
    assert {t for t, _ in doc.tags} <= {
        "html", "head", "meta", "link", "title", "style", "body", "h1", "h2", "h4", "p", "nav", "a", "section",
        "div", "table", "thead", "tbody", "tr", "th", "td", "button", "span", "b", "code", "ul", "li", "figure",
        "figcaption", "svg", "g", "defs", "clippath", "rect", "use", "text", "path", "details", "summary", "footer",
        "script"}
    # The reason is shown on hover, unescaped by the parser back to the original text.
    assert HOSTILE_REASON in [a.get("title") for t, a in doc.tags if t == "a"]


def test_empty_campaign():
    page = html.to_html([], Campaign((), ()), title="<b>empty</b>", run_url=None)
    assert formatting.EMPTY_MESSAGE in page and "&lt;b&gt;empty&lt;/b&gt;" in page and "<b>empty" not in page
    assert "<table" not in page and 'data-plot="' not in page
    # (An empty store's build, html included, is covered by test_no_torch.py.)


def test_without_run_url_run_ids_are_text(store, tmp_path):
    build(store.uri, tmp_path, formats="html")
    text = (tmp_path / "index.html").read_text("utf-8")
    assert "/#/experiments/" not in text and re.search(rf'<code title="[^"]*">{store.pgd}</code>', text)


def test_flag_reasons_are_notes_under_the_table(store, site):
    """Each distinct flag and reason is written once under its table, and every badge links to it."""
    doc = _Tags(site.text)
    badges = [a for a in doc.find("a") if a.get("class", "").startswith("badge")]
    notes = {a["id"] for a in doc.find("li") if "id" in a}
    assert badges and {b["href"].removeprefix("#") for b in badges} == notes
    first = site.text.split('<section id="table-1"')[1].split("</section>")[0]
    assert first.count('<li id="table-1-note-') == 4  # masking:aa-gap, the hostile flag, small-sample, single-seed
    assert "&#34;&gt;&lt;script&gt;alert(3)&lt;/script&gt; &amp; more <span class=\"rows\">(row 1)</span>" in first


def test_certified_far_below_autoattack_is_explained():
    hkr = Row(run_id="r1", experiment_id="0", dataset="digits", norm="L2", eps=0.3, method="hkr", arch="lip",
              aa_acc=0.85, clean_acc=0.95, certified_acc=0.035)
    pgd = Row(run_id="r2", experiment_id="0", dataset="digits", norm="Linf", eps=0.2, method="pgd_at", arch="cnn",
              aa_acc=0.5, clean_acc=0.9)
    tables = [Table("digits", "L2", 0.3, (hkr,)), Table("digits", "Linf", 0.2, (pgd,))]
    page = html.to_html(tables, Campaign((hkr, pgd), ()), title="t", run_url=None)
    l2, linf = page.split('<section id="table-')[1:]
    assert ">Certified<" in l2 and ">Certified<" not in linf
    assert "Certified accuracy far below AutoAttack (row 1)" in l2 and "sqrt(2) x eps = 0.424" in l2
    assert "far below" not in linf


def _on_segment(p, a, b) -> bool:
    """Whether p lies on the axis-parallel segment a-b."""
    (x, y), (x0, y0), (x1, y1) = p, a, b
    return ((x0 == x1 == x and min(y0, y1) <= y <= max(y0, y1))
            or (y0 == y1 == y and min(x0, x1) <= x <= max(x0, x1)))


def test_pareto_step_line_never_runs_through_a_dominated_point():
    rng = random.Random(0)
    for _ in range(300):
        # Accuracies over a few hundred images: ties in either coordinate are common.
        pts = [(float(rng.randrange(70, 100, 2)), float(rng.randrange(30, 60, 2))) for _ in range(rng.randint(1, 12))]
        front = plots.pareto_front(pts)
        xs, ys = plots.pareto_staircase(front)
        vertices = list(zip(xs, ys))
        assert vertices[::2] == front  # it joins the front's points, one corner between each two
        for p in set(pts) - set(front):
            assert not any(_on_segment(p, a, b) for a, b in zip(vertices, vertices[1:])), (p, front)
    # The shape that drew the step line through a dominated trial: a trial with the clean accuracy of a
    # front point and a lower AutoAttack one, under the drop a "steps-pre" line made there.
    xs, ys = plots.pareto_staircase(plots.pareto_front([(90, 40), (95, 30), (90, 35)]))
    assert list(zip(xs, ys)) == [(90, 40), (95, 40), (95, 30)]


def _trial_point(method, value, val, run_id="x"):
    return TrialPoint(run_id=run_id, experiment_id="0", parent_id=method, dataset="d", norm="Linf", eps=0.2,
                      method=method, arch="a", outcome="completed", val_pgd_acc=val, epochs=1.0, end_time=None,
                      hparams=(("lr", value), ("beta", str(1 + val))))


def test_a_log_scale_parameter_gets_a_log_axis_for_every_method():
    """pgd_at's learning rates span a decade, trades' less: both plots get the log axis, with two or more
    short tick labels each."""
    trials = [_trial_point("pgd_at", v, a, f"p{k}") for k, (v, a) in enumerate([("0.001", 0.3), ("0.05", 0.5)])]
    trials += [_trial_point("trades", v, a, f"t{k}") for k, (v, a) in enumerate([("0.0041", 0.4), ("0.0079", 0.45)])]
    rows = tuple(Row(run_id=t.run_id, experiment_id="0", dataset="d", norm="Linf", eps=0.2, method=t.method,
                     arch="a", aa_acc=0.4) for t in trials[1::2])
    assert plots.log_scale_params(trials) == {"lr"}  # beta spans 1.3-1.5
    drawn = dict(plots.sensitivity_plots(Table("d", "Linf", 0.2, rows), trials, plots.colors(["pgd_at", "trades"])))
    for method in ("pgd_at", "trades"):
        lr, beta = drawn[method]
        assert ">lr (log)<" in lr and ">beta<" in beta, method
        ticks = re.findall(r'<g id="[^"]*xtick_\d+">.*?<text[^>]*>([^<]*)</text>', lr, flags=re.S)
        assert 2 <= len(ticks) <= 4 and all(len(t) <= 6 for t in ticks), (method, ticks)


def test_helpers():
    assert plots.pareto_front([(90, 40), (95, 30), (80, 45), (85, 35), (95, 20)]) == [(80, 45), (90, 40), (95, 30)]
    for bad in ("javascript:alert(1)", " javascript:x", "JaVaScRiPt:x", "data:text/html,x", "//evil.example",
                "http://", "https://a.example/\"onmouseover=x", "ftp://a.example"):
        assert formatting.safe_url(bad) is None, bad
    assert formatting.safe_url("https://arxiv.org/abs/1706.06083") == "https://arxiv.org/abs/1706.06083"


def test_plot_survives_odd_numbers_and_hostile_text():
    """NaN, infinities and non-positive values on a log axis are left out; each point left keeps its
    hover text; user text is drawn as text (never mathtext), escaped, and no inline style remains
    for the page's CSP to refuse."""
    fig = svg.new_figure(300, 200)
    ax = fig.add_subplot()
    ax.set_xscale("log")
    tips: list = []
    xs, ys = [1.0, float("inf"), -1.0, 10.0, 100.0], [float("nan"), 2.0, 3.0, 4.0, 5.0]
    svg.plot_series(ax, [svg.Series("_$x^2$ <b>", xs, ys, "#000000", tips=[f"p{k} <i>" for k in range(5)])], tips)
    svg.finish(ax, "odd </svg>", "x", "y")
    drawn = svg.to_svg(fig, "x", "odd", tips)
    assert "nan" not in drawn.lower() and "inf" not in drawn.lower()
    assert drawn.count("<title>") == 2  # the two points left
    assert "<title>p3 &lt;i&gt;</title>" in drawn and "<title>p4 &lt;i&gt;</title>" in drawn
    assert "$x^2$ &lt;b&gt;" in drawn and "odd &lt;/svg&gt;" in drawn and "<b>" not in drawn
    assert not re.search(r"\sstyle=", drawn) and "<style" not in drawn
    assert drawn.startswith('<svg class="plot" data-plot="x"')


# ----------------------------------------------------------------------------------------------------
# In a browser

@pytest.fixture(scope="module")
def browser(chromium):
    return chromium  # Debian's chromium, shared with the MLflow UI test (tests/conftest.py)


def _order(table):
    return table.locator("tbody tr").evaluate_all("rs => rs.map(r => r.getAttribute('data-run'))")


def _open(page, site):
    """Load the site, refusing every other request; returns the lists of requests and of problems seen."""
    url = site.path.as_uri()
    requests, problems = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.route("**/*", lambda route: route.continue_() if route.request.url == url else route.abort())
    page.goto(url)
    return requests, problems


# Elements that stick out of the viewport, sideways, other than inside a table's scroll container
# (or inside a plot, which is checked as a whole), and how far the page itself scrolls sideways.
_OVERFLOW = """() => {
  const width = document.documentElement.clientWidth, out = [];
  for (const el of document.body.querySelectorAll('*')) {
    if (el.closest('.scroll') || (el.parentElement && el.parentElement.closest('svg'))) continue;
    const r = el.getBoundingClientRect();
    if (r.width > 0 && (r.right > width + 1 || r.left < -1)) out.push(`${el.tagName} ${el.getAttribute('class')}`);
  }
  return {page: document.documentElement.scrollWidth - width, elements: out};
}"""
# Cells whose text runs over more than one line: a run id or a number broken inside it.
_WRAPPED = """(selector) => Array.from(document.querySelectorAll(selector)).filter(el => {
  const range = document.createRange();
  range.selectNodeContents(el);
  const tops = Array.from(range.getClientRects()).filter(r => r.width > 0).map(r => r.top).sort((a, b) => a - b);
  return tops.some((t, k) => k > 0 && t - tops[k - 1] > 4);
}).map(el => el.textContent)"""
# Tick labels of one axis of a plot that overlap each other.
_TICKS_OVERLAP = """() => {
  const bad = [];
  for (const svg of document.querySelectorAll('svg.plot')) {
    for (const axis of ['xtick', 'ytick']) {
      const boxes = Array.from(svg.querySelectorAll(`g[id*="-${axis}_"] text`))
        .map(t => t.getBoundingClientRect()).filter(b => b.width > 0);
      boxes.forEach((a, i) => boxes.slice(i + 1).forEach(b => {
        if (a.left < b.right - 0.5 && b.left < a.right - 0.5 && a.top < b.bottom - 0.5 && b.top < a.bottom - 0.5)
          bad.push(`${svg.getAttribute('data-plot')} ${svg.getAttribute('data-param') || ''} ${axis}`);
      }));
    }
  }
  return bad;
}"""


def _assert_readable(page):
    """Nothing sticks out sideways outside a scroll container; no number, run id or hyperparameter
    value is broken over two lines; no plot's tick labels overlap."""
    assert page.evaluate(_OVERFLOW) == {"page": 0, "elements": []}
    for cells in ("table.board td.num", "table.board td.run > *", "table.board td.hyperparameters span"):
        assert page.evaluate(_WRAPPED, cells) == [], cells
    assert page.evaluate(_TICKS_OVERLAP) == []


def test_in_chromium(store, site, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    requests, problems = _open(page, site)
    url = site.path.as_uri()

    # At 1400 px every table fits: no column cut off behind a scroll bar.
    _assert_readable(page)
    assert page.locator(".scroll").evaluate_all("ss => ss.map(s => s.scrollWidth - s.clientWidth)") == [0, 0]

    tables = page.locator("table.board")
    assert tables.count() == 2
    assert [tables.nth(k).locator("tbody tr").count() for k in range(2)] == [3, 1]
    first = tables.nth(0)
    ranked = [store.trades, store.pgd, store.mart]
    assert _order(first) == ranked

    clean = first.locator("thead th", has_text="Clean")
    clean.locator("button").click()  # accuracies sort best first
    assert clean.get_attribute("aria-sort") == "descending"
    assert _order(first) == [store.mart, store.pgd, store.trades]  # clean 99, 95, 85
    clean.locator("button").click()
    assert clean.get_attribute("aria-sort") == "ascending"
    assert _order(first) == [store.trades, store.pgd, store.mart]
    ci = first.locator("thead th", has_text="AA 95% CI")
    ci.locator("button").click()
    assert clean.get_attribute("aria-sort") is None and _order(first) == ranked  # only trades has a CI
    first.locator("thead th", has_text="Rank").locator("button").click()
    first.locator("thead th", has_text="Method").locator("button").click()  # text, ascending first
    assert _order(first) == [store.mart, store.pgd, store.trades]  # "mart<svg…" < "pgd_at" < "trades"
    assert first.locator("tbody tr").first.locator("td").nth(1).inner_text().startswith(HOSTILE_METHOD)
    first.locator("thead th", has_text="Rank").locator("button").click()
    assert _order(first) == ranked

    plots = page.locator("svg.plot[data-plot]")
    # Per table 4, 6 sensitivity plots, the trades search's validation trade-off, pgd_at's two importance plots.
    assert plots.count() == 2 * 4 + 6 + 1 + 2
    for k in range(plots.count()):
        box = plots.nth(k).bounding_box()
        assert box and box["width"] > 100 and box["height"] > 100
        assert plots.nth(k).evaluate("s => s.querySelectorAll('path, use').length") > 5
    assert page.locator('svg[data-plot="pareto"] use title').count() >= 3 + 5  # every trial, with its hover text
    assert page.locator('svg[data-plot="eps-sweep"] use title').count() >= 2 * 5  # two curves of five radii
    # The training cost: a column with its hover text, and AutoAttack against training device-hours with the front
    # (mart 0.01 h, pgd_at 0.02 h, trades 0.05 h: each buys accuracy with cost, so all three are on it).
    cost = first.locator("thead th", has_text="Train cost")
    assert "device-hours over its epochs" in cost.get_attribute("title")
    assert first.locator(f'tr[data-run="{store.pgd}"] td', has_text="0.02 h, 18 s/epoch, 72 img/s").count() == 1
    cost_tips = page.locator('svg[data-plot="cost"] use title').all_text_contents()
    assert len([t for t in cost_tips if "device-hours" in t]) == 3 and any("0.02 device-hours" in t for t in cost_tips)
    assert "Pareto front" in page.locator('svg[data-plot="cost"]').first.inner_html()
    assert "no training cost logged" in page.locator('svg[data-plot="cost"]').nth(1).inner_html()
    assert page.evaluate("() => window.__pwned === undefined && !document.querySelector('img, iframe, i')")

    # Which knobs matter: pgd_at's bars on the same line as its sensitivity plots, just left of them; trades says
    # why it has none, in words on the page.
    knobs = page.locator('#table-1 svg[data-plot="importance"]')
    beside = page.locator('#table-1 svg[data-plot="sensitivity"][data-method="pgd_at"]').first
    assert knobs.count() == 1 and knobs.is_visible() and beside.is_visible()
    k, b = knobs.bounding_box(), beside.bounding_box()
    assert abs(k["y"] - b["y"]) < 2 and k["x"] + k["width"] <= b["x"]
    assert knobs.locator("text", has_text="72%").count() == 1
    reason = page.locator("#table-1 p.importance-reason")
    assert reason.count() == 1 and reason.is_visible() and TOO_FEW in reason.inner_text()
    # The Pareto set on the validation trade-off, with its hover texts, and the rule that chose each row.
    trade_off = page.locator('#table-1 svg[data-plot="validation-pareto"]')
    assert trade_off.is_visible() and "Pareto set" in trade_off.inner_html()
    assert len([t for t in trade_off.locator("use title").all_text_contents() if "Pareto set" in t]) == 2
    rule = page.locator("#table-1 p.selection")
    assert rule.is_visible() and rule.inner_text() == (f"Chosen on validation by: {CONSTRAINED_RULE} (row 1); "
                                                       "highest val/pgd_acc (row 2).")

    _screenshot(page, "leaderboard.png")
    page.close()
    assert requests == [url], requests  # nothing but the page itself, not even a favicon
    assert not problems, problems  # no CSP violation, no script error


def _screenshot(page, name):
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shot = artifacts / name
    page.screenshot(path=str(shot), full_page=True)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


@pytest.fixture(scope="module")
def plain_site(store, tmp_path_factory):
    """The site without an MLflow UI to link to: run names and ids are text (as ``make demo`` publishes it)."""
    out = tmp_path_factory.mktemp("plain-site")
    build(store.uri, out, formats="html")
    return SimpleNamespace(path=out / "index.html")


def test_run_ids_fit_at_1400_px(store, plain_site, browser):
    """A 32-character run id is shown on one line, cut to its column, and copied whole."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    _, problems = _open(page, plain_site)
    _assert_readable(page)
    assert page.locator(".scroll").evaluate_all("ss => ss.map(s => s.scrollWidth - s.clientWidth)") == [0, 0]
    code = page.locator(f'tr[data-run="{store.pgd}"] td.run code')
    assert code.text_content() == store.pgd and store.pgd in code.get_attribute("title")
    assert code.evaluate("c => c.scrollWidth > c.clientWidth")  # cut by CSS, not in the page
    page.close()
    assert not problems, problems


def test_on_a_phone(store, plain_site, browser):
    """At 390 px the tables scroll in their own frames, nothing else sticks out, and a tap on a flag
    shows its reason (a hover title never shows on a touch screen)."""
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    site = plain_site
    requests, problems = _open(page, site)
    _assert_readable(page)
    assert all(w > 0 for w in page.locator(".scroll").evaluate_all("ss => ss.map(s => s.scrollWidth - s.clientWidth)"))

    page.locator(f'tr[data-run="{store.trades}"] a.badge.warn').first.tap()
    note = page.locator("li:target")
    assert note.count() == 1 and HOSTILE_REASON in note.inner_text() and "(row 1)" in note.inner_text()
    box = note.bounding_box()
    # Within a pixel, as _OVERFLOW: a scrolled-to target may sit a sub-pixel above the top (-0.016).
    assert box and -1 <= box["y"] and box["y"] + box["height"] <= 844 and box["x"] + box["width"] <= 390
    # Every badge's reason is written out under its table, not only in the badge's title.
    badges = page.locator("table.board a.badge").evaluate_all(
        "bs => bs.map(b => [b.getAttribute('title'), document.getElementById(b.hash.slice(1)).textContent])")
    assert badges and all(title in text for title, text in badges), badges

    _screenshot(page, "leaderboard-phone.png")
    context.close()
    assert requests == [site.path.as_uri()], requests
    assert not problems, problems

