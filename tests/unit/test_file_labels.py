"""Each file's own label (its real/ or fake/ folder) travels from the listing through the manifest
and the feature shards to each fusion's per-modality heads, which learn it."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from config.schema import PipelineConfig, TrainingConfig
from models import (
    TRAINING_ONLY,
    EarlyFusionModel,
    FusionOutput,
    LateFusionModel,
    MidFusionModel,
    build_model,
)
from tasks.data.manifest import read_manifest
from tasks.data.shards import InMemoryShard, collate, decode_shard, encode_shard, read_shard
from tasks.errors import DataError
from tasks.io.storage import Storage, open_storage
from tasks.train.fit import log_epoch
from tasks.train.objective import Objective
from tests.unit.synthetic_data import features_of, generated, load_into, manifest_of, tiny_config


def folder_label(key: str) -> int:
    """dataset/<modality>/<real|fake>/... -> 0 | 1."""
    return {"real": 0, "fake": 1}[key.split("/")[2]]


@pytest.fixture(scope="module")
def bench() -> dict[str, bytes]:
    return generated(28, seed=5)  # 14 fakes over the 7 families: every family twice


@pytest.fixture
def loaded(tmp_path: Path, bench: dict[str, bytes]) -> tuple[PipelineConfig, Storage]:
    """A local bucket holding the benchmark (with its pairs.csv)."""
    cfg = tiny_config("local", tmp_path)
    store = open_storage(cfg.storage)
    load_into(store, bench)
    return cfg, store


def test_manifest_and_shards_carry_each_files_folder_label(
    loaded: tuple[PipelineConfig, Storage],
) -> None:
    cfg, store = loaded
    manifest = manifest_of(store, cfg, "r1")
    rows = read_manifest(store, manifest.key)
    for r in rows:
        assert (r.audio_label, r.image_label) == (
            folder_label(r.audio_key),
            folder_label(r.image_key),
        )
    # fake pairs that fake one modality only, or neither (emotion mismatch), are all there
    kinds = {(r.label, r.audio_label, r.image_label) for r in rows}
    assert {(1, 1, 0), (1, 0, 1), (1, 0, 0), (0, 0, 0)} <= kinds

    features = features_of(store, cfg, manifest)
    by_pair = {r.pair_id: (r.audio_label, r.image_label) for r in rows}
    seen = 0
    for keys in features.shards.values():
        for key in keys:
            shard = read_shard(store, key)
            assert shard["file_label"].dtype == np.int8 and shard["file_label"].shape[1] == 2
            for pid, labels in zip(shard["pair_id"], shard["file_label"], strict=True):
                assert tuple(int(v) for v in labels) == by_pair[str(pid)]
                seen += 1
    assert seen == len(rows)


def test_without_pairs_csv_both_files_of_a_pair_have_its_label(
    loaded: tuple[PipelineConfig, Storage],
) -> None:
    cfg, store = loaded
    store.delete("dataset/pairs.csv")
    rows = read_manifest(store, manifest_of(store, cfg, "r2").key)
    assert rows and all(r.audio_label == r.image_label == r.label for r in rows)


def test_a_manifest_written_before_the_file_labels_reads_them_as_unknown(
    loaded: tuple[PipelineConfig, Storage],
) -> None:
    cfg, store = loaded
    key = manifest_of(store, cfg, "old").key
    table = pq.read_table(io.BytesIO(store.read_bytes(key)))
    old = table.drop_columns(["audio_label", "image_label"])
    buf = io.BytesIO()
    pq.write_table(old, buf)
    store.write_bytes(key, buf.getvalue())
    rows = read_manifest(store, key)
    assert len(rows) == table.num_rows
    assert {(r.audio_label, r.image_label) for r in rows} == {(-1, -1)}


def tiny_shard(file_label: np.ndarray | None) -> dict[str, np.ndarray]:
    n = 4
    return decode_shard(
        encode_shard(
            audio=np.zeros((n, 1, 8, 8), np.float32),
            image=np.zeros((n, 3, 8, 8), np.uint8),
            label=np.array([0, 1, 1, 1], np.int8),
            pair_id=[f"p{i}" for i in range(n)],
            family=["real", "a", "b", "c"],
            file_label=file_label,
        )
    )


def test_shards_default_each_file_to_the_pairs_label_and_check_the_shape() -> None:
    assert tiny_shard(None)["file_label"].tolist() == [[0, 0], [1, 1], [1, 1], [1, 1]]
    given = np.array([[0, 0], [1, 0], [0, 1], [-1, -1]], np.int8)
    assert tiny_shard(given)["file_label"].tolist() == given.tolist()
    with pytest.raises(ValueError, match="file_label has shape"):
        tiny_shard(np.zeros((4, 3), np.int8))


def test_a_shard_written_before_the_file_labels_reads_them_as_unknown() -> None:
    shard = tiny_shard(None)
    buf = io.BytesIO()
    np.savez(buf, **{k: v for k, v in shard.items() if k != "file_label"})
    old = decode_shard(buf.getvalue(), "old.npz")
    assert old["file_label"].tolist() == [[-1, -1]] * 4 and old["file_label"].dtype == np.int8
    assert old["label"].tolist() == [0, 1, 1, 1]
    buf = io.BytesIO()
    np.savez(buf, **{k: v for k, v in shard.items() if k not in ("file_label", "family")})
    with pytest.raises(DataError, match=r"old\.npz: not a readable feature shard .*family"):
        decode_shard(buf.getvalue(), "old.npz")


def test_batches_hold_the_file_labels() -> None:
    given = np.array([[0, 0], [1, 0], [0, 1], [-1, -1]], np.int8)
    batch = collate(list(InMemoryShard(tiny_shard(given))))
    assert batch["file_label"].dtype == torch.float32
    assert batch["file_label"].tolist() == given.astype(float).tolist()


def objective(weight: float) -> Objective:
    tcfg = TrainingConfig(file_label_weight=weight, consistency_weight=0.0)
    return Objective.build(tcfg, [], {"real": 1, "fake": 1})


def output(file_logits: torch.Tensor, b: int | None = None) -> FusionOutput:
    b = file_logits.shape[0] if b is None else b
    logit = torch.zeros(b)
    emb = torch.ones(b, 4)
    return FusionOutput(logit, torch.sigmoid(logit), emb, emb, file_logits=file_logits)


def test_the_file_term_is_the_bce_of_the_known_files_only() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0], [-4.0, 7.0]], requires_grad=True)
    target = torch.tensor([[0.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])
    batch = {"label": torch.tensor([1.0, 1.0, 0.0]), "file_label": target}
    parts = objective(2.0)(output(logits), batch, torch.device("cpu"))
    known = target >= 0
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[known].detach(), target[known]
    )
    assert parts.file is not None and float(parts.file.detach()) == pytest.approx(float(expected))
    assert float(parts.total.detach()) == pytest.approx(
        float(parts.bce.detach()) + 2.0 * float(expected)
    )
    parts.total.backward()
    assert logits.grad is not None
    assert (logits.grad[~known] == 0).all() and (logits.grad[known] != 0).all()
    # pushed towards each file's own label: down for a real file, up for a fake one
    assert logits.grad[0, 0] > 0 and logits.grad[0, 1] < 0 and logits.grad[1, 0] < 0

    none_known = {**batch, "file_label": torch.full((3, 2), -1.0)}
    nothing = objective(1.0)(output(logits.detach()), none_known, torch.device("cpu")).file
    assert nothing is not None and float(nothing) == 0.0


def test_weight_zero_or_a_fusion_without_heads_leaves_the_loss_alone() -> None:
    batch = {"label": torch.tensor([1.0, 0.0]), "file_label": torch.tensor([[1.0, 0.0]] * 2)}
    off = objective(0.0)(output(torch.zeros(2, 2)), batch, torch.device("cpu"))
    assert off.file is None and float(off.total) == pytest.approx(float(off.bce))
    no_heads = objective(1.0)(output(torch.zeros(0, 0), b=2), batch, torch.device("cpu"))
    assert no_heads.file is None


def test_late_fusion_returns_its_audio_and_image_heads_logits() -> None:
    torch.manual_seed(0)
    model = LateFusionModel(embedding_dim=16).eval()
    audio, image = torch.randn(3, 1, 16, 16), torch.rand(3, 3, 32, 32)
    out = model(audio, image)
    assert out.file_logits.shape == (3, 2)
    heads = model.head_logits(out.audio_emb, out.image_emb, torch.full((3,), 0.5))
    assert torch.allclose(out.file_logits, heads[:, :2])


@pytest.mark.parametrize("model_class", [EarlyFusionModel, MidFusionModel])
def test_early_and_mid_fusion_have_auxiliary_file_heads_the_decision_never_reads(
    model_class: type[torch.nn.Module],
) -> None:
    torch.manual_seed(0)
    model = model_class(embedding_dim=16).eval()
    audio, image = torch.randn(3, 1, 16, 16), torch.rand(3, 3, 32, 32)
    out = model(audio, image)
    assert out.file_logits.shape == (3, 2)
    heads = [m for name, m in model.named_children() if f"{name}." in TRAINING_ONLY]
    assert len(heads) == 2
    with torch.no_grad():
        for head in heads:
            for p in head.parameters():
                p.add_(1.0)
    again = model(audio, image)
    assert torch.equal(again.logit, out.logit)  # the decision does not read them ...
    assert not torch.equal(again.file_logits, out.file_logits)  # ... the file logits are theirs


def test_early_fusions_file_heads_teach_both_stems() -> None:
    """The file term alone reaches the log-mel stem and the image stem: what each stem learns
    from its own file's label, before the joint trunk has learned to read it."""
    torch.manual_seed(0)
    model = EarlyFusionModel(embedding_dim=16)
    audio, image = torch.randn(4, 1, 16, 16), torch.rand(4, 3, 32, 32)
    batch = {
        "label": torch.tensor([0.0, 1.0, 1.0, 0.0]),
        "file_label": torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]),
    }
    parts = objective(1.0)(model(audio, image), batch, torch.device("cpu"))
    assert parts.file is not None
    parts.file.backward()
    for stem in (model.audio_stem, model.image_stem):
        grads = [p.grad for p in stem.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.joint.parameters())  # the trunk is not its path


