"""`AudioModel`: a CNN over the log-mel, an LSTM over its time axis, a 128-d emotion embedding."""

from __future__ import annotations

from torch import Tensor, nn

FREQ_BINS = 4  # mel axis pooled to this many bins, so any n_mels gives the same LSTM width


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """Conv 3x3 -> BatchNorm -> ReLU -> 2x2 max-pool (ceil, so tiny inputs never vanish)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, ceil_mode=True),
    )


class AudioModel(nn.Module):
    """Log-mel (B, 1, n_mels, frames) -> emotion embedding (B, embedding_dim).

    Three ReLU conv blocks find local time-frequency patterns; the mel axis is then pooled to
    `FREQ_BINS` bins and an LSTM (tanh inside) reads the sequence of frames; its last hidden
    state is projected to the embedding.
    """

    def __init__(self, embedding_dim: int = 128, hidden: int = 128) -> None:
        super().__init__()
        self.cnn = nn.Sequential(conv_block(1, 16), conv_block(16, 32), conv_block(32, 64))
        self.freq_pool = nn.AdaptiveAvgPool2d((FREQ_BINS, None))
        self.lstm = nn.LSTM(input_size=64 * FREQ_BINS, hidden_size=hidden, batch_first=True)
        self.proj = nn.Linear(hidden, embedding_dim)
        self.embedding_dim = embedding_dim

    def forward(self, audio: Tensor) -> Tensor:
        if audio.ndim != 4 or audio.shape[1] != 1:
            raise ValueError(f"audio must be (B, 1, n_mels, frames), got {tuple(audio.shape)}")
        x = self.freq_pool(self.cnn(audio))  # (B, 64, FREQ_BINS, T')
        x = x.flatten(1, 2).transpose(1, 2)  # (B, T', 64 * FREQ_BINS)
        _, (h, _) = self.lstm(x)  # h: (1, B, hidden)
        return self.proj(h[-1])  # (B, D)
