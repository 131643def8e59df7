"""Whisper-style audio encoder: log-mel features, a convolutional subsampler, a small
transformer. The number of tokens grows with the clip's duration.

Shape legend: N clips, M mel bins, F mel frames (max in batch), T tokens (max in batch),
W encoder width.

Preprocessing (:class:`AudioPreprocessor`, run in loader workers): mono waveform ->
resampled to `sample_rate` with torchaudio -> clipped to `max_seconds` -> log-mel
(torchaudio `MelSpectrogram`, Whisper's log10 / clamp-to-max-minus-8 / (x+4)/4 scaling)
-> (M, F) with F = 1 + samples // hop_length. The subsampler is one stride-1 conv and
log2(subsample) stride-2 convs (kernel 3, padding 1), so F frames give
T = F, then ceil(T / 2) per stride-2 conv. Padded positions are zeroed after every conv and
masked in attention, so a clip's embeddings do not depend on what it is batched with.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfm.encoders.config import EncoderConfig
from mmfm.encoders.image import _TransformerStack
from mmfm.encoders.media import Waveform


def resampled_length(num_samples: int, orig_rate: int, new_rate: int) -> int:
    """Samples after resampling (ceil of the exact ratio), in exact integer arithmetic."""
    g = math.gcd(orig_rate, new_rate)
    return -(-num_samples * (new_rate // g) // (orig_rate // g))


class AudioPreprocessor:
    """Waveform -> (M, F) normalized log-mel features; tokens from the clip's duration."""

    modality = "audio"

    def __init__(self, cfg: EncoderConfig) -> None:
        self.cfg = cfg
        self.max_samples = int(cfg.max_seconds * cfg.sample_rate)
        self.num_convs = int(math.log2(cfg.subsample))
        self._mel = None  # built lazily: cheap to pickle into loader workers

    def _resampled(self, raw: Waveform) -> int:
        return min(resampled_length(len(raw.samples), raw.sample_rate, self.cfg.sample_rate),
                   self.max_samples)

    def frames(self, num_samples: int) -> int:
        return 1 + num_samples // self.cfg.hop_length

    def tokens_for_frames(self, frames: int) -> int:
        for _ in range(self.num_convs):
            frames = (frames - 1) // 2 + 1
        return frames

    def num_tokens(self, raw: Waveform) -> int:
        """Placeholder tokens this clip occupies (from its duration alone)."""
        return self.tokens_for_frames(self.frames(self._resampled(raw)))

    def preprocess(self, raw: Waveform) -> Tensor:
        import torchaudio

        x_S = torch.from_numpy(raw.samples).float()
        if raw.sample_rate != self.cfg.sample_rate:
            x_S = torchaudio.functional.resample(x_S, raw.sample_rate, self.cfg.sample_rate)
        target = self._resampled(raw)
        x_S = F.pad(x_S, (0, max(0, target - len(x_S))))[:target]
        if self._mel is None:
            self._mel = torchaudio.transforms.MelSpectrogram(
                self.cfg.sample_rate, n_fft=self.cfg.n_fft, hop_length=self.cfg.hop_length,
                n_mels=self.cfg.n_mels, power=2.0, pad_mode="constant")  # any length
        logmel_MF = self._mel(x_S).clamp(min=1e-10).log10()
        logmel_MF = torch.maximum(logmel_MF, logmel_MF.max() - 8.0)
        return (logmel_MF + 4.0) / 4.0

    def collate(self, items: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(N, M, F_max) zero-padded features and (N,) frame counts."""
        M = self.cfg.n_mels
        if not items:
            return torch.zeros(0, M, 1), torch.zeros(0, dtype=torch.long)
        lengths_N = torch.tensor([x.shape[1] for x in items], dtype=torch.long)
        batch_NMF = torch.zeros(len(items), M, int(lengths_N.max()))
        for i, x_MF in enumerate(items):
            batch_NMF[i, :, :x_MF.shape[1]] = x_MF
        return batch_NMF, lengths_N


def sinusoids(length: int, width: int) -> Tensor:
    """Whisper's fixed sinusoidal positions, (length, width)."""
    half = width // 2
    inv = torch.exp(-math.log(10000) * torch.arange(half) / max(1, half - 1))
    t_LH = torch.arange(length)[:, None] * inv[None]
    return torch.cat([t_LH.sin(), t_LH.cos()], dim=1)


class WhisperStyleAudioEncoder(nn.Module):
    """Log-mel frames -> conv subsampler (stride `subsample`) -> transformer -> (N, T, W)."""

    modality = "audio"

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.preprocessor = AudioPreprocessor(cfg)
        self.out_dim = cfg.width
        self.conv_in = nn.Conv1d(cfg.n_mels, cfg.width, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv1d(cfg.width, cfg.width, 3, stride=2, padding=1)
                                   for _ in range(self.preprocessor.num_convs))
        self.body = _TransformerStack(cfg.width, cfg.layers, cfg.heads)

    def preprocess(self, raw: Waveform) -> Tensor:
        return self.preprocessor.preprocess(raw)

    def num_tokens(self, raw: Waveform) -> int:
        return self.preprocessor.num_tokens(raw)

    def output_lengths(self, frames_N: Tensor) -> Tensor:
        for _ in range(self.preprocessor.num_convs):
            frames_N = (frames_N - 1) // 2 + 1
        return frames_N

    def forward(self, mel_NMF: Tensor, frames_N: Tensor | None = None) -> Tensor:
        N, _, Fmax = mel_NMF.shape
        if frames_N is None:
            frames_N = torch.full((N,), Fmax, dtype=torch.long, device=mel_NMF.device)
        lengths_N = frames_N.to(mel_NMF.device)
        x_NWF = _masked(F.gelu(self.conv_in(mel_NMF)), lengths_N)
        for conv in self.convs:
            lengths_N = (lengths_N - 1) // 2 + 1
            x_NWF = _masked(F.gelu(conv(x_NWF)), lengths_N)
        x_NTW = x_NWF.transpose(1, 2)
        T = x_NTW.shape[1]
        x_NTW = x_NTW + sinusoids(T, x_NTW.shape[2]).to(x_NTW)
        pad_NT = torch.arange(T, device=x_NTW.device)[None] >= lengths_N[:, None]
        return self.body(x_NTW, pad_NT if bool(pad_NT.any()) else None)


def _masked(x_NWF: Tensor, lengths_N: Tensor) -> Tensor:
    """Zero the frames at or past each clip's length (so padding never leaks into convs)."""
    valid_NF = torch.arange(x_NWF.shape[2], device=x_NWF.device)[None] < lengths_N[:, None]
    return x_NWF * valid_NF[:, None, :].to(x_NWF.dtype)
