"""Where every object of a run lives in the bucket (DESIGN.md, "Bucket layout").

All keys are relative to the storage root. One function per kind of object, so no module
builds a key by hand:

    dataset/audio/{real,fake}/*.wav    dataset/images/{real,fake}/*.{jpg,jpeg,png}
    dataset/pairs.csv
    outputs/manifests/<run>/manifest.parquet   outputs/manifests/last-run.json
    outputs/cache/features/<content-hash>/shard-*.npz
    outputs/models/<fusion>/<run>/model.pt    outputs/models/<fusion>/<run>/checkpoints/epoch-N.pt
    outputs/models/<fusion>/champion.json
    outputs/intermediates/<run>/emotion_vectors-<fusion>.npz   .../<run>/losses.csv
    outputs/logs/<run>/train-<fusion>.jsonl (per epoch)    outputs/logs/<run>/steps-<fusion>.jsonl
    outputs/plots/<run>/*.png    outputs/reports/<run>/{report.html,metrics.json}
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

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
    def from_config(cls, storage_cfg: object) -> Layout:
        return cls(
            dataset=getattr(storage_cfg, "dataset_prefix", "dataset/"),
            outputs=getattr(storage_cfg, "outputs_prefix", "outputs/"),
        )

    # raw data
    def audio_prefix(self) -> str:
        return f"{self.dataset}audio/"

    def images_prefix(self) -> str:
        return f"{self.dataset}images/"

    def pairs_csv(self) -> str:
        return f"{self.dataset}pairs.csv"

    # products of a run
    def manifest(self, run: str) -> str:
        return f"{self.outputs}manifests/{run}/manifest.parquet"

    def manifest_dir(self, run: str) -> str:
        return f"{self.outputs}manifests/{run}/"

    def last_run(self) -> str:
        """Data hash and config fingerprint of the newest completed run (tasks/runs/)."""
        return f"{self.outputs}manifests/last-run.json"

    def features(self, content_hash: str) -> str:
        return f"{self.outputs}cache/features/{content_hash}/"

    def model_dir(self, fusion: str, run: str) -> str:
        return f"{self.outputs}models/{fusion}/{run}/"

    def model(self, fusion: str, run: str) -> str:
        return f"{self.model_dir(fusion, run)}model.pt"

    def checkpoints(self, fusion: str, run: str) -> str:
        return f"{self.model_dir(fusion, run)}checkpoints/"

    def checkpoint(self, fusion: str, run: str, epoch: int) -> str:
        return f"{self.checkpoints(fusion, run)}epoch-{epoch}.pt"

    def champion(self, fusion: str) -> str:
        return f"{self.outputs}models/{fusion}/champion.json"

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

    def reports(self, run: str) -> str:
        return f"{self.outputs}reports/{run}/"

    def metrics(self, run: str) -> str:
        return f"{self.reports(run)}metrics.json"

    def report(self, run: str) -> str:
        return f"{self.reports(run)}report.html"
