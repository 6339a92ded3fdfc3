"""The configuration schema: one frozen pydantic model per YAML section.

Every field has a default that works on the embedded demo, so a YAML file only states what differs.
Unknown keys are refused (`extra="forbid"`) so a typo never silently falls back to a default.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PositiveInt = Annotated[int, Field(gt=0, strict=True)]
NonNegInt = Annotated[int, Field(ge=0, strict=True)]
Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]
FusionName = Literal["early", "mid", "late"]
ALL_FUSIONS: tuple[FusionName, ...] = ("early", "mid", "late")


def refuse_removed(raw: object, key: str, why: str) -> object:
    """A section's raw mapping, unless it still names the removed setting `key`: then the
    one-line reason, so an old config fails saying what to do rather than "extra field"."""
    if isinstance(raw, dict) and key in raw:
        raise ValueError(f"{key} was removed: {why}; delete the key")
    return raw


class Section(BaseModel):
    """Common settings of every section: frozen, no unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class RunConfig(Section):
    name: str | None = None  # run id; None = UTC timestamp at flow start, e.g. 20261125T020000Z
    seed: NonNegInt = 42  # one seed for pairing, splits, init and shuffling
    # Nightly: when the data and the settings are those of the last completed run, stop after the
    # manifest instead of retraining the same models.
    skip_if_unchanged: bool = False


