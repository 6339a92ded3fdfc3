"""The HTML report: self-contained, every plot embedded, metrics, models, data and settings."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from typing import Any

import pytest

from config.schema import PipelineConfig
from tasks.evaluate import plots, publish
from tasks.evaluate.calibration import OperatingPoint
from tasks.evaluate.report import render_report
from tasks.runs.champions import ChampionDecision
from tasks.runs.trend import RunHistory, RunPoint
from tests.unit import eval_inputs

RUN = "20260101T000000Z"


class Tags(HTMLParser):
    """Collects the page's tags and attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def make_report(
    families: bool = True,
    manifest: bool = True,
    champions: list[ChampionDecision] | None = None,
    history: RunHistory | None = None,
    history_png: bytes | None = None,
    skipped_twice: bool = False,
) -> tuple[str, dict[str, bytes]]:
    cfg = PipelineConfig()
    features, trained, manifest_ref = eval_inputs.refs(RUN)
    if skipped_twice:  # as the feature build lists them: the manifest's skips, then its own
        skipped = [*manifest_ref.skipped, *features.skipped]
        features = features.model_copy(update={"skipped": skipped})
    preds = {f: eval_inputs.predictions(f, families=families) for f in eval_inputs.FUSIONS}
    doc = publish.metrics_document(RUN, cfg.evaluation, features, trained, preds)
    inputs = eval_inputs.plot_inputs()
    pngs = {
        "roc-curves": plots.render_png(plots.plot_roc(inputs.curves, inputs.metrics)),
        "train-loss": plots.render_png(plots.plot_train_loss(inputs.history)),
    }
    page = render_report(
        run=RUN,
        doc=doc,
        plots=pngs,
        settings=cfg.model_dump(mode="json"),
        features=features,
        trained=trained,
        manifest=manifest_ref if manifest else None,
        model_links={
            t.fusion: (f"s3://bkt/{t.model_key}", f"https://x/{t.model_key}?sig=a&b=1")
            for t in trained
        },
        metrics_link=("s3://bkt/outputs/reports/r/metrics.json", "/local/metrics.json"),
        generated_at="2026-01-01 00:00:00 UTC",
        champions=champions,
        history=history,
        history_png=history_png,
    )
    return page, pngs


def test_report_is_self_contained_with_every_plot_embedded() -> None:
    page, pngs = make_report()
    assert page.startswith("<!DOCTYPE html>")
    parser = Tags()
    parser.feed(page)
    images = [attrs for tag, attrs in parser.tags if tag == "img"]
    assert len(images) == len(pngs)
    for attrs, png in zip(images, pngs.values(), strict=True):
        src = attrs["src"] or ""
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]) == png
    # nothing loaded from elsewhere: no scripts, stylesheets or remote sources
    assert not [t for t, _ in parser.tags if t in ("script", "link", "iframe")]
    assert not re.search(r'src="(?!data:)', page)


def test_report_holds_metrics_confusions_and_families() -> None:
    page, _ = make_report()
    for fusion in eval_inputs.FUSIONS:
        assert f"<th>{fusion}</th>" in page
    p = eval_inputs.predictions("early")
    metrics = publish.evaluation.calculate_metrics(p.label, p.score)
    assert f"<td>{metrics['roc_auc']:.4f}</td>" in page
    assert f"<td>{metrics['eer']:.4f}</td>" in page
    assert "<td>ece</td>" in page and "<td>tpr_at_1pct_fpr</td>" in page
    assert "EER threshold" in page and "TP (fake caught)" in page
    assert "<td>faceswap</td>" in page and "<td>tts</td>" in page


def test_report_holds_models_data_and_settings() -> None:
    page, _ = make_report()
    # models: URI shown, link escaped
    assert 'href="https://x/outputs/models/early/20260101T000000Z/model.pt?sig=a&amp;b=1"' in page
    assert "s3://bkt/outputs/models/late/20260101T000000Z/model.pt" in page
    assert 'href="/local/metrics.json"' in page
    # data summary: manifest and usable counts, skipped files with reasons, escaped
    assert "Pairs in the manifest (200)" in page
    assert "<td>train</td><td>61</td><td>60</td><td>121</td>" in page
    assert "Skipped files (2)" in page
    assert "dataset/audio/fake/&lt;script&gt;bad.wav" in page and "<script>" not in page
    assert "not a WAV file" in page and "not an image" in page
    # settings: the whole config
    assert "&quot;calibration_bins&quot;: 10" in page
    assert "&quot;fusions&quot;" in page


def test_report_without_families_or_manifest_says_so() -> None:
    page, _ = make_report(families=False, manifest=False)
    assert "The data names no fake families." in page
    assert "Pairs in the manifest" not in page
    assert "Skipped files (1)" in page  # the preprocessing one remains


def test_champion_decisions_are_the_last_section_inside_the_body() -> None:
    decision = ChampionDecision(
        fusion="mid", promoted=True, reason="<first>", new_run="r", new_auc=0.9
    )
    page, _ = make_report(champions=[decision])
    section = page.index('<section id="champions"><h2>Champions</h2>')
    assert page.index("<h2>Settings</h2>") < section < page.index("</body>")
    assert "<li>mid: run r promoted: &lt;first&gt;</li>" in page
    assert "Champions" not in make_report()[0]  # a run without decisions has no such section


