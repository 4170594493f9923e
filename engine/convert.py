"""Convert a CTranslate2 (faster-whisper) Whisper ``model.bin`` into mlx-whisper's folder format.

The folder this writes is what ``mlx_whisper.load_models.load_model`` reads: ``config.json`` (the
``ModelDimensions`` fields and ``model_type``; it takes no other keys) and ``weights.safetensors``
(mlx-whisper parameter names, ``alignment_heads`` included, as mlx-community's conversions store
them). What mlx-whisper cannot read goes beside them in ``archive_asr.json``: the model's name,
where it came from, the source's sha256 and the alignment heads.

``model.bin`` layout (CTranslate2 version 6): uint32 version; spec name and uint32 revision;
uint32 variable count; each variable = name (uint16 length incl. NUL, bytes), uint8 rank, uint32
dims, uint8 dtype, uint32 byte count, bytes; then uint32 alias count and (alias, target) names.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from engine.errors import ModelError

CT2_VERSION = 6
SPEC_NAME = "WhisperSpec"
# CTranslate2 dtype codes -> numpy
CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
BF16_CODE = 5  # numpy has no bfloat16: read as uint16 and widen to float32 by hand

CONFIG_FILE = "config.json"  # mlx-whisper's: ModelDimensions + model_type
WEIGHTS_FILE = "weights.safetensors"
META_FILE = "archive_asr.json"  # ours: name, source, sha256, alignment heads
FORMAT_VERSION = 1

READ_CHUNK_BYTES = 8 << 20

# CTranslate2 flags and counts that describe the architecture but are not weights.
SCALAR_VARIABLES = {
    "decoder/activation",
    "decoder/alibi",
    "decoder/alignment_heads",
    "decoder/alignment_layer",
    "decoder/num_heads",
    "decoder/pre_norm",
    "decoder/scale_embeddings",
    "decoder/start_from_zero_embedding",
    "encoder/num_heads",
    "encoder/activation",
    "encoder/pre_norm",
}


class _PartsReader:
    """Reads the parts of one model.bin as one stream, hashing as it goes (no file is held twice)."""

    def __init__(self, paths: Iterable[Path]):
        self.paths = [Path(p) for p in paths]
        self._files = iter(self.paths)
        self._current = None
        self.sha256 = hashlib.sha256()
        self.offset = 0
        self._next_file()

    def _next_file(self) -> bool:
        if self._current is not None:
            self._current.close()
        path = next(self._files, None)
        self._current = open(path, "rb") if path is not None else None
        return self._current is not None

    def read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n and self._current is not None:
            chunk = self._current.read(n - len(out))
            if not chunk:
                self._next_file()
                continue
            out += chunk
        if len(out) < n:
            raise ModelError(f"{self.paths[-1]}: model.bin ends early at byte {self.offset + len(out)} (truncated?)")
        self.sha256.update(out)
        self.offset += n
        return bytes(out)

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt)))

    def string(self) -> str:
        (length,) = self.unpack("H")
        return self.read(length).rstrip(b"\0").decode("utf-8")

    def drain(self) -> None:
        """Hash whatever follows the last field (nothing, in a well-formed file)."""
        while self._current is not None:
            chunk = self._current.read(READ_CHUNK_BYTES)
            if not chunk:
                self._next_file()
                continue
            self.sha256.update(chunk)
            self.offset += len(chunk)

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None


def sha256_of(paths: Iterable[Path]) -> str:
    """sha256 of the concatenation of ``paths``, read in chunks."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(READ_CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


