"""The Twinklr sequencer as a ``twinklr_pipe`` pipeline: a song in, an xLights sequence out.

Run it (offline, about two seconds the first time, a few milliseconds after that)::

    pipe run twinklr_pipe.examples.sequencer:pipeline

and on your own song (a PCM WAV file)::

    pipe run twinklr_pipe.examples.sequencer:pipeline --input-path song.wav

or from Python::

    from twinklr_pipe import PipelineExecutor
    from twinklr_pipe.examples import sequencer

    definition, context = sequencer.pipeline()
    result = PipelineExecutor(cache_dir=".twinklr-cache").run(definition, context=context)
    result.get_output("export").path  # 'twinklr-out/clip.xsq'

The stages::

    audio ──┬── profile ──┬── macro ── tasks ── groups ×6 ── assemble ── export
            └── lyrics  ──┘      └──────────────────────────────┘

* ``audio`` (:class:`AudioAnalysis`) analyses the WAV file in plain Python, in a worker
  thread (its ``execute`` is a plain ``def``): RMS envelope, onsets, tempo and beats.
  About a second of CPU on the bundled clip: the stage worth caching.
* ``profile`` and ``lyrics`` (LLM stages) run in parallel: mood and genre of the music,
  and what its words (if any) are about.
* ``macro`` (LLM planner) cuts the song into sections, each with an energy and an intent,
  and picks a colour palette.
* ``tasks`` (:class:`GroupSplitter`) turns the plan into one :class:`GroupTask` per
  display group of the layout: the list that ``groups`` fans out over.
* ``groups`` (LLM, FAN_OUT, three at a time) designs each group's effects. Each item is
  cached on its own.
* ``assemble`` merges the group plans into one :class:`LightSequence`.
* ``export`` writes it as an xLights-style ``.xsq`` XML file. It has ``cache=False``: it
  has a side effect (the file), so it runs every time.

**Input.** The pipeline's input is the WAV file, as a :class:`~twinklr_pipe.cache.FileInput`
(the cache keys it on the file's content, not its path). When the run has no input
(``initial_input=None``, as with ``pipe run`` without ``--input-path``), the ``audio`` stage
analyses its ``clip`` field instead, which defaults to the bundled clip
``twinklr_pipe/examples/data/clip.wav``. ``clip`` is a ``FileInput`` configuration field,
so its content is part of the stage's key either way. A plain ``str`` or ``Path`` input is
refused: its fingerprint would be the path, and an edited file would hit a stale entry.

**Output.** ``export`` writes ``<output_dir>/<clip name>.xsq``; ``output_dir`` defaults to
``./twinklr-out`` (relative to the current directory) and is a parameter of
:func:`pipeline` and :func:`build_pipeline`.

**LLM stages** are pydantic models whose fields (``prompt``, ``model``) are their
configuration: editing a prompt changes that stage's cache key and nothing else's. They
call ``context.provider`` (see :mod:`twinklr_pipe.examples.providers`); the default is
:func:`offline_provider`, deterministic and offline. Each call adds to the ``tokens``
and ``llm_calls`` metrics.

**Versions.** Every stage has an explicit ``version``: bump it when you change what a
stage computes, and its cached entries stop matching.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import random
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from twinklr_pipe import (
    ExecutionPattern,
    PipelineContext,
    PipelineDefinition,
    StageDefinition,
    StageResult,
    success_result,
)
from twinklr_pipe.cache import FileInput

from .audio import AudioFeatures, analyse, read_wav
from .providers import Completion, LLMProvider, OfflineProvider

__all__ = [
    "BUNDLED_CLIP",
    "DEFAULT_LAYOUT",
    "DEFAULT_MODEL",
    "DEFAULT_OUTPUT_DIR",
    "AudioAnalysis",
    "AudioProfile",
    "AudioProfiler",
    "DisplayGroup",
    "EffectCue",
    "ExportedSequence",
    "GroupDesigner",
    "GroupPlan",
    "GroupSplitter",
    "GroupTask",
    "LightSequence",
    "LyricsAnalysis",
    "LyricsAnalyst",
    "MacroPlan",
    "MacroPlanner",
    "SequenceAssembler",
    "Track",
    "XLightsExporter",
    "build_pipeline",
    "offline_provider",
    "pipeline",
]

#: The example's audio: four seconds of 120 BPM "Jingle Bells", made by
#: ``scripts/make_example_wav.py``.
BUNDLED_CLIP = Path(__file__).resolve().parent / "data" / "clip.wav"
#: Where ``export`` writes by default, relative to the current directory.
DEFAULT_OUTPUT_DIR = "twinklr-out"
#: The model name the LLM stages ask for by default (any name works offline).
DEFAULT_MODEL = "offline-1"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --------------------------------------------------------------------------- outputs


class AudioProfile(_Frozen):
    """The music's character (from the LLM) next to its measured timing."""

    source: str
    duration_s: float
    tempo_bpm: float
    beats: tuple[float, ...]
    energy_by_beat: tuple[float, ...]  #: mean RMS (0..1) between consecutive beats
    onset_rate: float  #: onsets per second
    mood: str
    genre: str
    descriptors: tuple[str, ...]
    summary: str


