"""The story the evaluation summary opens with: the winner and its margin, the champion
decisions with both scores, the skipped files (listed up to a limit, the rest counted)."""

from __future__ import annotations

from pathlib import Path

from flows import artifacts
from tasks.evaluate.metrics import HEADLINE
from tasks.io.layout import Layout
from tasks.io.storage import LocalStorage
from tasks.refs import EvaluationRef, FeatureRef, ManifestRef
from tasks.runs.champions import ChampionDecision

RUN = "20261201T020000Z"


def aucs(**values: float) -> dict[str, dict[str, float]]:
    """Headline metrics per fusion: the given ROC-AUC, the others stand-ins."""
    return {f: {**dict.fromkeys(HEADLINE, 0.5), "roc_auc": v} for f, v in values.items()}


def test_winner_and_its_margin_over_the_runner_up() -> None:
    lines = artifacts.winner_lines(aucs(early=0.9611, mid=0.995, late=0.983))
    assert lines == ["**mid** wins: test ROC-AUC 0.9950, 0.0120 ahead of late (0.9830)."]


def test_margin_is_that_of_the_scores_as_shown() -> None:
    # 0.99504 - 0.98296 = 0.01208, but the text shows 0.9950 and 0.9830: the margin matches them
    lines = artifacts.winner_lines(aucs(mid=0.99504, late=0.98296))
    assert lines == ["**mid** wins: test ROC-AUC 0.9950, 0.0120 ahead of late (0.9830)."]


def test_a_tie_at_the_top_names_every_tied_fusion() -> None:
    lines = artifacts.winner_lines(aucs(early=0.9, mid=0.95001, late=0.95))
    assert lines == [
        "**mid** and **late** tie: test ROC-AUC 0.9500, 0.0500 ahead of early (0.9000)."
    ]
    assert artifacts.winner_lines(aucs(early=0.9, mid=0.9, late=0.9)) == [
        "**early**, **mid** and **late** tie: test ROC-AUC 0.9000 each."
    ]


def test_a_single_fusion_has_no_runner_up() -> None:
    assert artifacts.winner_lines(aucs(late=0.87654)) == [
        "**late** is the only fusion: test ROC-AUC 0.8765."
    ]
    assert artifacts.winner_lines({}) == []


def decision(**kw: object) -> ChampionDecision:
    base: dict[str, object] = {"fusion": "mid", "new_run": RUN, "reason": "r"}
    return ChampionDecision.model_validate({**base, **kw})


def test_decisions_carry_both_scores() -> None:
    first = decision(promoted=True, new_auc=0.9)
    assert artifacts.decision_line(first) == (
        "- **mid**: promoted, first champion: test ROC-AUC 0.9000 (this run)"
    )
    won = decision(promoted=True, new_auc=0.995, champion_run="R0", champion_auc=0.99)
    assert artifacts.decision_line(won) == (
        "- **mid**: promoted: test ROC-AUC 0.9950 (this run) vs 0.9900 (champion run R0, "
        "same test split)"
    )
    kept = decision(fusion="late", promoted=False, new_auc=0.983, champion_run="R0",
                    champion_auc=0.99)  # fmt: skip
    assert artifacts.decision_line(kept) == (
        "- **late**: champion kept: test ROC-AUC 0.9830 (this run) vs 0.9900 (champion run R0, "
        "same test split)"
    )
    other = decision(promoted=False, new_auc=0.97, champion_run="R0", champion_auc=0.99,
                     comparable=False)  # fmt: skip
    assert "champion kept" in artifacts.decision_line(other)
    assert "0.9700 (this run) vs 0.9900 (champion run R0" in artifacts.decision_line(other)
    assert "another test split: not comparable" in artifacts.decision_line(other)


def skips(n: int, prefix: str = "dataset/audio/fake/") -> list[dict[str, str]]:
    return [{"key": f"{prefix}{i}.wav", "reason": "not a WAV file"} for i in range(n)]


