"""Small, frozen results that tasks pass to each other: references into the bucket, never data."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Ref(BaseModel):
    model_config = ConfigDict(frozen=True)


class FoldersRef(Ref):
    """The output folders that exist after set-up."""

    root_uri: str
    folders: list[str]


class ManifestRef(Ref):
    """The run's manifest: where it is and what it holds."""

    run: str
    key: str  # outputs/manifests/<run>/manifest.parquet
    uri: str
    n_pairs: int
    counts: dict[str, dict[str, int]]  # split -> {"real": n, "fake": n}
    data_hash: str  # hash of every listed key + ETag; unchanged data gives the same hash
    skipped: list[dict[str, str]] = Field(default_factory=list)  # {"key", "reason"} at listing


class FeatureRef(Ref):
    """Preprocessed feature shards for one manifest."""

    run: str
    feature_hash: str  # content key: ETags + preprocessing settings
    prefix: str  # outputs/cache/features/<hash>/
    shards: dict[str, list[str]]  # split -> shard keys
    counts: dict[str, dict[str, int]]  # split -> {"real": n, "fake": n} of usable pairs
    emotions: list[str] = Field(default_factory=list)  # emotion vocabulary; [] = no labels
    skipped: list[dict[str, str]] = Field(default_factory=list)  # {"key", "reason"}
    skipped_key: str | None = None  # where the skipped-file list was written for this run
    cache_hit: bool = False


class TrainedRef(Ref):
    """One trained fusion model."""

    fusion: str
    run: str
    model_key: str  # outputs/models/<fusion>/<run>/model.pt
    epochs: int  # epochs completed
    best_epoch: int
    best_val_loss: float
    best_val_auc: float | None = None  # validation ROC-AUC of the best epoch
    resumed_from: int | None = None  # epoch the run resumed after, when a retry resumed


class EvaluationRef(Ref):
    """Metrics, plots and report of one run."""

    run: str
    metrics_key: str
    report_key: str
    plot_keys: list[str]
    metrics: dict[str, dict[str, float]]  # fusion -> headline metrics (auc, eer, accuracy, ...)
    # Re-evaluation only: True when the new metrics equal the stored metrics.json, False when
    # they differ (logged), None when there was no stored metrics.json to compare with.
    reproduced: bool | None = None


class RunSummary(Ref):
    """What `train-all-fusions` returns."""

    run: str
    root_uri: str
    n_pairs: int = 0
    fusions: list[str] = Field(default_factory=list)
    report_key: str | None = None
    metrics: dict[str, dict[str, float]] = Field(default_factory=dict)
    skipped: int = 0
    notes: list[str] = Field(default_factory=list)
