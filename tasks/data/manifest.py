"""The manifest: which audio goes with which image, with which label, in which split.

`build_manifest` lists `dataset/` (paginated by the storage backend), records every file's key,
modality, label, size and ETag, pairs audio with images and writes two parquet tables to
`outputs/manifests/<run>/`: `manifest.parquet` (one row per pair) and `files.parquet` (one row
per listed file). Files the listing cannot use (wrong extension, outside real/ and fake/, zero
bytes) are skipped and reported, never silently dropped: they are returned in
`ManifestRef.skipped`, and the feature build writes them with its own skips to the run's
skipped-file list. Only when no usable pair is left does the manifest write that list itself,
before raising, so the error can point at it.

Pairing:
- `dataset/pairs.csv` present (audio_key, image_key, label[, split][, family][, emotion]): its
  rows are the pairs. Keys may be relative to `dataset/` or to the storage root. A `split`
  column is honoured as given; when it names only train and test, val is carved from train.
- otherwise the seed's plan: each file gets a split from the stable hash of its key, then audio
  and images of the same label and split are paired at random (seeded), the shorter list
  reused so every file is used.

Splits come from a SHA-256 of a key, never from a position in a list, so adding files later
never moves an existing pair (or, without pairs.csv, an existing file) to another split.

Cost: the listing's pages (S3: 1,000 keys each, one request at a time) are consumed as they
come; sizes and ETags come with them, so no object is read or HEADed except pairs.csv. What is
kept grows linearly, about 600 bytes per listed object (its entry, its key and ETag for the data
hash, its rows in the two tables): tests/unit/test_manifest_load.py, benchmarks/bench_manifest.py.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from config.schema import DataConfig
from tasks.data.skipped import write_skipped
from tasks.errors import DataError
from tasks.io.layout import FAKE, LABEL_NAMES, REAL, SPLITS, Layout
from tasks.io.storage import ObjectInfo, Storage
from tasks.refs import ManifestRef

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".wave", ".flac", ".ogg", ".mp3")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
MODALITY_FOLDERS = {"audio": AUDIO_EXTENSIONS, "images": IMAGE_EXTENSIONS}
LABEL_FOLDERS = {"real": REAL, "fake": FAKE}
LABEL_VALUES = {"0": REAL, "1": FAKE, "real": REAL, "fake": FAKE}
SPLIT_VALUES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}
REQUIRED_COLUMNS = ("audio_key", "image_key", "label")


@dataclass(frozen=True)
class FileEntry:
    """One usable listed file."""

    key: str  # relative to the storage root
    modality: str  # "audio" or "image"
    label: int  # from the folder: 1 = fake
    size: int
    etag: str


@dataclass(frozen=True)
class PairRow:
    """One row of manifest.parquet."""

    pair_id: str
    split: str
    label: int  # 1 = fake
    family: str  # fake family; "real" for real pairs; "" when unknown
    emotion: str  # the voice's emotion; "" when unknown
    image_emotion: str  # the face's emotion; "" when unknown
    audio_key: str
    audio_size: int
    audio_etag: str
    image_key: str
    image_size: int
    image_etag: str
    # Each file's own label, from its folder (audio/fake/..., images/real/...): a fake pair may
    # fake only one modality (a cloned voice over a real face) or neither (real files whose
    # emotions disagree). Late fusion teaches each modality's head its own file's label.
    audio_label: int = -1  # 1 = fake; -1 = unknown (a manifest written before the column)
    image_label: int = -1


# Columns a manifest of an older version may lack, and what they then read as.
LATER_COLUMNS = {"audio_label": -1, "image_label": -1}


@dataclass
class Listing:
    """What `list_dataset` found under `dataset/`."""

    audio: list[FileEntry]
    images: list[FileEntry]
    pairs_csv: ObjectInfo | None
    objects: list[ObjectInfo]  # everything listed, usable or not (for the data hash)
    skipped: list[dict[str, str]]


def stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by `key` alone: the same on every machine and every run."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:15], 16) / float(16**15)


def split_of(key: str, val_fraction: float, test_fraction: float) -> str:
    """train, val or test, by the stable hash of `key`."""
    u = stable_fraction(key)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def pair_id_of(audio_key: str, image_key: str) -> str:
    return hashlib.sha256(f"{audio_key}\n{image_key}".encode()).hexdigest()[:16]


def data_hash(objects: Iterable[ObjectInfo]) -> str:
    """SHA-256 over every listed key and ETag: unchanged data gives the same hash."""
    digest = hashlib.sha256()
    for obj in sorted(objects, key=lambda o: o.key):
        digest.update(f"{obj.key}\t{obj.etag}\n".encode())
    return digest.hexdigest()


def list_dataset(store: Storage, layout: Layout) -> Listing:
    """List `dataset/` (paginated); sort every object into audio, images, pairs.csv or skipped."""
    listing = Listing(audio=[], images=[], pairs_csv=None, objects=[], skipped=[])
    prefix = layout.dataset
    for obj in store.list(prefix):
        listing.objects.append(obj)
        if obj.key == layout.pairs_csv():
            listing.pairs_csv = obj
            continue
        reason = _unusable(obj, prefix)
        if reason:
            listing.skipped.append({"key": obj.key, "reason": reason, "stage": "listing"})
            continue
        modality_folder, label_folder = obj.key[len(prefix) :].split("/")[:2]
        entry = FileEntry(
            key=obj.key,
            modality="audio" if modality_folder == "audio" else "image",
            label=LABEL_FOLDERS[label_folder],
            size=obj.size,
            etag=obj.etag,
        )
        (listing.audio if entry.modality == "audio" else listing.images).append(entry)
    return listing


def _unusable(obj: ObjectInfo, prefix: str) -> str | None:
    """Why a listed object cannot be a sample, or None when it can."""
    parts = obj.key[len(prefix) :].split("/")
    if len(parts) < 3 or parts[0] not in MODALITY_FOLDERS:
        return "not under audio/{real,fake}/ or images/{real,fake}/; ignored"
    if parts[1] not in LABEL_FOLDERS:
        return f"folder {parts[1]!r} is neither real/ nor fake/, so the label is unknown"
    allowed = MODALITY_FOLDERS[parts[0]]
    ext = "." + parts[-1].rsplit(".", 1)[-1].lower() if "." in parts[-1] else ""
    if ext not in allowed:
        return f"unsupported extension {ext or '(none)'!r} for {parts[0]} ({', '.join(allowed)})"
    if obj.size == 0:
        return "empty file (0 bytes)"
    return None


# --------------------------------------------------------------------------------------------
# Pairing


def pairs_from_csv(
    text: str,
    listing: Listing,
    layout: Layout,
    val_fraction: float,
    test_fraction: float,
    where: str,
) -> tuple[list[PairRow], list[dict[str, str]]]:
    """The pairs named in pairs.csv; rows that cannot be used are returned as skipped."""
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in reader.fieldnames or []]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DataError(
            f"{where}: missing column(s) {', '.join(missing)}; "
            f"needs {', '.join(REQUIRED_COLUMNS)} [, split, family, emotion, image_emotion], "
            f"found {columns}"
        )
    audio_files = {e.key: e for e in listing.audio}
    image_files = {e.key: e for e in listing.images}
    listed_bad = {s["key"] for s in listing.skipped}
    rows: list[PairRow] = []
    skipped: list[dict[str, str]] = []
    seen: set[tuple[str, str]] = set()
    given: set[str] = set()  # splits named in the split column
    for raw in reader:
        line = reader.line_num  # of the row's last line (a quoted cell may span lines)
        extra = raw.pop(None, None)  # cells beyond the header
        short = sum(v is None for v in raw.values())  # cells the row lacks
        rec = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
        if extra or short:
            n = len(columns) + len(extra or []) - short
            skipped.append({
                "key": f"{layout.pairs_csv()}:{line}",
                "reason": f"{n} field(s) where the header has {len(columns)}",
                "stage": "pairs.csv",
            })  # fmt: skip
            continue
        audio_key = _dataset_key(rec["audio_key"], layout)
        image_key = _dataset_key(rec["image_key"], layout)
        label = LABEL_VALUES.get(rec["label"].lower())
        split = SPLIT_VALUES.get(rec.get("split", "").lower())
        problem = None
        if label is None:
            problem = f"label {rec['label']!r} is not one of 0, 1, real, fake"
        elif rec.get("split") and split is None:
            problem = f"split {rec['split']!r} is not one of train, val, test"
        elif (audio_key, image_key) in seen:
            problem = "the same pair is listed twice; the first row is kept"
        else:
            problem = _missing(rec["audio_key"], audio_key, "audio", audio_files, listed_bad)
            problem = problem or _missing(
                rec["image_key"], image_key, "image", image_files, listed_bad
            )
        if problem or label is None:
            where_row = f"{layout.pairs_csv()}:{line}"
            skipped.append({"key": where_row, "reason": str(problem), "stage": "pairs.csv"})
            continue
        seen.add((audio_key, image_key))
        if split:
            given.add(split)
        pid = pair_id_of(audio_key, image_key)
        audio, image = audio_files[audio_key], image_files[image_key]
        family = rec.get("family", "") or (LABEL_NAMES[REAL] if label == REAL else "")
        rows.append(
            PairRow(
                pair_id=pid,
                split=split or split_of(pid, val_fraction, test_fraction),
                label=label,
                family=family,
                emotion=rec.get("emotion", ""),
                image_emotion=_image_emotion(rec, label),
                audio_key=audio.key,
                audio_size=audio.size,
                audio_etag=audio.etag,
                image_key=image.key,
                image_size=image.size,
                image_etag=image.etag,
                audio_label=audio.label,
                image_label=image.label,
            )
        )
    if "split" in columns and "val" not in given and "train" in given:
        rows = _carve_val(rows, val_fraction / (1.0 - test_fraction))
    return rows, skipped


def _image_emotion(rec: dict[str, str], label: int) -> str:
    """The face's emotion: the `image_emotion` column; without one, a real pair's face shows
    the voice's `emotion` (one recording, one emotion), a fake pair's is unknown."""
    if "image_emotion" in rec:
        return rec["image_emotion"]
    return rec.get("emotion", "") if label == REAL else ""


def _missing(
    cell: str, key: str, modality: str, files: dict[str, FileEntry], listed_bad: set[str]
) -> str | None:
    """Why a pairs.csv cell names no usable file of `modality`, or None."""
    if not cell:
        return f"{modality}_key is empty"
    if key in listed_bad:
        return f"{key} was skipped at listing (see its own entry)"
    if key not in files:
        return f"{key} is not a listed {modality} file (missing, or in the wrong folder)"
    return None


def _carve_val(rows: list[PairRow], share: float) -> list[PairRow]:
    """pairs.csv gave train and test only: move a stable `share` of train to val."""
    out = []
    for r in rows:
        if r.split == "train" and stable_fraction("val:" + r.pair_id) < share:
            r = PairRow(**{**asdict(r), "split": "val"})
        out.append(r)
    return out


def _dataset_key(key: str, layout: Layout) -> str:
    key = key.lstrip("/")
    return key if key.startswith(layout.dataset) else layout.dataset_key(key)


def pairs_at_random(
    listing: Listing, seed: int, val_fraction: float, test_fraction: float
) -> tuple[list[PairRow], list[dict[str, str]]]:
    """The seed's pairing: within each label and split, shuffle (seeded) and zip, reusing the
    shorter side; a file's split is the stable hash of its own key."""
    rows: list[PairRow] = []
    skipped: list[dict[str, str]] = []
    audio_groups = _by_label_and_split(listing.audio, val_fraction, test_fraction)
    image_groups = _by_label_and_split(listing.images, val_fraction, test_fraction)
    for label in (REAL, FAKE):
        for split in SPLITS:
            group_a = _seeded_order(audio_groups.get((label, split), []), seed)
            group_i = _seeded_order(image_groups.get((label, split), []), seed)
            if not group_a or not group_i:
                lonely, other = (group_a, "image") if group_a else (group_i, "audio")
                for e in lonely:
                    skipped.append(
                        {
                            "key": e.key,
                            "reason": f"no {other} file labelled {LABEL_NAMES[label]} in the "
                            f"{split} split to pair it with",
                            "stage": "pairing",
                        }
                    )
                continue
            for k in range(max(len(group_a), len(group_i))):
                audio, image = group_a[k % len(group_a)], group_i[k % len(group_i)]
                rows.append(
                    PairRow(
                        pair_id=pair_id_of(audio.key, image.key),
                        split=split,
                        label=label,
                        family=LABEL_NAMES[REAL] if label == REAL else "",
                        emotion="",
                        image_emotion="",
                        audio_key=audio.key,
                        audio_size=audio.size,
                        audio_etag=audio.etag,
                        image_key=image.key,
                        image_size=image.size,
                        image_etag=image.etag,
                        audio_label=audio.label,
                        image_label=image.label,
                    )
                )
    return rows, skipped


