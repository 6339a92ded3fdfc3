"""Bad and unusual input beyond tests/unit/test_preprocess.py's: audio codecs and containers,
image modes, orientations, animations and tiny sizes, keys with spaces, unicode and `../`,
malformed pairs.csv rows, and a config with each setting of the wrong type. Each is decoded
correctly, skipped and reported with a reason, or refused up front with one clear message."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import yaml
from PIL import Image

from config import load_config
from config.schema import DataConfig, PipelineConfig
from tasks.data.decode import preprocess_audio, preprocess_image
from tasks.data.shards import read_shard
from tasks.errors import ConfigError, CorruptSample
from tasks.io.storage import Storage, open_storage
from tests.unit.synthetic_data import (
    TINY_DATA,
    features_of,
    generated,
    load_into,
    manifest_of,
    tiny_config,
)

DATA = DataConfig(sample_rate=16000, clip_seconds=1.0, **TINY_DATA)
CROP = DataConfig(
    sample_rate=16000, clip_seconds=1.0, image_mode="crop", crop_margin=8, **TINY_DATA
)


def tone(sr: int, channels: int = 1, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    y = 0.3 * np.sin(2 * np.pi * 440 * t)
    return np.repeat(y[:, None], channels, axis=1)


def encoded(fmt: str, subtype: str, sr: int = 16000, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, tone(sr, channels), sr, format=fmt, subtype=subtype)
    return buf.getvalue()


REFERENCE = preprocess_audio(encoded("WAV", "PCM_16"), DATA)


# --- audio ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subtype", "sr", "channels"),
    [
        ("GSM610", 8000, 1),  # GSM 6.10: 8 kHz mono only
        ("ULAW", 8000, 1),
        ("ALAW", 16000, 1),
        ("IMA_ADPCM", 16000, 1),
        ("MS_ADPCM", 22050, 2),
        ("PCM_24", 44100, 1),
        ("PCM_32", 16000, 1),
        ("FLOAT", 16000, 8),
        ("DOUBLE", 48000, 2),
    ],
)
def test_every_wav_codec_decodes_to_the_same_tone(subtype: str, sr: int, channels: int) -> None:
    mel = preprocess_audio(encoded("WAV", subtype, sr, channels), DATA, "clip.wav")
    assert mel.shape == REFERENCE.shape and np.isfinite(mel).all()
    # the 440 Hz tone lands in the same band in every frame but the edges
    assert (np.argmax(mel[0, :, 4:-4], axis=0) == np.argmax(REFERENCE[0, :, 4:-4], axis=0)).all()


@pytest.mark.parametrize(("fmt", "subtype"), [("MP3", "MPEG_LAYER_III"), ("FLAC", "PCM_16"),
                                              ("OGG", "VORBIS"), ("AIFF", "PCM_16")])  # fmt: skip
def test_other_containers_named_wav_decode_by_their_content(fmt: str, subtype: str) -> None:
    """What matters is the bytes: an MP3, FLAC, OGG or AIFF file named .wav is read as itself."""
    mel = preprocess_audio(encoded(fmt, subtype), DATA, "named.wav")
    assert mel.shape == REFERENCE.shape
    assert np.argmax(mel[0, :, 8]) == np.argmax(REFERENCE[0, :, 8])


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"RIFF\x00\x00\x00\x00WAVE", "not a readable"),  # a RIFF header and nothing else
        (b"hello, this is a text file\n" * 50, "not a readable"),
        ("voix,é,ü\n".encode() * 200, "not a readable"),  # UTF-8 text named .wav
        (b"\x00" * 4096, "not a readable"),
        (b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\x00" * 100, "not a readable"),  # an MP3 tag only
    ],
)
def test_text_and_junk_named_wav_are_corrupt_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(CorruptSample, match=rf"^junk.wav: .*{reason}"):
        preprocess_audio(data, DATA, "junk.wav")


# --- images --------------------------------------------------------------------------------------


def saved(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def quadrants(w: int = 64, h: int = 48) -> Image.Image:
    """White top-left quadrant on black: its position shows the orientation."""
    img = Image.new("RGB", (w, h), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, w // 2, h // 2))
    return img


# Each EXIF orientation: the stored picture is the upright one transformed by its inverse.
STORED = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("orientation", [1, *STORED])
def test_exif_rotated_jpegs_are_decoded_upright(orientation: int) -> None:
    upright = quadrants()
    stored = upright.transpose(STORED[orientation]) if orientation in STORED else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = preprocess_image(saved(stored, "JPEG", exif=exif, quality=95), DATA, "r.jpg")
    want = np.asarray(upright.resize((32, 32)), dtype=np.float32).transpose(2, 0, 1)
    assert np.abs(out.astype(np.float32) - want).mean() < 20  # upright, not mirrored or turned
    assert out[:, :12, :12].mean() > 200 and out[:, -12:, -12:].mean() < 50


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (40, 40), c) for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]
    return saved(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def png16_rgb() -> bytes:
    """A 48-bit RGB PNG (16 bits per channel); PIL gives it as 8-bit RGB."""
    import zlib

    w = h = 8
    rows = b"".join(b"\x00" + (b"\xff\xff\x80\x00\x00\x00") * w for _ in range(h))  # orange-ish

    def chunk(tag: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + tag + body + zlib.crc32(tag + body).to_bytes(4, "big")

    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([16, 2, 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def palette_with_transparency() -> bytes:
    img = Image.new("P", (30, 30), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.paste(1, (0, 0, 15, 30))
    return saved(img, "PNG", transparency=0)


RGBA = Image.new("RGBA", (20, 20), (10, 20, 250, 128))
GREY16 = Image.fromarray(np.full((9, 9), 65535, np.uint16))


@pytest.mark.parametrize(
    ("name", "data", "colour"),
    [
        ("animated PNG: first frame", animated("PNG"), (200, 30, 30)),
        ("16-bit RGB PNG", png16_rgb(), (255, 128, 0)),
        ("CMYK JPEG", saved(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG"), (255, 0, 0)),
        ("RGBA PNG, half transparent", saved(RGBA, "PNG"), (10, 20, 250)),
        ("16-bit greyscale PNG", saved(GREY16, "PNG"), (255, 255, 255)),
    ],
)  # fmt: skip
def test_image_modes_decode_to_their_colour(
    name: str, data: bytes, colour: tuple[int, ...]
) -> None:
    out = preprocess_image(data, DATA, "m.png")
    assert out.shape == (3, 32, 32), name
    got = out.reshape(3, -1).mean(axis=1)
    assert np.abs(got - np.array(colour)).max() < 8, f"{name}: {got}"


def test_palette_with_transparency_keeps_its_colours() -> None:
    out = preprocess_image(palette_with_transparency(), DATA, "p.png")
    assert out[1, :, :10].mean() > 240 and out[0, :, -10:].mean() > 240  # green left, red right


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "TIFF", "BMP"])
def test_animated_and_other_formats_are_refused_by_name(fmt: str) -> None:
    data = animated(fmt) if fmt in ("GIF", "WEBP") else saved(Image.new("RGB", (20, 20)), fmt)
    with pytest.raises(CorruptSample, match=rf"^x.png: {fmt} image; only JPEG, PNG are supported"):
        preprocess_image(data, DATA, "x.png")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("cfg", [DATA, CROP], ids=["resize", "crop"])
@pytest.mark.parametrize("size", [(1, 1), (1, 50), (50, 1)])
def test_one_pixel_images_decode(fmt: str, cfg: DataConfig, size: tuple[int, int]) -> None:
    out = preprocess_image(saved(Image.new("RGB", size, (90, 160, 220)), fmt), cfg, "dot")
    side = cfg.image_size + (cfg.crop_margin if cfg.image_mode == "crop" else 0)
    assert out.shape == (3, side, side)
    assert np.abs(out.reshape(3, -1).mean(axis=1) - [90, 160, 220]).max() < 8


def test_zero_length_image_and_audio_name_the_file() -> None:
    with pytest.raises(CorruptSample, match=r"^e.png: empty file \(0 bytes\)"):
        preprocess_image(b"", DATA, "e.png")
    with pytest.raises(CorruptSample, match=r"^e.wav: "):
        preprocess_audio(b"", DATA, "e.wav")


# --- keys and pairs.csv --------------------------------------------------------------------------

ODD_NAMES = ["with space", "unicodé ünïcode 声音", "a+b=c&d", "percent%20sign", "semi;colon"]


def renamed(objects: dict[str, bytes]) -> dict[str, bytes]:
    """The bench with its first pairs' files renamed to odd names, pairs.csv following them."""
    rows = list(csv.DictReader(io.StringIO(objects["dataset/pairs.csv"].decode())))
    out = {k: v for k, v in objects.items() if k != "dataset/pairs.csv"}
    for name, row in zip(ODD_NAMES, rows, strict=False):
        for col in ("audio_key", "image_key"):
            old = row[col]
            folder, _, file = old.rpartition("/")
            new = f"{folder}/{name} {file}"
            out[f"dataset/{new}"] = out.pop(f"dataset/{old}")
            row[col] = new
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    out["dataset/pairs.csv"] = buf.getvalue().encode()
    return out


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_keys_with_spaces_and_unicode_go_through(kind: str, tmp_path: Path, request) -> None:
    server = request.getfixturevalue("s3_server") if kind == "s3" else None
    cfg = tiny_config(kind, tmp_path, server)
    store = open_storage(cfg.storage)
    load_into(store, renamed(generated(40, seed=21)))
    manifest = manifest_of(store, cfg, "odd")
    assert manifest.n_pairs == 40 and manifest.skipped == []
    ref = features_of(store, cfg, manifest)
    assert ref.skipped == []
    assert sum(len(read_shard(store, k)["label"]) for s in ref.shards.values() for k in s) == 40