class LyricLine(_Frozen):
    start_s: float
    text: str


class LyricsAnalysis(_Frozen):
    """What the words are about; ``has_vocals`` is False for an instrumental."""

    has_vocals: bool
    lines: tuple[LyricLine, ...] = ()
    themes: tuple[str, ...]
    note: str


class Section(_Frozen):
    """A stretch of the song with one lighting intention."""

    name: str
    start_s: float
    end_s: float
    energy: float = Field(ge=0.0, le=1.0)
    intent: str


class MacroPlan(_Frozen):
    """The show's outline: sections and palette (from the LLM), with the song's timing."""

    title: str
    palette: tuple[str, ...]
    sections: tuple[Section, ...]
    source: str
    duration_s: float
    tempo_bpm: float
    beats: tuple[float, ...]


class DisplayGroup(_Frozen):
    """A group of props in the yard layout, e.g. the roofline, all driven together."""

    name: str
    kind: str  #: line, arch, tree, matrix or radial
    pixels: int


class GroupTask(_Frozen):
    """One FAN_OUT item: everything the group designer needs for one display group."""

    group: DisplayGroup
    title: str
    palette: tuple[str, ...]
    sections: tuple[Section, ...]
    beats: tuple[float, ...]


class EffectCue(_Frozen):
    start_ms: int
    end_ms: int
    effect: str
    color: str
    intensity: float = Field(ge=0.0, le=1.0)


class GroupPlan(_Frozen):
    group: str
    cues: tuple[EffectCue, ...]
    rationale: str


class Track(_Frozen):
    group: DisplayGroup
    cues: tuple[EffectCue, ...]


class LightSequence(_Frozen):
    """The assembled show: one track of effects per display group, and the beat grid."""

    title: str
    media: str
    duration_ms: int
    frame_ms: int
    tempo_bpm: float
    beats_ms: tuple[int, ...]
    tracks: tuple[Track, ...]

    @property
    def effect_count(self) -> int:
        return sum(len(t.cues) for t in self.tracks)


class ExportedSequence(_Frozen):
    path: str
    effects: int
    bytes: int


# ------------------------------------------------------------------------ the stages


@dataclasses.dataclass(frozen=True)
class AudioAnalysis:
    """``audio``: duration, RMS envelope, onsets, tempo and beats of a WAV file.

    Its ``execute`` is a plain ``def``, so the executor runs it in a worker thread.
    Input: a ``FileInput``, or None for ``clip`` (the bundled clip unless configured).
    """

    name: ClassVar[str] = "audio"
    version: ClassVar[str] = "1"

    clip: FileInput = dataclasses.field(default_factory=lambda: FileInput(BUNDLED_CLIP))
    frame_size: int = 1024
    hop_size: int = 256

    def execute(self, input: FileInput | None, context: PipelineContext) -> StageResult[Any]:
        if input is None:
            input = self.clip
        if not isinstance(input, FileInput):
            raise TypeError(
                f"the audio stage takes a FileInput (or None for its clip), not "
                f"{type(input).__name__}: pass FileInput({input!r}) (pipe run: --input-path) "
                f"so the cache keys on the file's content rather than its name"
            )
        samples, rate = read_wav(input.path)
        features = analyse(
            samples,
            rate,
            source=input.path.name,
            frame_size=self.frame_size,
            hop_size=self.hop_size,
        )
        return success_result(features, stage_name=self.name)


