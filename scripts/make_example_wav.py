"""Synthesise the example's audio clip: ``twinklr_pipe/examples/data/clip.wav``.

Four seconds of 22.05 kHz mono 16-bit PCM: a 4/4 beat at 120 BPM (a kick on every
beat, a snare on beats 2 and 4, hi-hats on the off-beats) under the opening of
"Jingle Bells" (traditional, 1857) played by a small additive synth. Only the standard
library is used, and the noise comes from ``random.Random`` with a fixed seed, so
running this script again writes the same samples.

Usage::

    python scripts/make_example_wav.py [output.wav]
"""

from __future__ import annotations

import math
import random
import struct
import sys
import wave
from pathlib import Path

SAMPLE_RATE = 22_050
BPM = 120.0
BEATS = 8  # two bars of 4/4: 4.0 s at 120 BPM
SEED = 1857
OUT = Path(__file__).resolve().parent.parent / "twinklr_pipe" / "examples" / "data" / "clip.wav"

# (MIDI note, length in eighth notes): "Jingle bells, jingle bells, jingle all the way".
MELODY = [
    (64, 1), (64, 1), (64, 2),
    (64, 1), (64, 1), (64, 2),
    (64, 1), (67, 1), (60, 1.5), (62, 0.5),
    (64, 4),
]  # fmt: skip


def _midi_hz(note: int) -> float:
    return 440.0 * 2.0 ** ((note - 69) / 12.0)


def _add(buf: list[float], start: int, samples: list[float]) -> None:
    for i, s in enumerate(samples, start):
        if i >= len(buf):
            break
        buf[i] += s


def _kick(rate: int) -> list[float]:
    """A sine whose pitch falls from 150 Hz to 45 Hz, with a fast exponential decay."""
    n = int(0.25 * rate)
    out: list[float] = []
    phase = 0.0
    for i in range(n):
        t = i / rate
        freq = 45.0 + 105.0 * math.exp(-t * 30.0)
        phase += 2.0 * math.pi * freq / rate
        out.append(0.9 * math.exp(-t * 14.0) * math.sin(phase))
    return out


def _noise_burst(rate: int, rng: random.Random, seconds: float, decay: float) -> list[float]:
    """White noise through a one-pole high-pass, with an exponential decay."""
    n = int(seconds * rate)
    out: list[float] = []
    prev_in = prev_out = 0.0
    for i in range(n):
        x = rng.uniform(-1.0, 1.0)
        y = 0.85 * (prev_out + x - prev_in)
        prev_in, prev_out = x, y
        out.append(math.exp(-i / rate * decay) * y)
    return out


def _snare(rate: int, rng: random.Random) -> list[float]:
    noise = _noise_burst(rate, rng, 0.18, 22.0)
    return [
        0.45 * s + 0.25 * math.exp(-i / rate * 30.0) * math.sin(2 * math.pi * 190.0 * i / rate)
        for i, s in enumerate(noise)
    ]


def _note(rate: int, freq: float, seconds: float) -> list[float]:
    """A bell-ish tone: three partials, 5 ms attack, exponential decay, 10 ms release."""
    n = int(seconds * rate)
    attack, release = int(0.005 * rate), int(0.010 * rate)
    out: list[float] = []
    for i in range(n):
        t = i / rate
        env = math.exp(-t * 3.0)
        if i < attack:
            env *= i / attack
        if i > n - release:
            env *= max(0.0, (n - i) / release)
        w = 2.0 * math.pi * freq * t
        out.append(env * (0.30 * math.sin(w) + 0.12 * math.sin(2 * w) + 0.05 * math.sin(3 * w)))
    return out


def synthesise(rate: int = SAMPLE_RATE, seed: int = SEED) -> list[float]:
    rng = random.Random(seed)
    beat = 60.0 / BPM
    buf = [0.0] * round(BEATS * beat * rate)
    kick = _kick(rate)
    for b in range(BEATS):
        start = round(b * beat * rate)
        _add(buf, start, kick)
        if b % 4 in (1, 3):
            _add(buf, start, _snare(rate, rng))
        hat = [0.18 * s for s in _noise_burst(rate, rng, 0.05, 80.0)]
        _add(buf, start + round(beat / 2 * rate), hat)
    t = 0.0
    eighth = beat / 2
    for note, eighths in MELODY:
        _add(buf, round(t * rate), _note(rate, _midi_hz(note), eighths * eighth))
        t += eighths * eighth
    peak = max(abs(s) for s in buf)
    return [0.8 * s / peak for s in buf]


def write_wav(path: Path, samples: list[float], rate: int = SAMPLE_RATE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = struct.pack(
        f"<{len(samples)}h", *(max(-32768, min(32767, round(s * 32767))) for s in samples)
    )
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames)


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    write_wav(out, synthesise())
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
