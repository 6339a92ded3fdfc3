"""The audio front-end's signal processing, in numpy and soxr alone (no librosa at run time).

    resample     soxr's "HQ" resampler, the output cut or zero-padded to ceil(n x ratio)
    stft_power   |STFT|^2: centred frames (n_fft // 2 zeros each side), periodic Hann window
    mel_filters  triangular filters on the Slaney mel scale, Slaney-normalised (float32)

Each computes what librosa 0.11 computes for the same call (`librosa.resample(res_type=
"soxr_hq")`, `np.abs(librosa.stft(center=True, pad_mode="constant")) ** 2`,
`librosa.filters.mel(htk=False, norm="slaney")`), the same operations on the same dtypes, so the
features, and every model trained on them, stay what they were: `tests/unit/test_spectral.py`
holds them to librosa's results. Why not librosa itself: importing it (numba, scipy.signal) took
1.6 s of CPU in every decode process of a feature build, measured, more than decoding 400 pairs,
on every build; these need numpy (already loaded) and soxr (a few milliseconds).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def resample(y: np.ndarray, sr: int, rate: int) -> np.ndarray:
    """Mono `y` at `sr` -> at `rate`, same dtype, ceil(len(y) x rate / sr) samples."""
    if sr == rate:
        return y
    import soxr

    n = int(np.ceil(len(y) * (float(rate) / sr)))
    out = soxr.resample(y, sr, rate, quality="soxr_hq")
    out = out[:n] if len(out) > n else np.pad(out, (0, n - len(out)))
    return np.asarray(out, dtype=y.dtype)


@lru_cache(maxsize=8)
def hann(n: int) -> np.ndarray:
    """The periodic Hann window of `n` points, float64 (an n + 1 point symmetric one, its last
    point dropped), computed as scipy.signal.get_window("hann", n) computes it."""
    fac = np.linspace(-np.pi, np.pi, n + 1, dtype=np.float64)
    w = np.zeros(n + 1, dtype=np.float64)
    for k, a in enumerate((0.5, 0.5)):
        w += a * np.cos(k * fac)
    w = w[:-1]
    w.flags.writeable = False
    return w


def stft_power(y: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """Power spectrogram of mono float32 `y`: (1 + n_fft // 2, 1 + len(y) // hop) float32.

    Frame t covers samples t x hop - n_fft // 2 ... + n_fft (zeros outside the signal); each is
    windowed in float64, transformed, and the spectrum kept as complex64, as librosa.stft does.
    """
    half = n_fft // 2
    padded = np.pad(y, (half, half))
    n_frames = 1 + (len(padded) - n_fft) // hop
    step = padded.strides[0]
    frames = np.lib.stride_tricks.as_strided(
        padded, shape=(n_fft, n_frames), strides=(step, hop * step), writeable=False
    )
    spectrum = np.fft.rfft(hann(n_fft)[:, None] * frames, axis=0).astype(np.complex64)
    return np.abs(spectrum) ** 2


def _hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """Slaney's mel scale: linear to 1 kHz (200/3 Hz per mel), logarithmic above."""
    f = np.asanyarray(hz)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    mels = f / f_sp
    if f.ndim:
        log_t = f >= min_log_hz
        mels[log_t] = min_log_mel + np.log(f[log_t] / min_log_hz) / logstep
    elif f >= min_log_hz:
        mels = min_log_mel + np.log(f / min_log_hz) / logstep
    return mels


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    freqs = f_sp * mels
    log_t = mels >= min_log_mel
    freqs[log_t] = min_log_hz * np.exp(logstep * (mels[log_t] - min_log_mel))
    return freqs


def mel_filters(sr: int, n_fft: int, n_mels: int, fmax: float) -> np.ndarray:
    """(n_mels, 1 + n_fft // 2) float32: triangles whose edges are n_mels + 2 points evenly
    spaced in mel from 0 Hz to `fmax`, each scaled by 2 / its width in Hz (Slaney's norm)."""
    weights = np.zeros((n_mels, 1 + n_fft // 2), dtype=np.float32)
    fftfreqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    enorm = 2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels])
    weights *= enorm[:, np.newaxis]
    return weights
