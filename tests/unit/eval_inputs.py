"""Hand-built inputs of the evaluation in the training contract's formats: epoch and step logs
(JSON lines), emotion vectors (.npz), test-split predictions, and the refs that name them."""

from __future__ import annotations

import io
import json

import numpy as np

from tasks.evaluate import metrics as evaluation
from tasks.evaluate import plots
from tasks.evaluate.inference import Predictions
from tasks.io.layout import Layout
from tasks.io.storage import Storage
from tasks.refs import FeatureRef, ManifestRef, TrainedRef

FUSIONS = ("early", "mid", "late")
DIM = 8  # embedding size of the synthetic vectors


def predictions(fusion: str, n: int = 40, seed: int = 0, families: bool = True) -> Predictions:
    """Half real, half fake; fakes score higher on average, more so for later fusions."""
    rng = np.random.default_rng([seed, FUSIONS.index(fusion) if fusion in FUSIONS else 9])
    label = np.array([0, 1] * (n // 2))
    skill = 1.0 + FUSIONS.index(fusion) if fusion in FUSIONS else 1.0
    logit = skill * (2 * label - 1) + rng.normal(0, 1.2, n)
    score = (1 / (1 + np.exp(-logit))).astype(np.float32)
    audio = rng.normal(0, 1, (n, DIM)).astype(np.float32)
    image = np.where(label[:, None] == 0, audio, -audio) + rng.normal(0, 0.5, (n, DIM))
    names = np.array(["tts", "faceswap"])
    family = (
        np.where(label == 1, names[np.arange(n) % 4 // 2], "real")
        if families
        else np.array([""] * n)
    )
    return Predictions(
        score=score,
        logit=logit.astype(np.float32),
        label=label,
        audio_emb=audio,
        image_emb=image.astype(np.float32),
        family=family.astype(str),
        pair_id=np.array([f"pair-{i:04d}" for i in range(n)]),
    )


def epoch_records(fusion: str, epochs: int = 3) -> list[dict]:
    return [
        {
            "fusion": fusion,
            "epoch": e,
            "train_loss": 0.8 / e,
            "train_bce": 0.7 / e,
            "train_consistency": 0.1 / e,
            "train_acc": 0.5 + 0.1 * e,
            "val_loss": 0.9 / e + 0.05,
            "val_bce": 0.8 / e,
            "val_consistency": 0.12 / e,
            "val_acc": 0.45 + 0.1 * e,
            "samples_per_s": 30.0 + e,
            "batch_size": 16,
            "memory_percent": 40.0 + e,
            "seconds": 10.0,
            "time": f"2026-01-01T00:0{e}:00+00:00",
        }
        for e in range(1, epochs + 1)
    ]


def step_records(fusion: str, steps: int = 12, start: float = 1_767_225_600.0) -> list[dict]:
    out = []
    batch = 16
    for s in range(steps):
        event = None
        if s == 6:
            batch, event = batch // 2, "shrink"
        out.append(
            {
                "fusion": fusion,
                "epoch": 1 + s // 4,
                "step": s + 1,
                "time": start + 5.0 * s + FUSIONS.index(fusion),
                "batch_size": batch,
                "memory_percent": 50.0 + 2 * s,
                "samples_per_s": 25.0 + s % 3,
                "bce": 0.7 - 0.02 * s,
                "consistency": 0.1,
                "loss": 0.71 - 0.02 * s,
                "event": event,
            }
        )
    return out


def vectors_npz(fusion: str, n: int = 30) -> bytes:
    p = predictions(fusion, n, seed=1)
    buf = io.BytesIO()
    np.savez(buf, audio_emb=p.audio_emb, image_emb=p.image_emb, label=p.label, epoch=np.int64(3))
    return buf.getvalue()


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def write_training_outputs(
    store: Storage, layout: Layout, run: str, fusions: tuple[str, ...] = FUSIONS
) -> None:
    """What training leaves in the bucket for the evaluation to read: logs and emotion vectors."""
    for f in fusions:
        store.write_bytes(layout.epoch_log(f, run), jsonl(epoch_records(f)))
        store.write_bytes(layout.step_log(f, run), jsonl(step_records(f)))
        store.write_bytes(layout.emotion_vectors(f, run), vectors_npz(f))


def refs(
    run: str, fusions: tuple[str, ...] = FUSIONS
) -> tuple[FeatureRef, list[TrainedRef], ManifestRef]:
    layout = Layout()
    features = FeatureRef(
        run=run,
        feature_hash="abc123",
        prefix=layout.features("abc123"),
        shards={
            "train": [],
            "val": [],
            "test": [f"{layout.features('abc123')}test/shard-0000.npz"],
        },
        counts={
            "train": {"real": 60, "fake": 60},
            "val": {"real": 20, "fake": 20},
            "test": {"real": 20, "fake": 20},
        },
        skipped=[{"key": "dataset/audio/fake/<script>bad.wav", "reason": "not a WAV file"}],
    )
    trained = [
        TrainedRef(
            fusion=f,
            run=run,
            model_key=layout.model(f, run),
            epochs=3,
            best_epoch=3,
            best_val_loss=0.35,
        )
        for f in fusions
    ]
    manifest = ManifestRef(
        run=run,
        key=layout.manifest(run),
        uri=f"file:///b/{layout.manifest(run)}",
        n_pairs=200,
        counts={
            "train": {"real": 61, "fake": 60},
            "val": {"real": 20, "fake": 20},
            "test": {"real": 20, "fake": 20},
        },
        data_hash="d1",
        skipped=[{"key": "dataset/images/real/x.gif", "reason": "not an image"}],
    )
    return features, trained, manifest


def plot_inputs(fusions: tuple[str, ...] = FUSIONS, families: bool = True) -> plots.PlotInputs:
    """Everything the 19 plots draw, from the synthetic predictions and logs."""
    preds = {f: predictions(f, families=families) for f in fusions}
    docs = {
        f: evaluation.evaluate_scores(p.label, p.score, list(p.family), 0.5, 10)
        for f, p in preds.items()
    }
    vectors = {f: predictions(f, 30, seed=1) for f in fusions}
    return plots.PlotInputs(
        history={f: epoch_records(f) for f in fusions},
        steps={f: step_records(f) for f in fusions},
        curves={f: evaluation.curves(p.label, p.score, 10) for f, p in preds.items()},
        metrics={f: d["metrics"] for f, d in docs.items()},
        confusion={f: d["confusion"] for f, d in docs.items()},
        families={f: d["families"] for f, d in docs.items()},
        scores={f: (p.label, p.score) for f, p in preds.items()},
        similarity={
            f: (p.label, evaluation.cosine_similarity(p.audio_emb, p.image_emb))
            for f, p in preds.items()
        },
        projections={
            f: plots.Projection(
                xy=evaluation.project_2d(np.concatenate([v.audio_emb, v.image_emb])),
                label=np.concatenate([v.label, v.label]),
                modality=np.array(["audio"] * len(v.label) + ["image"] * len(v.label)),
                source="saved at epoch 3",
            )
            for f, v in vectors.items()
        },
        threshold=0.5,
        memory_cap=0.8,
        shrink_threshold=0.7,
    )