class LLMStage(_Frozen):
    """Base of the LLM stages: the prompt and model are fields, so they are cache config."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    #: The request's task name; the offline provider answers by it.
    task: ClassVar[str]

    prompt: str
    model: str = DEFAULT_MODEL

    async def ask(self, context: PipelineContext, request: Any) -> str:
        """Ask ``context.provider``; record the tokens; return the answer's text."""
        provider = getattr(context, "provider", None)
        if not isinstance(provider, LLMProvider):
            raise TypeError(
                f"stage {self.name!r} needs an LLM provider: "
                "PipelineContext(provider=offline_provider()) or any LLMProvider"
            )
        reply: Completion = await provider.complete(
            self.prompt, model=self.model, payload={"task": self.task, "input": request}
        )
        context.increment_metric("llm_calls")
        context.increment_metric("tokens", reply.total_tokens)
        return reply.text


PROFILE_PROMPT = """\
You are a lighting designer listening to a song for a Christmas light show.
From the measured features (tempo, energy envelope, onsets), describe the music:
its mood, its genre, three descriptive words and a one-sentence summary.
Answer in JSON: {"mood", "genre", "descriptors", "summary"}."""


class _ProfileAnswer(_Frozen):
    mood: str
    genre: str
    descriptors: tuple[str, ...]
    summary: str


class AudioProfiler(LLMStage):
    """``profile``: the music's mood and genre, asked of the LLM from the features."""

    name: ClassVar[str] = "profile"
    task: ClassVar[str] = "profile"
    prompt: str = PROFILE_PROMPT

    async def execute(self, input: AudioFeatures, context: PipelineContext) -> StageResult[Any]:
        energy = _energy_by_beat(input)
        request = {
            "duration_s": input.duration_s,
            "tempo_bpm": input.tempo_bpm,
            "onsets": len(input.onsets),
            "mean_rms": input.mean_rms,
            "energy_by_beat": energy,
        }
        answer = _ProfileAnswer.model_validate_json(await self.ask(context, request))
        profile = AudioProfile(
            source=input.source,
            duration_s=input.duration_s,
            tempo_bpm=input.tempo_bpm,
            beats=input.beats,
            energy_by_beat=energy,
            onset_rate=round(len(input.onsets) / max(input.duration_s, 1e-9), 3),
            **answer.model_dump(),
        )
        return success_result(profile, stage_name=self.name)


def _energy_by_beat(features: AudioFeatures) -> tuple[float, ...]:
    """Mean RMS between consecutive beats (and from the last beat to the end)."""
    edges = [*features.beats, features.duration_s]
    out = []
    for start, end in itertools.pairwise(edges):
        lo = int(start * features.frame_rate)
        hi = max(lo + 1, int(end * features.frame_rate))
        frames = features.rms[lo:hi] or (0.0,)
        out.append(round(sum(frames) / len(frames), 4))
    return tuple(out)


LYRICS_PROMPT = """\
You transcribe and interpret song lyrics for a Christmas light show.
Given the song's features, list its lyric lines with start times, or say that it is
instrumental, and name its themes. Answer in JSON: {"has_vocals", "lines", "themes", "note"}."""


