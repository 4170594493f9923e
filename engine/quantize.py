"""Quantise a model of the store to 8 or 4 bits (``archive-asr models quantize``).

The folder written is what mlx-whisper's own quantised conversions look like (mlx-community's
``whisper-*-4bit``): ``config.json`` with a ``quantization`` key ({"group_size", "bits"}), and
``weights.safetensors`` holding each quantised layer as packed ``weight`` (uint32), ``scales`` and
``biases``. ``engine.holder.load_mlx_folder`` loads it as it loads any MLX folder. Beside them,
``archive_asr.json`` records how it was made: the source model, its sha256, bits, group size.

What is quantised: every Linear layer and the token embedding (which is also the output
projection), as ``mlx.nn.quantize`` does by default; convolutions, layer norms and the
positional embedding stay in the source's precision (they are under 2 % of the weights). The
encoder's layers may have a group size of their own (``--encoder-group-size``): config.json then
lists each of them under its path, as mlx-lm does, which mlx-whisper's own loader cannot read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from engine.convert import CONFIG_FILE, FORMAT_VERSION, META_FILE, write_mlx_folder
from engine.errors import ModelError
from engine.model_store import _safe_name, models_dir, read_meta, resolve_model
from engine.variants import BITS_CHOICES, GROUP_SIZE_CHOICES, Quantization, source_of, variant_name


def check_quantization(quantization: Quantization) -> None:
    if quantization.bits not in BITS_CHOICES:
        raise ModelError(f"--bits {quantization.bits}: use one of {', '.join(map(str, BITS_CHOICES))}")
    for option, size in (("--group-size", quantization.group_size), ("--encoder-group-size", quantization.encoder_group_size)):
        if size is not None and size not in GROUP_SIZE_CHOICES:
            raise ModelError(f"{option} {size}: use one of {', '.join(map(str, GROUP_SIZE_CHOICES))}")


def quantize_model(source: str, quantization: Quantization, name: str | None = None) -> tuple[Path, bool]:
    """Write ``source`` quantised into the model store as ``name`` (default: base -> base-q4).

    Returns (folder, made): made is False when the same quantisation of the same source was already
    there. Atomic as imports are (a temporary folder in the models folder, then a rename), under
    a file lock, so two processes asking at once write it once.
    """
    from filelock import FileLock

    check_quantization(quantization)
    folder = resolve_model(source)
    if json.loads((folder / CONFIG_FILE).read_text()).get("quantization"):
        raise ModelError(f"{source} is already quantised; quantise its full-precision source ({source_of(source, folder)}) instead")
    # a folder or a Hugging Face repo id names its variant by its last part: .../whisper-base -> whisper-base-q4
    name = _safe_name(name or variant_name(Path(source).name, quantization))
    dest = models_dir() / name
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(dest.parent / f".{dest.name}.lock")):
            if dest.exists():
                meta = read_meta(dest)
                # the same source: by its sha256 where it has one (a moved models folder still matches), else its path
                sha256 = read_meta(folder).get("source_sha256")
                same_source = meta.get("source_sha256") == sha256 if sha256 else meta.get("source_path") == str(folder)
                if same_source and meta.get("quantization") == quantization.as_config():
                    return dest, False
                raise ModelError(f"a model named {name!r} already exists ({dest}); pick another --name")
            _write(folder, dest, name=name, source=source, quantization=quantization)
    except OSError as e:
        raise ModelError(f"cannot write the quantised model to {dest} ({e}); set ARCHIVE_ASR_MODELS_DIR to a writable folder") from e
    return dest, True


def is_quantizable(module, group_size: int) -> bool:
    """A Linear layer or the token embedding whose rows split into whole groups (all of Whisper's)."""
    import mlx.nn as nn

    return isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.shape[-1] % group_size == 0


def quantize_in_place(model, quantization: Quantization) -> list[str]:
    """Quantise a Whisper model's Linear layers and token embedding in place; return their paths."""
    import mlx.nn as nn

    layers = []

    def quantizable(path: str, module) -> bool | dict:
        settings = quantization.layer_config(path)
        if not is_quantizable(module, settings["group_size"]):
            return False
        layers.append(path)
        return settings

    nn.quantize(model, group_size=quantization.group_size, bits=quantization.bits, class_predicate=quantizable)
    return layers


def _write(folder: Path, dest: Path, *, name: str, source: str, quantization: Quantization) -> None:
    """Quantise the model in ``folder`` and write it to ``dest`` through a temporary folder beside it."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    from engine.holder import load_mlx_folder
    from engine.model_store import stored_dtype

    source_meta = read_meta(folder)
    # Quantise from the weights as stored (float16 for Whisper): no cast before the rounding.
    dtype = {"float32": mx.float32, "bfloat16": mx.bfloat16}.get(stored_dtype(folder) or "", mx.float16)
    model, dims, _ = load_mlx_folder(folder, dtype)
    if source_meta.get("alignment_heads"):
        model.set_alignment_heads(np.asarray(source_meta["alignment_heads"], dtype=np.int64))
    layers = quantize_in_place(model, quantization)
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    meta = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "source_model": source,
        "source_path": str(folder),
        "source_sha256": source_meta.get("source_sha256"),
        "source_dtype": str(dtype).removeprefix("mlx.core."),
        "quantization": quantization.as_config(),
        "quantized_layers": len(layers),
        "alignment_heads": np.array(model.alignment_heads).tolist(),
        "alignment_heads_from_config": source_meta.get("alignment_heads_from_config"),
        "quantized_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        staged = tmp / "model"
        write_mlx_folder(staged, weights, dims, meta)
        config_path = staged / CONFIG_FILE
        config = json.loads(config_path.read_text()) | {"quantization": config_quantization(quantization, layers)}
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        os.rename(staged, dest)  # the folder appears complete or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def config_quantization(quantization: Quantization, layers: list[str]) -> dict:
    """config.json's ``quantization``: mlx-whisper's ``{"group_size", "bits"}``, and where a layer's
    differ, its own entry under its path (mlx-lm's convention; mlx-whisper's loader reads only
    the uniform kind, engine.holder both)."""
    config = {"group_size": quantization.group_size, "bits": quantization.bits}
    for path in layers:
        own = quantization.layer_config(path)
        if own["group_size"] != quantization.group_size:
            config[path] = own
    return config