def test_skipped_files_are_listed_up_to_the_limit_and_the_rest_counted() -> None:
    lines = artifacts.skipped_lines(skips(53), "[skipped.json](/b/skipped.json)", limit=50)
    assert lines[0] == "**Skipped files: 53**"
    listed = [line for line in lines if line.startswith("- ")]
    assert len(listed) == 50
    assert listed[0] == "- `dataset/audio/fake/0.wav`: not a WAV file"
    assert "- `dataset/audio/fake/50.wav`: not a WAV file" not in lines
    assert lines[-1] == "… and 3 more; full list: [skipped.json](/b/skipped.json)."


def test_few_or_no_skipped_files() -> None:
    lines = artifacts.skipped_lines(skips(2), "[s](/s)")
    assert lines == [
        "**Skipped files: 2**",
        "",
        "- `dataset/audio/fake/0.wav`: not a WAV file",
        "- `dataset/audio/fake/1.wav`: not a WAV file",
        "",
        "Full list: [s](/s).",
    ]
    assert artifacts.skipped_lines([]) == ["**Skipped files:** none."]
    odd = [{"key": "a`b\nc.wav", "reason": "bad\nheader", "stage": "decode"}]
    assert artifacts.skipped_lines(odd)[2] == "- `a'b c.wav`: bad header (decode)"


def test_skipped_files_of_manifest_and_features_are_counted_once() -> None:
    listing = {"key": "dataset/images/real/x.gif", "reason": "not an image"}
    decode = {"key": "dataset/audio/fake/y.wav", "reason": "not a WAV file"}
    manifest = ManifestRef(run=RUN, key="m", uri="file:///m", n_pairs=1, counts={},
                           data_hash="d", skipped=[listing])  # fmt: skip
    features = FeatureRef(run=RUN, feature_hash="f", prefix="p/", shards={}, counts={},
                          skipped=[listing, decode])  # fmt: skip
    assert artifacts.skipped_files(manifest, features) == [listing, decode]
    assert artifacts.skipped_files(None, None) == []


def test_summary_opens_with_the_story(tmp_path: Path) -> None:
    store, layout = LocalStorage(str(tmp_path)), Layout()
    ref = EvaluationRef(run=RUN, metrics_key=layout.metrics(RUN), report_key=layout.report(RUN),
                        plot_keys=[], metrics=aucs(early=0.9, mid=0.995, late=0.983))  # fmt: skip
    features = FeatureRef(run=RUN, feature_hash="f", prefix="p/", shards={}, counts={},
                          skipped=skips(60), skipped_key=layout.skipped(RUN))  # fmt: skip
    decisions = [
        decision(promoted=True, new_auc=0.995, champion_run="R0", champion_auc=0.99),
        decision(fusion="late", promoted=False, new_auc=0.983, champion_run="R0",
                 champion_auc=0.99),
    ]  # fmt: skip
    text = artifacts.summary_markdown(store, ref, [], decisions=decisions, features=features)
    lines = text.splitlines()
    assert lines[0] == f"# Evaluation of run {RUN}"
    assert lines[2] == "**mid** wins: test ROC-AUC 0.9950, 0.0120 ahead of late (0.9830)."
    story_end = text.index("| fusion |")  # the metrics table comes after the story
    assert 0 < text.index("**Champions:**") < text.index("**Skipped files: 60**") < story_end
    assert "- **mid**: promoted: test ROC-AUC 0.9950 (this run) vs 0.9900" in text
    assert "- **late**: champion kept: test ROC-AUC 0.9830 (this run) vs 0.9900" in text
    full = store.link(layout.skipped(RUN))
    assert f"… and 10 more; full list: [{store.uri(layout.skipped(RUN))}]({full})." in text
    # a re-evaluation makes no decisions and says so
    again = artifacts.summary_markdown(store, ref, [])
    assert "no decisions in this run (re-evaluation: champions unchanged)" in again
    assert "**Skipped files:** none." in again
