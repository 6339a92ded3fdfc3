"""Where every object of a run lives in the bucket: the one place a key is built.

All keys are relative to the storage root. One function per kind of object, so no module
builds a key by hand:

    dataset/audio/{real,fake}/*.wav    dataset/images/{real,fake}/*.{jpg,jpeg,png}
    dataset/pairs.csv
    outputs/manifests/<run>/{manifest.parquet,files.parquet,skipped.json}
    outputs/manifests/last-run.json
    outputs/cache/features/<content-hash>/{index.json,shard-<split>-NNNNN.npz}
    outputs/models/<fusion>/<run>/model.pt    outputs/models/<fusion>/<run>/checkpoints/epoch-N.pt
    outputs/models/<fusion>/champion.json
    outputs/intermediates/<run>/emotion_vectors-<fusion>.npz   .../<run>/losses.csv
    outputs/logs/<run>/train-<fusion>.jsonl (per epoch)    outputs/logs/<run>/steps-<fusion>.jsonl
    outputs/plots/<run>/*.png
    outputs/reports/<run>/{report.html,metrics.json,refs.json,champions.json,predictions.csv}
    outputs/detections/<id>/{detections.csv,skipped.json}
    outputs/runs/in-progress.json
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from config.schema import StorageConfig

REAL, FAKE = 0, 1  # label 1 = fake, 0 = real, defined once here
LABEL_NAMES = {REAL: "real", FAKE: "fake"}
SPLITS = ("train", "val", "test")


def new_run_id(now: datetime | None = None) -> str:
    """A sortable UTC timestamp, e.g. 20261125T020000Z, used when `run.name` is not set."""
    return (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")


@dataclass(frozen=True)
class Layout:
    """Keys of a bucket whose raw data is under `dataset` and products under `outputs`."""

    dataset: str = "dataset/"
    outputs: str = "outputs/"

    @classmethod
    def from_config(cls, storage_cfg: StorageConfig) -> Layout:
        return cls(dataset=storage_cfg.dataset_prefix, outputs=storage_cfg.outputs_prefix)

    # raw data
    def audio_prefix(self) -> str:
        return f"{self.dataset}audio/"

    def images_prefix(self) -> str:
        return f"{self.dataset}images/"

    def pairs_csv(self) -> str:
        return f"{self.dataset}pairs.csv"

    def dataset_key(self, relative: str) -> str:
        """The key of `relative` (a key relative to the dataset prefix, as pairs.csv writes it)."""
        return f"{self.dataset}{relative}"

    @staticmethod
    def sample(modality: str, label: int, name: str) -> str:
        """Relative to the dataset prefix: `audio/real/<name>`, `images/fake/<name>`..."""
        folder = {"audio": "audio", "image": "images"}[modality]
        return f"{folder}/{LABEL_NAMES[label]}/{name}"

    # products of a run
    def manifest(self, run: str) -> str:
        return f"{self.outputs}manifests/{run}/manifest.parquet"

    def manifest_dir(self, run: str) -> str:
        return f"{self.outputs}manifests/{run}/"

    def files_table(self, run: str) -> str:
        """Every usable listed file of the run's dataset (one row per file)."""
        return f"{self.manifest_dir(run)}files.parquet"

    def skipped(self, run: str) -> str:
        """The run's skipped files: listing, pairs.csv and decoding, with the reason for each."""
        return f"{self.manifest_dir(run)}skipped.json"

    def last_run(self) -> str:
        """Data hash and config fingerprint of the newest completed run (tasks/runs/)."""
        return f"{self.outputs}manifests/last-run.json"

    def features(self, content_hash: str) -> str:
        return f"{self.outputs}cache/features/{content_hash}/"

    def feature_file(self, content_hash: str, name: str) -> str:
        """A file of the feature cache, by the name its index.json records."""
        return f"{self.features(content_hash)}{name}"

    def feature_index(self, content_hash: str) -> str:
        """Written last by a feature build: present = the cache is complete."""
        return self.feature_file(content_hash, "index.json")

    @staticmethod
    def feature_shard_name(split: str, number: int) -> str:
        return f"shard-{split}-{number:05d}.npz"

    def model_dir(self, fusion: str, run: str) -> str:
        return f"{self.outputs}models/{fusion}/{run}/"

    def model(self, fusion: str, run: str) -> str:
        return f"{self.model_dir(fusion, run)}model.pt"

    def checkpoints(self, fusion: str, run: str) -> str:
        return f"{self.model_dir(fusion, run)}checkpoints/"

    def checkpoint(self, fusion: str, run: str, epoch: int) -> str:
        return f"{self.checkpoints(fusion, run)}epoch-{epoch}.pt"

    def trained(self, fusion: str, run: str) -> str:
        """The `TrainedRef` a finished training leaves (how fan-out gets a child run's result)."""
        return f"{self.model_dir(fusion, run)}trained.json"

    def champion(self, fusion: str) -> str:
        return f"{self.outputs}models/{fusion}/champion.json"

    def models_root(self) -> str:
        """Above every fusion's models: <models_root><fusion>/<run>/model.pt."""
        return f"{self.outputs}models/"

    def in_progress(self) -> str:
        """The record of the run in progress, deleted when it completes (tasks/runs/ids.py)."""
        return f"{self.outputs}runs/in-progress.json"

    def intermediates(self, run: str) -> str:
        return f"{self.outputs}intermediates/{run}/"

    def emotion_vectors(self, fusion: str, run: str) -> str:
        return f"{self.intermediates(run)}emotion_vectors-{fusion}.npz"

    def losses(self, run: str) -> str:
        return f"{self.intermediates(run)}losses.csv"

    def logs(self, run: str) -> str:
        return f"{self.outputs}logs/{run}/"

    def epoch_log(self, fusion: str, run: str) -> str:
        return f"{self.logs(run)}train-{fusion}.jsonl"

    def step_log(self, fusion: str, run: str) -> str:
        return f"{self.logs(run)}steps-{fusion}.jsonl"

    def plots(self, run: str) -> str:
        return f"{self.outputs}plots/{run}/"

    def plot(self, run: str, name: str) -> str:
        return f"{self.plots(run)}{name}.png"

    def reports(self, run: str) -> str:
        return f"{self.outputs}reports/{run}/"

    def metrics(self, run: str) -> str:
        return f"{self.reports(run)}metrics.json"

    def report(self, run: str) -> str:
        return f"{self.reports(run)}report.html"

    def refs(self, run: str) -> str:
        """What the run evaluated (config, features, models): enough to re-evaluate it."""
        return f"{self.reports(run)}refs.json"

    def champion_decisions(self, run: str) -> str:
        """The run's champion decisions, one per fusion (tasks/runs/champions.py)."""
        return f"{self.reports(run)}champions.json"

    def predictions(self, run: str) -> str:
        """Every test pair's calibrated score and decision, per fusion (the evaluation's)."""
        return f"{self.reports(run)}predictions.csv"

    # scoring new media (tasks/evaluate/detect.py)
    def detections(self, detection: str) -> str:
        return f"{self.outputs}detections/{detection}/"

    def detection_scores(self, detection: str) -> str:
        """The scores and decisions of one `detect` run, one row per pair."""
        return f"{self.detections(detection)}detections.csv"

    def detection_skipped(self, detection: str) -> str:
        """The files one `detect` run could not score, with the reason for each."""
        return f"{self.detections(detection)}skipped.json"