class StorageConfig(Section):
    uri: str = "s3://my-deepfake-bucket"  # s3://bucket[/prefix], a local path or file:// URI
    endpoint_url: str | None = None  # S3-compatible store's URL; AWS_ENDPOINT_URL wins
    region: str | None = None  # AWS region; None = boto3's default chain
    dataset_prefix: str = "dataset/"  # where the raw audio and images live
    outputs_prefix: str = "outputs/"  # where every product of a run lands
    # Retries and timeouts of every S3 request (botocore's standard retry mode, whose backoff is
    # bounded); `tasks.io.storage.worst_case_wait_s` adds them up with the steps' own retries.
    max_attempts: PositiveInt = 3  # HTTP attempts per request, the first included
    connect_timeout_s: Annotated[float, Field(gt=0)] = 5.0  # longest wait to open a connection
    # Longest silence of the store within one attempt (before the reply, or mid-body): then the
    # attempt is given up and retried.
    read_timeout_s: Annotated[float, Field(gt=0)] = 15.0
    # HTTP connections kept per client; at least data.fetch_concurrency, or the GETs beyond it
    # open and drop a connection each time.
    max_pool_connections: PositiveInt = 64
    multipart_threshold_mb: PositiveInt = 64  # uploads at least this large go multipart
    # Links in reports and artifacts carry no credentials (`Storage.link`): no presigned URLs.

    @model_validator(mode="before")
    @classmethod
    def _removed_settings(cls, raw: object) -> object:
        return refuse_removed(
            raw,
            "presign_expiry_s",
            "links in reports and artifacts are no longer presigned (a presigned URL carries "
            "the access key id and session token)",
        )

    @field_validator("uri")
    @classmethod
    def _uri_scheme(cls, v: str) -> str:
        if "://" in v and not v.startswith(("s3://", "file://")):
            raise ValueError(f"must be s3://bucket[/prefix], file://path or a path, got {v!r}")
        if v.startswith("s3://") and not v[len("s3://") :].strip("/"):
            raise ValueError(f"names no bucket: {v!r}")
        return v

    @field_validator("dataset_prefix", "outputs_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v or v.startswith("/") or ".." in v.split("/"):
            raise ValueError(f"must be a relative prefix like 'outputs/', got {v!r}")
        return v if v.endswith("/") else v + "/"


class DataConfig(Section):
    sample_rate: PositiveInt = 16000  # audio is resampled to this rate before the log-mel
    n_mels: PositiveInt = 128  # log-mel height (frequency bands, mel or linear)
    # The audio front-end's bands: "mel" (fine at low frequencies, like hearing) or "linear"
    # (evenly spaced up to the top: more resolution where vocoders leave their traces).
    audio_bands: Literal["mel", "linear"] = "mel"
    # Highest frequency the bands cover; None = Nyquist of sample_rate. Set 4000 for corpora with
    # telephone (8 kHz) audio: every clip then looks alike in band whatever it was recorded at,
    # so the missing top band of a narrow-band recording is neither a cue nor a confusion.
    band_limit_hz: Annotated[float, Field(gt=0)] | None = None
    spec_frames: PositiveInt = 128  # log-mel width (time frames)
    image_size: PositiveInt = 224  # images become image_size x image_size RGB (see image_mode)
    # How an image becomes image_size x image_size: "resize" scales the whole picture; "crop"
    # keeps native pixels (deepfake traces are high-frequency): a centre square of image_size +
    # crop_margin is stored, training takes random image_size crops of it and evaluation the
    # centre; images smaller than that are padded by reflection, never upsampled.
    image_mode: Literal["resize", "crop"] = "resize"
    crop_margin: NonNegInt = 16  # extra native pixels stored around the crop, for random crops
    val_fraction: Fraction = 0.15  # share of pairs in the validation split (stable hash)
    test_fraction: Fraction = 0.15  # share of pairs in the test split (stable hash)
    shard_size: PositiveInt = 64  # pairs per feature shard
    # Objects fetched at once while preprocessing (both files of a pair together; at least two
    # per decode process). To keep the decoders fed it must cover the round trip:
    # pairs/s x 2 x latency, e.g. 300 x 2 x 0.05 = 30.
    fetch_concurrency: PositiveInt = 32
    # Processes that fetch and decode while preprocessing, each on its own core with its own S3
    # client and a share of fetch_concurrency (the GIL would hold threads to one core): "auto" =
    # the cores this process may use, at most one per 64 pairs (a process takes ~1-3 s to start);
    # 1 = fetch and decode in the pipeline's own process. Each holds ~150 MB resident.
    decode_workers: Literal["auto"] | PositiveInt = "auto"
    max_image_pixels: PositiveInt = 40_000_000  # larger images are refused (decompression bombs)
    # Audio is cut (or zero-padded) to this many seconds from its start before the log-mel, so the
    # spec_frames columns always span the same time: hop = clip_seconds * sample_rate / spec_frames.
    clip_seconds: Annotated[float, Field(gt=0)] = 2.0
    # No length limit: a file of any length is fetched only as far as its first clip_seconds
    # reach (tasks/data/decode.py, read_audio_prefix), never whole.

    @model_validator(mode="before")
    @classmethod
    def _removed_settings(cls, raw: object) -> object:
        return refuse_removed(
            raw,
            "max_audio_seconds",
            "audio of any length is now read only as far as data.clip_seconds needs, so long "
            "files are no longer refused",
        )


class GeneratorConfig(Section):
    """The synthetic benchmark (`tasks/data/synthetic.py`), for trying the product without data."""

    # Fill an empty dataset/ with the benchmark before the manifest (the demo). Off in production:
    # an empty bucket there is a mistake that must fail loudly, not be papered over with toy data.
    fill_empty_dataset: bool = False
    n_pairs: Annotated[int, Field(ge=2, strict=True)] = 600  # pairs written (half of them fake)
    seed: NonNegInt = 1234  # the data's own seed: changing run.seed must not change the data


class ModelConfig(Section):
    embedding_dim: PositiveInt = 128  # size of each modality's emotion embedding
    # ResNet18 weights for the mid and late image branches: "imagenet" (torchvision's, through
    # torch's download and cache; needs the internet once), a local path or a bucket key.
    pretrained_image_weights: str | None = None
    late_fusion_rule: Literal["learned", "mean", "max"] = "learned"  # how late fusion combines


class TrainingConfig(Section):
    fusions: list[FusionName] = Field(default_factory=lambda: list(ALL_FUSIONS))
    batch_size: PositiveInt = 16  # initial batch size; the memory guard may shrink it
    optimizer: Literal["adamw", "adam"] = "adamw"  # AdamW: weight decay decoupled from Adam
    learning_rate: Annotated[float, Field(gt=0, lt=1)] = 0.001  # peak learning rate
    weight_decay: Annotated[float, Field(ge=0, lt=1)] = 0.01  # AdamW weight decay
    # Learning-rate schedule over the whole run: a linear warm-up over this share of it, then
    # cosine decay to zero ("cosine"), or the peak rate throughout ("constant").
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1
    grad_clip: Annotated[float, Field(gt=0)] | None = 5.0  # max gradient norm; None = no clip
    # Weigh the BCE of each class by its share of the train split, so a skewed split does not
    # teach the detector to answer the majority class.
    balance_classes: bool = True
    # Model selection: keep the epoch with the best validation ROC-AUC ("auc"; ties go to the
    # lower validation loss) or the lowest validation loss ("loss").
    select_on: Literal["auc", "loss"] = "auc"
    patience: PositiveInt | None = None  # stop after this many epochs without improvement
    # Validate, select and save an exponential moving average of the weights over about this many
    # epochs (tasks/train/average.py) instead of the raw weights; None = the raw weights.
    average_epochs: Annotated[float, Field(gt=0)] | None = None
    # Augmentations that keep artefacts: random horizontal flips and random crops (crop mode)
    # of the image, a random time shift of the log-mel; never a blurring resize.
    augment: bool = True
    # With augment, this share of the training pictures (real and fake alike, pseudo-fakes
    # included) is blurred slightly, re-compressed as a JPEG or both, as pictures are on their
    # way around: the image branch learns traces that survive that, not the finest ones alone
    # (after Wang et al., CVPR 2020, who degraded half of theirs; benchmarks/README.md, "Blurred
    # and re-compressed" and "Half of the training pictures degraded"). 0 = off.
    image_degrade_rate: Annotated[float, Field(ge=0, le=1)] = 0.5
    # With augment, this share of the training pairs with a fake voice and a real picture sees a
    # self-blended pseudo-fake of the picture instead (a region resampled, re-coloured, blurred,
    # sharpened, re-noised or shifted, then blended back in; tasks/data/pseudofake.py),
    # labelled a fake image for the image heads; the pair's label stays fake. The image branch
    # learns what manipulations share, not only the bucket's own generators' traces. 0 = off.
    pseudo_fake_rate: Annotated[float, Field(ge=0, le=1)] = 0.5
    # Share of the training pairs with a real voice and a fake face whose voice is shown as a
    # pseudo-fake (tasks/data/pseudofake.self_blend_audio), labelled a fake audio file: vocoder
    # traces never trained on are caught (benchmarks/README.md, "Self-blended voices"). 0 = off.
    audio_pseudo_fake_rate: Annotated[float, Field(ge=0, le=1)] = 0.5
    epochs: PositiveInt = 5  # passes over the training split
    consistency_weight: Annotated[float, Field(ge=0)] = 0.1  # lambda; 0 disables the signal
    consistency_margin: Annotated[float, Field(ge=-1, le=1)] = 0.0  # fake pairs pushed below it
    # Weight of the emotion classifiers' cross-entropy (voice and face, when pairs.csv gives
    # emotion / image_emotion); 0 turns the emotion heads off.
    emotion_weight: Annotated[float, Field(ge=0)] = 0.5
    # Weight of the per-modality BCE: each fusion's audio head learns the audio file's own label
    # and its image head the image file's (from their real/ and fake/ folders); late fusion's
    # decision combines these heads, early's and mid's are auxiliary; 0 turns it off.
    file_label_weight: Annotated[float, Field(ge=0)] = 1.0
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = CUDA when present
    mixed_precision: bool = True  # autocast on CUDA; ignored on the CPU
    log_every: PositiveInt = 10  # steps between progress lines
    concurrency: Literal["auto"] | PositiveInt = "auto"  # fusions trained at once
    fan_out: bool = False  # run each fusion as a separate train-fusion deployment run
    # Checkpoints (model, Adam state and weight average: ~185 MB for ResNet18) kept per fusion and
    # run; older ones are deleted after each save. Resume needs only the newest (the one before it
    # is there in case the newest was cut short). None keeps every epoch: the demo's 15 epochs of
    # three fusions were 7.9 GB per run.
    keep_checkpoints: PositiveInt | None = 2

    @field_validator("fusions")
    @classmethod
    def _fusions(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must name at least one of early, mid, late")
        if len(set(v)) != len(v):
            raise ValueError(f"names a fusion twice: {v}")
        return v


class MemoryConfig(Section):
    cap: Fraction = 0.8  # system memory share the trainer must never push past
    shrink_threshold: Fraction = 0.7  # above this share the batch size is halved
    # The guard never shrinks below this; at least 2 because BatchNorm cannot normalise a
    # training batch of one sample.
    min_batch_size: Annotated[int, Field(ge=2, strict=True)] = 2
    # At the minimum batch, with memory still too full for the next batch to stay under the cap,
    # the trainer waits this long for memory to be freed, then fails with MemoryError.
    cap_wait_s: Annotated[float, Field(ge=0)] = 60.0

    @model_validator(mode="after")
    def _threshold_below_cap(self) -> MemoryConfig:
        if self.shrink_threshold >= self.cap:
            raise ValueError(
                f"shrink_threshold ({self.shrink_threshold}) must be below cap ({self.cap})"
            )
        return self


class EvaluationConfig(Section):
    # Fixed threshold: a calibrated score at or above it is fake; metrics.json reports it beside
    # the operating point fitted on validation (and it stands in for model files without one).
    threshold: Annotated[float, Field(gt=0, lt=1)] = 0.5
    # How training fits each model's decision threshold on the validation split (after fitting a
    # temperature): "eer" = where false-positive and false-negative rates meet, "fpr" = the
    # lowest threshold whose validation false-positive rate is at most target_fpr.
    operating_point: Literal["eer", "fpr"] = "eer"
    target_fpr: Fraction = 0.01  # the false-positive budget of operating_point "fpr"
    calibration_bins: PositiveInt = 10  # bins of the reliability diagram and ECE
    # Inference device for the test split. The CPU gives bit-identical scores run after run, so
    # `python -m flows.evaluate` reproduces a run's metrics.json exactly; auto = CUDA when present.
    device: Literal["auto", "cpu", "cuda"] = "cpu"


class PipelineConfig(Section):
    """Every setting of the pipeline; loaded once at flow start and passed down."""

    run: RunConfig = RunConfig()
    storage: StorageConfig = StorageConfig()
    data: DataConfig = DataConfig()
    generator: GeneratorConfig = GeneratorConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    memory: MemoryConfig = MemoryConfig()
    evaluation: EvaluationConfig = EvaluationConfig()

    @model_validator(mode="after")
    def _pool_covers_fetches(self) -> PipelineConfig:
        if self.storage.uri.startswith("s3://") and (
            self.data.fetch_concurrency > self.storage.max_pool_connections
        ):
            raise ValueError(
                f"data.fetch_concurrency={self.data.fetch_concurrency} is more than "
                f"storage.max_pool_connections={self.storage.max_pool_connections}: the GETs "
                "beyond the pool would each open and drop a connection; raise the pool"
            )
        return self
