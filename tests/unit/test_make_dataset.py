"""The synthetic benchmark: deterministic, laid out as the seed says, no metadata shortcut, every
artefact family present and measurable."""

from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from scipy import ndimage, signal
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier

from config.load import validate_config
from tasks.data import synthetic as make_dataset
from tasks.data.synthetic import (
    AUDIO_FAMILIES,
    EMOTIONS,
    FAKE_FAMILIES,
    IMAGE_FAMILIES,
    MISMATCH,
    PAIRS_COLUMNS,
    ensure_demo_dataset,
    plan_pairs,
)
from tasks.io.layout import Layout
from tasks.io.storage import open_storage
from tests.unit.synthetic_data import generated

N = 168  # 84 real pairs and 12 of each of the 7 fake families


@pytest.fixture(scope="module")
def bench() -> dict[str, bytes]:
    return generated(N, seed=5)


def pairs_of(objects: dict[str, bytes]) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(objects["dataset/pairs.csv"].decode())))


def read_audio(data: bytes) -> tuple[np.ndarray, int]:
    y, sr = sf.read(io.BytesIO(data), always_2d=True)
    return y.mean(axis=1), sr


def read_image(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)


def test_layout_labels_and_pairs_csv(bench: dict[str, bytes]) -> None:
    rows = pairs_of(bench)
    assert len(rows) == N
    assert tuple(rows[0]) == PAIRS_COLUMNS
    assert len(bench) == 2 * N + 1  # every pair's two files + pairs.csv
    families = Counter(r["family"] for r in rows)
    assert families["real"] == N // 2
    assert {f: families[f] for f in FAKE_FAMILIES} == {f: N // 2 // 7 for f in FAKE_FAMILIES}
    for r in rows:
        assert "dataset/" + r["audio_key"] in bench and "dataset/" + r["image_key"] in bench
        assert r["audio_key"].startswith("audio/") and r["audio_key"].endswith(".wav")
        assert r["image_key"].startswith("images/") and r["image_key"].endswith((".jpg", ".png"))
        assert r["label"] == ("0" if r["family"] == "real" else "1")
        audio_folder, image_folder = r["audio_key"].split("/")[1], r["image_key"].split("/")[1]
        assert audio_folder == ("fake" if r["family"] in AUDIO_FAMILIES else "real")
        assert image_folder == ("fake" if r["family"] in IMAGE_FAMILIES else "real")
        assert r["emotion"] in EMOTIONS and r["image_emotion"] in EMOTIONS
        # The emotion-mismatch family: two real files whose emotions disagree, labelled fake.
        assert (r["emotion"] != r["image_emotion"]) == (r["family"] == MISMATCH)


def test_deterministic_under_the_seed() -> None:
    first, again, other = generated(14, seed=3), generated(14, seed=3), generated(14, seed=4)
    assert first == again
    assert first.keys() != other.keys() or any(first[k] != other[k] for k in first)


def test_plan_is_balanced_and_refuses_tiny_n() -> None:
    specs = plan_pairs(70, seed=1)
    assert sum(s.label for s in specs) == 35
    assert Counter(s.family for s in specs if s.label) == {f: 5 for f in FAKE_FAMILIES}
    with pytest.raises(ValueError, match="at least 2"):
        plan_pairs(1, seed=1)


def metadata(objects: dict[str, bytes], row: dict[str, str]) -> list[float]:
    """What a shortcut-hunting classifier would look at: sizes, rate, duration, loudness, format."""
    wav, picture = objects["dataset/" + row["audio_key"]], objects["dataset/" + row["image_key"]]
    info = sf.info(io.BytesIO(wav))
    y, sr = read_audio(wav)
    loudness = 20 * np.log10(np.sqrt(np.mean(y**2)))
    lead = np.argmax(np.abs(y) > 0.1 * np.abs(y).max()) / sr  # leading silence, s
    img = Image.open(io.BytesIO(picture))
    return [
        len(wav),
        info.duration,
        sr,
        info.channels,
        loudness,
        lead,
        len(picture),
        img.size[0] * img.size[1],
        img.format == "PNG",
        len(img.getbands()),
    ]


def test_metadata_alone_cannot_separate_real_from_fake(bench: dict[str, bytes]) -> None:
    rows = pairs_of(bench)
    x = np.array([metadata(bench, r) for r in rows], dtype=np.float64)
    y = np.array([int(r["label"]) for r in rows])
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    for clf in (
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
        DecisionTreeClassifier(max_depth=3, random_state=0),
    ):
        score = cross_val_predict(clf, x, y, cv=folds, method="predict_proba")[:, 1]
        auc = roc_auc_score(y, score)
        assert auc < 0.65, f"{clf}: metadata separates real from fake (AUC {auc:.3f})"


def test_real_and_fake_share_formats(bench: dict[str, bytes]) -> None:
    rows = pairs_of(bench)
    by_label: dict[str, dict[str, set[object]]] = {"0": {}, "1": {}}
    for r in rows:
        info = sf.info(io.BytesIO(bench["dataset/" + r["audio_key"]]))
        img = Image.open(io.BytesIO(bench["dataset/" + r["image_key"]]))
        seen = by_label[r["label"]]
        seen.setdefault("rate", set()).add(info.samplerate)
        seen.setdefault("channels", set()).add(info.channels)
        seen.setdefault("subtype", set()).add(info.subtype)
        seen.setdefault("size", set()).add(img.size)
        seen.setdefault("format", set()).add(img.format)
        if img.format == "JPEG":  # same quantisation tables = same JPEG quality
            tables = img.quantization  # type: ignore[attr-defined]
            seen.setdefault("jpeg", set()).add(tuple(tuple(t) for t in tables.values()))
    assert by_label["0"] == by_label["1"]
    assert len(by_label["0"]["jpeg"]) == 1


# --- artefact families: each one measurable on the raw files ----------------------------------


def audio_features(data: bytes) -> dict[str, float]:
    y, sr = read_audio(data)
    f, _, spec = signal.stft(y, fs=sr, nperseg=512, noverlap=384)
    power = np.abs(spec) ** 2
    loud = power.sum(0) > np.percentile(power.sum(0), 50)
    band = np.log(power[(f > 3000) & (f < 7500)].sum(0) + 1e-12)
    return {
        "hf_share": float(power[f > 4500].sum() / power.sum()),  # energy above 4.5 kHz
        "hf_flutter": float(np.std(np.diff(band[loud]))),  # frame-to-frame change, 3-7.5 kHz
        "brightness": float(  # 1.5-4 kHz vs below 1 kHz in loud frames
            power[(f > 1500) & (f < 4000)][:, loud].sum() / power[f < 1000][:, loud].sum()
        ),
    }


def image_features(data: bytes) -> dict[str, float]:
    img = read_image(data)
    s = img.shape[0]
    grey = img.mean(axis=2)
    spectrum = np.abs(np.fft.fft2(grey - grey.mean()))
    k = 8  # the coarse upsampling grid has period s/8
    peak = (spectrum[k, k] + spectrum[-k, k] + spectrum[k, -k] + spectrum[-k, -k]) / 4
    y, x = np.mgrid[0:s, 0:s] / s
    r = np.sqrt(((x - 0.5) / 0.22) ** 2 + ((y - 0.58) / 0.27) ** 2)  # 1 on the blend's outline
    on_outline = grey[(r > 0.93) & (r < 1.07)].mean()
    beside = grey[((r > 0.75) & (r < 0.88)) | ((r > 1.12) & (r < 1.25))].mean()
    dog = ndimage.gaussian_filter(img, (s / 64, s / 64, 0)) - ndimage.gaussian_filter(
        img, (s / 16, s / 16, 0)
    )
    return {
        "grid_peak": float(peak / np.median(spectrum[4:13, 4:13])),
        "seam": float(on_outline / beside),  # < 1 where a dark blending seam runs
        "detail": float(np.percentile(np.abs(dog).mean(axis=2), 95)),
    }


@pytest.fixture(scope="module")
def family_means(bench: dict[str, bytes]) -> dict[str, dict[str, float]]:
    per_family: dict[str, list[dict[str, float]]] = {}
    for r in pairs_of(bench):
        feats = audio_features(bench["dataset/" + r["audio_key"]])
        feats.update(image_features(bench["dataset/" + r["image_key"]]))
        per_family.setdefault(r["family"], []).append(feats)
    return {
        fam: {name: float(np.mean([f[name] for f in items])) for name in items[0]}
        for fam, items in per_family.items()
    }


def test_fake_audio_differs_from_real_in_high_frequencies(
    bench: dict[str, bytes], family_means: dict[str, dict[str, float]]
) -> None:
    rows = pairs_of(bench)
    folder = {"real": [], "fake": []}  # type: dict[str, list[float]]
    for r in rows:
        hf = audio_features(bench["dataset/" + r["audio_key"]])["hf_share"]
        folder[r["audio_key"].split("/")[1]].append(hf)
    assert np.mean(folder["fake"]) < 0.5 * np.mean(folder["real"])  # the issue's own example

    real = family_means["real"]
    assert family_means["vocoder_bandlimit"]["hf_share"] < 0.05 * real["hf_share"]
    assert family_means["griffin_lim"]["hf_flutter"] < 0.7 * real["hf_flutter"]
    assert family_means["buzzy_excitation"]["brightness"] > 2.5 * real["brightness"]
    # Emotion mismatch and image fakes keep real audio: no audio artefact.
    for fam in (MISMATCH, *IMAGE_FAMILIES):
        assert family_means[fam]["hf_share"] == pytest.approx(real["hf_share"], rel=0.5)


def test_fake_images_carry_generator_traces(family_means: dict[str, dict[str, float]]) -> None:
    real = family_means["real"]
    assert family_means["upsample_checkerboard"]["grid_peak"] > 4 * real["grid_peak"]
    assert family_means["face_blend"]["seam"] < 0.85 * real["seam"]
    assert family_means["smooth_renoise"]["detail"] < 0.9 * real["detail"]
    for fam in (MISMATCH, *AUDIO_FAMILIES):
        assert family_means[fam]["grid_peak"] == pytest.approx(real["grid_peak"], rel=0.5)


def pitch_hz(y: np.ndarray, sr: int) -> float:
    """Median autocorrelation pitch of the loud 40 ms frames."""
    y = signal.sosfiltfilt(signal.butter(4, 600, fs=sr, output="sos"), y)
    n = int(0.04 * sr)
    frames = np.lib.stride_tricks.sliding_window_view(y, n)[:: n // 2]
    energy = (frames**2).mean(axis=1)
    lo, hi = int(sr / 400), int(sr / 70)
    found = []
    for frame in frames[energy > 0.3 * energy.max()]:
        ac = np.correlate(frame - frame.mean(), frame - frame.mean(), "full")[n - 1 :]
        found.append(sr / (lo + np.argmax(ac[lo:hi])))
    return float(np.median(found))


def syllable_rate(y: np.ndarray, sr: int) -> float:
    env = ndimage.uniform_filter1d(np.abs(signal.hilbert(y)), int(0.02 * sr))
    onsets = np.sum(np.diff((env > 0.3 * env.max()).astype(int)) == 1)
    return float(onsets / (len(y) / sr))


def test_emotions_are_audible_in_pitch_and_rate(bench: dict[str, bytes]) -> None:
    """Happy is high, sad low and slow, angry quick: the voice carries the emotion."""
    by_emotion: dict[str, list[tuple[float, float]]] = {}
    for r in pairs_of(bench):
        if r["family"] != "real":
            continue
        y, sr = read_audio(bench["dataset/" + r["audio_key"]])
        by_emotion.setdefault(r["emotion"], []).append((pitch_hz(y, sr), syllable_rate(y, sr)))
    mean = {e: np.mean(v, axis=0) for e, v in by_emotion.items()}
    assert mean["happy"][0] > mean["neutral"][0] > mean["sad"][0]  # pitch
    assert mean["angry"][1] > mean["neutral"][1] > mean["sad"][1]  # syllables per second


# --- writing -----------------------------------------------------------------------------------


def test_ensure_demo_dataset_writes_once_and_only_when_allowed(tmp_path: Path) -> None:
    on = validate_config(
        {"storage": {"uri": str(tmp_path / "b")}, "generator": {"fill_empty_dataset": True}}
    )
    store = open_storage(on.storage)
    assert ensure_demo_dataset(store, Layout(), on.generator, n=6) == 6
    keys = [o.key for o in store.list("dataset/")]
    assert len(keys) == 13 and "dataset/pairs.csv" in keys
    assert ensure_demo_dataset(store, Layout(), on.generator, n=6) == 0  # data there: no write
    assert len(list(store.list("dataset/"))) == 13

    off = validate_config({"storage": {"uri": str(tmp_path / "c")}})
    assert off.generator.fill_empty_dataset is False  # production default
    off_store = open_storage(off.storage)
    assert ensure_demo_dataset(off_store, Layout(), off.generator, n=6) == 0
    assert list(off_store.list("dataset/")) == []


def test_cli_writes_to_s3_and_refuses_a_full_dataset(
    tmp_path: Path, s3_server, capsys: pytest.CaptureFixture[str]
) -> None:
    bucket = s3_server.new_bucket()
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"storage:\n  uri: s3://{bucket}\n  endpoint_url: {s3_server.endpoint_url}\n")
    assert make_dataset.main(["--config", str(cfg), "--n", "4", "--seed", "9"]) == 0
    store = open_storage(
        validate_config(
            {"storage": {"uri": f"s3://{bucket}", "endpoint_url": s3_server.endpoint_url}}
        ).storage
    )
    keys = sorted(o.key for o in store.list("dataset/"))
    assert len(keys) == 9
    assert keys == sorted(generated(4, seed=9))  # same files as the in-memory generator
    assert make_dataset.main(["--config", str(cfg), "--n", "4"]) == 2
    assert "already holds objects" in capsys.readouterr().err
    assert make_dataset.main(["--config", str(cfg), "--n", "4", "--seed", "9", "--force"]) == 0


@pytest.mark.slow
def test_small_cnns_learn_the_artefacts_in_a_few_epochs() -> None:
    """At the tests' tiny sizes (32 mel bands x 32 frames, 32 px images) a three-layer CNN per
    modality finds the audio fakes in 3 epochs and the image fakes in 6, on held-out pairs."""
    import torch
    from torch import nn

    from tasks.data.decode import preprocess_audio, preprocess_image
    from tasks.data.manifest import split_of

    objects = generated(280, seed=8)
    rows = pairs_of(objects)
    data = validate_config({"data": {"n_mels": 32, "spec_frames": 32, "image_size": 32}}).data
    audio = torch.tensor(
        np.stack([preprocess_audio(objects["dataset/" + r["audio_key"]], data) for r in rows])
    )  # (N, 1, 32, 32)
    image = (
        torch.tensor(
            np.stack([preprocess_image(objects["dataset/" + r["image_key"]], data) for r in rows])
        ).float()
        / 255.0
    )  # (N, 3, 32, 32)
    test = torch.tensor([split_of(r["audio_key"], 0.0001, 0.3) == "test" for r in rows])
    train_idx, test_idx = torch.nonzero(~test).squeeze(1), torch.nonzero(test).squeeze(1)

    for inputs, families, epochs, floor in (
        (audio, AUDIO_FAMILIES, 3, 0.9),
        (image, IMAGE_FAMILIES, 6, 0.8),
    ):
        target = torch.tensor([float(r["family"] in families) for r in rows])  # (N,)
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Conv2d(inputs.shape[1], 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 1),
        )  # fmt: skip
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        for _ in range(epochs):
            net.train()
            for batch in train_idx[torch.randperm(len(train_idx))].split(16):
                logit = net(inputs[batch]).squeeze(1)
                loss = nn.functional.binary_cross_entropy_with_logits(logit, target[batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval()
        with torch.no_grad():
            score = net(inputs[test_idx]).squeeze(1).numpy()
        auc = roc_auc_score(target[test_idx].numpy(), score)
        assert auc > floor, f"{families}: held-out AUC {auc:.3f} after {epochs} epochs"
