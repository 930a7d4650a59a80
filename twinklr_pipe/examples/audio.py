"""Audio analysis in plain Python: RMS envelope, spectral-flux onsets, tempo and beats.

Only the standard library: ``wave`` reads the file, a small radix-2 FFT gives each
frame's spectrum. It is deliberately straightforward rather than fast: on the
bundled four-second clip it takes about a second, which is exactly the kind of
stage a cache should never run twice.

The steps, for frames of ``frame_size`` samples every ``hop_size`` samples:

1. RMS energy of each frame (the envelope the lighting follows).
2. Spectral flux: the summed increase of log-compressed magnitudes from one frame
   to the next, minus a moving average, so it peaks where a note or drum starts.
3. Onsets: local maxima of that novelty curve above an adaptive threshold, at
   least ``min_onset_gap_s`` apart.
4. Tempo: the autocorrelation of the novelty curve over lags of 60-200 BPM,
   weighted towards 120 BPM (a common prior), refined by parabolic interpolation.
5. Beats: the phase of that beat grid which collects the most novelty and energy
   rises (the kick drum is loud but spectrally narrow).
"""

from __future__ import annotations

import array
import cmath
import itertools
import math
import os
import sys
import wave
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict

__all__ = ["AudioFeatures", "analyse", "read_wav"]


class AudioFeatures(BaseModel):
    """What the ``audio`` stage learns from a WAV file (times in seconds)."""

    model_config = ConfigDict(frozen=True)

    source: str  #: the file's name (not its path, so a moved file gives the same features)
    sample_rate: int
    duration_s: float
    frame_rate: float  #: envelope values per second
    rms: tuple[float, ...]  #: RMS energy per frame, 0..1
    novelty: tuple[float, ...]  #: onset strength per frame, 0..1
    onsets: tuple[float, ...]
    tempo_bpm: float
    beats: tuple[float, ...]
    peak_rms: float
    mean_rms: float


def read_wav(path: str | os.PathLike[str]) -> tuple[list[float], int]:
    """Samples of a PCM WAV file (8, 16, 24 or 32 bit), mixed to mono in -1..1."""
    with wave.open(os.fspath(path), "rb") as w:
        channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
        raw = w.readframes(w.getnframes())
    values: Sequence[int]
    if width == 1:  # 8-bit WAV is unsigned
        values = [b - 128 for b in raw]
        scale = 128.0
    elif width in (2, 4):
        pcm = array.array("h" if width == 2 else "i", raw[: len(raw) - len(raw) % width])
        if sys.byteorder == "big":
            pcm.byteswap()
        values = pcm
        scale = float(1 << (8 * width - 1))
    elif width == 3:
        values = [
            int.from_bytes(raw[i : i + width], "little", signed=True)
            for i in range(0, len(raw) - width + 1, width)
        ]
        scale = float(1 << (8 * width - 1))
    else:
        raise ValueError(f"{os.fspath(path)}: unsupported sample width {width} bytes")
    if channels == 1:
        return [v / scale for v in values], rate
    mono = [
        sum(values[i : i + channels]) / (channels * scale)
        for i in range(0, len(values) - channels + 1, channels)
    ]
    return mono, rate


def _fft(values: list[complex], twiddles: Sequence[complex], order: Sequence[int]) -> list[complex]:
    """In-place iterative radix-2 FFT of a power-of-two length list."""
    a = [values[i] for i in order]
    n = len(a)
    size = 2
    while size <= n:
        half = size // 2
        step = n // size
        for start in range(0, n, size):
            k = 0
            for j in range(start, start + half):
                t = twiddles[k] * a[j + half]
                a[j + half] = a[j] - t
                a[j] += t
                k += step
        size *= 2
    return a


def _bit_reversal(n: int) -> list[int]:
    bits = n.bit_length() - 1
    return [int(format(i, f"0{bits}b")[::-1], 2) for i in range(n)]


