"""A synthetic audio-visual deepfake benchmark, written into the bucket's `dataset/`.

No real deepfake data set can be downloaded here, so this draws one: a "speaker" says a few
syllables with an emotion in the voice (pitch level and contour, syllable rate, attack, spectral
tilt) while a drawn face shows the same emotion (mouth and brows). Half of the pairs are fake,
spread evenly over seven families a real detector meets:

    fake audio, real face:
        vocoder_bandlimit      high frequencies cut off, as by a band-limited vocoder
        griffin_lim            high band smeared in time and frequency, phase rebuilt by Griffin-Lim
        buzzy_excitation       flat, jitter-free pulse-train source, no breath noise
    real audio, fake face:
        upsample_checkerboard  transposed-convolution traces: a fine 2 px checkerboard and a
                               coloured grid of period size/8
        face_blend             inner face pasted from another render: seam and tone shift
        smooth_renoise         patches blurred, then re-noised with blotchy noise
    both real:
        emotion_mismatch       the voice and the face show different emotions

The artefacts are strong enough to survive resizing to 32-64 px and 32-64 mel bands, so small
CNNs learn them in a few epochs. Everything that is not an artefact comes from the same
distributions for real and fake (sample rate, channels, duration, leading silence, loudness,
image size, format, JPEG quality), so metadata alone says nothing about the label.

Layout (keys relative to the storage root, `dataset/` = `storage.dataset_prefix`):

    dataset/audio/{real,fake}/<i>.wav    dataset/images/{real,fake}/<i>.{jpg,png}
    dataset/pairs.csv    audio_key,image_key,label,family,emotion,image_emotion
                         (keys relative to dataset/; label 1 = fake; emotion is the voice's,
                         image_emotion the face's)

An emotion-mismatch pair stores two real files (under real/) but is labelled fake in pairs.csv.
Pair i is drawn from its own generator seeded with (seed, i): the output is deterministic and
the same whatever the thread count.

    python -m tasks.data.synthetic --config config/demo.yaml --n 600
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage, signal

from config.schema import GeneratorConfig
from tasks import progress
from tasks.errors import ConfigError
from tasks.io.layout import FAKE, REAL, Layout
from tasks.io.storage import Storage, open_storage

log = logging.getLogger(__name__)

EMOTIONS = ("neutral", "happy", "sad", "angry")
AUDIO_FAMILIES = ("vocoder_bandlimit", "griffin_lim", "buzzy_excitation")
IMAGE_FAMILIES = ("upsample_checkerboard", "face_blend", "smooth_renoise")
MISMATCH = "emotion_mismatch"
FAKE_FAMILIES = (*AUDIO_FAMILIES, *IMAGE_FAMILIES, MISMATCH)
REAL_FAMILY = "real"
PAIRS_COLUMNS = ("audio_key", "image_key", "label", "family", "emotion", "image_emotion")

# Shared by real and fake, drawn independently of the label: no metadata shortcut.
SAMPLE_RATES = (16000, 22050, 24000)  # Hz
CHANNELS = (1, 1, 2)  # a third of the files are stereo
DURATION_S = (1.8, 2.6)  # uniform range, seconds
LEAD_SILENCE_S = (0.05, 0.35)  # uniform range of silence before the voice
LOUDNESS_DB = (-26.0, -18.0)  # uniform range of RMS level, dBFS
IMAGE_SIZES = (96, 128, 160)  # square, pixels
JPEG_QUALITY = 90
IMAGE_FORMATS = ("jpg", "jpg", "jpg", "png")  # a quarter PNG (half of those RGBA)

# How each emotion sounds: pitch scale, pitch contour, syllables per second, attack/release (s),
# glottal low-pass (Hz, lower = darker voice).
VOICE = {
    "neutral": dict(f0=1.0, rate=4.0, attack=0.030, release=0.060, tilt=900.0),
    "happy": dict(f0=1.35, rate=5.0, attack=0.020, release=0.050, tilt=1400.0),
    "sad": dict(f0=0.78, rate=2.5, attack=0.090, release=0.160, tilt=450.0),
    "angry": dict(f0=1.2, rate=6.5, attack=0.004, release=0.025, tilt=2400.0),
}
VOWELS = (  # formant frequencies (Hz) of a, e, i, o, u
    (700.0, 1220.0, 2600.0),
    (500.0, 1900.0, 2500.0),
    (300.0, 2300.0, 3000.0),
    (500.0, 900.0, 2400.0),
    (320.0, 870.0, 2250.0),
)
FORMANT_BW = (90.0, 110.0, 160.0)  # Hz
FORMANT_GAIN = (1.0, 0.5, 0.25)


@dataclass(frozen=True)
class PairSpec:
    """Everything decided about one pair before any sample is drawn."""

    index: int
    label: int  # 1 = fake
    family: str  # "real" or one of FAKE_FAMILIES
    emotion: str  # the voice's emotion
    image_emotion: str  # the face's emotion (differs only for emotion_mismatch)
    sample_rate: int
    channels: int
    duration_s: float
    lead_silence_s: float
    loudness_db: float
    image_size: int
    image_format: str  # "jpg" or "png"
    image_mode: str  # "RGB" or "RGBA" (PNG only)

    @property
    def audio_fake(self) -> bool:
        return self.family in AUDIO_FAMILIES

    @property
    def image_fake(self) -> bool:
        return self.family in IMAGE_FAMILIES

    @property
    def audio_key(self) -> str:
        """Relative to the dataset prefix, as pairs.csv names it."""
        return Layout.sample("audio", FAKE if self.audio_fake else REAL, f"{self.index:06d}.wav")

    @property
    def image_key(self) -> str:
        """Relative to the dataset prefix, as pairs.csv names it."""
        name = f"{self.index:06d}.{self.image_format}"
        return Layout.sample("image", FAKE if self.image_fake else REAL, name)


def plan_pairs(n: int, seed: int) -> list[PairSpec]:
    """Decide label, family, emotions and metadata of `n` pairs: half fake, families balanced."""
    if n < 2:
        raise ValueError(f"n must be at least 2 (one real, one fake pair), got {n}")
    rng = np.random.default_rng([seed, 0])
    n_fake = n // 2
    families = [REAL_FAMILY] * (n - n_fake) + [
        FAKE_FAMILIES[i % len(FAKE_FAMILIES)] for i in range(n_fake)
    ]
    families = [families[i] for i in rng.permutation(n)]
    specs = []
    for index, family in enumerate(families):
        r = np.random.default_rng([seed, 1, index])
        emotion = EMOTIONS[r.integers(len(EMOTIONS))]
        image_emotion = emotion
        if family == MISMATCH:
            others = [e for e in EMOTIONS if e != emotion]
            image_emotion = others[r.integers(len(others))]
        fmt = IMAGE_FORMATS[r.integers(len(IMAGE_FORMATS))]
        specs.append(
            PairSpec(
                index=index,
                label=REAL if family == REAL_FAMILY else FAKE,
                family=family,
                emotion=emotion,
                image_emotion=image_emotion,
                sample_rate=SAMPLE_RATES[r.integers(len(SAMPLE_RATES))],
                channels=CHANNELS[r.integers(len(CHANNELS))],
                duration_s=round(float(r.uniform(*DURATION_S)), 3),
                lead_silence_s=float(r.uniform(*LEAD_SILENCE_S)),
                loudness_db=float(r.uniform(*LOUDNESS_DB)),
                image_size=IMAGE_SIZES[r.integers(len(IMAGE_SIZES))],
                image_format=fmt,
                image_mode="RGBA" if fmt == "png" and r.random() < 0.5 else "RGB",
            )
        )
    return specs


# --------------------------------------------------------------------------------------------
# Audio


def synth_audio(spec: PairSpec, seed: int) -> np.ndarray:
    """The pair's waveform, float32 (frames, channels) in [-1, 1]."""
    rng = np.random.default_rng([seed, 2, spec.index])
    sr = spec.sample_rate
    n = int(round(spec.duration_s * sr))
    lead = int(round(spec.lead_silence_s * sr))
    tail = int(rng.uniform(0.08, 0.2) * sr)
    source = "buzz" if spec.family == "buzzy_excitation" else "glottal"
    speech = _speech(rng, spec.emotion, sr, max(n - lead - tail, sr // 4), source)
    y = np.zeros(n)
    y[lead : lead + len(speech)] = speech[: n - lead]
    noise = signal.lfilter([1.0], [1.0, -0.85], rng.standard_normal(n)) + rng.standard_normal(n)
    y += noise * (_rms(speech) * 10 ** (rng.uniform(-46, -38) / 20) / _rms(noise))

    if spec.family == "vocoder_bandlimit":
        cutoff = rng.uniform(3200.0, 4200.0)
        y = signal.sosfiltfilt(signal.butter(10, cutoff, fs=sr, output="sos"), y)
    elif spec.family == "griffin_lim":
        y = _griffin_lim_smear(y, sr, rng)

    y *= 10 ** (spec.loudness_db / 20) / _rms(y)
    peak = np.max(np.abs(y))
    if peak > 0.98:
        y *= 0.98 / peak
    if spec.channels == 2:
        other = y * rng.uniform(0.85, 1.0) + rng.standard_normal(n) * 1e-4
        return np.stack([y, other], axis=1).astype(np.float32)  # (frames, 2)
    return y[:, None].astype(np.float32)  # (frames, 1)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x))) + 1e-12)


def _speech(rng: np.random.Generator, emotion: str, sr: int, n: int, source: str) -> np.ndarray:
    """A few syllables: pulses -> glottal tilt -> vowel formants, plus breath and fricatives."""
    v = VOICE[emotion]
    t = np.arange(n) / sr
    u = t / t[-1]  # 0..1 over the utterance
    base = rng.uniform(115.0, 165.0) * v["f0"]
    if emotion == "happy":  # rising, lively
        contour = (1 + 0.18 * u) * (1 + 0.12 * np.sin(2 * np.pi * 3.0 * t))
    elif emotion == "sad":  # falling, monotone
        contour = 1 - 0.22 * u
    elif emotion == "angry":  # high, flat, abrupt steps
        contour = 1 + 0.06 * np.sign(np.sin(2 * np.pi * v["rate"] * t + rng.uniform(0, 6)))
    else:
        contour = 1 + 0.02 * np.sin(2 * np.pi * 1.2 * t)
    f0 = base * contour
    if source == "glottal":  # natural jitter; the buzzy vocoder has none
        f0 *= 1 + 0.01 * signal.lfilter([0.05], [1, -0.95], rng.standard_normal(n))
    phase = np.cumsum(f0 / sr)
    pulses = np.diff(np.floor(phase), prepend=0.0)  # one impulse per period

    # Syllables: onsets, voiced envelope, vowel per syllable, optional fricative before it.
    env = np.zeros(n)
    voice = np.zeros(n)
    fric = np.zeros(n)
    period = 1.0 / (v["rate"] * rng.uniform(0.9, 1.1))
    start = 0.0
    formant_scale = rng.uniform(0.92, 1.12)
    if source == "glottal":
        a = math.exp(-2 * math.pi * v["tilt"] / sr)
        excitation = signal.lfilter([1 - a], [1, -a], signal.lfilter([1 - a], [1, -a], pulses))
        excitation /= _rms(excitation)
    else:
        excitation = pulses / _rms(pulses)
    band = signal.butter(4, [3000.0, 0.45 * sr], btype="bandpass", fs=sr, output="sos")
    k = 0
    while start < t[-1] - 0.1:
        dur = period * rng.uniform(0.75, 1.25)
        i0, i1 = int(start * sr), min(int((start + dur * 0.72) * sr), n)
        if i1 - i0 > 16:
            seg = np.arange(i1 - i0) / sr
            att = np.clip(seg / v["attack"], 0, 1)
            rel = np.clip((seg[-1] - seg) / v["release"], 0, 1)
            accent = rng.uniform(0.6, 1.0) if emotion == "angry" else rng.uniform(0.8, 1.0)
            if emotion == "sad":
                accent *= 1 - 0.5 * u[i0]
            env[i0:i1] = accent * np.sin(0.5 * np.pi * att) * np.sin(0.5 * np.pi * rel)
            vowel = VOWELS[rng.integers(len(VOWELS))]
            seg_src = excitation[i0:i1]
            out = np.zeros(i1 - i0)
            for freq, bw, gain in zip(vowel, FORMANT_BW, FORMANT_GAIN, strict=True):
                out += gain * _resonate(seg_src, freq * formant_scale, bw, sr)
            voice[i0:i1] = out
            if k > 0 and rng.random() < 0.6:  # a fricative consonant before the vowel
                m = int(rng.uniform(0.04, 0.09) * sr)
                j0 = max(i0 - m, 0)
                burst = signal.sosfilt(band, rng.standard_normal(i0 - j0))
                fric[j0:i0] = burst * np.hanning(i0 - j0) * rng.uniform(0.15, 0.35)
        start += dur
        k += 1
    voice *= env
    voice /= _rms(voice[env > 0.1]) if np.any(env > 0.1) else 1.0
    out = voice
    if source == "glottal":
        breath = np.diff(rng.standard_normal(n + 1)) * env * 0.04
        out = out + breath + 2.0 * fric
    return out


def _resonate(x: np.ndarray, freq: float, bw: float, sr: int) -> np.ndarray:
    """A two-pole formant resonator."""
    r = math.exp(-math.pi * bw / sr)
    theta = 2 * math.pi * min(freq, 0.45 * sr) / sr
    return signal.lfilter([1 - r], [1, -2 * r * math.cos(theta), r * r], x)


def _griffin_lim_smear(y: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Blur the magnitude above ~2.5 kHz in time and frequency; rebuild phase by Griffin-Lim."""
    n_fft = 1 << int(round(math.log2(sr * 0.032)))  # ~32 ms window, hop = n_fft / 4
    mag = np.abs(_stft(y, n_fft))  # (frames, bins)
    cut = int(2500.0 / sr * n_fft)
    mag[:, cut:] = ndimage.uniform_filter(mag[:, cut:], size=(15, 7), mode="nearest")
    phase = np.exp(2j * np.pi * rng.random(mag.shape))
    for _ in range(8):  # plain Griffin-Lim: few iterations leave its phasey trace
        spec = _stft(_istft(mag * phase, n_fft, len(y)), n_fft)
        phase = spec / np.maximum(np.abs(spec), 1e-12)
    return _istft(mag * phase, n_fft, len(y))


def _stft(x: np.ndarray, n_fft: int) -> np.ndarray:
    """Hann-windowed STFT with hop n_fft/4: (frames, n_fft/2 + 1) complex."""
    hop = n_fft // 4
    padded = np.pad(x, (n_fft, n_fft + (-len(x)) % hop))
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]
    return np.fft.rfft(frames * np.hanning(n_fft), axis=1)


def _istft(spec: np.ndarray, n_fft: int, length: int) -> np.ndarray:
    """Inverse of `_stft` by weighted overlap-add, cut to `length` samples."""
    hop = n_fft // 4
    win = np.hanning(n_fft)
    frames = np.fft.irfft(spec, n=n_fft, axis=1) * win
    n = len(frames)
    out = np.zeros((n + 3) * hop)
    norm = np.zeros_like(out)
    for k in range(4):  # frame i covers hops i..i+3: add each quarter at its offset
        out[k * hop : k * hop + n * hop] += frames[:, k * hop : (k + 1) * hop].reshape(-1)
        norm[k * hop : k * hop + n * hop] += np.tile(win[k * hop : (k + 1) * hop] ** 2, n)
    out /= np.maximum(norm, 1e-8)
    return out[n_fft : n_fft + length]


def encode_wav(samples: np.ndarray, sample_rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Images


def synth_image(spec: PairSpec, seed: int) -> Image.Image:
    """The pair's face picture (size x size), with the family's artefact if the image is fake."""
    rng = np.random.default_rng([seed, 3, spec.index])
    s = spec.image_size
    face = _face(rng, s, spec.image_emotion)  # float32 (S, S, 3) in [0, 255]
    if spec.family == "upsample_checkerboard":
        face = _checkerboard(face, rng)
    elif spec.family == "face_blend":
        donor = _face(np.random.default_rng([seed, 4, spec.index]), s, spec.image_emotion)
        face = _blend_inner_face(face, donor, rng)
    img = Image.fromarray(np.clip(face, 0, 255).astype(np.uint8))
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 0.9)))
    arr = np.asarray(img, dtype=np.float64)
    noise_sigma = rng.uniform(2.0, 7.0)
    arr = arr + rng.normal(0.0, noise_sigma, arr.shape)
    if spec.family == "smooth_renoise":
        arr = _smooth_renoise(arr, rng, noise_sigma)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if spec.image_mode == "RGBA":
        img.putalpha(255)
    return img


def _face(rng: np.random.Generator, s: int, emotion: str) -> np.ndarray:
    """A drawn face showing `emotion` with its mouth and brows, on a blotchy background."""
    top, bottom = rng.uniform(40, 220, 3), rng.uniform(40, 220, 3)
    grad = np.linspace(0, 1, s)[:, None, None]
    bg = (top * (1 - grad) + bottom * grad) * np.ones((1, s, 1))
    blotch = _upsample(rng.normal(0, 18, (5, 5, 3)), s, s)
    img = Image.fromarray(np.clip(bg + blotch, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)

    cx = s * (0.5 + rng.uniform(-0.06, 0.06))
    cy = s * (0.52 + rng.uniform(-0.05, 0.05))
    rx = s * rng.uniform(0.27, 0.33)
    ry = rx * rng.uniform(1.15, 1.3)
    skin = np.array([rng.uniform(150, 245), rng.uniform(105, 200), rng.uniform(80, 170)])
    hair = tuple(int(c) for c in rng.uniform(10, 110, 3))
    d.ellipse([cx - rx * 1.05, cy - ry * 1.08, cx + rx * 1.05, cy + ry * 0.2], fill=hair)
    d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=tuple(int(c) for c in skin))
    ink = tuple(int(c) for c in skin * 0.25)
    w = max(2, int(round(s / 26)))  # stroke width: ~1 px even at 32 px input

    # Eyes.
    ex, ey, er = 0.4 * rx, cy - 0.18 * ry, 0.15 * rx
    for side in (-1, 1):
        x = cx + side * ex
        d.ellipse([x - er * 1.3, ey - er, x + er * 1.3, ey + er], fill=(245, 245, 240))
        d.ellipse([x - er * 0.6, ey - er * 0.6, x + er * 0.6, ey + er * 0.6], fill=ink)

    # Brows: (inner end, outer end) heights relative to the eye, in units of er.
    by = {"neutral": (2.0, 2.0), "happy": (2.6, 2.3), "sad": (3.0, 1.5), "angry": (1.0, 2.8)}
    inner, outer = by[emotion]
    for side in (-1, 1):
        x_in, x_out = cx + side * (ex - er * 1.2), cx + side * (ex + er * 1.6)
        d.line([(x_in, ey - inner * er), (x_out, ey - outer * er)], fill=ink, width=w)

    # Mouth.
    my, mw = cy + 0.5 * ry, rx * rng.uniform(0.45, 0.55)
    lip = (int(skin[0] * 0.55), int(skin[1] * 0.25), int(skin[2] * 0.3))
    if emotion == "happy":  # smile: lower half of an ellipse
        d.arc([cx - mw, my - mw * 0.7, cx + mw, my + mw * 0.45], 15, 165, fill=lip, width=w + 1)
    elif emotion == "sad":  # frown: upper half
        d.arc([cx - mw, my - mw * 0.05, cx + mw, my + mw * 0.9], 200, 340, fill=lip, width=w + 1)
    elif emotion == "angry":  # shouting: open dark mouth with teeth
        d.rectangle([cx - mw * 0.8, my - mw * 0.25, cx + mw * 0.8, my + mw * 0.3], fill=ink)
        d.rectangle([cx - mw * 0.7, my - mw * 0.25, cx + mw * 0.7, my - mw * 0.08], fill=(235,) * 3)
    else:  # neutral: a straight line
        d.line([(cx - mw * 0.75, my), (cx + mw * 0.75, my)], fill=lip, width=w + 1)
    return np.asarray(img, dtype=np.float32)


def _checkerboard(face: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Transposed-convolution upsampling traces: a fine 2 px checkerboard and a coarse colour grid.

    The coarse period is size/8, so the grid survives resizing down to 32 px (4 px there).
    """
    s = face.shape[0]
    y, x = np.mgrid[0:s, 0:s]
    fine = np.where((x + y) % 2 == 0, 1.0, -1.0)
    w = 2 * np.pi / (s / 8)
    offset = rng.uniform(0, 2 * np.pi)
    grid = np.stack(  # a slightly different phase per channel: the grid is coloured
        [
            np.tanh(2 * np.cos(w * x + offset + k) * np.cos(w * y + offset + k))
            for k in (0, 0.7, 1.4)
        ],
        axis=-1,
    )
    gain = 1 + rng.uniform(0.12, 0.18) * grid + rng.uniform(0.04, 0.07) * fine[..., None]
    return face * gain


def _blend_inner_face(face: np.ndarray, donor: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Paste the donor's inner face into `face` with a tone shift and a visible seam."""
    s = face.shape[0]
    shift = rng.integers(-s // 16, s // 16 + 1, size=2)
    donor = np.roll(donor, tuple(int(v) for v in shift), axis=(0, 1))
    tone = rng.uniform(0.85, 1.15, 3)
    k = rng.integers(3)
    tone[k] = 1 + rng.choice([-1, 1]) * rng.uniform(0.2, 0.3)  # at least one channel far off
    donor = donor * tone
    y, x = np.mgrid[0:s, 0:s] / s
    mask = ((x - 0.5) / 0.22) ** 2 + ((y - 0.58) / 0.27) ** 2 <= 1.0
    soft = ndimage.gaussian_filter(mask.astype(np.float32), sigma=s / 96)
    out = face * (1 - soft[..., None]) + donor * soft[..., None]
    wide = ndimage.gaussian_filter(mask.astype(np.float32), sigma=s / 40)
    seam = np.clip(4 * wide * (1 - wide), 0, 1)  # 1 on the boundary, 0 away from it
    return out * (1 - rng.uniform(0.3, 0.45) * seam[..., None])


def _smooth_renoise(arr: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Blur one to three patches hard, then re-noise them with blotchy noise and a level shift."""
    s = arr.shape[0]
    out = arr.copy()
    for _ in range(int(rng.integers(2, 4))):
        h, w = (rng.uniform(0.35, 0.55, 2) * s).astype(int)
        y0, x0 = int(rng.integers(0, s - h)), int(rng.integers(0, s - w))
        patch = ndimage.gaussian_filter(arr[y0 : y0 + h, x0 : x0 + w], sigma=(s / 20, s / 20, 0))
        cell = max(2, s // 12)  # blotches stay visible at 32 px
        blot = _upsample(rng.normal(0, 1, (h // cell + 1, w // cell + 1, 3)), h, w)
        fine = rng.normal(
            0.0, sigma, patch.shape
        )  # keeps the grain (and the file size) of the rest
        level = 1 + rng.choice([-1, 1]) * rng.uniform(0.12, 0.2)
        patch = patch * level + blot * max(3 * sigma, 12.0) + fine
        out[y0 : y0 + h, x0 : x0 + w] = patch
    return out


def _upsample(small: np.ndarray, h: int, w: int) -> np.ndarray:
    """Smoothly (bicubic) enlarge a (h0, w0, C) float array to (h, w, C)."""
    channels = [
        np.asarray(
            Image.fromarray(small[..., c].astype(np.float32), mode="F").resize(
                (w, h), Image.Resampling.BICUBIC
            )
        )
        for c in range(small.shape[2])
    ]
    return np.stack(channels, axis=-1)


def encode_image(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        img.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Writing


def generate(store: Storage, layout: Layout, n: int, seed: int, workers: int = 4) -> list[PairSpec]:
    """Write `n` pairs and `pairs.csv` under `layout.dataset`; returns the pairs' specs."""
    specs = plan_pairs(n, seed)

    def write_pair(spec: PairSpec) -> None:
        wav = encode_wav(synth_audio(spec, seed), spec.sample_rate)
        store.write_bytes(layout.dataset_key(spec.audio_key), wav, content_type="audio/wav")
        picture = encode_image(synth_image(spec, seed), spec.image_format)
        kind = "image/jpeg" if spec.image_format == "jpg" else "image/png"
        store.write_bytes(layout.dataset_key(spec.image_key), picture, content_type=kind)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="make-dataset") as pool:
        written = progress.track(pool.map(write_pair, specs), total=n, description="benchmark")
        for done, _ in enumerate(written, start=1):
            if done % 100 == 0:
                log.info("wrote %d/%d pairs", done, n)
    store.write_bytes(layout.pairs_csv(), pairs_csv(specs), content_type="text/csv")
    where = store.uri(layout.dataset)
    log.info("wrote %d pairs (%d fake) to %s", n, sum(s.label for s in specs), where)
    return specs


def pairs_csv(specs: Sequence[PairSpec]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(PAIRS_COLUMNS)
    for s in specs:
        writer.writerow([s.audio_key, s.image_key, s.label, s.family, s.emotion, s.image_emotion])
    return buf.getvalue().encode()


def dataset_is_empty(store: Storage, layout: Layout) -> bool:
    store.check()
    return next(iter(store.list(layout.dataset)), None) is None


def ensure_demo_dataset(
    store: Storage, layout: Layout, generator: GeneratorConfig, n: int | None = None
) -> int:
    """Write the benchmark when `dataset/` is empty and `generator.fill_empty_dataset` is on.

    Returns the number of pairs written (0 when data is already there or filling is off).
    """
    if not dataset_is_empty(store, layout):
        log.info("%s already holds data; not generating", store.uri(layout.dataset))
        return 0
    if not generator.fill_empty_dataset:
        log.warning(
            "%s is empty and generator.fill_empty_dataset is off; not generating",
            store.uri(layout.dataset),
        )
        return 0
    n = generator.n_pairs if n is None else n
    generate(store, layout, n, generator.seed)
    return n


def main(argv: Sequence[str] | None = None) -> int:
    from config import load_config
    from config.cli import base_parser, run_cli

    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--n", type=int, default=None, help="pairs (default: generator.n_pairs)")
    parser.add_argument("--seed", type=int, default=None, help="default: generator.seed")
    parser.add_argument(
        "--force", action="store_true", help="write even if dataset/ already holds objects"
    )

    def run(args: argparse.Namespace) -> None:
        cfg = load_config(args.config, args.overrides)
        store = open_storage(cfg.storage)
        layout = Layout.from_config(cfg.storage)
        n = cfg.generator.n_pairs if args.n is None else args.n
        if n < 2:
            raise ConfigError(f"--n: need at least 2 pairs, got {n}")
        if not args.force and not dataset_is_empty(store, layout):
            raise ConfigError(
                f"{store.uri(layout.dataset)}: already holds objects; "
                "use --force to write over them or point storage.uri elsewhere"
            )
        seed = cfg.generator.seed if args.seed is None else args.seed
        generate(store, layout, n, seed)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_cli(run, parser, argv)


def cli() -> int:
    """The `deepfake-make-dataset` console script: parse sys.argv, run, return the exit code."""
    return main()


if __name__ == "__main__":
    sys.exit(cli())