def _by_label_and_split(
    entries: Iterable[FileEntry], val_fraction: float, test_fraction: float
) -> dict[tuple[int, str], list[FileEntry]]:
    """(label, split) -> the entries in it, in listing order; one hash per file."""
    groups: dict[tuple[int, str], list[FileEntry]] = {}
    for e in entries:
        groups.setdefault((e.label, split_of(e.key, val_fraction, test_fraction)), []).append(e)
    return groups


def _seeded_order(group: Sequence[FileEntry], seed: int) -> list[FileEntry]:
    return sorted(group, key=lambda e: hashlib.sha256(f"{seed}:{e.key}".encode()).digest())


# --------------------------------------------------------------------------------------------
# Building and reading


def build_manifest(
    store: Storage, layout: Layout, data: DataConfig, seed: int, run: str
) -> ManifestRef:
    """List, pair, split; write `manifest.parquet` and `files.parquet`.

    `seed` (run.seed) orders the random pairing when there is no pairs.csv.
    """
    store.check()
    listing = list_dataset(store, layout)
    where = store.uri(layout.dataset)
    if listing.pairs_csv is not None:
        csv_uri = store.uri(listing.pairs_csv.key)
        try:
            text = store.read_bytes(listing.pairs_csv.key).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataError(f"{csv_uri}: not UTF-8 text ({exc})") from exc
        rows, pair_skips = pairs_from_csv(
            text, listing, layout, data.val_fraction, data.test_fraction, csv_uri
        )
        how = "pairs.csv"
    else:
        rows, pair_skips = pairs_at_random(listing, seed, data.val_fraction, data.test_fraction)
        how = "random pairing within labels"
    skipped = listing.skipped + pair_skips
    if not rows:
        skipped_key = write_skipped(store, layout, run, skipped)
        raise DataError(
            f"{where}: no usable pairs ({len(listing.audio)} audio and {len(listing.images)} image "
            f"files usable, {len(skipped)} skipped; see {skipped_key}). "
            "Expected audio/{real,fake}/*.wav and images/{real,fake}/*.{jpg,png}"
            + (" and pairs.csv rows naming them" if listing.pairs_csv else "")
        )
    rows.sort(key=lambda r: (SPLITS.index(r.split), r.pair_id))
    counts = count_labels(rows)
    check_splits(counts, where)

    key = layout.manifest(run)
    store.write_bytes(key, _parquet(rows, PairRow), "application/vnd.apache.parquet")
    files = sorted([*listing.audio, *listing.images], key=lambda e: e.key)
    store.write_bytes(
        layout.files_table(run), _parquet(files, FileEntry), "application/vnd.apache.parquet"
    )
    log.info(
        "manifest %s: %d pairs (%s), %s; %d skipped",
        store.uri(key),
        len(rows),
        how,
        ", ".join(f"{s} {c['real']} real/{c['fake']} fake" for s, c in counts.items()),
        len(skipped),
    )
    return ManifestRef(
        run=run,
        key=key,
        uri=store.uri(key),
        n_pairs=len(rows),
        counts=counts,
        data_hash=data_hash(listing.objects),
        skipped=skipped,
    )


