"""The shipped sequencer example: it runs offline, and the cache does what the README says.

One story, on one cache directory, counting what really ran (``PipelineResult.executed``
and the offline provider's per-task call counts):

1. a cold run executes every stage;
2. a second run executes only ``export`` (``cache=False``), and is far faster;
3. an edited macro prompt re-runs ``macro`` and what depends on its output, never
   ``audio``, ``profile`` or ``lyrics``;
4. the same audio passed explicitly as a ``FileInput`` re-runs ``audio`` (its input
   changed from None) but its output is identical, so everything downstream is a hit;
5. editing a few samples of that WAV file re-runs everything.
"""

from __future__ import annotations

import collections
import importlib.util
import shutil
import struct
import wave
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from twinklr_pipe import (
    ExecutionPattern,
    PipelineContext,
    PipelineDefinition,
    PipelineExecutor,
    PipelineResult,
    StageDefinition,
)
from twinklr_pipe.cache import FileInput
from twinklr_pipe.examples import sequencer
from twinklr_pipe.examples.audio import AudioFeatures, analyse
from twinklr_pipe.examples.providers import Completion, OfflineProvider

ALL = ["audio", "profile", "lyrics", "macro", "tasks", "groups", "assemble", "export"]
REPO = Path(__file__).resolve().parent.parent


class PeakRecorder:
    """Wraps a provider; remembers the most requests of each task in flight at once."""

    def __init__(self, inner: OfflineProvider) -> None:
        self.inner = inner
        self.in_flight: collections.Counter[str] = collections.Counter()
        self.peak: collections.Counter[str] = collections.Counter()

    async def complete(self, prompt: str, *, model: str, payload: Any) -> Completion:
        task = payload["task"]
        self.in_flight[task] += 1
        self.peak[task] = max(self.peak[task], self.in_flight[task])
        try:
            return await self.inner.complete(prompt, model=model, payload=payload)
        finally:
            self.in_flight[task] -= 1


def _run(
    executor: PipelineExecutor,
    definition: PipelineDefinition,
    provider: PeakRecorder,
    initial_input: Any = None,
) -> PipelineResult:
    result = executor.run(definition, initial_input, PipelineContext(provider=provider))
    assert result.success, {k: r.error for k, r in result.stage_results.items() if r.error}
    return result


def _edit_samples(path: Path, at_s: float, count: int) -> None:
    """Overwrite ``count`` samples from ``at_s`` with a loud click, in place."""
    with wave.open(str(path), "rb") as w:
        params = w.getparams()
        frames = bytearray(w.readframes(w.getnframes()))
    start = int(at_s * params.framerate) * params.sampwidth
    for i in range(count):
        struct.pack_into("<h", frames, start + 2 * i, 30000 if i % 2 else -30000)
    with wave.open(str(path), "wb") as w:
        w.setparams(params)
        w.writeframes(bytes(frames))


def test_cache_story(tmp_path: Path) -> None:
    offline = sequencer.offline_provider()
    provider = PeakRecorder(offline)
    executor = PipelineExecutor(cache_dir=tmp_path / "cache")
    out = tmp_path / "out"
    definition = sequencer.build_pipeline(output_dir=out)

    # 1. Cold: everything runs; the bundled clip is analysed for real.
    first = _run(executor, definition, provider)
    assert sorted(first.executed) == sorted(ALL)
    assert offline.calls == {"profile": 1, "lyrics": 1, "macro": 1, "group": 6}
    assert provider.peak["group"] == 3  # max_concurrent_fan_out=3 over six groups
    assert first.metadata["metrics"]["llm_calls"] == 9
    assert first.metadata["metrics"]["tokens"] > 0
    audio = first.get_output("audio")
    assert audio.duration_s == pytest.approx(4.0)
    assert audio.tempo_bpm == pytest.approx(120, abs=2)
    assert [round(b * 2) / 2 for b in audio.beats[:8]] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]
    assert len(audio.onsets) >= 8

    exported = first.get_output("export")
    xsq = Path(exported.path)
    assert xsq == out / "clip.xsq"
    root = ET.parse(xsq).getroot()
    assert root.tag == "xsequence"
    assert root.findtext("head/mediaFile") == "clip.wav"
    models = root.findall("ElementEffects/Element[@type='model']")
    assert [m.get("name") for m in models] == [g.name for g in sequencer.DEFAULT_LAYOUT]
    assert len(root.findall("ElementEffects/Element[@type='model']/EffectLayer/Effect")) == (
        exported.effects
    )
    assert exported.effects > 0

    # 2. Warm: only export (cache=False) runs, and it rewrites its file.
    xsq.unlink()
    second = _run(executor, definition, provider)
    assert second.executed == ["export"]
    assert sorted(second.cached) == sorted(set(ALL) - {"export"})
    assert offline.calls == {"profile": 1, "lyrics": 1, "macro": 1, "group": 6}
    assert xsq.exists()
    assert second.outputs["assemble"] == first.outputs["assemble"]
    assert second.total_duration_ms < first.total_duration_ms / 3, (
        second.total_duration_ms,
        first.total_duration_ms,
    )

    # 3. Iterate on the macro prompt: audio, profile and lyrics are not touched.
    edited = sequencer.MacroPlanner(prompt=sequencer.MACRO_PROMPT + "\nFavour long sections.")
    third = _run(
        executor, sequencer.build_pipeline(output_dir=out, stages={"macro": edited}), provider
    )
    assert third.get_output("macro") != first.get_output("macro")
    assert sorted(third.executed) == sorted(["macro", "tasks", "groups", "assemble", "export"])
    assert {"audio", "profile", "lyrics"} <= set(third.cached)
    assert offline.calls["macro"] == 2
    assert (offline.calls["profile"], offline.calls["lyrics"]) == (1, 1)
    assert 6 < offline.calls["group"] <= 12

    # 4. The same bytes as an explicit FileInput: audio's input changed (None -> a file),
    #    so it runs, but its output is identical and everything downstream is a hit.
    clip = tmp_path / "song" / "clip.wav"
    clip.parent.mkdir()
    shutil.copyfile(sequencer.BUNDLED_CLIP, clip)
    calls_before = offline.calls.copy()
    fourth = _run(executor, definition, provider, FileInput(clip))
    assert sorted(fourth.executed) == ["audio", "export"]
    assert fourth.get_output("audio") == audio
    assert offline.calls == calls_before

    # 5. Edit a few samples of that file: everything re-runs.
    _edit_samples(clip, at_s=1.25, count=64)
    fifth = _run(executor, definition, provider, FileInput(clip))
    assert fifth.get_output("audio") != audio
    assert sorted(fifth.executed) == sorted(ALL)
    assert offline.calls["macro"] == calls_before["macro"] + 1
    assert offline.calls["group"] == calls_before["group"] + 6


