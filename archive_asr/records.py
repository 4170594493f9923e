"""Typed records the engine returns; the worker writes them to rows, the CLI prints them.

They live outside `engine` so the scheduler and database code can use them without importing MLX.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Word:
    start_s: float
    end_s: float
    word: str  # as Whisper spells it, leading space and attached punctuation included
    probability: float


@dataclass(frozen=True)
class Segment:
    start_s: float
    end_s: float
    text: str
    avg_logprob: float
    no_speech_prob: float
    compression_ratio: float
    temperature: float
    words: tuple[Word, ...] = ()


@dataclass(frozen=True)
class Timing:
    audio_s: float  # duration of the decoded audio
    wall_s: float  # audio array in to records out, model already loaded
    batch_size: int  # windows per batch the engine used
    device: str  # e.g. "cpu", "gpu (Apple M2 Max)", "gpu (NVIDIA H100)"
    model: str  # model name as resolved by the model store

    @property
    def real_time_factor(self) -> float:
        """Seconds of audio per second of work (higher is faster)."""
        return self.audio_s / self.wall_s if self.wall_s > 0 else 0.0


@dataclass(frozen=True)
class Transcript:
    language: str | None  # None: no speech, or detection below the confidence bar
    language_probability: float | None
    duration_s: float
    text: str
    segments: tuple[Segment, ...]
    timing: Timing
    options: dict = field(default_factory=dict)  # engine options used, for the record
    # Seconds of audio the decoder delivered (gaps left by damaged stretches count, as silence);
    # None: not measured (an array given directly).
    decoded_s: float | None = None
    # What the decoder had to say (a damaged tail, a corrupt middle filled with silence): one line each.
    warnings: tuple[str, ...] = ()

    def to_json(self, path: str | None = None, *, job_id: int | None = None, sha256: str | None = None) -> dict:
        """The one JSON shape of a transcript: `archive-asr transcribe --json` prints it per file,
        `archive-asr export --format json` per job (with the job's id and content hash)."""
        return {
            "job_id": job_id,
            "path": path,
            "sha256": sha256,
            "language": self.language,
            "language_probability": self.language_probability,
            "duration_s": self.duration_s,
            # Seconds the decoder delivered; short of the file's length, or with warnings: a partial transcript.
            "decoded_s": self.decoded_s,
            "warnings": list(self.warnings),
            "model": self.timing.model,
            "text": self.text,
            "segments": [
                {
                    "start_s": s.start_s,
                    "end_s": s.end_s,
                    "text": s.text,
                    "avg_logprob": s.avg_logprob,
                    "no_speech_prob": s.no_speech_prob,
                    "compression_ratio": s.compression_ratio,
                    "temperature": s.temperature,
                    "words": [asdict(w) for w in s.words],
                }
                for s in self.segments
            ],
            "timing": {
                "audio_s": self.timing.audio_s,
                "wall_s": self.timing.wall_s,
                "real_time_factor": self.timing.real_time_factor,
                "batch_size": self.timing.batch_size,
                "device": self.timing.device,
                "model": self.timing.model,
            },
            "options": dict(self.options),
        }
