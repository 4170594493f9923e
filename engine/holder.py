"""The one loaded model of this process.

A worker process serves one model: ``get_model(name)`` loads it on first use (never at import or
in a fork hook: MLX/Metal is not fork-safe) and returns the same object afterwards. Asking for
another name replaces it, so a process never holds two. Weights are float32 on the CPU (float16
runs 5-10x slower there) and float16 on a GPU.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import engine  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_whisper.whisper import ModelDimensions, Whisper

from archive_asr.settings import get_settings
from engine.convert import CONFIG_FILE, check_against_model
from engine.errors import ModelError
from engine.model_store import WEIGHT_FILES, read_meta, resolve_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    name: str  # as asked for: "base", "tiny.en", a folder, a repo id
    model: Whisper
    dims: ModelDimensions
    dtype: mx.Dtype  # of the floating-point weights
    path: Path  # the MLX folder it was loaded from
    alignment_heads: np.ndarray  # (n_heads, 2) [decoder layer, head] pairs used for word timing
    quantization: dict | None = None  # config.json's {"bits", "group_size"}; None at full precision

    @property
    def is_multilingual(self) -> bool:
        return self.dims.n_vocab >= 51865

    @property
    def num_languages(self) -> int:
        return self.model.num_languages

    def tokenizer(self, language: str | None = None, task: str = "transcribe"):
        """mlx-whisper's tokenizer for this model (offline: its tiktoken files ship with mlx-whisper)."""
        from mlx_whisper.tokenizer import get_tokenizer

        return get_tokenizer(
            multilingual=self.is_multilingual,
            num_languages=self.num_languages,
            language=language if self.is_multilingual else "en",
            task=task,
        )


_lock = threading.Lock()
_held: LoadedModel | None = None


def default_dtype() -> mx.Dtype:
    """float16 on a GPU (Metal or CUDA), float32 on the CPU."""
    return mx.float16 if mx.default_device() == mx.gpu else mx.float32


def device_name() -> str:
    """'cpu', or 'gpu:N (<device name>)': the card this process was pinned to (engine.device)."""
    from engine.device import device_name as pinned_device_name

    return pinned_device_name()