@pytest.mark.parametrize("fusion", ["early", "mid", "late"])
def test_each_head_learns_its_own_modalitys_fakes(fusion: str) -> None:
    """Audio-only fakes (a loud band in the log-mel) and image-only fakes (a bright patch):
    with the file term the audio head separates the audio fakes from the real pairs and the
    image head the image fakes, each calling the other modality's fakes real. Without it (seen
    on this batch for late: weight 0) the image head memorises the audio fakes' images as fake
    too and the audio head scores audio fakes as low as real pairs: whichever head leads takes
    every fake."""
    torch.manual_seed(0)
    n = 24
    kind = torch.tensor([0, 0, 1, 2] * (n // 4))  # 0 real, 1 audio-only fake, 2 image-only fake
    audio = torch.randn(n, 1, 16, 16)
    image = torch.rand(n, 3, 32, 32) * 0.5
    audio[kind == 1, :, :4] += 2.0
    image[kind == 2, :, :8, :8] = 1.0
    batch = {
        "label": (kind > 0).float(),
        "file_label": torch.stack([(kind == 1).float(), (kind == 2).float()], dim=1),
    }
    model = build_model(fusion, PipelineConfig.model_validate({"model": {"embedding_dim": 16}}))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_of = objective(1.0)
    for _ in range(40):
        parts = loss_of(model(audio, image), batch, torch.device("cpu"))
        opt.zero_grad()
        parts.total.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        heads = model(audio, image).file_logits
    real, audio_fake, image_fake = kind == 0, kind == 1, kind == 2
    assert heads[audio_fake, 0].min() > heads[real, 0].max() + 1.0
    assert heads[image_fake, 1].min() > heads[real, 1].max() + 1.0
    assert heads[audio_fake, 1].max() < 0 and heads[image_fake, 0].max() < 0


def test_the_epoch_line_shows_the_file_term_only_where_it_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    record = {
        "fusion": "late", "epoch": 3, "train_loss": 1.5, "train_bce": 0.5,
        "train_consistency": 0.25, "train_acc": 0.75, "val_loss": 2.0, "val_bce": 0.75,
        "val_consistency": 0.5, "val_acc": 0.5, "train_emotion": 0.0, "val_emotion": 0.0,
        "train_file_bce": 0.125, "val_file_bce": 0.0625, "val_auc": 0.875,
        "samples_per_s": 4.0, "batch_size": 16, "memory_percent": 20.0, "seconds": 80.0,
    }  # fmt: skip
    with caplog.at_level(logging.INFO, logger="tasks.train.fit"):
        log_epoch(record, 15, best=True)
        log_epoch({**record, "fusion": "mid", "train_file_bce": 0.0, "val_file_bce": 0.0,
                   "val_auc": None}, 15, best=False)  # fmt: skip
    late, mid = (r.getMessage() for r in caplog.records)
    assert "train loss 1.5000 (bce 0.5000, consistency 0.2500, file 0.1250)" in late
    assert "val loss 2.0000 (bce 0.7500, consistency 0.5000, file 0.0625) acc 0.500" in late
    assert "AUC 0.8750" in late and late.endswith("(best so far)")
    assert "file" not in mid and "emotion" not in mid and "AUC n/a" in mid