def count_labels(rows: Iterable[PairRow]) -> dict[str, dict[str, int]]:
    """split -> {"real": n, "fake": n}, for every split (zero counts included)."""
    counts = {s: {"real": 0, "fake": 0} for s in SPLITS}
    for r in rows:
        counts[r.split][LABEL_NAMES[int(r.label)]] += 1
    return counts


def check_splits(counts: dict[str, dict[str, int]], where: str) -> None:
    """Every split needs real and fake pairs, or training and evaluation cannot work."""
    for split in SPLITS:
        for name in ("real", "fake"):
            if counts.get(split, {}).get(name, 0) == 0:
                raise DataError(
                    f"{where}: the {split} split has no {name} pairs "
                    f"(counts: {json.dumps(counts)}); add data or change "
                    "data.val_fraction / data.test_fraction"
                )


def _parquet(items: Sequence[Any], kind: type) -> bytes:
    names = [f.name for f in fields(kind)]
    table = pa.table({n: [getattr(it, n) for it in items] for n in names})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def read_manifest(store: Storage, key: str) -> list[PairRow]:
    """The pairs of a manifest written by `build_manifest`."""
    try:
        table = pq.read_table(io.BytesIO(store.read_bytes(key)))
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{store.uri(key)}: not a readable manifest ({exc})") from exc
    names = [f.name for f in fields(PairRow)]
    missing = [n for n in names if n not in table.column_names and n not in LATER_COLUMNS]
    if missing:
        raise DataError(f"{store.uri(key)}: manifest lacks column(s) {', '.join(missing)}")
    cols: dict[str, list[Any]] = {
        n: table.column(n).to_pylist()
        if n in table.column_names
        else [LATER_COLUMNS[n]] * table.num_rows
        for n in names
    }
    return [PairRow(**{n: cols[n][i] for n in names}) for i in range(table.num_rows)]