def write_pairs(store: Storage, text: str) -> None:
    store.write_bytes("dataset/pairs.csv", text.encode())


def test_malformed_pairs_csv_rows_are_skipped_with_their_line(tmp_path: Path) -> None:
    cfg = tiny_config("local", tmp_path)
    store = open_storage(cfg.storage)
    bench = generated(40, seed=21)
    load_into(store, bench)
    header, *rows = bench["dataset/pairs.csv"].decode().splitlines()
    assert header == "audio_key,image_key,label,family,emotion,image_emotion"
    a0, i0 = rows[0].split(",")[:2]
    kept = rows[4:]
    bad = {  # the line each bad row ends on -> the reason it must be skipped with
        "few": (f"{a0},{i0}", "2 field(s) where the header has 6"),
        "many": (f"{rows[1]},surplus,fields", "8 field(s) where the header has 6"),
        "empty cells": (",,,,,", "label '' is not one of"),
        "escapes dataset/": (f"../{a0},{i0},fake,,,", "dataset/../audio/real/"),
        "absolute path": (f"/etc/passwd,{i0},real,,,", "dataset/etc/passwd is not a listed audio"),
        "cell over two lines": (f'"{a0}\nsecond line",{i0},fake,,,', "is not a listed audio"),
        "NUL label": (f"{a0},{i0},\x00,,,", "label '\\x00' is not one of"),
    }
    lines, ends, at = [header, *kept, ""], {}, len(kept) + 2  # a blank line is ignored
    for name, (row, _) in bad.items():
        lines.append(row)
        at += 1 + row.count("\n")
        ends[name] = at
    write_pairs(store, "\n".join(lines) + "\n")
    ref = manifest_of(store, cfg, "m")
    reasons = {s["key"]: s["reason"] for s in ref.skipped}
    for name, (_, reason) in bad.items():
        got = reasons.get(f"dataset/pairs.csv:{ends[name]}", "")
        assert reason in got, f"{name}: {got!r} (all: {reasons})"
    assert ref.n_pairs == len(kept) and len(ref.skipped) == len(bad)