class LyricsAnalyst(LLMStage):
    """``lyrics``: what the song's words are about (an instrumental has none)."""

    name: ClassVar[str] = "lyrics"
    task: ClassVar[str] = "lyrics"
    prompt: str = LYRICS_PROMPT

    async def execute(self, input: AudioFeatures, context: PipelineContext) -> StageResult[Any]:
        request = {
            "source": input.source,
            "duration_s": input.duration_s,
            "tempo_bpm": input.tempo_bpm,
            "onsets": input.onsets,
        }
        answer = LyricsAnalysis.model_validate_json(await self.ask(context, request))
        return success_result(answer, stage_name=self.name)


MACRO_PROMPT = """\
You are the lead designer of a Christmas light show. Given the music profile and the
lyrics, cut the song into sections on beat boundaries. For each, give a name, start and
end (seconds), an energy from 0 to 1 and a one-line lighting intent. Pick a palette of
hex colours and a title. Answer in JSON: {"title", "palette", "sections"}."""


class _MacroAnswer(_Frozen):
    title: str
    palette: tuple[str, ...]
    sections: tuple[Section, ...]


class MacroPlanner(LLMStage):
    """``macro``: sections with energy and intent, and a palette, from profile and lyrics."""

    name: ClassVar[str] = "macro"
    task: ClassVar[str] = "macro"
    prompt: str = MACRO_PROMPT

    async def execute(self, input: Mapping[str, Any], context: PipelineContext) -> StageResult[Any]:
        profile: AudioProfile = input["profile"]
        lyrics: LyricsAnalysis = input["lyrics"]
        answer = _MacroAnswer.model_validate_json(
            await self.ask(context, {"profile": profile, "lyrics": lyrics})
        )
        plan = MacroPlan(
            **answer.model_dump(),
            source=profile.source,
            duration_s=profile.duration_s,
            tempo_bpm=profile.tempo_bpm,
            beats=profile.beats,
        )
        return success_result(plan, stage_name=self.name)


#: A small yard: six groups, so the FAN_OUT (three at a time) runs in two waves.
DEFAULT_LAYOUT: tuple[DisplayGroup, ...] = (
    DisplayGroup(name="Roofline", kind="line", pixels=300),
    DisplayGroup(name="Windows", kind="line", pixels=200),
    DisplayGroup(name="Arches", kind="arch", pixels=400),
    DisplayGroup(name="MiniTrees", kind="tree", pixels=300),
    DisplayGroup(name="MegaTree", kind="matrix", pixels=1600),
    DisplayGroup(name="Spinners", kind="radial", pixels=250),
)


class GroupSplitter(_Frozen):
    """``tasks``: one :class:`GroupTask` per display group, for ``groups`` to fan out over."""

    name: ClassVar[str] = "tasks"
    version: ClassVar[str] = "1"

    layout: tuple[DisplayGroup, ...] = DEFAULT_LAYOUT

    async def execute(self, input: MacroPlan, context: PipelineContext) -> StageResult[Any]:
        tasks = [
            GroupTask(
                group=group,
                title=input.title,
                palette=input.palette,
                sections=input.sections,
                beats=input.beats,
            )
            for group in self.layout
        ]
        return success_result(tasks, stage_name=self.name)


GROUP_PROMPT = """\
You design the effects of one display group of a Christmas light show. Given the group
(its kind and size), the show's sections with their energy and intent, the palette and
the beat times, give the group's effect cues (start and end in ms, effect, colour,
intensity) and a one-line rationale. Answer in JSON: {"group", "cues", "rationale"}."""


class GroupDesigner(LLMStage):
    """``groups`` (FAN_OUT): one display group's effect cues, one LLM call per group."""

    name: ClassVar[str] = "groups"
    task: ClassVar[str] = "group"
    prompt: str = GROUP_PROMPT

    async def execute(self, input: GroupTask, context: PipelineContext) -> StageResult[Any]:
        plan = GroupPlan.model_validate_json(await self.ask(context, input))
        return success_result(plan, stage_name=self.name)


