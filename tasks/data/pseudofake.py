"""Pseudo-fake faces for training: a real picture made fake by blending an altered copy of
itself back into a region of it (after "self-blended images", Shiohara and Yamasaki, CVPR 2022).

A detector trained only on the fakes in its bucket learns those generators' traces and misses
other generators' (the quality benchmark's leave-one-family-out figures show it). What every
face manipulation shares is a region whose pixels went through a different process than the
rest: resampled, re-coloured, blurred or sharpened, re-noised, slightly misaligned, then blended
in along a seam. A pseudo-fake is exactly that and nothing else (same person, same expression,
same lighting), so the only way to tell it from its source is the trace of the process: the
evidence that generalises.

`self_blend` alters a copy of the image with one to three of those processes, each drawn from
`rng`, and blends it in through a soft elliptical mask of random size, place, softness and
strength. It works on the shard's uint8 (3, H, W) pictures before the training crop.
`DeepfakeDataset` shows one to a share (`training.pseudo_fake_rate`) of the training pairs with
a fake voice and a real picture, with an image label of 1: the per-modality image heads learn
it, and the pair, fake already, keeps its label, so the real class and the decision's balance
stay as they were. Emotion-mismatch pairs keep their real faces: there the decision must learn
the emotions' disagreement, not a trace.

`self_blend_audio` is the same for the voice, on the shard's log-mels: one stretch of time and
frequency (most often the upper bands, where vocoders differ most) smeared in time or across
bands, its harmonics flattened towards the envelope or sharpened above it, re-noised, lowered
or its envelope re-shaped, blended back in through soft edges. `training.audio_pseudo_fake_rate`
(0.5 by default) shows one to that share of the training pairs with a real voice and a fake
face, with an audio label of 1.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

# PIL's resampling filters, for the way down and the way back up.
_FILTERS = (
    Image.Resampling.NEAREST,
    Image.Resampling.BOX,
    Image.Resampling.BILINEAR,
    Image.Resampling.BICUBIC,
    Image.Resampling.LANCZOS,
)


def self_blend(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A pseudo-fake of `image` (uint8 (3, H, W)): same shape and dtype."""
    face = np.ascontiguousarray(image.transpose(1, 2, 0))  # (H, W, 3) uint8
    h, w = face.shape[:2]
    original = source = face.astype(np.float32)  # every alteration returns a new array
    n = int(rng.integers(1, 4))
    for k in rng.choice(len(_ALTERATIONS), size=n, replace=False):
        source = _ALTERATIONS[k](source, rng)
    mask = _mask(h, w, rng)[..., None]
    out = original * (1 - mask) + source * mask
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).transpose(2, 0, 1)