def test_a_detect_pairs_csv_with_ragged_rows_keeps_its_key_columns() -> None:
    from tasks.evaluate.detect import read_pairs_csv

    text = "audio_key,image_key\na.wav,a.png,surplus,cells\nb.wav\n"
    assert read_pairs_csv(text, "p.csv") == [("a.wav", "a.png"), ("b.wav", "")]


def test_pairs_csv_that_is_not_utf8_or_empty_is_refused(tmp_path: Path) -> None:
    from tasks.errors import DataError

    cfg = tiny_config("local", tmp_path)
    store = open_storage(cfg.storage)
    load_into(store, generated(8, seed=5))
    store.write_bytes("dataset/pairs.csv", b"audio_key,image_key,label\n\xff\xfe,x,1\n")
    with pytest.raises(DataError, match=r"pairs.csv: not UTF-8 text"):
        manifest_of(store, cfg, "u")
    store.write_bytes("dataset/pairs.csv", b"")
    with pytest.raises(DataError, match=r"pairs.csv: missing column\(s\) audio_key, image_key"):
        manifest_of(store, cfg, "e")


# --- config --------------------------------------------------------------------------------------


def leaves(d: dict[str, Any], path: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        full = f"{path}.{k}" if path else k
        out.extend(leaves(v, full) if isinstance(v, dict) else [(full, v)])
    return out


def wrong(value: Any) -> Any:
    """A value of another type than `value`'s (and than None's): a mapping for scalars and lists,
    a list for a mapping-valued default."""
    return {"not": "this"} if not isinstance(value, dict) else ["not", "this"]


SETTINGS = leaves(PipelineConfig().model_dump(mode="json"))


@pytest.mark.parametrize(("key", "default"), SETTINGS, ids=[k for k, _ in SETTINGS])
def test_each_setting_of_the_wrong_type_is_refused_naming_it(
    key: str, default: Any, tmp_path: Path
) -> None:
    raw: dict[str, Any] = {}
    node = raw
    *parents, last = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = wrong(default)
    path = tmp_path / "wrong.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    message = str(exc.value)
    assert key in message and str(path) in message, message


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("storage:\n  uri: [unclosed\n", "YAML"),
        ("storage:\n\turi: x\n", "YAML"),  # a tab
        ("- a\n- b\n", "mapping"),
        ("storage: 5\n", "storage"),
        ("storage:\n  presign_expiry_s: 600\n", "presign_expiry_s was removed"),
    ],
)
def test_malformed_config_files_give_one_clear_error(
    text: str, phrase: str, tmp_path: Path
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=phrase) as exc:
        load_config(path)
    assert str(path) in str(exc.value)


def test_a_missing_or_empty_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == PipelineConfig()  # an empty file: the defaults
