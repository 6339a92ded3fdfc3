"""Scoring new media (tasks/evaluate/detect.py) on a local bucket with hand-saved model files: the
argument rules, one pair scored exactly as the model's own preprocessing and operating point say
(crop mode, settings from the model file, not today's config), bad files skipped and listed, pairs
found under a prefix, and the errors when there is nothing to score with."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from config.schema import DataConfig, ModelConfig, PipelineConfig, StorageConfig
from flows.common import run_cli
from flows.detect import main, parser
from models import build_model
from tasks.data.decode import preprocess_audio, preprocess_image
from tasks.errors import CheckpointError, ConfigError, DataError
from tasks.evaluate import detect
from tasks.evaluate.calibration import OperatingPoint
from tasks.io import records
from tasks.io.layout import Layout
from tasks.io.storage import LocalStorage, open_storage
from tasks.runs.champions import Champion
from tasks.train.checkpoint import save_model

RUN = "20260101T000000Z"
# The settings the models were trained with: crop mode, tiny inputs.
TRAINED = PipelineConfig(
    data=DataConfig(
        n_mels=16, spec_frames=16, image_size=32, image_mode="crop", crop_margin=8, clip_seconds=0.5
    ),
    model=ModelConfig(embedding_dim=16),
)
POINTS = {
    "early": OperatingPoint(threshold=0.45, temperature=2.0, rule="eer", target_fpr=None, n_val=9),
    "mid": OperatingPoint(threshold=0.6, temperature=0.5, rule="fpr", target_fpr=0.05, n_val=9),
}


def wav_bytes(seed: int, seconds: float = 0.7, sr: int = 22050) -> bytes:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    y = 0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + 0.05 * rng.normal(size=t.size)
    buf = io.BytesIO()
    sf.write(buf, y.astype(np.float32), sr, format="WAV")
    return buf.getvalue()


def png_bytes(seed: int, size: tuple[int, int] = (57, 45)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def fill(store) -> dict[str, torch.nn.Module]:
    """An early and a mid champion (no late one), trained in crop mode, and three pairs of new
    media under incoming/; returns the models."""
    layout = Layout()
    models = {}
    for fusion, point in POINTS.items():
        torch.manual_seed(0)
        model = build_model(fusion, TRAINED).eval()
        key = layout.model(fusion, RUN)
        extra = {"operating_point": point.as_dict()}
        save_model(store, key, model, TRAINED, fusion, 1, 0.5, extra=extra)
        champion = Champion(
            fusion=fusion, run=RUN, auc=0.9, model_key=key, split_hash="x",
            promoted_at="2026-01-01T00:00:00+00:00",
        )  # fmt: skip
        records.write_json(store, layout.champion(fusion), champion.model_dump(mode="json"))
        models[fusion] = model
    for i in range(3):
        store.write_bytes(f"incoming/audio/clip{i}.wav", wav_bytes(i))
        store.write_bytes(f"incoming/images/clip{i}.png", png_bytes(i))
    return models


@pytest.fixture
def bucket(tmp_path: Path) -> tuple[PipelineConfig, LocalStorage, dict[str, torch.nn.Module]]:
    """A local bucket `fill`ed; the config used to score has today's defaults (resize, 224 px),
    which must not apply."""
    root = tmp_path / "bucket"
    cfg = PipelineConfig(storage=StorageConfig(uri=str(root)))
    store = LocalStorage(str(root))
    return cfg, store, fill(store)


def expected_score(model: torch.nn.Module, audio: bytes, image: bytes, point: OperatingPoint):
    """What the model says by hand: its own settings, float16 log-mel as in a shard, the centre
    32 x 32 of the stored native square, sigmoid(logit / T)."""
    mel = preprocess_audio(audio, TRAINED.data).astype(np.float16).astype(np.float32)
    square = preprocess_image(image, TRAINED.data)  # (3, 40, 40): native pixels
    assert square.shape == (3, 40, 40)
    centre = square[:, 4:36, 4:36].astype(np.float32) / 255.0
    with torch.inference_mode():
        logit = model(torch.from_numpy(mel)[None], torch.from_numpy(centre)[None]).logit
    return float(torch.sigmoid(logit / point.temperature)[0])


def read_rows(store, uri: str) -> list[dict[str, str]]:
    key = uri[len(store.root_uri) + 1 :]
    return list(csv.DictReader(io.StringIO(store.read_bytes(key).decode())))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give exactly one of --audio A --image I, --pairs FILE, --prefix P (given: none)"),
        (["--audio", "a.wav"], "--audio needs --image"),
        (["--image", "a.png"], "--image needs --audio"),
        (["--pairs", "p.csv", "--prefix", "x/"], "(given: --pairs, --prefix)"),
        (["--audio", "a.wav", "--image", "b.png", "--pairs", "p.csv"], "--audio/--image, --pairs"),
    ],
)
def test_argument_errors_exit_2_before_anything_runs(args, message, tmp_path, capsys) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"storage:\n  uri: {tmp_path / 'bucket'}\n")
    assert run_cli(main, parser(), ["--config", str(cfg), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "bucket").exists()  # refused before any work


def test_bad_config_key_exits_2_naming_it(tmp_path, capsys) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("evaluaton:\n  device: cpu\n")
    assert run_cli(main, parser(), ["--config", str(cfg), "--prefix", "x/"]) == 2
    assert "evaluaton: unknown setting" in capsys.readouterr().err


def test_one_local_pair_scored_with_the_models_own_settings_and_point(bucket, tmp_path) -> None:
    cfg, store, models = bucket
    audio, image = tmp_path / "voice.wav", tmp_path / "face.png"
    audio.write_bytes(wav_bytes(7))
    image.write_bytes(png_bytes(7, (70, 51)))

    ref = detect.detect(cfg, store, audio=str(audio), image=str(image))

    assert ref.models == {f: Layout().model(f, RUN) for f in POINTS}  # no late champion
    assert ref.thresholds == {f: p.threshold for f, p in POINTS.items()}
    assert ref.scores_uri.startswith(store.uri("outputs/detections/"))
    [row] = read_rows(store, ref.scores_uri)
    assert list(row) == [
        "audio_key", "image_key", "score_early", "decision_early", "score_mid", "decision_mid"
    ]  # fmt: skip
    assert (row["audio_key"], row["image_key"]) == (str(audio), str(image))
    for fusion, point in POINTS.items():
        want = expected_score(models[fusion], audio.read_bytes(), image.read_bytes(), point)
        assert float(row[f"score_{fusion}"]) == pytest.approx(want, abs=1e-6)
        assert row[f"decision_{fusion}"] == ("fake" if want >= point.threshold else "real")
    assert ref.n_scored == 1 and ref.skipped == []


def test_champions_with_references_give_the_ensembles_verdict_too(bucket, tmp_path) -> None:
    """Model files that keep their validation reals' scores: the pair also gets the ensemble's
    score (the mean of each calibrated score's rank among its fusion's reference) and decision."""
    cfg, store, models = bucket
    refs = {"early": (0.2, 0.4, 0.6, 0.8), "mid": (0.1, 0.3, 0.5, 0.7, 0.9)}
    points = {f: OperatingPoint(p.threshold, p.temperature, p.rule, p.target_fpr, p.n_val, refs[f])
              for f, p in POINTS.items()}  # fmt: skip
    for fusion, point in points.items():
        extra = {"operating_point": point.as_metadata()}
        save_model(store, Layout().model(fusion, RUN), models[fusion], TRAINED, fusion, 1, 0.5,
                   extra=extra)  # fmt: skip
    audio, image = tmp_path / "voice.wav", tmp_path / "face.png"
    audio.write_bytes(wav_bytes(7))
    image.write_bytes(png_bytes(7, (70, 51)))

    ref = detect.detect(cfg, store, audio=str(audio), image=str(image))

    [row] = read_rows(store, ref.scores_uri)
    assert list(row)[-2:] == ["score_ensemble", "decision_ensemble"]
    ranks, scores = [], []
    for fusion, point in points.items():
        want = expected_score(models[fusion], audio.read_bytes(), image.read_bytes(), point)
        below = sum(r < want for r in refs[fusion]) + 0.5 * sum(r == want for r in refs[fusion])
        ranks.append(below / len(refs[fusion]))
        scores.append(want)
    tie = 0.5 / (2 * 2 * 5)  # ties broken by the mean probability, at half the finest step
    combined = (np.mean(ranks) + tie * np.mean(scores)) / (1 + tie)
    assert float(row["score_ensemble"]) == pytest.approx(combined, abs=1e-9)
    at_rank = np.mean(
        [sum(r < p.threshold for r in refs[f]) / len(refs[f]) for f, p in points.items()]
    )
    at = (at_rank + tie * np.mean([p.threshold for p in points.values()])) / (1 + tie)
    assert ref.thresholds["ensemble"] == pytest.approx(at)
    assert row["decision_ensemble"] == ("fake" if combined >= at else "real")


def test_bad_files_are_skipped_and_listed_the_rest_scored(bucket, tmp_path) -> None:
    cfg, store, models = bucket
    store.write_bytes("incoming/audio/truncated.wav", wav_bytes(5)[:60])
    store.write_bytes("incoming/images/text.png", b"this is not a picture")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(
        "audio_key,image_key,note\n"
        "incoming/audio/clip0.wav,incoming/images/clip0.png,good\n"
        "incoming/audio/truncated.wav,incoming/images/clip1.png,bad audio\n"
        "incoming/audio/clip1.wav,incoming/images/text.png,bad image\n"
        "incoming/audio/gone.wav,incoming/images/clip1.png,missing\n"
        "incoming/audio/clip2.wav,incoming/images/clip2.png,good\n"
    )
    out = tmp_path / "out" / "scores.csv"
    out.parent.mkdir()

    ref = detect.detect(cfg, store, pairs=str(pairs), out=str(out))

    rows = list(csv.DictReader(out.open()))
    assert [r["audio_key"] for r in rows] == [
        "incoming/audio/clip0.wav",
        "incoming/audio/clip2.wav",
    ]
    for row in rows:
        audio = store.read_bytes(row["audio_key"])
        image = store.read_bytes(row["image_key"])
        want = expected_score(models["mid"], audio, image, POINTS["mid"])
        assert float(row["score_mid"]) == pytest.approx(want, abs=1e-6)
    listed = json.loads((tmp_path / "out" / "scores.skipped.json").read_text())
    reasons = {s["key"]: s["reason"] for s in listed["skipped"]}
    assert listed["n_skipped"] == 3 and ref.skipped == listed["skipped"]
    assert "truncated" in reasons["incoming/audio/truncated.wav"]
    assert "not a readable image" in reasons["incoming/images/text.png"]
    assert "neither a local file nor an object" in reasons["incoming/audio/gone.wav"]
    assert (ref.n_pairs, ref.n_scored) == (5, 2)


def test_nothing_scorable_is_an_error_pointing_at_the_list(bucket) -> None:
    cfg, store, _ = bucket
    with pytest.raises(
        DataError, match=r"no pair could be scored: the pair has a file .*\(see .*/skipped\.json\)"
    ):
        detect.detect(cfg, store, audio="incoming/audio/nope.wav", image="incoming/images/x.png")


def test_prefix_pairs_unlabelled_media_by_name(bucket) -> None:
    cfg, store, _ = bucket
    store.write_bytes("incoming/audio/lonely.wav", wav_bytes(9))
    ref = detect.detect(cfg, store, prefix="incoming")
    keys = [(r["audio_key"], r["image_key"]) for r in read_rows(store, ref.scores_uri)]
    assert keys == [
        (f"incoming/audio/clip{i}.wav", f"incoming/images/clip{i}.png") for i in (0, 1, 2)
    ]
    reason = "no image file named lonely.* to pair it with"
    assert ref.skipped == [
        {"key": "incoming/audio/lonely.wav", "reason": reason, "stage": "pairing"}
    ]


def test_pairs_csv_without_the_key_columns_names_them(bucket, tmp_path) -> None:
    cfg, store, _ = bucket
    pairs = tmp_path / "p.csv"
    pairs.write_text("audio,image\na.wav,b.png\n")
    with pytest.raises(DataError, match=r"p\.csv: missing column\(s\) audio_key, image_key"):
        detect.detect(cfg, store, pairs=str(pairs))


def test_no_champion_and_unknown_run_name_the_keys(bucket, tmp_path) -> None:
    cfg, store, _ = bucket
    with pytest.raises(CheckpointError) as info:
        detect.detect(cfg, store, prefix="incoming", run="20990101T000000Z")
    assert "run '20990101T000000Z' has no model" in str(info.value)
    assert "outputs/models/early/20990101T000000Z/model.pt" in str(info.value)
    assert f"runs with models: {RUN}" in str(info.value)

    empty = LocalStorage(str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match=r"no fusion has a champion: .*late/champion\.json"):
        detect.detect(cfg, empty, prefix="incoming")
    with pytest.raises(ConfigError, match="--image needs --audio"):
        detect.detect(cfg, store, image="x.png")


def test_on_s3_a_pairs_key_scores_into_the_bucket(s3_server, s3_bucket) -> None:
    cfg = PipelineConfig(
        storage=StorageConfig(uri=f"s3://{s3_bucket}", endpoint_url=s3_server.endpoint_url)
    )
    store = open_storage(cfg.storage)
    models = fill(store)
    store.write_bytes(
        "incoming/pairs.csv",
        b"audio_key,image_key\nincoming/audio/clip1.wav,incoming/images/clip2.png\n"
        b"incoming/audio/clip9.wav,incoming/images/clip2.png\n",
    )

    ref = detect.detect(cfg, store, pairs="incoming/pairs.csv")

    assert ref.scores_uri.startswith(f"s3://{s3_bucket}/outputs/detections/")
    [row] = read_rows(store, ref.scores_uri)
    audio, image = wav_bytes(1), png_bytes(2)
    for fusion, point in POINTS.items():
        want = expected_score(models[fusion], audio, image, point)
        assert float(row[f"score_{fusion}"]) == pytest.approx(want, abs=1e-6)
    skipped_key = ref.skipped_uri[len(f"s3://{s3_bucket}/") :]
    listed = json.loads(store.read_bytes(skipped_key))
    assert [s["key"] for s in listed["skipped"]] == ["incoming/audio/clip9.wav"]
    assert f"s3://{s3_bucket}/incoming/audio/clip9.wav" in listed["skipped"][0]["reason"]


def test_prefix_with_an_unlabelled_pairs_csv_takes_its_rows(bucket) -> None:
    cfg, store, _ = bucket
    store.write_bytes(
        "incoming/pairs.csv",
        b"audio_key,image_key\naudio/clip2.wav,images/clip0.png\n"
        b"incoming/audio/clip0.wav,incoming/images/clip1.png\n",
    )
    ref = detect.detect(cfg, store, prefix="incoming/")
    keys = [(r["audio_key"], r["image_key"]) for r in read_rows(store, ref.scores_uri)]
    assert keys == [
        ("incoming/audio/clip2.wav", "incoming/images/clip0.png"),
        ("incoming/audio/clip0.wav", "incoming/images/clip1.png"),
    ]


def test_labelled_prefix_without_pairs_names_the_prefix(bucket) -> None:
    cfg, store, _ = bucket
    store.write_bytes("lonely/audio/real/a.wav", wav_bytes(1))
    with pytest.raises(DataError, match=r"lonely/: no pairs under this prefix \(1 audio and 0"):
        detect.detect(cfg, store, prefix="lonely")
