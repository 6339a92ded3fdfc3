"""The audio front-end's numpy/soxr signal processing (`tasks/data/spectral.py`) gives what
librosa 0.11 gives for the same calls, so features (and the models trained on them) did not
change when librosa left the decoders' import path. Compared with a tolerance far below any
difference a model could see (numpy picks its float kernels by CPU); on the machine that wrote
this they were bit-identical, and so were the feature shards of a whole build."""

from __future__ import annotations

import subprocess
import sys

import librosa
import numpy as np
import pytest

from tasks.data import spectral


def close(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(b)) or 1.0))


@pytest.mark.parametrize(("n_fft", "hop"), [(1024, 250), (1024, 500), (2048, 125)])
@pytest.mark.parametrize("n", [300, 1023, 4000, 32000, 32001])
def test_stft_power_is_librosas(n_fft: int, hop: int, n: int) -> None:
    y = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    expected = np.abs(librosa.stft(y, n_fft=n_fft, hop_length=hop, center=True)) ** 2
    close(spectral.stft_power(y, n_fft, hop), expected)


@pytest.mark.parametrize(("sr", "rate"), [(44100, 16000), (8000, 16000), (22050, 8000)])
def test_resample_is_librosas(sr: int, rate: int) -> None:
    y = np.random.default_rng(sr).standard_normal(2 * sr + 37).astype(np.float32)
    close(spectral.resample(y, sr, rate), librosa.resample(y, orig_sr=sr, target_sr=rate))
    assert spectral.resample(y, rate, rate) is y  # nothing to do


@pytest.mark.parametrize(
    ("sr", "n_fft", "n_mels", "fmax"),
    [(16000, 1024, 128, 8000.0), (16000, 1024, 64, 8000.0), (8000, 1024, 64, 4000.0)],
)
def test_mel_filters_are_librosas(sr: int, n_fft: int, n_mels: int, fmax: float) -> None:
    expected = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmax=fmax)
    close(spectral.mel_filters(sr, n_fft, n_mels, fmax), expected)


def test_the_hann_window_is_scipys() -> None:
    from scipy.signal import get_window

    np.testing.assert_allclose(spectral.hann(1024), get_window("hann", 1024), rtol=0, atol=1e-15)


def test_a_decode_process_never_imports_librosa_scipy_or_numba() -> None:
    """What a decode process loads to start and decode (the warm-up, a resampled clip): the
    start-up every feature build pays once per process."""
    code = (
        "import sys\n"
        "from config.load import validate_config\n"
        "from tasks.data import workers\n"
        "import io, numpy as np, soundfile as sf\n"
        "cfg = validate_config({'storage': {'uri': '/tmp/x'}}).data\n"
        "workers._init_worker(cfg)\n"
        "wav = io.BytesIO()\n"
        "sf.write(wav, np.sin(np.arange(88200) / 7.0), 44100, format='WAV')\n"
        "mel, _, _ = workers.decode_pair(wav.getvalue(), b'', ('a', 'i'), ('a', 'i'), cfg)\n"
        "assert mel.shape == (1, cfg.n_mels, cfg.spec_frames)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'librosa', 'scipy', 'numba'}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