def read_ct2_model(parts: Iterable[Path]) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    """Read a CTranslate2 Whisper model.bin (possibly split in parts): (variables, aliases, sha256)."""
    reader = _PartsReader(parts)
    try:
        (version,) = reader.unpack("I")
        if version != CT2_VERSION:
            raise ModelError(f"{reader.paths[0]}: CTranslate2 model version {version}, expected {CT2_VERSION}")
        spec = reader.string()
        if spec != SPEC_NAME:
            raise ModelError(f"{reader.paths[0]}: a CTranslate2 {spec!r}, not a Whisper model ({SPEC_NAME})")
        reader.unpack("I")  # spec revision
        (n_variables,) = reader.unpack("I")
        variables: dict[str, np.ndarray] = {}
        for _ in range(n_variables):
            name = reader.string()
            (rank,) = reader.unpack("B")
            shape = reader.unpack("I" * rank)
            (dtype_code,) = reader.unpack("B")
            (n_bytes,) = reader.unpack("I")
            data = reader.read(n_bytes)
            if dtype_code == BF16_CODE:
                array = (np.frombuffer(data, np.uint16).astype(np.uint32) << 16).view(np.float32)
            elif dtype_code in CT2_DTYPES:
                array = np.frombuffer(data, CT2_DTYPES[dtype_code])
            else:
                raise ModelError(f"{name}: unknown CTranslate2 dtype code {dtype_code}")
            if array.size != int(np.prod(shape)):
                raise ModelError(f"{name}: {n_bytes} bytes do not fill shape {shape}")
            variables[name] = array.reshape(shape)
        (n_aliases,) = reader.unpack("I")
        aliases = {}
        for _ in range(n_aliases):
            alias = reader.string()
            aliases[alias] = reader.string()
        reader.drain()
        return variables, aliases, reader.sha256.hexdigest()
    except (struct.error, UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"{reader.paths[0]}: not a readable CTranslate2 model.bin ({e})") from e
    finally:
        reader.close()


def _layer_count(variables: dict[str, np.ndarray], prefix: str) -> int:
    pattern = re.compile(rf"^{prefix}/layer_(\d+)/")
    indices = {int(m.group(1)) for name in variables if (m := pattern.match(name))}
    return max(indices) + 1 if indices else 0


def _scalar(variables: dict[str, np.ndarray], name: str) -> int:
    if name not in variables:
        raise ModelError(f"missing tensor {name}")
    return int(variables[name].reshape(-1)[0])


def _dims_from(variables: dict[str, np.ndarray]):
    from mlx_whisper.whisper import ModelDimensions

    need = ["encoder/conv1/weight", "encoder/position_encodings/encodings", "decoder/embeddings/weight",
            "decoder/position_encodings/encodings"]
    missing = [n for n in need if n not in variables]
    if missing:
        raise ModelError(f"missing tensors: {', '.join(missing)}")
    audio_ctx, audio_state = variables["encoder/position_encodings/encodings"].shape
    text_ctx, text_state = variables["decoder/position_encodings/encodings"].shape
    return ModelDimensions(
        n_mels=int(variables["encoder/conv1/weight"].shape[1]),
        n_audio_ctx=int(audio_ctx),
        n_audio_state=int(audio_state),
        n_audio_head=_scalar(variables, "encoder/num_heads"),
        n_audio_layer=_layer_count(variables, "encoder"),
        n_vocab=int(variables["decoder/embeddings/weight"].shape[0]),
        n_text_ctx=int(text_ctx),
        n_text_state=int(text_state),
        n_text_head=_scalar(variables, "decoder/num_heads"),
        n_text_layer=_layer_count(variables, "decoder"),
    )


def _linear(out: dict, dst: str, variables: dict, src: str) -> None:
    out[f"{dst}.weight"] = variables.pop(f"{src}/weight")
    out[f"{dst}.bias"] = variables.pop(f"{src}/bias")


def _block(out: dict, variables: dict, src: str, dst: str) -> None:
    """Self-attention (fused q|k|v) and MLP of one layer, shared by encoder and decoder blocks."""
    _norm(out, f"{dst}.attn_ln", variables, f"{src}/self_attention/layer_norm")
    _fused(out, [f"{dst}.attn.query", f"{dst}.attn.key", f"{dst}.attn.value"], variables,
           f"{src}/self_attention/linear_0")
    _linear(out, f"{dst}.attn.out", variables, f"{src}/self_attention/linear_1")
    _norm(out, f"{dst}.mlp_ln", variables, f"{src}/ffn/layer_norm")
    _linear(out, f"{dst}.mlp1", variables, f"{src}/ffn/linear_0")
    _linear(out, f"{dst}.mlp2", variables, f"{src}/ffn/linear_1")


def _norm(out: dict, dst: str, variables: dict, src: str) -> None:
    out[f"{dst}.weight"] = variables.pop(f"{src}/gamma")
    out[f"{dst}.bias"] = variables.pop(f"{src}/beta")


