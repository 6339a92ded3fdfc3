"""Feature shards: the preprocessed tensors of up to `data.shard_size` pairs in one `.npz` object.

Shard arrays (loaded with `allow_pickle=False`, so a shard can never run code):
    audio    float16 (N, 1, n_mels, spec_frames)   normalised log-mel
    image    uint8   (N, 3, S, S)                  RGB; divided by 255 when read -> [0, 1]
    label    int8    (N,)                          1 = fake, 0 = real
    file_label int8  (N, 2)                        the audio's and the image's own label (from
                                                   their folders); -1 = unknown
    pair_id  str     (N,)                          stable id of the pair (manifest)
    family   str     (N,)                          fake family ("real" for real pairs, "" unknown)

`DeepfakeDataset` streams shards from storage one at a time (the next is fetched in the
background while the current one is consumed), so memory stays bounded by two shards.
`read_ahead` runs such a stream in a thread of its own, a few batches ahead of the training
step, so that augmenting samples overlaps the step instead of waiting for it.
"""

from __future__ import annotations

import contextvars
import io
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import IterableDataset, get_worker_info

from config.schema import StorageConfig
from tasks.data.pseudofake import self_blend, self_blend_audio
from tasks.errors import DataError
from tasks.io.storage import Storage, open_storage

log = logging.getLogger(__name__)
T = TypeVar("T")

SHARD_FIELDS = (
    "audio", "image", "label", "file_label", "pair_id", "family", "audio_emotion",
    "image_emotion", "crop",
)  # fmt: skip


def encode_shard(
    audio: np.ndarray,
    image: np.ndarray,
    label: np.ndarray,
    pair_id: Sequence[str],
    family: Sequence[str],
    audio_emotion: Sequence[str] | None = None,
    image_emotion: Sequence[str] | None = None,
    crop: int = 0,
    file_label: np.ndarray | None = None,
) -> bytes:
    """Serialise one shard; checks that every array has the same length and the right dtype.
    Emotions are names ("" = unknown); omitted, they are all unknown. `crop` > 0: the images are
    native-resolution squares from which `DeepfakeDataset` takes `crop` x `crop` crops.
    `file_label` (N, 2): each pair's audio and image labels; omitted, both files take the pair's
    label (a fake pair whose two files are fake)."""
    n = len(label)
    if file_label is None:
        file_label = np.repeat(np.asarray(label, dtype=np.int8)[:, None], 2, axis=1)
    file_label = np.asarray(file_label, dtype=np.int8)
    if file_label.shape != (n, 2):
        raise ValueError(f"file_label has shape {file_label.shape}, expected ({n}, 2)")
    audio_emotion = [""] * n if audio_emotion is None else list(audio_emotion)
    image_emotion = [""] * n if image_emotion is None else list(image_emotion)
    if not (
        len(audio) == len(image) == len(pair_id) == len(family) == n
        and len(audio_emotion) == len(image_emotion) == n
    ):
        raise ValueError(
            f"shard arrays differ in length: audio {len(audio)}, image {len(image)}, "
            f"label {n}, pair_id {len(pair_id)}, family {len(family)}"
        )
    if audio.ndim != 4 or image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"bad shard shapes: audio {audio.shape}, image {image.shape}")
    buf = io.BytesIO()
    np.savez(
        buf,
        audio=np.asarray(audio, dtype=np.float16),
        image=np.asarray(image, dtype=np.uint8),
        label=np.asarray(label, dtype=np.int8),
        file_label=file_label,
        pair_id=np.asarray(list(pair_id), dtype=str),
        family=np.asarray(list(family), dtype=str),
        audio_emotion=np.asarray(audio_emotion, dtype=str),
        image_emotion=np.asarray(image_emotion, dtype=str),
        crop=np.asarray(crop, dtype=np.int64),
    )
    return buf.getvalue()