class SequenceAssembler(_Frozen):
    """``assemble``: the group plans merged into one sequence, cues clamped and de-overlapped."""

    name: ClassVar[str] = "assemble"
    version: ClassVar[str] = "1"

    frame_ms: int = 25
    layout: tuple[DisplayGroup, ...] = DEFAULT_LAYOUT

    async def execute(self, input: Mapping[str, Any], context: PipelineContext) -> StageResult[Any]:
        macro: MacroPlan = input["macro"]
        plans: Sequence[GroupPlan] = input["groups"]
        duration_ms = round(macro.duration_s * 1000)
        groups = {g.name: g for g in self.layout}
        tracks = []
        for plan in plans:
            group = groups.get(plan.group) or DisplayGroup(name=plan.group, kind="line", pixels=0)
            tracks.append(Track(group=group, cues=self._clean(plan.cues, duration_ms)))
        sequence = LightSequence(
            title=macro.title,
            media=macro.source,
            duration_ms=duration_ms,
            frame_ms=self.frame_ms,
            tempo_bpm=macro.tempo_bpm,
            beats_ms=tuple(round(b * 1000) for b in macro.beats),
            tracks=tuple(tracks),
        )
        context.add_metric("effects", sequence.effect_count)
        return success_result(sequence, stage_name=self.name)

    def _clean(self, cues: Sequence[EffectCue], duration_ms: int) -> tuple[EffectCue, ...]:
        """Snap to frames, clamp to the song, and cut each cue where the next one starts."""
        snapped = []
        for cue in sorted(cues, key=lambda c: (c.start_ms, c.end_ms)):
            start = min(duration_ms, self._snap(cue.start_ms))
            end = min(duration_ms, self._snap(cue.end_ms))
            if end > start:
                snapped.append(cue.model_copy(update={"start_ms": start, "end_ms": end}))
        out: list[EffectCue] = []
        for cue, following in zip(snapped, [*snapped[1:], None], strict=True):
            if following is not None and cue.end_ms > following.start_ms:
                if following.start_ms <= cue.start_ms:
                    continue
                cue = cue.model_copy(update={"end_ms": following.start_ms})
            out.append(cue)
        return tuple(out)

    def _snap(self, ms: int) -> int:
        return max(0, round(ms / self.frame_ms) * self.frame_ms)


class XLightsExporter(_Frozen):
    """``export``: writes the sequence as an xLights-style ``.xsq`` XML file.

    Run with ``cache=False``: writing the file is the point, so it must happen every run.
    The file is ``<output_dir>/<media stem>.xsq``.
    """

    name: ClassVar[str] = "export"
    version: ClassVar[str] = "1"

    output_dir: str = DEFAULT_OUTPUT_DIR

    async def execute(self, input: LightSequence, context: PipelineContext) -> StageResult[Any]:
        path = Path(self.output_dir) / f"{Path(input.media).stem or 'sequence'}.xsq"
        data = to_xsq(input)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        exported = ExportedSequence(path=str(path), effects=input.effect_count, bytes=len(data))
        return success_result(exported, stage_name=self.name)