def _fused(out: dict, dsts: list[str], variables: dict, src: str) -> None:
    """Split a fused projection (q|k|v or k|v) into mlx-whisper's separate Linear layers.

    Whisper's key projection has no bias; CTranslate2 stores zeros there. Dropping it is exact in
    any case: a key bias adds q.b to every logit of one query, which softmax cancels.
    """
    weights = np.split(variables.pop(f"{src}/weight"), len(dsts), axis=0)
    biases = np.split(variables.pop(f"{src}/bias"), len(dsts), axis=0)
    for dst, weight, bias in zip(dsts, weights, biases):
        out[f"{dst}.weight"] = weight
        if not dst.endswith(".key"):
            out[f"{dst}.bias"] = bias


def ct2_to_mlx_weights(variables: dict[str, np.ndarray], aliases: dict[str, str]):
    """Map CTranslate2 WhisperSpec variables to mlx-whisper parameter names: (weights, dims).

    Raises ModelError for missing, extra or misshapen tensors, checked against the parameters of
    an ``mlx_whisper.whisper.Whisper`` built with the dimensions the file implies.
    """
    variables = dict(variables)
    dims = _dims_from(variables)
    out: dict[str, np.ndarray] = {}
    try:
        for conv in ("conv1", "conv2"):
            # CTranslate2/PyTorch conv weights are (out, in, kernel); MLX's Conv1d wants (out, kernel, in).
            out[f"encoder.{conv}.weight"] = variables.pop(f"encoder/{conv}/weight").transpose(0, 2, 1)
            out[f"encoder.{conv}.bias"] = variables.pop(f"encoder/{conv}/bias")
        # mlx-whisper computes the encoder's sinusoids itself; check they are the standard ones.
        positions = variables.pop("encoder/position_encodings/encodings")
        for i in range(dims.n_audio_layer):
            _block(out, variables, f"encoder/layer_{i}", f"encoder.blocks.{i}")
        _norm(out, "encoder.ln_post", variables, "encoder/layer_norm")

        out["decoder.token_embedding.weight"] = variables.pop("decoder/embeddings/weight")
        out["decoder.positional_embedding"] = variables.pop("decoder/position_encodings/encodings")
        for i in range(dims.n_text_layer):
            src, dst = f"decoder/layer_{i}", f"decoder.blocks.{i}"
            _block(out, variables, src, dst)
            _norm(out, f"{dst}.cross_attn_ln", variables, f"{src}/attention/layer_norm")
            _linear(out, f"{dst}.cross_attn.query", variables, f"{src}/attention/linear_0")
            _fused(out, [f"{dst}.cross_attn.key", f"{dst}.cross_attn.value"], variables, f"{src}/attention/linear_1")
            _linear(out, f"{dst}.cross_attn.out", variables, f"{src}/attention/linear_2")
        _norm(out, "decoder.ln", variables, "decoder/layer_norm")
    except KeyError as e:
        raise ModelError(f"missing tensor {e.args[0]}") from e

    # Whisper ties the output projection to the token embedding; mlx-whisper does too (as_linear).
    projection = variables.pop("decoder/projection/weight", None)
    if projection is not None and projection.shape != out["decoder.token_embedding.weight"].shape:
        raise ModelError("decoder/projection/weight is not tied to the token embedding")
    unknown_aliases = {a for a in aliases if a != "decoder/projection/weight"}
    extra = sorted(set(variables) - SCALAR_VARIABLES) + sorted(unknown_aliases)
    if extra:
        raise ModelError(f"unexpected tensors (not a plain Whisper model?): {', '.join(extra[:8])}")
    _check_positions(positions, dims)
    check_against_model(out, dims)
    return out, dims


def _check_positions(positions: np.ndarray, dims) -> None:
    import mlx.core as mx
    from mlx_whisper.whisper import sinusoids

    expected = np.array(sinusoids(dims.n_audio_ctx, dims.n_audio_state).astype(mx.float32))
    if positions.shape != expected.shape or np.abs(positions.astype(np.float32) - expected).max() > 1e-2:
        raise ModelError("encoder positional encodings are not Whisper's sinusoids")