def decode_shard(data: bytes, where: str = "<shard>") -> dict[str, np.ndarray]:
    """Read a shard written by `encode_shard`; never unpickles. A shard written before
    `file_label` existed reads its files' labels as unknown (-1)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in SHARD_FIELDS if name in npz.files}
            missing = [n for n in SHARD_FIELDS if n not in arrays and n != "file_label"]
            if missing:
                raise KeyError(f"no {', '.join(missing)} in the archive")
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{where}: not a readable feature shard ({exc})") from exc
    if "file_label" not in arrays:
        arrays["file_label"] = np.full((len(arrays["label"]), 2), -1, dtype=np.int8)
    return arrays


def write_shard(store: Storage, key: str, **arrays: Any) -> str:
    """Encode and write one shard; returns its URI."""
    return store.write_bytes(key, encode_shard(**arrays))


def read_shard(store: Storage, key: str) -> dict[str, np.ndarray]:
    return decode_shard(store.read_bytes(key), store.uri(key))


class DeepfakeDataset(IterableDataset):  # type: ignore[type-arg]
    """Streams (audio, image, label) samples from feature shards in a bucket.

    Each item is a dict: audio float32 (1, n_mels, frames), image float32 (3, S, S) in [0, 1],
    label float32 scalar (1 = fake), file_label float32 (2,) (the audio's and the image's own
    label, -1 unknown), pair_id str, family str, audio_emotion and image_emotion
    str ("" = unknown). Crop-mode shards hold larger native squares: the centre S x S is taken,
    or with `augment` (training) a random one, plus the augmentations of `_augment`. With
    `augment` and a `pseudo_fake_rate`, that share of the pairs with a fake voice and a real
    picture get a self-blended pseudo-fake of the picture instead (tasks/data/pseudofake.py) and
    an image file_label of 1; the pair's label stays 1. `audio_pseudo_fake_rate` does the same for
    the real voices of pairs with a fake picture (an audio file_label of 1). With `augment`,
    `image_degrade_rate` of the pictures (any label) are blurred slightly and/or re-compressed
    as a JPEG (`degrade`). Storage is opened in `__iter__` (boto3 clients must not cross a
    fork); shards are split between DataLoader workers.
    """

    def __init__(
        self,
        storage_cfg: StorageConfig,
        shard_keys: Sequence[str],
        shuffle: bool = False,
        seed: int = 0,
        n_samples: int | None = None,
        augment: bool = False,
        pseudo_fake_rate: float = 0.0,
        audio_pseudo_fake_rate: float = 0.0,
        image_degrade_rate: float = 0.0,
    ) -> None:
        self.storage_cfg = storage_cfg
        self.augment = augment
        self.pseudo_fake_rate = pseudo_fake_rate if augment else 0.0
        self.audio_pseudo_fake_rate = audio_pseudo_fake_rate if augment else 0.0
        self.image_degrade_rate = image_degrade_rate
        self.shard_keys = list(shard_keys)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.n_samples = n_samples

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle differently (but reproducibly) each epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.n_samples is None:
            raise TypeError("DeepfakeDataset was built without n_samples")
        return self.n_samples

    def _my_shards(self) -> list[str]:
        keys = list(self.shard_keys)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch])
            keys = [keys[i] for i in rng.permutation(len(keys))]
        info = get_worker_info()
        if info is not None:
            keys = keys[info.id :: info.num_workers]
        return keys

    def iter_shards(self) -> Iterator[dict[str, np.ndarray]]:
        """Yield decoded shards, fetching the next one while the caller works on the current."""
        keys = self._my_shards()
        if not keys:
            return
        store = open_storage(self.storage_cfg)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-prefetch") as pool:
            pending: Future[dict[str, np.ndarray]] = pool.submit(read_shard, store, keys[0])
            for nxt in [*keys[1:], None]:
                shard = pending.result()
                if nxt is not None:
                    pending = pool.submit(read_shard, store, nxt)
                yield shard

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rng = np.random.default_rng([self.seed, self.epoch, 1])
        augment = np.random.default_rng([self.seed, self.epoch, 2])  # its own stream
        for shard in self.iter_shards():
            n = len(shard["label"])
            order = rng.permutation(n) if self.shuffle else np.arange(n)
            crop = int(shard["crop"])
            for i in order:
                audio = shard["audio"][i].astype(np.float32)  # (1, M, T)
                image = shard["image"][i]  # (3, C, C) uint8
                file_label = shard["file_label"][i].astype(np.float32)
                if file_label[0] == 1 and file_label[1] == 0 and self.pseudo_fake_rate:
                    if augment.random() < self.pseudo_fake_rate:  # drawn only when asked for
                        image = self_blend(image, augment)
                        file_label[1] = 1.0
                elif file_label[0] == 0 and file_label[1] == 1 and self.audio_pseudo_fake_rate:
                    if augment.random() < self.audio_pseudo_fake_rate:
                        audio = self_blend_audio(audio, augment)
                        file_label[0] = 1.0
                if self.augment:
                    audio, image = _augment(audio, image, crop, augment, self.image_degrade_rate)
                elif crop:
                    image = _crop(image, crop, None)
                yield {
                    "audio": torch.from_numpy(np.ascontiguousarray(audio)),
                    "image": torch.from_numpy(image.astype(np.float32) / 255.0),  # [0, 1]
                    "label": torch.tensor(float(shard["label"][i]), dtype=torch.float32),
                    "file_label": torch.from_numpy(file_label),
                    "pair_id": str(shard["pair_id"][i]),
                    "family": str(shard["family"][i]),
                    "audio_emotion": str(shard["audio_emotion"][i]),
                    "image_emotion": str(shard["image_emotion"][i]),
                }


class InMemoryShard(DeepfakeDataset):
    """`DeepfakeDataset`'s evaluation path (no shuffle, no augmentation) over one shard already
    in memory (`decode_shard`'s arrays): new media scored as the models saw their test split."""

    def __init__(self, shard: dict[str, np.ndarray]) -> None:
        super().__init__(StorageConfig(), [], shuffle=False, augment=False)
        self.shard = shard

    def iter_shards(self) -> Iterator[dict[str, np.ndarray]]:
        yield self.shard


def read_ahead(items: Iterable[T], depth: int) -> Iterator[T]:
    """`items` in the same order, produced by a thread of their own at most `depth` items ahead
    of the consumer, so that producing them (reading shards, augmenting samples) overlaps the
    consumer's work (the training step). An exception in `items` is raised here, in its order;
    closing this iterator early stops and joins the thread. `depth` < 1: `items` as they are.
    The thread runs in a copy of the caller's context (Prefect's run context is a context
    variable)."""
    if depth < 1:
        yield from items
        return
    ready: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        source = iter(items)
        try:
            for item in source:
                if not put((True, item)):
                    return
            put((False, None))
        except BaseException as exc:  # handed to the consumer, raised there
            put((False, exc))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()  # a generator's own cleanup (its shard prefetch pool) runs here

    thread = threading.Thread(
        target=contextvars.copy_context().run, args=(produce,), name="read-ahead", daemon=True
    )
    thread.start()
    try:
        while True:
            more, item = ready.get()
            if not more:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        stop.set()
        thread.join()


MAX_SHIFT = 8  # the log-mel's random time shift is at most 1/MAX_SHIFT of its frames


def _crop(image: np.ndarray, side: int, rng: np.random.Generator | None) -> np.ndarray:
    """A side x side crop of (3, C, C): random with `rng`, else the centre."""
    c = image.shape[-1]
    if c <= side:
        return image
    if rng is None:
        top = left = (c - side) // 2
    else:
        top, left = (int(v) for v in rng.integers(0, c - side + 1, size=2))
    return image[:, top : top + side, left : left + side]


def degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`image` (uint8 (3, H, W)) as it may come back from being passed around: blurred slightly
    (a Gaussian of sigma 0.2-1 px), re-saved as a JPEG of quality 65-95, or both (a third each).
    Same shape and dtype."""
    img = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)))
    kind = int(rng.integers(0, 3))  # 0: blur, 1: JPEG, 2: both
    if kind != 1:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.2, 1.0))))
    if kind != 0:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(65, 96)))
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def _augment(
    audio: np.ndarray,
    image: np.ndarray,
    crop: int,
    rng: np.random.Generator,
    degrade_rate: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Augmentations: the image (crop mode) cropped at a random place at native resolution,
    `degrade`d at `degrade_rate` and flipped left-right at random; the log-mel shifted in time by
    up to 1/8 of its frames, the gap filled with the floor (-1). No resizing: the slight blur and
    the JPEG of `degrade` weaken the finest traces, and only in a share of the pictures."""
    if crop:
        image = _crop(image, crop, rng)
    if degrade_rate and rng.random() < degrade_rate:  # drawn only when asked for
        image = degrade(image, rng)
    if rng.random() < 0.5:
        image = image[:, :, ::-1]
    frames = audio.shape[-1]
    shift = int(rng.integers(-(frames // MAX_SHIFT), frames // MAX_SHIFT + 1))
    if shift:
        out = np.full_like(audio, -1.0)
        if shift > 0:
            out[..., shift:] = audio[..., :-shift]
        else:
            out[..., :shift] = audio[..., -shift:]
        audio = out
    return audio, np.ascontiguousarray(image)


def batches(
    samples: Iterator[dict[str, Any]], batch_size: int | Callable[[], int]
) -> Iterator[dict[str, Any]]:
    """Group samples into batches; `batch_size` is an int or a zero-argument callable read
    before each batch, so a memory guard can shrink batches mid-epoch."""
    size = batch_size if callable(batch_size) else (lambda: batch_size)
    buf: list[dict[str, Any]] = []
    for sample in samples:
        buf.append(sample)
        if len(buf) >= size():
            yield collate(buf)
            buf = []
    if buf:
        yield collate(buf)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors: audio (B, 1, M, T), image (B, 3, S, S), label (B,); strings as lists."""
    return {
        "audio": torch.stack([it["audio"] for it in items]),
        "image": torch.stack([it["image"] for it in items]),
        "label": torch.stack([it["label"] for it in items]),
        "file_label": torch.stack(  # (B, 2); -1 = unknown
            [it.get("file_label", torch.full((2,), -1.0)) for it in items]
        ),
        "pair_id": [it["pair_id"] for it in items],
        "family": [it["family"] for it in items],
        "audio_emotion": [it.get("audio_emotion", "") for it in items],
        "image_emotion": [it.get("image_emotion", "") for it in items],
    }