def to_xsq(sequence: LightSequence) -> bytes:
    """The sequence as xLights-style XML: head, effect palettes, a beat timing track and
    one model element per display group with its effects."""
    root = ET.Element("xsequence", BaseChannel="0", FixedPointTiming="1", ModelBlending="true")
    head = ET.SubElement(root, "head")
    for tag, text in (
        ("version", "2024.01"),
        ("author", "twinklr_pipe sequencer example"),
        ("song", sequence.title),
        ("sequenceTiming", f"{sequence.frame_ms} ms"),
        ("sequenceType", "Media"),
        ("mediaFile", sequence.media),
        ("sequenceDuration", f"{sequence.duration_ms / 1000:.3f}"),
        ("tempo", f"{sequence.tempo_bpm:g}"),
    ):
        ET.SubElement(head, tag).text = text

    palettes = ET.SubElement(root, "ColorPalettes")
    effect_db = ET.SubElement(root, "EffectDB")
    palette_ids: dict[str, int] = {}
    effect_ids: dict[str, int] = {}
    for track in sequence.tracks:
        for cue in track.cues:
            if cue.color not in palette_ids:
                palette_ids[cue.color] = len(palette_ids)
                ET.SubElement(
                    palettes, "ColorPalette"
                ).text = f"C_BUTTON_Palette1={cue.color},C_CHECKBOX_Palette1=1"
            settings = _effect_settings(cue)
            if settings not in effect_ids:
                effect_ids[settings] = len(effect_ids)
                ET.SubElement(effect_db, "Effect").text = settings

    display = ET.SubElement(root, "DisplayElements")
    ET.SubElement(display, "Element", type="timing", name="Beats", visible="1", active="1")
    for track in sequence.tracks:
        ET.SubElement(display, "Element", type="model", name=track.group.name, visible="1")

    effects = ET.SubElement(root, "ElementEffects")
    timing = ET.SubElement(
        ET.SubElement(effects, "Element", type="timing", name="Beats"), "EffectLayer"
    )
    marks = [*sequence.beats_ms, sequence.duration_ms]
    for n, (start, end) in enumerate(itertools.pairwise(marks), 1):
        if end > start:
            ET.SubElement(
                timing, "Effect", label=str((n - 1) % 4 + 1), startTime=str(start), endTime=str(end)
            )
    for track in sequence.tracks:
        layer = ET.SubElement(
            ET.SubElement(effects, "Element", type="model", name=track.group.name), "EffectLayer"
        )
        for cue in track.cues:
            ET.SubElement(
                layer,
                "Effect",
                ref=str(effect_ids[_effect_settings(cue)]),
                name=cue.effect,
                startTime=str(cue.start_ms),
                endTime=str(cue.end_ms),
                palette=str(palette_ids[cue.color]),
            )
    ET.indent(root)
    data: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return data + b"\n"


def _effect_settings(cue: EffectCue) -> str:
    return f"E_SLIDER_Brightness={round(cue.intensity * 100)}"


# --------------------------------------------------------------- the offline "LLM"

_MOODS = {
    "calm": ("serene", "wistful", "cosy"),
    "lively": ("joyful", "playful", "festive"),
    "intense": ("triumphant", "electric", "exuberant"),
}
_GENRES = ("pop", "big band", "rock", "orchestral", "electronic", "folk")
_DESCRIPTORS = (
    "bright", "bouncy", "driving", "sparkly", "warm", "punchy", "nostalgic", "crisp", "airy",
)  # fmt: skip
_THEMES = ("snow", "sleigh bells", "family", "lights", "joy", "winter night", "home")
_PALETTES = {
    "classic": ("#FF0000", "#00A651", "#FFFFFF", "#FFD700"),
    "icy": ("#A0E9FF", "#FFFFFF", "#5B8DEF", "#C8C8FF"),
    "warm": ("#FFB347", "#FF6F3C", "#FFF2CC", "#D7263D"),
    "candy": ("#FF1744", "#FFFFFF", "#FF80AB", "#00C853"),
}
_SECTION_NAMES = ("intro", "verse", "chorus", "bridge", "chorus", "outro")
_INTENTS = (
    (0.35, ("a gentle shimmer that sets the scene", "slow warm fades", "soft twinkles")),
    (0.7, ("a steady chase locked to the beat", "colour washes that follow the melody")),
    (1.01, ("every prop hits on every beat", "big strobing accents", "full-yard colour bursts")),
)
_EFFECTS = {  # by group kind, from calm to intense
    "line": ("On", "Color Wash", "Chase", "Strobe"),
    "arch": ("On", "Shimmer", "Chase", "Bars"),
    "tree": ("Twinkle", "Spirals", "Bars", "Strobe"),
    "matrix": ("Twinkle", "Ripple", "Butterfly", "Fireworks"),
    "radial": ("Shimmer", "Pinwheel", "Pinwheel", "Strobe"),
}


