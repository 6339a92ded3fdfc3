"""One self-contained HTML page per run: metrics, every plot (embedded PNG), models, data, settings.

The page has no external references but the links to the models and files in the bucket, so it
can be mailed, archived or opened straight from the bucket. All text is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tasks.evaluate.metrics import METRIC_NAMES, THRESHOLD_METRIC_NAMES
from tasks.refs import FeatureRef, ManifestRef, TrainedRef

if TYPE_CHECKING:
    from tasks.runs.champions import ChampionDecision
    from tasks.runs.trend import RunHistory

MAX_SKIPPED_ROWS = 500  # skipped files listed in the page; the rest are counted
Link = tuple[str, str]  # (URI shown, href: `Storage.link`, a URL or path without credentials)

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
figure { display: inline-block; margin: .5em; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: .85em; color: #555; text-align: center; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: .85em; }
.muted { color: #666; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return _e(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{_number(v)}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _link(link: Link) -> str:
    uri, href = link
    return f'<a href="{_e(href)}">{_e(uri)}</a>'


def _metrics_section(doc: Mapping[str, Any]) -> str:
    fusions = doc["fusions"]
    names = list(fusions)
    rows = [[metric, *(fusions[f]["metrics"][metric] for f in names)] for metric in METRIC_NAMES]
    rows += [[count, *(fusions[f][count] for f in names)] for count in ("n", "n_real", "n_fake")]
    parts = [
        "<h2>Metrics (test split)</h2>",
        f'<p class="muted">A score at or above {_e(doc["threshold"])} is called fake; calibration '
        f"uses {_e(doc['calibration_bins'])} bins; inference on {_e(doc['device'])}.</p>",
        _table(["metric", *names], rows),
        "<h3>Confusion matrices</h3>",
    ]
    conf_rows = []
    for f in names:
        for key, name in (
            ("threshold", f"threshold {doc['threshold']}"),
            ("eer_threshold", f"EER threshold {fusions[f]['metrics']['eer_threshold']:.4f}"),
        ):
            (tn, fp), (fn, tp) = fusions[f]["confusion"][key]
            conf_rows.append([f, name, tn, fp, fn, tp])
    parts.append(
        _table(
            [
                "fusion",
                "at",
                "TN (real ok)",
                "FP (real called fake)",
                "FN (fake missed)",
                "TP (fake caught)",
            ],
            conf_rows,
        )
    )
    family_rows = [
        [family, f, values["roc_auc"], values["recall"], int(values["n_fake"])]
        for f in names
        for family, values in fusions[f]["families"].items()
    ]
    parts.append(_operating_point_section(doc))
    parts.append(_ensemble_section(doc))
    parts.append("<h3>Per fake family</h3>")
    if family_rows:
        parts.append(
            _table(
                ["family", "fusion", "ROC-AUC vs all reals", "recall", "fakes"],
                sorted(family_rows, key=lambda r: (r[0], names.index(r[1]))),
            )
        )
    else:
        parts.append('<p class="muted">The data names no fake families.</p>')
    return "\n".join(parts)


def _cells(values: Mapping[str, Any]) -> dict[str, Any]:
    """THRESHOLD_METRIC_NAMES and the confusion counts of one threshold, by row name."""
    (tn, fp), (fn, tp) = values["confusion"]
    return {
        **{m: values[m] for m in THRESHOLD_METRIC_NAMES},
        "TN": tn,
        "FP": fp,
        "FN": fn,
        "TP": tp,
    }


def _at_fixed(fusion: Mapping[str, Any]) -> dict[str, Any]:
    """A fusion's threshold metrics at the fixed threshold, from its "metrics" and "confusion"."""
    (tn, fp), (fn, tp) = fusion["confusion"]["threshold"]
    rates = {"fpr": fp / (fp + tn), "tpr": tp / (tp + fn)}  # metrics.json has both classes
    values = {
        m: fusion["metrics"][m] if m not in rates else rates[m] for m in THRESHOLD_METRIC_NAMES
    }
    return {**values, "confusion": [[tn, fp], [fn, tp]]}