def test_pipeline_entry_point_and_shape(tmp_path: Path) -> None:
    definition, context = sequencer.pipeline(output_dir=tmp_path)
    assert isinstance(definition, PipelineDefinition)
    assert isinstance(context, PipelineContext)
    assert isinstance(context.provider, OfflineProvider)  # type: ignore[attr-defined]
    assert definition.validate_pipeline() == []
    assert [s.id for s in definition.get_entry_points()] == ["audio"]
    groups = definition.get_stage("groups")
    assert groups.pattern is ExecutionPattern.FAN_OUT
    assert groups.max_concurrent_fan_out == 3
    assert [s.id for s in definition.stages if not s.cache] == ["export"]
    assert definition.get_stage("macro").inputs == ("profile", "lyrics")
    # The zero-argument form is what `pipe run ...sequencer:pipeline` calls.
    assert isinstance(sequencer.pipeline()[0], PipelineDefinition)
    with pytest.raises(KeyError, match="no stage 'nope'"):
        sequencer.build_pipeline(stages={"nope": object()})


def test_a_path_string_input_is_refused_with_the_way_out(tmp_path: Path) -> None:
    definition, context = sequencer.pipeline(output_dir=tmp_path)
    result = PipelineExecutor().run(definition, str(sequencer.BUNDLED_CLIP), context)
    assert not result.success
    assert result.failed_stages == ["audio"]
    assert "FileInput" in (result.get_result("audio").error or "")


def test_llm_stages_need_a_provider(tmp_path: Path) -> None:
    only = PipelineDefinition("profile", [StageDefinition("profile", sequencer.AudioProfiler())])
    result = PipelineExecutor().run(only, _tiny_features(), PipelineContext())
    assert not result.success
    assert "needs an LLM provider" in (result.get_result("profile").error or "")


def _tiny_features() -> AudioFeatures:
    return analyse([0.0, 0.5, -0.5, 0.0] * 2048, 8000, source="tiny.wav")


async def test_offline_provider_is_deterministic_and_sensitive_to_the_prompt() -> None:
    provider = sequencer.offline_provider(latency_s=(0.0, 0.001))
    payload = {"task": "lyrics", "input": {"onsets": [0.0, 0.5]}}
    a = await provider.complete("Name the themes.", model="m", payload=payload)
    b = await provider.complete("Name the themes.", model="m", payload=payload)
    c = await provider.complete("Name the themes!", model="m", payload=payload)
    assert a == b
    assert {a.text, c.text} != {a.text}
    assert a.input_tokens > 0 and a.output_tokens > 0
    assert provider.calls["lyrics"] == 3
    with pytest.raises(ValueError, match="OfflineProvider answers payloads"):
        await provider.complete("?", model="m", payload={"task": "unknown"})


def test_bundled_clip_is_small_and_reproducible(tmp_path: Path) -> None:
    assert sequencer.BUNDLED_CLIP.stat().st_size < 200_000
    with wave.open(str(sequencer.BUNDLED_CLIP), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 22_050)
        assert w.getnframes() / w.getframerate() == pytest.approx(4.0)
    spec = importlib.util.spec_from_file_location(
        "make_example_wav", REPO / "scripts" / "make_example_wav.py"
    )
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    again = tmp_path / "clip.wav"
    script.write_wav(again, script.synthesise())
    # Byte-identical here; allow one step of rounding where another libm differs in an ulp.
    regenerated, committed = (_samples(p) for p in (again, sequencer.BUNDLED_CLIP))
    assert len(regenerated) == len(committed)
    assert max(abs(a - b) for a, b in zip(regenerated, committed, strict=True)) <= 1


def _samples(path: Path) -> list[int]:
    with wave.open(str(path), "rb") as w:
        raw = w.readframes(w.getnframes())
    return [s for (s,) in struct.iter_unpack("<h", raw)]
