"""Quantised variants of a model: their settings and their names in the model store (base -> base-q4).

Apart from engine.quantize, which writes them, so that engine.holder can name a variant that would
fit without importing the writer (which loads models through engine.holder).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from engine.model_store import read_meta

BITS_CHOICES = (8, 4)
DEFAULT_GROUP_SIZE = 64  # mlx's default: one float16 scale and bias per 64 weights
GROUP_SIZE_CHOICES = (32, 64, 128)
SUFFIX = re.compile(r"-q(\d+)(?:-g\d+)?(?:-e\d+)?$")  # base-q4, tiny.en-q8-g32, tiny.en-q8-e32


@dataclass(frozen=True)
class Quantization:
    bits: int  # per weight of each quantised layer
    group_size: int = DEFAULT_GROUP_SIZE  # weights sharing one scale and one bias
    encoder_group_size: int | None = None  # the encoder's layers, where it differs from group_size

    def as_config(self) -> dict:
        """The recipe: ``{"group_size", "bits"}`` (config.json's ``quantization`` key, as mlx-whisper
        reads it), plus ``encoder_group_size`` where the encoder has its own (archive_asr.json's)."""
        config = {"group_size": self.group_size, "bits": self.bits}
        if self.encoder_group_size not in (None, self.group_size):
            config["encoder_group_size"] = self.encoder_group_size
        return config

    def layer_config(self, path: str) -> dict:
        """``to_quantized``'s settings for the layer at ``path`` (encoder.blocks.0.mlp1, decoder...)."""
        group = self.encoder_group_size if path.startswith("encoder.") and self.encoder_group_size else self.group_size
        return {"group_size": group, "bits": self.bits}


def variant_name(source: str, quantization: Quantization) -> str:
    """The store name of a source model's quantised variant: base -> base-q4 (base-q4-g32 off the default
    group, base-q8-e32 with the encoder's own)."""
    group = "" if quantization.group_size == DEFAULT_GROUP_SIZE else f"-g{quantization.group_size}"
    encoder = quantization.as_config().get("encoder_group_size")
    return f"{source}-q{quantization.bits}{group}" + (f"-e{encoder}" if encoder else "")


def source_of(name: str, folder: Path | None = None) -> str:
    """The full-precision model a name was quantised from ("base-q8" -> "base"); the name itself if none."""
    if folder is not None:
        meta = read_meta(folder)
        if meta.get("quantization"):
            return meta.get("source_model") or SUFFIX.sub("", name)
    return SUFFIX.sub("", name) if SUFFIX.search(name) else name