def _operating_point_section(doc: Mapping[str, Any]) -> str:
    """Per fusion, the test metrics at the fixed threshold beside those at the fitted one."""
    fusions = {f: v for f, v in doc["fusions"].items() if "operating_point" in v}
    if not fusions:
        return ""
    columns = []
    for v in fusions.values():
        op = v["operating_point"]
        rule = op["rule"] if op["target_fpr"] is None else f"{op['rule']} <= {op['target_fpr']}"
        columns += [
            {
                "threshold": float(doc["threshold"]),
                "rule": "fixed",
                "temperature": op["temperature"],
                **_cells(_at_fixed(v)),
            },
            {
                "threshold": op["threshold"],
                "rule": rule,
                "temperature": op["temperature"],
                **_cells(v["metrics_at_operating_point"]),
            },
        ]
    header = ["", *(f"{f} at {kind}" for f in fusions for kind in ("fixed", "fitted"))]
    names = ["threshold", "rule", "temperature", *THRESHOLD_METRIC_NAMES, "TN", "FP", "FN", "TP"]
    return "\n".join(
        [
            '<section id="operating-point"><h3>Fixed and fitted thresholds</h3>',
            '<p class="muted">Test scores are sigmoid(logit / temperature), the temperature '
            "fitted on the validation split. The fitted threshold is the validation operating "
            "point: eer, where the false-positive and false-negative rates meet; fpr, the lowest "
            "threshold within the false-positive budget; fixed, the model file has none.</p>",
            _table(header, [[name, *(c[name] for c in columns)] for name in names]),
            "</section>",
        ]
    )


def _ensemble_section(doc: Mapping[str, Any]) -> str:
    """The fusions' combined verdict (metrics.json's "ensemble"), when the run has one."""
    ens = doc.get("ensemble")
    if not ens:
        return ""
    at = ens["metrics_at_operating_point"]
    rows = [
        *([m, v] for m, v in ens["metrics"].items()),
        ["threshold", ens["threshold"]],
        *([m, v] for m, v in _cells(at).items()),
        *([f"{family} ROC-AUC", v["roc_auc"]] for family, v in ens["families"].items()),
    ]
    return "\n".join(
        [
            '<section id="ensemble"><h3>Ensemble of the fusions</h3>',
            f'<p class="muted">The mean over {_e(", ".join(ens["fusions"]))} of each calibrated '
            "score's rank among that fusion's validation real pairs (0: below every one, 1: "
            "above every one), fake at or above the mean of their fitted thresholds' ranks. A "
            "rank, not a probability: no calibration metrics.</p>",
            _table(["", "ensemble"], rows),
            "</section>",
        ]
    )


def _plots_section(plots: Mapping[str, bytes]) -> str:
    figures = [_img(name, png, f"{name}.png") for name, png in plots.items()]
    return f"<h2>Plots ({len(plots)})</h2>\n" + "\n".join(figures)


def _models_section(trained: Sequence[TrainedRef], model_links: Mapping[str, Link]) -> str:
    rows = [
        [
            t.fusion,
            t.epochs,
            t.best_epoch,
            t.best_val_loss,
            "" if t.resumed_from is None else t.resumed_from,
        ]
        for t in trained
    ]
    head = ["fusion", "epochs", "best epoch", "best val loss", "resumed after epoch"]
    items = "".join(f"<li>{_e(t.fusion)}: {_link(model_links[t.fusion])}</li>" for t in trained)
    return f"<h2>Models</h2>\n{_table(head, rows)}\n<ul>{items}</ul>"


def _data_section(manifest: ManifestRef | None, features: FeatureRef) -> str:
    parts = ["<h2>Data</h2>"]
    if manifest is not None:
        rows = [
            [split, c.get("real", 0), c.get("fake", 0), c.get("real", 0) + c.get("fake", 0)]
            for split, c in manifest.counts.items()
        ]
        parts += [
            f"<h3>Pairs in the manifest ({manifest.n_pairs})</h3>",
            _table(["split", "real", "fake", "total"], rows),
        ]
    rows = [
        [split, c.get("real", 0), c.get("fake", 0), c.get("real", 0) + c.get("fake", 0)]
        for split, c in features.counts.items()
    ]
    cache = "reused from the cache" if features.cache_hit else "computed for this run"
    parts += [
        f'<h3>Usable pairs after preprocessing</h3><p class="muted">Feature shards '
        f"{_e(features.prefix)} ({cache}).</p>",
        _table(["split", "real", "fake", "total"], rows),
    ]
    listed = list(manifest.skipped if manifest else [])
    skipped = [("listing", s) for s in listed]
    # the feature build's list holds the manifest's skips too: each file once
    skipped += [("preprocessing", s) for s in features.skipped if s not in listed]
    parts.append(f"<h3>Skipped files ({len(skipped)})</h3>")
    if skipped:
        shown = skipped[:MAX_SKIPPED_ROWS]
        parts.append(
            _table(
                ["stage", "key", "reason"],
                [[stage, s.get("key", ""), s.get("reason", "")] for stage, s in shown],
            )
        )
        if len(skipped) > len(shown):
            where = f" (full list: {_e(features.skipped_key)})" if features.skipped_key else ""
            parts.append(f"<p>… and {len(skipped) - len(shown)} more{where}.</p>")
    else:
        parts.append('<p class="muted">No file was skipped.</p>')
    return "\n".join(parts)