def _resample(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Down to 35-80% of the size and back up, with any of PIL's filters each way: the
    interpolation grid an upsampling generator or a pasted, rescaled face leaves."""
    h, w = x.shape[:2]
    scale = rng.uniform(0.35, 0.8)
    small = (max(2, int(round(w * scale))), max(2, int(round(h * scale))))
    down, up = (_FILTERS[int(i)] for i in rng.integers(0, len(_FILTERS), size=2))
    img = Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))
    return np.asarray(img.resize(small, down).resize((w, h), up), dtype=np.float32)


def _recolour(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A per-channel gain and offset: the tone mismatch of a face from another picture."""
    gain = rng.uniform(0.85, 1.15, 3).astype(np.float32)
    offset = rng.uniform(-15.0, 15.0, 3).astype(np.float32)
    return x * gain + offset


def _blur(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A Gaussian blur (sigma 0.5-1.5 px): a smoother, lower-detail region."""
    return ndimage.gaussian_filter(x, sigma=(rng.uniform(0.5, 1.5),) * 2 + (0,))


def _sharpen(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An unsharp mask: over-crisp edges."""
    soft = ndimage.gaussian_filter(x, sigma=(1.0, 1.0, 0))
    return x + rng.uniform(0.5, 1.5) * (x - soft)


def _renoise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fresh Gaussian noise (sigma 2-8 grey levels): grain that differs from the rest."""
    return x + rng.normal(0.0, rng.uniform(2.0, 8.0), x.shape).astype(np.float32)


def _shift(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A shift by 1 px to 3% of the size, in each direction: the misalignment of a pasted
    face (never none, or the pseudo-fake could be its source)."""
    h, w = x.shape[:2]
    dy, dx = (int(rng.integers(1, max(1, s * 3 // 100) + 1) * rng.choice([-1, 1])) for s in (h, w))
    return np.roll(x, (dy, dx), axis=(0, 1))


_ALTERATIONS: tuple[Callable[[np.ndarray, np.random.Generator], np.ndarray], ...] = (
    _resample,
    _recolour,
    _blur,
    _sharpen,
    _renoise,
    _shift,
)


def _mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W) float32 in [0, 1]: a rotated ellipse 30-80% of the picture's size across each
    axis, around its middle, softened by 0-5% of the size and scaled by a strength of 0.6-1."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h * rng.uniform(0.35, 0.65), w * rng.uniform(0.35, 0.65)
    ry, rx = h * rng.uniform(0.15, 0.4), w * rng.uniform(0.15, 0.4)
    angle = rng.uniform(0, np.pi)
    u = ((x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)) / rx
    v = (-(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)) / ry
    mask = (u**2 + v**2 <= 1.0).astype(np.float32)
    soft = rng.uniform(0.0, 0.05) * min(h, w)
    if soft > 0.3:
        mask = ndimage.gaussian_filter(mask, sigma=soft)
    return mask * np.float32(rng.uniform(0.6, 1.0))


def self_blend_audio(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A pseudo-fake voice: the log-mel (1, M, T) (floor -1) altered in one stretch of time and
    frequency by one to three of the processes vocoders and TTS leave (smeared in time, smeared
    across bands, fine harmonic structure flattened to the envelope or stretched above it (a
    source too regular), a fresh noise floor, the band's level lowered, a spectral envelope that
    is not the speaker's), blended back through a mask with soft edges. Always differs from its
    source."""
    # (M, T), not copied: every step below returns a new array, so the caller's is never written
    original: np.ndarray = np.asarray(audio[0], dtype=np.float32)
    y = original
    m, t = original.shape
    ops = rng.permutation(len(_AUDIO_OPS))[: int(rng.integers(1, 4))]
    for op in ops:
        y = _AUDIO_OPS[op](y, rng)
    # the region: the upper bands from a random cut (where vocoders differ most) or a random band
    if rng.random() < 0.7:
        f0, f1 = int(rng.uniform(0.2, 0.7) * m), m
    else:
        width = max(2, int(rng.uniform(0.3, 0.6) * m))
        f0 = int(rng.integers(0, m - width + 1))
        f1 = f0 + width
    length = max(2, int(rng.uniform(0.4, 1.0) * t))
    t0 = int(rng.integers(0, t - length + 1))
    mask = np.outer(_soft_span(m, f0, f1, rng), _soft_span(t, t0, t0 + length, rng))
    strength = rng.uniform(0.6, 1.0)
    out = original + strength * mask * (y - original)
    if np.array_equal(out, original):  # nothing changed (e.g. a silent region): lower the band
        out = original - 0.1 * mask
    return np.clip(out, -1.0, None)[None]


def _soft_span(n: int, start: int, stop: int, rng: np.random.Generator) -> np.ndarray:
    """1 on [start, stop), raised-cosine edges of 1-6 steps, 0 elsewhere."""
    edge = int(rng.integers(1, 7))
    idx = np.arange(n, dtype=np.float32)
    up = np.clip((idx - start + edge) / edge, 0.0, 1.0)
    down = np.clip((stop - 1 + edge - idx) / edge, 0.0, 1.0)
    ramp = np.minimum(up, down)
    return (0.5 - 0.5 * np.cos(np.pi * ramp)).astype(np.float32)


def _smear_time(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return ndimage.uniform_filter1d(y, size=int(rng.integers(3, 10)), axis=1, mode="nearest")


def _smear_bands(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return ndimage.uniform_filter1d(y, size=int(rng.integers(3, 8)), axis=0, mode="nearest")


def _flatten_harmonics(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    envelope = ndimage.uniform_filter1d(y, size=int(rng.integers(9, 16)), axis=0, mode="nearest")
    return y + rng.uniform(0.5, 1.0) * (envelope - y)


def _sharpen_harmonics(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A source too regular: each band's distance from the envelope across bands stretched by
    30-100%, so harmonics stand higher above their valleys than the speaker's (a pulse-excited
    vocoder's buzz, a missing aperiodic part), kept within the log-mel's range."""
    envelope = ndimage.uniform_filter1d(y, size=int(rng.integers(9, 16)), axis=0, mode="nearest")
    return np.clip(y + rng.uniform(0.3, 1.0) * (y - envelope), -1.0, 1.0)


def _renoise_voice(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    smooth = ndimage.uniform_filter(y, size=int(rng.integers(3, 6)), mode="nearest")
    return smooth + rng.normal(0.0, rng.uniform(0.02, 0.08), y.shape).astype(np.float32)


def _lower_level(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return -1.0 + rng.uniform(0.6, 0.9) * (y + 1.0)


def _reshape_envelope(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A vocoder's spectral envelope that is not the speaker's: one or two broad bumps or dips
    of 3-10 dB across the bands (the log-mel's unit is 40 dB), kept below the clip's 0 dB."""
    m = y.shape[0]
    bands = np.arange(m, dtype=np.float32)[:, None]
    curve = np.zeros((m, 1), dtype=np.float32)
    for _ in range(int(rng.integers(1, 3))):
        centre, width = rng.uniform(0.0, m), rng.uniform(0.1, 0.3) * m
        gain = rng.choice((-1.0, 1.0)) * rng.uniform(0.08, 0.25)
        curve += np.float32(gain) * np.exp(-0.5 * ((bands - centre) / width) ** 2)
    return np.clip(y + curve, -1.0, 1.0)


_AUDIO_OPS: tuple[Callable[[np.ndarray, np.random.Generator], np.ndarray], ...] = (
    _smear_time,
    _smear_bands,
    _flatten_harmonics,
    _sharpen_harmonics,
    _renoise_voice,
    _lower_level,
    _reshape_envelope,
)
