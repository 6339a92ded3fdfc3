"""Every plot renders from small synthetic inputs to a readable, non-blank PNG."""

from __future__ import annotations

import io

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from tasks.evaluate import plots
from tests.unit import eval_inputs


def decode(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def assert_readable(png: bytes, name: str) -> None:
    pixels = decode(png)
    height, width, _ = pixels.shape
    assert 300 <= width <= 3000 and 250 <= height <= 2000, f"{name}: odd size {width}x{height}"
    # not blank: many distinct colours, and a good share of the canvas is not background white
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 20, f"{name}: only {len(colours)} colours"
    inked = np.mean(np.any(pixels < 240, axis=2))
    assert inked > 0.02, f"{name}: {inked:.1%} of pixels drawn"


@pytest.fixture(scope="module")
def figures() -> dict[str, Figure]:
    return plots.draw_all(eval_inputs.plot_inputs())


@pytest.fixture(scope="module")
def rendered(figures: dict[str, Figure]) -> dict[str, bytes]:
    return {name: plots.render_png(fig) for name, fig in figures.items()}


def test_nineteen_distinct_plots(rendered: dict[str, bytes]) -> None:
    assert len(rendered) == 19
    assert list(rendered) == plots.plot_names(eval_inputs.FUSIONS)
    assert len(set(rendered.values())) == 19  # no two images alike


@pytest.mark.parametrize("name", plots.plot_names(eval_inputs.FUSIONS))
def test_each_plot_is_a_readable_png(rendered: dict[str, bytes], name: str) -> None:
    assert_readable(rendered[name], name)


def test_every_figure_has_title_labels_and_legend_where_needed(
    figures: dict[str, Figure], rendered: dict[str, bytes]
) -> None:
    for name, fig in figures.items():
        assert isinstance(fig, Figure)
        axes = [ax for ax in fig.axes if ax.get_visible()]
        title = fig.get_suptitle() or " ".join(ax.get_title() for ax in axes)
        assert title.strip(), f"{name}: no title"
        for ax in axes:
            assert ax.get_xlabel() and ax.get_ylabel(), f"{name}: unlabelled axes"
            series = len(ax.get_legend_handles_labels()[0])
            if series > 1:
                assert ax.get_legend() is not None, f"{name}: {series} series, no legend"


def test_fusion_keeps_its_colour_across_plots() -> None:
    inputs = eval_inputs.plot_inputs()
    roc = plots.plot_roc(inputs.curves, inputs.metrics)
    loss = plots.plot_train_loss(inputs.history)
    for fig in (roc, loss):
        by_label = {line.get_label().split()[0]: line.get_color() for line in fig.axes[0].lines}
        for fusion in eval_inputs.FUSIONS:
            assert by_label[fusion] == plots.FUSION_COLOURS[fusion]


def test_plots_without_logs_or_families_still_render() -> None:
    inputs = eval_inputs.plot_inputs(fusions=("mid",), families=False)
    empty = plots.PlotInputs(**{**inputs.__dict__, "history": {"mid": []}, "steps": {"mid": []}})
    figures = plots.draw_all(empty)
    assert len(figures) == 17  # one confusion matrix: one fusion ran
    for name in ("train-loss", "memory", "batch-throughput", "family-auc"):
        png = plots.render_png(figures[name])
        assert_readable(png, name)
    texts = [t.get_text() for t in figures["memory"].axes[0].texts]
    assert "no step records" in texts
    assert "no family labels" in figures["family-auc"].axes[0].get_title()


def test_memory_plot_draws_the_cap_and_marks_shrinks() -> None:
    inputs = eval_inputs.plot_inputs()
    fig = plots.plot_memory(inputs.steps, cap=0.8, shrink_threshold=0.7)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "cap 80%" in labels
    assert "early shrink" in labels


def test_render_png_is_deterministic() -> None:
    inputs = eval_inputs.plot_inputs()
    first = plots.render_png(plots.plot_metric_comparison(inputs.metrics))
    second = plots.render_png(plots.plot_metric_comparison(inputs.metrics))
    assert first == second


def run_history_inputs(n: int) -> tuple[list[str], dict, dict]:
    runs = [f"202611{d:02d}T020000Z" for d in range(1, n + 1)]
    auc = {f: [0.8 + 0.004 * i + o for i in range(n)] for f, o in (("early", 0), ("mid", 0.05))}
    auc["late"] = [None, *(0.9 + 0.002 * i for i in range(1, n))]  # late missing in the first run
    eer = {f: [0.3 - v for v in values if v is not None] for f, values in auc.items()}
    eer["late"] = [None, *eer["late"]]
    return runs, auc, eer


def test_run_history_plot_draws_one_line_per_fusion_and_shades_other_splits() -> None:
    runs, auc, eer = run_history_inputs(30)
    other = [i < 3 for i in range(30)]
    fig = plots.plot_run_history(runs, auc, eer, other_split=other)
    top, bottom = fig.axes
    for ax in (top, bottom):
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == ["early", "mid", "late"]
        assert [line.get_color() for line in lines] == [plots.colour(f) for f in auc]
        assert all(len(line.get_xdata()) == 30 for line in lines)
        assert ax.get_ylabel() and ax.get_legend() is not None
        assert "other test split" in ax.get_legend_handles_labels()[1]
        assert len(ax.patches) == 3  # one shaded span per run on another split
    assert "ROC-AUC" in top.get_title() and "EER" in bottom.get_title()
    labels = [t.get_text() for t in bottom.get_xticklabels()]
    assert labels[-1] == runs[-1] and 0 < sum(1 for t in labels if t) <= plots.MAX_RUN_TICKS
    assert_readable(plots.render_png(fig), "run-history")


def test_run_history_plot_of_one_run_and_bad_lengths() -> None:
    fig = plots.plot_run_history(["r1"], {"mid": [0.9]}, {"mid": [0.1]})
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["mid"]
    assert decode(plots.render_png(fig)).shape[2] == 3
    with pytest.raises(ValueError, match="auc of mid: 2 values for 1 runs"):
        plots.plot_run_history(["r1"], {"mid": [0.9, 0.8]}, {"mid": [0.1]})