def _img(name: str, png: bytes, caption: str) -> str:
    return (
        f'<figure id="plot-{_e(name)}"><img alt="{_e(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode("ascii")}"><figcaption>{_e(caption)}</figcaption></figure>'
    )


def _history_section(history: RunHistory, png: bytes | None) -> str:
    """Each fusion's test ROC-AUC and EER over the last runs, newest first, and the trend."""
    from tasks.runs.trend import table_rows  # the one definition of the history's columns

    rows = table_rows(history)
    header = list(rows[0]) if rows else ["run"]
    body = [["" if row[h] is None else row[h] for h in header] for row in reversed(rows)]
    other = sum(1 for p in history.runs if p.same_split is False)
    n = len(history.runs)
    parts = [
        f'<section id="run-history"><h2>Run history ({n} run{"s" if n != 1 else ""})</h2>',
        f'<p class="muted">The newest {history.limit} evaluated runs at most, up to this one, '
        "newest first. Test split: same or other than this run's (the set of test pairs); "
        "scores measured on another split are not comparable."
        + (f" Runs evaluated on another test split: {other}." if other else "")
        + "</p>",
        _table(header, body),
    ]
    if png is not None:
        parts.append(_img("run-history", png, "run-history.png"))
    if history.left_out:
        items = "".join(f"<li>{_e(line)}</li>" for line in history.left_out)
        parts.append(f"<p>Left out (metrics unreadable):</p><ul>{items}</ul>")
    parts.append("</section>")
    return "\n".join(parts)


def _champions_section(decisions: Sequence[ChampionDecision]) -> str:
    items = "\n".join(f"<li>{_e(d.summary())}</li>" for d in decisions)
    return f'<section id="champions"><h2>Champions</h2>\n<ul>\n{items}\n</ul></section>\n'


def render_report(
    run: str,
    doc: Mapping[str, Any],
    plots: Mapping[str, bytes],
    settings: Mapping[str, Any],
    features: FeatureRef,
    trained: Sequence[TrainedRef],
    manifest: ManifestRef | None,
    model_links: Mapping[str, Link],
    metrics_link: Link,
    generated_at: str,
    champions: Sequence[ChampionDecision] | None = None,
    history: RunHistory | None = None,
    history_png: bytes | None = None,
) -> str:
    """The report page. `doc` is the run's metrics.json, `plots` PNG bytes by name, `settings`
    the run's configuration; links are (URI, href) pairs, href a credential-free URL or a path;
    `champions` the run's champion decisions (None: the run has none, no section); `history`
    the last runs' test metrics and `history_png` their trend (None: no run-history section)."""
    body = "\n".join(
        [
            f"<h1>Deepfake detector evaluation: run {_e(run)}</h1>",
            f'<p class="muted">Generated {_e(generated_at)} · fusions: '
            f"{_e(', '.join(doc['fusions']))} · test split of feature set "
            f"{_e(features.feature_hash)}</p>",
            f"<p>Metrics as JSON: {_link(metrics_link)}</p>",
            _metrics_section(doc),
            _plots_section(plots),
            "" if history is None else _history_section(history, history_png),
            _models_section(trained, model_links),
            _data_section(manifest, features),
            "<h2>Settings</h2>",
            f"<pre>{_e(json.dumps(settings, indent=2, sort_keys=True))}</pre>",
        ]
    )
    last = "" if champions is None else _champions_section(champions)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Run {_e(run)}: evaluation report</title><style>{_CSS}</style></head>"
        f"<body>\n{body}\n{last}</body></html>\n"
    )
