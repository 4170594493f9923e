"""CLI commands that run the engine directly, no queue: `transcribe` and `models`.

Added to the root group by `cli`; MLX is imported only inside the commands, so importing this
module (every `archive-asr` command does) loads no engine and `archive-asr models --help` stays quick.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from archive_asr.errors import ArchiveAsrError
from archive_asr.settings import get_settings
from worker.cli_options import parse_batch_size


def _timestamp(seconds: float) -> str:
    minutes, s = divmod(max(0.0, seconds), 60)
    h, m = divmod(int(minutes), 60)
    return f"{h:02d}:{m:02d}:{s:06.3f}" if h else f"{m:02d}:{s:06.3f}"


def _warn_blas() -> None:
    import engine  # noqa: F401  (loads OpenBLAS before MLX)
    from engine.blas import blas_warning

    warning = blas_warning()
    if warning:
        click.echo(f"warning: {warning}", err=True)


def _batch_size(ctx: click.Context, param: click.Parameter, value: str) -> int:
    return parse_batch_size(value)


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", "-m", default=None, help="Model: a name from `archive-asr models list`, an MLX or CTranslate2 folder, or a Hugging Face repo id. [default: settings' model, 'base']")
@click.option("--batch-size", default="auto", callback=_batch_size, show_default=True, help="Windows decoded together; 'auto' chooses from the device's memory.")
@click.option("--language", "-l", default=None, help="Language code of the audio (en, de, ...); detected per file when omitted.")
@click.option("--words/--no-words", default=True, show_default=True, help="Word-level timestamps.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per file (one per line).")
@click.option("--quiet", "-q", is_flag=True, help="No progress or log messages on stderr.")
def transcribe(files: tuple[Path, ...], model: str | None, batch_size: int, language: str | None, words: bool, as_json: bool, quiet: bool) -> None:
    """Transcribe audio files together with the batched engine and print the transcripts (no queue, no database)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _warn_blas()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from engine.options import EngineOptions
    from engine.transcribe import transcribe_many

    options = EngineOptions(language=language, word_timestamps=words, batch_size=batch_size)
    model_name = model or get_settings().model
    progress = Progress(TextColumn("transcribing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        disable=quiet, transient=True)
    with progress:
        bar = progress.add_task("files", total=len(files))
        try:
            # every file in one session: files are the batch rows, each decoded as sequential Whisper
            results = transcribe_many(list(files), model_name=model_name, options=options, return_exceptions=True,
                                      on_done=lambda _i, _r: progress.advance(bar))
        except ArchiveAsrError as e:  # the model would not load, an English-only model asked for German
            raise click.ClickException(str(e)) from e
    failed = 0
    for path, result in zip(files, results):
        if isinstance(result, BaseException):
            if not isinstance(result, ArchiveAsrError):
                raise result
            failed += 1  # one bad file fails alone; the others go on
            message = str(result).removeprefix(f"{path}: ")
            click.echo(f"error: {path}: {message}", err=True)
            if as_json:
                click.echo(json.dumps({"path": str(path), "error": message}))
            continue
        if as_json:
            click.echo(json.dumps(result.to_json(str(path)), ensure_ascii=False))
            continue
        t = result.timing
        language_note = result.language or "language undetermined"
        click.echo(f"# {path} ({result.duration_s:.1f} s, {language_note}, batch {t.batch_size}, {t.device})")
        for warning in result.warnings:
            click.echo(f"# warning: {warning}")
        for seg in result.segments:
            click.echo(f"[{_timestamp(seg.start_s)} --> {_timestamp(seg.end_s)}] {seg.text.strip()}")
        if not result.segments:
            click.echo("(no speech)")
    if failed:
        sys.exit(1)


@click.group()
def models() -> None:
    """List, import and quantise Whisper models (converted to MLX once, cached in the models folder)."""


def _size(size_bytes: int | None) -> str:
    if size_bytes is None:
        return "-"
    return f"{size_bytes / (1 << 20):.0f} MiB" if size_bytes < 1 << 30 else f"{size_bytes / (1 << 30):.2f} GiB"


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
def list_command(as_json: bool) -> None:
    """Show the models available offline: bundled ones (converted on first use), imported and quantised ones."""
    from engine.model_store import list_models

    infos = list_models()
    default = get_settings().model
    if as_json:
        rows = [
            {"name": i.name, "kind": i.kind, "path": str(i.path) if i.path else None, "ready": i.ready,
             "multilingual": i.multilingual, "bits": i.bits, "size_bytes": i.size_bytes, "default": i.name == default}
            for i in infos
        ]
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'name':<24} {'kind':<9} {'languages':<12} {'bits':>4} {'size':>9}  {'status':<22} path")
    for i in infos:
        languages = {True: "multilingual", False: "English", None: "?"}[i.multilingual]
        status = "converted" if i.ready else "converted on first use"
        marker = " (default)" if i.name == default else ""
        bits = "-" if i.bits is None else str(i.bits)
        click.echo(f"{i.name + marker:<24} {i.kind:<9} {languages:<12} {bits:>4} {_size(i.size_bytes):>9}  "
                   f"{status:<22} {i.path or ''}")
    click.echo(f"\nmodels folder: {get_settings().resolved_models_dir}")


@models.command("quantize")
@click.argument("model")
@click.option("--bits", type=click.Choice(["8", "4"]), required=True, help="Bits per weight: 8 (about half the weights of float16) or 4 (under a third; costs over a WER point, README).")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True,
              help="Weights sharing one scale and bias; smaller is more accurate and a little larger.")
@click.option("--encoder-group-size", type=click.Choice(["32", "64", "128"]), default=None,
              help="The encoder's own group size (it is under a fifth of the weights; README). [default: --group-size]")
@click.option("--name", "-n", default=None, help="Name to use with --model. [default: MODEL-q8 or MODEL-q4]")
def quantize_command(model: str, bits: str, group_size: str, encoder_group_size: str | None, name: str | None) -> None:
    """Write a quantised copy of MODEL (e.g. base -> base-q4) into the models folder."""
    import engine  # noqa: F401  (OpenBLAS before MLX)
    from engine.errors import ModelError
    from engine.model_store import size_on_disk
    from engine.quantize import Quantization, quantize_model

    try:
        quantization = Quantization(int(bits), int(group_size), int(encoder_group_size) if encoder_group_size else None)
        dest, made = quantize_model(model, quantization, name)
    except ModelError as e:
        raise click.ClickException(str(e)) from e
    verb = "quantised" if made else "already there:"
    click.echo(f"{verb} {model} -> {dest.name} ({bits}-bit, {_size(size_on_disk(dest))}) at {dest}  (use --model {dest.name})")


@models.command("import")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--name", "-n", default=None, help="Name to use with --model. [default: the folder's name]")
def import_command(path: Path, name: str | None) -> None:
    """Convert a CTranslate2 (faster-whisper) model folder to MLX and add it to the models folder."""
    import engine  # noqa: F401
    from engine.errors import ModelError
    from engine.model_store import import_ct2

    try:
        dest = import_ct2(path, name)
    except ModelError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"imported {dest.name} -> {dest}  (use --model {dest.name})")