def _answer_profile(prompt: str, request: Any, rng: random.Random) -> Any:
    energy = request["mean_rms"]
    bpm = request["tempo_bpm"]
    level = "intense" if energy > 0.5 and bpm > 110 else "lively" if bpm > 90 else "calm"
    mood = rng.choice(_MOODS[level])
    genre = rng.choice(_GENRES)
    descriptors = tuple(rng.sample(_DESCRIPTORS, 3))
    return {
        "mood": mood,
        "genre": genre,
        "descriptors": descriptors,
        "summary": f"A {mood} {genre} piece at {bpm:g} BPM, {', '.join(descriptors)}.",
    }


def _answer_lyrics(prompt: str, request: Any, rng: random.Random) -> Any:
    themes = tuple(rng.sample(_THEMES, 2))
    return {
        "has_vocals": False,
        "lines": [],
        "themes": themes,
        "note": f"Instrumental; the melody suggests {themes[0]} and {themes[1]}.",
    }


def _answer_macro(prompt: str, request: Any, rng: random.Random) -> Any:
    profile = request["profile"]
    beats: list[float] = profile["beats"]
    energy: list[float] = profile["energy_by_beat"]
    duration: float = profile["duration_s"]
    # A beat in the song's last half-beat starts nothing worth a section of its own.
    period = 60.0 / (profile["tempo_bpm"] or 120.0)
    keep = [i for i, b in enumerate(beats) if b < duration - period / 2] or [0]
    beats = [beats[i] for i in keep] if beats else [0.0]
    energy = [energy[i] for i in keep if i < len(energy)] or [0.5]
    per_section = rng.choice((2, 4)) if len(beats) <= 16 else rng.choice((8, 16))
    top = max(energy) or 1.0
    sections = []
    starts = list(range(0, len(beats), per_section))
    for n, first in enumerate(starts):
        last = starts[n + 1] if n + 1 < len(starts) else len(beats)
        level = sum(energy[first:last]) / max(1, last - first) / top
        level = min(1.0, max(0.0, round(level * rng.uniform(0.6, 1.1), 2)))
        intents = next(options for limit, options in _INTENTS if level < limit)
        name = "outro" if n == len(starts) - 1 and n > 0 else _SECTION_NAMES[n % 5]
        sections.append(
            {
                "name": name,
                "start_s": 0.0 if first == 0 else beats[first],
                "end_s": duration if last >= len(beats) else beats[last],
                "energy": level,
                "intent": rng.choice(intents),
            }
        )
    themes = request["lyrics"]["themes"]
    return {
        "title": f"{profile['mood'].title()} {themes[0].title()}",
        "palette": _PALETTES[rng.choice(sorted(_PALETTES))],
        "sections": sections,
    }


def _answer_group(prompt: str, request: Any, rng: random.Random) -> Any:
    group = request["group"]
    palette: list[str] = request["palette"]
    beats: list[float] = request["beats"]
    effects = _EFFECTS.get(group["kind"], _EFFECTS["line"])
    cues = []
    for section in request["sections"]:
        start, end, energy = section["start_s"], section["end_s"], section["energy"]
        effect = effects[min(3, int(energy * 4))]
        if energy >= 0.6:  # hit on every beat of the section
            hits = [b for b in beats if start <= b < end] or [start]
            for i, (a, b) in enumerate(zip(hits, [*hits[1:], end], strict=True)):
                cues.append(
                    {
                        "start_ms": round(a * 1000),
                        "end_ms": round(b * 1000),
                        "effect": effect,
                        "color": palette[i % len(palette)],
                        "intensity": 1.0 if i % 2 == 0 else 0.7,
                    }
                )
        else:
            cues.append(
                {
                    "start_ms": round(start * 1000),
                    "end_ms": round(end * 1000),
                    "effect": effect,
                    "color": rng.choice(palette),
                    "intensity": round(0.3 + 0.6 * energy, 2),
                }
            )
    return {
        "group": group["name"],
        "cues": cues,
        "rationale": (
            f"{group['name']} ({group['kind']}, {group['pixels']} px) follows the energy: "
            f"{len(cues)} cues, {rng.choice(('leading', 'supporting', 'framing'))} the show."
        ),
    }