def check_against_model(weights: dict, dims) -> None:
    """Raise ModelError unless ``weights`` holds exactly the parameters a Whisper(dims) has, in their shapes."""
    from mlx.utils import tree_flatten
    from mlx_whisper.whisper import Whisper

    expected = {k: tuple(v.shape) for k, v in tree_flatten(Whisper(dims).parameters()) if k != "alignment_heads"}
    given = {k: tuple(v.shape) for k, v in weights.items() if k != "alignment_heads"}
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    wrong = sorted(k for k in set(expected) & set(given) if expected[k] != given[k])
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if extra:
        problems.append(f"unexpected {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    if wrong:
        problems.append(", ".join(f"{k} is {given[k]}, expected {expected[k]}" for k in wrong[:5]))
    if problems:
        raise ModelError("weights do not match a Whisper model of these dimensions: " + "; ".join(problems))


def read_alignment_heads(config_path: Path | None, dims) -> tuple[np.ndarray, bool]:
    """(alignment heads as (n, 2) [layer, head] pairs, whether they came from the model's config)."""
    if config_path is not None and config_path.is_file():
        heads = json.loads(config_path.read_text()).get("alignment_heads")
        if heads:
            array = np.asarray(heads, dtype=np.int64).reshape(-1, 2)
            if (array[:, 0] >= dims.n_text_layer).any() or (array[:, 1] >= dims.n_text_head).any():
                raise ModelError(f"{config_path}: alignment heads outside the decoder ({dims.n_text_layer} layers)")
            return array, True
    # mlx-whisper's and openai-whisper's fallback: every head of the last half of the decoder layers.
    heads = np.zeros((dims.n_text_layer, dims.n_text_head), dtype=bool)
    heads[dims.n_text_layer // 2 :] = True
    return np.asarray(heads.nonzero(), dtype=np.int64).T, False


def write_mlx_folder(dest: Path, weights: dict, dims, meta: dict) -> None:
    """Write config.json, weights.safetensors and archive_asr.json into ``dest`` (which must not exist yet)."""
    import mlx.core as mx

    dest.mkdir(parents=True)
    config = asdict(dims) | {"model_type": "whisper"}
    (dest / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    arrays = {k: mx.array(v) for k, v in weights.items()}
    mx.save_safetensors(str(dest / WEIGHTS_FILE), arrays, metadata={"format": "mlx"})
    (dest / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def convert_ct2(
    parts: list[Path],
    dest: Path,
    *,
    name: str,
    config_path: Path | None,
    expected_sha256: str | None = None,
    source: str = "",
) -> Path:
    """Convert one CTranslate2 Whisper model into the MLX folder ``dest``, atomically; return ``dest``.

    Two processes converting the same model at once do not clash: a file lock beside ``dest``
    serialises them, the second finds the folder done. The folder appears only when complete
    (written under a temporary name, then renamed).
    """
    from filelock import FileLock

    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(dest.parent / f".{dest.name}.lock")):
            return _convert_locked(parts, dest, name=name, config_path=config_path,
                                   expected_sha256=expected_sha256, source=source)
    except OSError as e:
        raise ModelError(f"cannot write the converted model to {dest} ({e}); set ARCHIVE_ASR_MODELS_DIR to a writable folder") from e


def _convert_locked(parts, dest: Path, *, name, config_path, expected_sha256, source) -> Path:
    """convert_ct2's work, under its lock."""
    if (dest / META_FILE).is_file():
        return dest
    variables, aliases, sha256 = read_ct2_model(parts)
    if expected_sha256 and sha256 != expected_sha256:
        raise ModelError(
            f"{' + '.join(str(p) for p in parts)}: sha256 {sha256} does not match the pinned "
            f"{expected_sha256}; the package is damaged or a different version: reinstall it"
        )
    weights, dims = ct2_to_mlx_weights(variables, aliases)
    del variables
    heads, heads_from_config = read_alignment_heads(config_path, dims)
    weights["alignment_heads"] = heads
    meta = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "source": source or " + ".join(str(p) for p in parts),
        "source_sha256": sha256,
        "source_dtype": str(weights["decoder.token_embedding.weight"].dtype),
        "alignment_heads": heads.tolist(),
        "alignment_heads_from_config": heads_from_config,
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        staged = tmp / "model"
        write_mlx_folder(staged, weights, dims, meta)
        if dest.exists():  # a half-written folder from an older, interrupted tool: replace it
            shutil.rmtree(dest)
        os.rename(staged, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
