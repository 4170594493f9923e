"""engine.memory: the batch size follows the memory budget; a real run stays inside it."""

from __future__ import annotations

from pathlib import Path

import pytest

import engine  # noqa: F401
import mlx.core as mx
from mlx_whisper.whisper import ModelDimensions

from engine.memory import device_memory, plan_batch

GIB = 1 << 30
BASE = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=512, n_audio_head=8, n_audio_layer=6,
                       n_vocab=51865, n_text_ctx=448, n_text_state=512, n_text_head=8, n_text_layer=6)


def test_smaller_budget_gives_smaller_batch() -> None:
    big = plan_batch(BASE, mx.float16, budget_bytes=8 * GIB, max_batch=1000)
    small = plan_batch(BASE, mx.float16, budget_bytes=2 * GIB, max_batch=1000)
    assert 1 <= small.batch_size < big.batch_size
    assert small.budget_bytes == 2 * GIB and "2.00 GiB budget" in small.reason
    # float32 windows cost more than float16 ones
    assert plan_batch(BASE, mx.float32, budget_bytes=8 * GIB, max_batch=1000).batch_size < big.batch_size


def test_batch_never_below_one_and_capped() -> None:
    assert plan_batch(BASE, mx.float16, budget_bytes=1).batch_size == 1
    assert plan_batch(BASE, mx.float16, budget_bytes=10_000 * GIB, max_batch=24).batch_size == 24


def test_user_batch_size_wins() -> None:
    plan = plan_batch(BASE, mx.float16, batch_size=7, budget_bytes=1)
    assert plan.batch_size == 7 and "set by the user" in plan.reason


def test_device_memory_reads_this_machine() -> None:
    mem = device_memory()
    assert mem.device in ("cpu", "metal", "cuda")
    assert 0 < mem.available_bytes <= mem.total_bytes
    plan = plan_batch(BASE, mx.float32)
    assert plan.batch_size >= 1 and plan.budget_bytes <= mem.available_bytes


@pytest.mark.slow
def test_real_run_peak_memory_stays_inside_the_budget(data_dir: Path, shared_audio: Path) -> None:
    from engine.audio import load_audio
    from engine.holder import get_model
    from engine.options import EngineOptions
    from engine.transcribe import transcribe_audio

    loaded = get_model("tiny.en")
    window = plan_batch(loaded.dims, loaded.dtype, budget_bytes=GIB).per_window_bytes
    plan = plan_batch(loaded.dims, loaded.dtype, budget_bytes=int(mx.get_active_memory() + 2.5 * window))
    assert plan.batch_size == 2
    audio = load_audio(shared_audio / "longform" / "english_read_mix_concat.flac")[: 75 * 16000]  # 3 windows
    mx.clear_cache()
    mx.reset_peak_memory()
    transcript = transcribe_audio(audio, model_name="tiny.en", options=EngineOptions(language="en", batch_size=plan.batch_size))
    assert transcript.timing.batch_size == 2
    assert len(transcript.text.split()) > 100
    assert mx.get_peak_memory() <= plan.budget_bytes, f"peak {mx.get_peak_memory() / GIB:.2f} GiB > budget {plan.budget_bytes / GIB:.2f} GiB"