def analyse(
    samples: Sequence[float],
    sample_rate: int,
    *,
    source: str = "",
    frame_size: int = 1024,
    hop_size: int = 256,
    min_bpm: float = 60.0,
    max_bpm: float = 200.0,
    min_onset_gap_s: float = 0.1,
) -> AudioFeatures:
    """Analyse mono samples; see the module docstring for the steps."""
    if frame_size < 2 or frame_size & (frame_size - 1):
        raise ValueError(f"frame_size must be a power of two, got {frame_size}")
    if hop_size < 1:
        raise ValueError(f"hop_size must be positive, got {hop_size}")
    duration = len(samples) / sample_rate
    # Centred frames: frame i covers samples around i * hop_size.
    padded = [0.0] * (frame_size // 2) + list(samples) + [0.0] * frame_size
    n_frames = max(1, (len(samples) + hop_size - 1) // hop_size)
    fps = sample_rate / hop_size

    window = [0.5 - 0.5 * math.cos(2 * math.pi * i / frame_size) for i in range(frame_size)]
    twiddles = [cmath.exp(-2j * math.pi * k / frame_size) for k in range(frame_size // 2)]
    order = _bit_reversal(frame_size)
    bins = frame_size // 2 + 1

    rms: list[float] = []
    flux: list[float] = []
    previous = [0.0] * bins
    for f in range(n_frames):
        frame = padded[f * hop_size : f * hop_size + frame_size]
        rms.append(math.sqrt(math.fsum(x * x for x in frame) / frame_size))
        spectrum = _fft([x * w for x, w in zip(frame, window, strict=True)], twiddles, order)
        magnitude = [math.log1p(100.0 * abs(c)) for c in spectrum[:bins]]
        flux.append(sum(m - p for m, p in zip(magnitude, previous, strict=True) if m > p))
        previous = magnitude

    # Novelty: flux above its local mean (±0.1 s), normalised to 0..1.
    radius = max(1, round(0.1 * fps))
    novelty = []
    for i, value in enumerate(flux):
        lo, hi = max(0, i - radius), min(len(flux), i + radius + 1)
        novelty.append(max(0.0, value - sum(flux[lo:hi]) / (hi - lo)))
    top = max(novelty) or 1.0
    novelty = [v / top for v in novelty]

    # Onsets: local maxima over ±min_gap/2 above mean + 0.5 * std.
    mean = sum(novelty) / len(novelty)
    std = math.sqrt(sum((v - mean) ** 2 for v in novelty) / len(novelty))
    threshold = max(mean + 0.5 * std, 0.05)  # silence has no onsets
    gap = max(1, round(min_onset_gap_s * fps))
    onsets: list[float] = []
    last = -gap
    for i, value in enumerate(novelty):
        lo, hi = max(0, i - gap // 2), min(len(novelty), i + gap // 2 + 1)
        if value >= threshold and value == max(novelty[lo:hi]) and i - last >= gap:
            onsets.append(i / fps)
            last = i

    tempo, period = _tempo(novelty, fps, min_bpm, max_bpm)
    # Beats fall where the loudness jumps (the kick), not just anywhere the spectrum
    # changes (hi-hats change it most): place the grid on novelty plus energy rises.
    peak = max(rms) or 1.0
    rises = [0.0] + [max(0.0, (b - a) / peak) for a, b in itertools.pairwise(rms)]
    top_rise = max(rises) or 1.0
    accents = [n + r / top_rise for n, r in zip(novelty, rises, strict=True)]
    beats = _beats(accents, fps, period, n_frames)
    envelope = tuple(round(v / peak, 4) for v in rms)
    return AudioFeatures(
        source=source,
        sample_rate=sample_rate,
        duration_s=round(duration, 4),
        frame_rate=round(fps, 4),
        rms=envelope,
        novelty=tuple(round(v, 4) for v in novelty),
        onsets=tuple(round(t, 3) for t in onsets),
        tempo_bpm=round(tempo, 1),
        beats=tuple(round(t, 3) for t in beats if t < duration),
        peak_rms=round(peak, 4),
        mean_rms=round(sum(envelope) / len(envelope), 4),
    )


def _tempo(
    novelty: Sequence[float], fps: float, min_bpm: float, max_bpm: float
) -> tuple[float, float]:
    """(BPM, period in frames) from the autocorrelation of the novelty curve."""
    n = len(novelty)
    lo = max(1, math.floor(60.0 * fps / max_bpm))
    hi = min(n - 1, math.ceil(60.0 * fps / min_bpm))
    if hi <= lo:
        return 120.0, 60.0 * fps / 120.0
    centred = [v - sum(novelty) / n for v in novelty]

    def acf(lag: int) -> float:
        return sum(centred[i] * centred[i + lag] for i in range(n - lag)) / (n - lag)

    scores = {}
    for lag in range(max(1, lo - 1), min(n - 1, hi + 1) + 1):
        bpm = 60.0 * fps / lag
        # A log-normal prior around 120 BPM breaks ties between a tempo and its multiples.
        prior = math.exp(-0.5 * math.log2(bpm / 120.0) ** 2)
        scores[lag] = acf(lag) * prior
    best = max(range(lo, hi + 1), key=lambda lag: scores[lag])
    if scores[best] <= 0.0:  # nothing periodic (silence, noise): assume 120 BPM
        return 120.0, 60.0 * fps / 120.0
    left, mid, right = scores.get(best - 1, 0.0), scores[best], scores.get(best + 1, 0.0)
    denom = left - 2 * mid + right
    offset = 0.5 * (left - right) / denom if denom < 0 else 0.0
    period = best + max(-0.5, min(0.5, offset))
    return 60.0 * fps / period, period


def _beats(accents: Sequence[float], fps: float, period: float, n_frames: int) -> list[float]:
    """Beat times: the grid of ``period`` frames whose phase collects the most accent."""

    def strength(phase: float) -> float:
        total, t = 0.0, phase
        while t < n_frames:
            i = round(t)
            if i < n_frames:
                total += max(accents[max(0, i - 1) : i + 2])
            t += period
        return total

    phases = [p / 4 for p in range(math.ceil(period * 4))]
    phase = max(phases, key=strength)
    # Windowed frames see an onset a little early, so a grid anchored on a beat at 0 s
    # can come out at "phase - a frame or two"; keep that beat rather than drop it.
    if phase - period >= -0.05 * fps:
        phase = max(0.0, phase - period)
    beats, t = [], phase
    while t < n_frames:
        beats.append(t / fps)
        t += period
    return beats