def early_and_mid_report(points: dict[str, OperatingPoint]) -> tuple[dict[str, Any], str]:
    """metrics.json of an early and a mid model at `points`, and the page rendered from it."""
    features, trained, _ = eval_inputs.refs(RUN, ("early", "mid"))
    preds = {f: eval_inputs.predictions(f) for f in ("early", "mid")}
    doc = publish.metrics_document(
        RUN, PipelineConfig().evaluation, features, trained, preds, points
    )
    page = render_report(
        run=RUN,
        doc=doc,
        plots={},
        settings={},
        features=features,
        trained=trained,
        manifest=None,
        model_links={t.fusion: ("s3://b/m", "/m") for t in trained},
        metrics_link=("s3://b/metrics.json", "/metrics.json"),
        generated_at="2026-01-01 00:00:00 UTC",
    )
    return doc, page


def test_report_shows_the_fitted_threshold_beside_the_fixed_one() -> None:
    op = OperatingPoint(threshold=0.8125, temperature=2.5, rule="fpr", target_fpr=0.05, n_val=40)
    doc, page = early_and_mid_report({"mid": op})
    start = page.index('<section id="operating-point">')
    section = page[start : page.index("</section>", start)]
    header = (
        "<th>early at fixed</th><th>early at fitted</th><th>mid at fixed</th><th>mid at fitted</th>"
    )
    assert header in section
    # rows: threshold, rule and temperature of each column
    assert (
        "<td>threshold</td><td>0.5000</td><td>0.5000</td><td>0.5000</td><td>0.8125</td>" in section
    )
    assert (
        "<td>rule</td><td>fixed</td><td>fixed</td><td>fixed</td><td>fpr &lt;= 0.05</td>" in section
    )
    assert (
        "<td>temperature</td><td>1.0000</td><td>1.0000</td><td>2.5000</td><td>2.5000</td>"
        in section
    )
    at, fixed = (
        doc["fusions"]["mid"]["metrics_at_operating_point"],
        doc["fusions"]["mid"]["metrics"],
    )
    assert at["f1"] != fixed["f1"]
    f1_row = f"<td>f1</td><td>{doc['fusions']['early']['metrics']['f1']:.4f}</td>"
    assert f1_row in section
    assert f"<td>{fixed['f1']:.4f}</td><td>{at['f1']:.4f}</td></tr>" in section
    (tn, fp), (fn, tp) = at["confusion"]
    assert "<td>TP</td>" in section and f"<td>{tp}</td></tr>" in section


def test_a_skipped_file_in_both_lists_is_counted_once() -> None:
    page, _ = make_report(skipped_twice=True)
    assert "Skipped files (2)" in page
    assert page.count("dataset/images/real/x.gif") == 1


def history(*, left_out: list[str] | None = None) -> RunHistory:
    def point(run: str, auc: float, same: bool | None, current: bool = False) -> RunPoint:
        metrics = {f: {"roc_auc": auc, "eer": 1 - auc} for f in ("early", "mid")}
        return RunPoint(run=run, metrics=metrics, same_split=same, current=current)

    runs = [point("R1", 0.81, False), point("R2", 0.82, None), point(RUN, 0.9, True, True)]
    return RunHistory(limit=30, runs=runs, left_out=left_out or [])


def test_run_history_section_newest_first_with_the_trend_embedded() -> None:
    png = plots.render_png(plots.plot_run_history(["R1"], {"mid": [0.9]}, {"mid": [0.1]}))
    page, pngs = make_report(history=history(left_out=["R0: <bad> json"]), history_png=png)
    start = page.index('<section id="run-history"><h2>Run history (3 runs)</h2>')
    section = page[start : page.index("</section>", start)]
    assert page.index("<h2>Plots") < start < page.index("<h2>Models</h2>")
    header = "<th>run</th><th>test split</th><th>early ROC-AUC</th><th>early EER</th>"
    assert header in section
    assert (
        section.index(f"<td>{RUN}</td><td>this run</td><td>0.9000</td><td>0.1000</td>")
        < (section.index("<td>R2</td><td>unknown</td><td>0.8200</td>"))
        < section.index("<td>R1</td><td>other</td><td>0.8100</td>")
    )  # newest first
    assert "Runs evaluated on another test split: 1." in section
    assert "<li>R0: &lt;bad&gt; json</li>" in section
    parser = Tags()
    parser.feed(page)
    images = [attrs for tag, attrs in parser.tags if tag == "img"]
    assert len(images) == len(pngs) + 1
    assert images[-1]["alt"] == "run-history"
    assert base64.b64decode((images[-1]["src"] or "").split(",", 1)[1]) == png
    assert "run-history" not in make_report()[0]  # no history given: no section


def test_report_shows_the_ensemble_when_the_run_has_one() -> None:
    ref = (0.1, 0.3, 0.5, 0.7)
    points = {f: OperatingPoint(0.6, 1.0, "eer", None, 8, ref) for f in ("early", "mid")}
    doc, page = early_and_mid_report(points)
    start = page.index('<section id="ensemble">')
    section = page[start : page.index("</section>", start)]
    ens = doc["ensemble"]
    assert "The mean over early, mid of each calibrated score" in section
    assert f"<td>roc_auc</td><td>{ens['metrics']['roc_auc']:.4f}</td>" in section
    assert f"<td>threshold</td><td>{ens['threshold']:.4f}</td>" in section
    tie = 0.5 / (2 * 2 * 4)  # both thresholds rank 0.75, at probability 0.6
    assert ens["threshold"] == pytest.approx((0.75 + tie * 0.6) / (1 + tie))
    assert "<td>ece</td>" not in section  # a rank: no calibration metric
    for family, values in ens["families"].items():
        assert f"<td>{family} ROC-AUC</td><td>{values['roc_auc']:.4f}</td>" in section
    # without references (model files from before the ensemble): no section
    assert '<section id="ensemble">' not in early_and_mid_report({})[1]