def read_config(folder: Path) -> tuple[ModelDimensions, dict | None]:
    """A model folder's dimensions and quantisation settings (None: full precision), from its config."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{folder / CONFIG_FILE}: unreadable ({e})") from e
    config.pop("model_type", None)
    quantization = config.pop("quantization", None)
    fields = ModelDimensions.__dataclass_fields__
    try:
        dims = ModelDimensions(**{k: int(v) for k, v in config.items() if k in fields})
    except TypeError as e:
        raise ModelError(f"{folder / CONFIG_FILE}: not a Whisper config ({e})") from e
    return dims, quantization


def load_mlx_folder(folder: Path, dtype: mx.Dtype) -> tuple[Whisper, ModelDimensions, dict | None]:
    """Load an mlx-whisper model folder, checking that every weight is there, cast to ``dtype``;
    also its quantisation settings (None: full precision)."""
    dims, quantization = read_config(folder)
    weight_file = next((folder / w for w in WEIGHT_FILES if (folder / w).is_file()), None)
    if weight_file is None:
        raise ModelError(f"{folder}: no {' or '.join(WEIGHT_FILES)}")
    try:
        weights = mx.load(str(weight_file))
    except Exception as e:
        raise ModelError(f"{weight_file}: unreadable weights ({e})") from e
    model = Whisper(dims, dtype)
    if quantization is not None:
        # as mlx_whisper.load_models does: quantize the layers the file has scales for; a layer
        # with its own settings (mlx-lm's convention: config's quantization[path]) gets them
        def predicate(p: str, m) -> bool | dict:
            if not (isinstance(m, (nn.Linear, nn.Embedding)) and f"{p}.scales" in weights):
                return False
            own = quantization.get(p)
            return own if isinstance(own, dict) else True

        nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"], class_predicate=predicate)
        expected = dict(tree_flatten(model.parameters()))
        missing = sorted(set(expected) - set(weights) - {"alignment_heads"})
        if missing:
            raise ModelError(f"{weight_file}: missing weights {', '.join(missing[:5])}")
        wrong = sorted(k for k, v in expected.items()
                       if k in weights and k != "alignment_heads" and weights[k].shape != v.shape)
        if wrong:  # a group size or width config.json does not state
            raise ModelError(f"{weight_file}: {wrong[0]} is {weights[wrong[0]].shape}, its config says "
                             f"{expected[wrong[0]].shape}")
        if mx.default_device() == mx.cpu:  # MLX's CPU quantized_matmul is slow for many rows
            from engine.cpu_quantized import use_cpu_layers

            use_cpu_layers(model)
    else:
        check_against_model(weights, dims)

    def cast(x: mx.array) -> mx.array:
        return x.astype(dtype) if mx.issubdtype(x.dtype, mx.floating) else x

    model.update(tree_unflatten([(k, cast(v)) for k, v in weights.items()]))
    mx.eval(model.parameters())
    return model, dims, quantization


def planned_rows(name: str | None = None, batch_size: int = 0) -> int:
    """The batch rows a session of this model will have here, without loading its weights (a
    worker sizes its task pool from it before any job arrives).

    Raises ModelError, in one line, when the weights and one row do not fit the memory budget.
    """
    from engine.memory import plan_batch

    name = name or get_settings().model
    folder = resolve_model(name)
    dims, quantization = read_config(folder)
    plan = plan_batch(dims, default_dtype(), quantization=quantization)
    check_fits(name, folder, plan, dims, quantization)
    return batch_size if batch_size > 0 else plan.batch_size


def check_fits(name: str, folder: Path, plan, dims: ModelDimensions, quantization: dict | None) -> None:
    """Raise ModelError unless the model's weights and one batch row fit ``plan``'s budget (an
    automatic plan's); the message names the memory needed and had, and a quantised variant that would fit."""
    from engine.memory import GIB, weights_bytes
    from engine.model_store import is_mlx_folder, models_dir
    from engine.variants import BITS_CHOICES, Quantization, source_of, variant_name

    needed = plan.weights_bytes + plan.per_window_bytes
    if needed <= plan.budget_bytes:
        return
    message = (f"model {name} needs {needed / GIB:.2f} GiB for its weights and one batch row; "
               f"the budget is {plan.budget_bytes / GIB:.2f} GiB ({plan.budget_source})")
    full = source_of(name, folder)
    current_bits = int(quantization["bits"]) if quantization else 16
    dtype_bytes = default_dtype().size
    smaller = [Quantization(bits) for bits in BITS_CHOICES if bits < current_bits]
    for q in smaller:
        variant_bytes = weights_bytes(dims, dtype_bytes, q.as_config()) + plan.per_window_bytes
        if variant_bytes <= plan.budget_bytes:
            variant = variant_name(Path(full).name, q)
            how = (f"--model {variant}" if is_mlx_folder(models_dir() / variant)
                   else f"archive-asr models quantize {full} --bits {q.bits}")
            raise ModelError(f"{message}; {variant} would fit ({variant_bytes / GIB:.2f} GiB): {how}")
    if smaller:
        q = smaller[-1]
        least = weights_bytes(dims, dtype_bytes, q.as_config()) + plan.per_window_bytes
        message += f"; even {variant_name(Path(full).name, q)} would need {least / GIB:.2f} GiB"
    raise ModelError(f"{message}: raise the budget or use a smaller model")


def get_model(name: str | None = None) -> LoadedModel:
    """The model called ``name`` (default: settings.model), loaded once per process."""
    global _held
    name = name or get_settings().model
    with _lock:
        if _held is not None and _held.name == name:
            return _held
        if _held is not None:
            log.info("replacing model %s with %s", _held.name, name)
            _held = None
            clear_cache()
        folder = resolve_model(name)
        dtype = default_dtype()
        model, dims, quantization = load_mlx_folder(folder, dtype)
        meta = read_meta(folder)
        if meta.get("alignment_heads"):
            model.set_alignment_heads(np.asarray(meta["alignment_heads"], dtype=np.int64))
        heads = np.array(model.alignment_heads)
        _held = LoadedModel(name=name, model=model, dims=dims, dtype=dtype, path=folder, alignment_heads=heads,
                            quantization=quantization)
        log.info("loaded model %s from %s (%s, %s)", name, folder, dtype, device_name())
        return _held


def release_model() -> None:
    """Drop the held model and MLX's cached buffers (tests, or a worker switching models)."""
    global _held
    with _lock:
        _held = None
        clear_cache()


def clear_cache() -> None:
    """Return MLX's cached buffers to the system: call between jobs, whose shapes differ."""
    mx.clear_cache()