def offline_provider(*, latency_s: tuple[float, float] = (0.02, 0.05)) -> OfflineProvider:
    """The example's deterministic offline LLM: one responder per stage task."""
    return OfflineProvider(
        {
            "profile": _answer_profile,
            "lyrics": _answer_lyrics,
            "macro": _answer_macro,
            "group": _answer_group,
        },
        latency_s=latency_s,
    )


# -------------------------------------------------------------------- the pipeline

#: The stage objects by id; :func:`build_pipeline` takes replacements for any of them.
STAGE_IDS = ("audio", "profile", "lyrics", "macro", "tasks", "groups", "assemble", "export")


def build_pipeline(
    *,
    output_dir: str | os.PathLike[str] = DEFAULT_OUTPUT_DIR,
    stages: Mapping[str, Any] | None = None,
) -> PipelineDefinition:
    """The sequencer's definition.

    Args:
        output_dir: Where ``export`` writes ``<clip>.xsq`` (default ``./twinklr-out``).
        stages: Replacement stage objects by stage id, to iterate on one stage, e.g.
            ``{"macro": MacroPlanner(prompt="Plan fewer, longer sections ...")}``.
    """
    chosen: dict[str, Any] = {
        "audio": AudioAnalysis(),
        "profile": AudioProfiler(),
        "lyrics": LyricsAnalyst(),
        "macro": MacroPlanner(),
        "tasks": GroupSplitter(),
        "groups": GroupDesigner(),
        "assemble": SequenceAssembler(),
        "export": XLightsExporter(output_dir=os.fspath(output_dir)),
    }
    for stage_id, replacement in (stages or {}).items():
        if stage_id not in chosen:
            raise KeyError(
                f"no stage {stage_id!r} in the sequencer (stages: {', '.join(STAGE_IDS)})"
            )
        chosen[stage_id] = replacement
    return PipelineDefinition(
        name="sequencer",
        description="Twinklr: a song in, an xLights sequence out",
        stages=[
            StageDefinition(
                "audio", chosen["audio"], description="RMS envelope, onsets, tempo (worker thread)"
            ),
            StageDefinition(
                "profile",
                chosen["profile"],
                pattern=ExecutionPattern.PARALLEL,
                inputs=["audio"],
                description="LLM: mood and genre",
            ),
            StageDefinition(
                "lyrics",
                chosen["lyrics"],
                pattern=ExecutionPattern.PARALLEL,
                inputs=["audio"],
                description="LLM: lyrics and themes",
            ),
            StageDefinition(
                "macro",
                chosen["macro"],
                inputs=["profile", "lyrics"],
                description="LLM planner: sections with energy and intent",
            ),
            StageDefinition(
                "tasks", chosen["tasks"], inputs=["macro"], description="one task per display group"
            ),
            StageDefinition(
                "groups",
                chosen["groups"],
                pattern=ExecutionPattern.FAN_OUT,
                inputs=["tasks"],
                max_concurrent_fan_out=3,
                description="LLM: effects of each display group",
            ),
            StageDefinition(
                "assemble",
                chosen["assemble"],
                inputs=["macro", "groups"],
                description="merge group plans into a sequence",
            ),
            StageDefinition(
                "export",
                chosen["export"],
                inputs=["assemble"],
                cache=False,
                description="write the .xsq file (side effect: never cached)",
            ),
        ],
    )


def pipeline(
    *,
    provider: LLMProvider | None = None,
    output_dir: str | os.PathLike[str] = DEFAULT_OUTPUT_DIR,
) -> tuple[PipelineDefinition, PipelineContext]:
    """The sequencer and a context holding its LLM provider (``pipe run`` calls this).

    Args:
        provider: The LLM client; defaults to :func:`offline_provider`.
        output_dir: Where ``export`` writes ``<clip>.xsq`` (default ``./twinklr-out``).
    """
    context = PipelineContext(provider=provider if provider is not None else offline_provider())
    return build_pipeline(output_dir=output_dir), context
