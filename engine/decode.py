"""Batched greedy decoding of encoded windows, with Whisper's logit rules as array operations.

mlx_whisper decodes a batch too, but its `ApplyTimestampRules` pulls every step's tokens to the
host (`tolist()`) and fills a numpy (batch x vocabulary) mask in a Python loop, so each token
waits on a host round trip; its decoder also computes logits for every prompt position and grows
the key/value cache by concatenation. Here:

- the timestamp rules run on the device from three small per-row state arrays (last token,
  the one before it, the latest timestamp), so steps are queued without waiting for the device
  and the host checks for completion only every few steps;
- rows carry different prompts (the previous text of their own region), left-padded; padding is
  masked in self-attention and each row's positions start at 0 at its first real token;
- the self-attention cache is written in place into a buffer sized for the whole decode;
- logits are computed only where needed: the last position, and the SOT position for P(no speech).

A step costs about as much at 128 rows as at 64 (H200, base: 2.5 vs 2.8 ms; benchmarks/bench_batch.py),
so rows are nearly free on a big GPU. Compiling the whole one-token step (mx.compile, the cache at a
fixed capacity written with slice_update) was tried and dropped: no faster at 64 rows, and at 128
rows 4.6 ms a step, as the compiled step copies the whole cache every time.

The model's own layers (mlx_whisper.whisper.TextDecoder) are called; only the loop around them
is ours. Arithmetic stays in the model's dtype (float16 on a GPU); logits are float32.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_whisper.audio import CHUNK_LENGTH
from mlx_whisper.tokenizer import Tokenizer

from engine.options import EngineOptions

NEG_INF = float("-inf")


@dataclass(frozen=True)
class WindowResult:
    """What one window decoded to (tokens exclude the final <|endoftext|>)."""

    tokens: tuple[int, ...]  # text and timestamp tokens, as sampled
    avg_logprob: float  # sum of sampled log-probabilities / (len(tokens) + 1), as Whisper
    no_speech_prob: float  # P(<|nospeech|>) at the SOT position
    compression_ratio: float  # gzip ratio of the decoded text
    temperature: float
    text: str


def compression_ratio(text: str) -> float:
    """gzip compression ratio of the text; > 2.4 means Whisper is repeating itself."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


class TokenRules:
    """Whisper's logit filters (SuppressBlank, SuppressTokens, ApplyTimestampRules) and the choice
    of the next token, for one vocabulary layout.

    The timestamp rules follow openai/whisper's reference implementation, including "timestamps
    never decrease", which mlx_whisper 0.4.3 means to apply but whose slice is always empty.
    The vocabulary is handled as two parts, text tokens [0, timestamp_begin) and timestamps
    [timestamp_begin, n_vocab): every per-row rule masks a prefix of one part, so a rule is one
    comparison against a per-row bound, and the "timestamps are likelier than any text token"
    test needs no softmax over the whole vocabulary (the normaliser cancels out).
    """

    def __init__(self, tokenizer: Tokenizer, n_vocab: int, options: EngineOptions):
        self.eot = tokenizer.eot
        self.ts_begin = tokenizer.timestamp_begin
        self.n_ts = n_vocab - self.ts_begin
        suppress = np.zeros(n_vocab, bool)
        suppress[list(suppress_token_ids(tokenizer, options.suppress_tokens))] = True
        if tokenizer.no_timestamps is not None:
            suppress[tokenizer.no_timestamps] = True  # timestamps are always on here
        self.text_ids = mx.arange(self.ts_begin)[None, :]  # (1, n_text)
        self.ts_ids = mx.arange(self.n_ts)[None, :]  # (1, n_ts), relative to timestamp_begin
        self.text_suppress = mx.array(suppress[: self.ts_begin])[None, :]
        self.ts_suppress = mx.array(suppress[self.ts_begin :])[None, :]
        first = suppress[self.ts_begin :].copy()  # the first token is a timestamp...
        if options.max_initial_timestamp:
            precision = CHUNK_LENGTH / 1500  # 0.02 s per timestamp token
            first[round(options.max_initial_timestamp / precision) + 1 :] = True  # ...and an early one
        self.ts_first = mx.array(first)[None, :]
        # (SuppressBlank only matters when text could come first; here the first token is a timestamp.)

        self._compiled: dict[tuple[bool, bool], object] = {}

    def step_fn(self, first: bool, sampling: bool):
        """The whole per-token update as one compiled function (fused kernels on a GPU):
        (logits, last, penult, last_ts, done, sum_logprob, temperature, key) ->
        (token, done, sum_logprob, last_ts), all (batch,)."""
        fn = self._compiled.get((first, sampling))
        if fn is None:

            def step(logits, last, penult, last_ts, done, sum_logprob, temperature, key):
                token, logprob = self._choose(logits, first, last, penult, last_ts, temperature if sampling else None, key)
                sum_logprob = sum_logprob + mx.where(done, 0.0, logprob)
                token = mx.where(done, self.eot, token)
                done = done | (token == self.eot)
                last_ts = mx.where(token >= self.ts_begin, token, last_ts)
                return token, done, sum_logprob, last_ts

            fn = self._compiled[(first, sampling)] = mx.compile(step)
        return fn

    def _choose(self, logits, first, last, penult, last_ts, temperature, key):
        """(batch, n_vocab) float32 logits -> (next tokens, their log-probabilities), both (batch,).

        last/penult: the previous two sampled tokens (on the second step penult is any timestamp:
        Whisper counts the missing token as one); last_ts: the latest sampled timestamp or -1.
        """
        ts = logits[:, self.ts_begin :]
        if first:
            ts = mx.where(self.ts_first, NEG_INF, ts)
            text = None
        else:
            last_was_ts = last >= self.ts_begin
            penult_was_ts = penult >= self.ts_begin
            # after a timestamp pair (or a lone first one): text or <|endoftext|>, no timestamp;
            # after text + a closing timestamp: a timestamp or <|endoftext|>, no text
            closing = last_was_ts & ~penult_was_ts
            text_hi = mx.where(closing, self.eot, 0)
            all_ts = mx.where(last_was_ts & penult_was_ts, self.n_ts, 0)
            # timestamps never decrease, and a segment is never empty
            rel = last_ts - self.ts_begin
            floor = mx.where(last_ts < 0, 0, mx.where(closing, rel, rel + 1))
            ts_hi = mx.maximum(all_ts, floor)
            text = logits[:, : self.ts_begin]
            text = mx.where(self.text_suppress | (self.text_ids < text_hi[:, None]), NEG_INF, text)
            ts = mx.where(self.ts_suppress | (self.ts_ids < ts_hi[:, None]), NEG_INF, ts)
        ts_lse = mx.logsumexp(ts, axis=-1)
        if text is None:
            lse = ts_lse
        else:
            text_max = mx.max(text, axis=-1)
            # if the timestamps together are likelier than any single text token, sample a timestamp
            force = ts_lse > text_max
            lse = mx.where(force, ts_lse, mx.logaddexp(ts_lse, mx.logsumexp(text, axis=-1)))
        if temperature is not None:
            if text is None:
                token = self.ts_begin + mx.random.categorical(ts / temperature, key=key)
            else:
                text = mx.where(force[:, None], NEG_INF, text)
                token = mx.random.categorical(mx.concatenate([text, ts], axis=-1) / temperature, key=key)
        else:
            ts_arg = mx.argmax(ts, axis=-1)
            if text is None:
                token = self.ts_begin + ts_arg
            else:
                use_ts = force | (mx.max(ts, axis=-1) > text_max)
                token = mx.where(use_ts, self.ts_begin + ts_arg, mx.argmax(text, axis=-1))
        token = token.astype(mx.int32)
        logprob = mx.take_along_axis(logits, token[:, None], axis=-1)[:, 0] - lse
        return token, logprob


def suppress_token_ids(tokenizer: Tokenizer, suppress_tokens: str) -> tuple[int, ...]:
    """Whisper's suppressed set: the listed ids ("-1" = non-speech symbols) and the special tokens."""
    ids = [int(t) for t in suppress_tokens.split(",") if t.strip()] if suppress_tokens else []
    if -1 in ids:
        ids = [t for t in ids if t >= 0] + list(tokenizer.non_speech_tokens)
    ids += [tokenizer.transcribe, tokenizer.translate, tokenizer.sot, tokenizer.sot_prev, tokenizer.sot_lm]
    if tokenizer.no_speech is not None:
        ids.append(tokenizer.no_speech)  # its probability is read at the SOT position instead
    return tuple(sorted(set(ids)))


class _Decoder:
    """The model's text decoder run over a batch with padded prompts and a preallocated cache.

    Keys and values are kept head-major, (batch, n_head, length, head_dim), and contiguous: a
    transposed view of the cross-attention keys would be copied again at every step.
    """

    def __init__(self, model, audio_features: mx.array, pads: mx.array, capacity: int):
        self.dec = model.decoder
        self.n_head = model.dims.n_text_head
        # the positional embedding's: a quantised token embedding's weight is packed uint32
        self.dtype = self.dec.positional_embedding.dtype
        n_batch = audio_features.shape[0]
        head_dim = model.dims.n_text_state // self.n_head
        # cross-attention keys/values: once per batch, per layer
        self.cross = [
            (self._heads(b.cross_attn.key(audio_features)), self._heads(b.cross_attn.value(audio_features)))
            for b in self.dec.blocks
        ]
        shape = (n_batch, self.n_head, capacity, head_dim)
        self.keys = [mx.zeros(shape, self.dtype) for _ in self.dec.blocks]
        self.values = [mx.zeros(shape, self.dtype) for _ in self.dec.blocks]
        self.pads = pads  # (batch,) left padding of each row
        cols = mx.arange(capacity)[None, :] - pads[:, None]  # (batch, capacity)
        self.key_ok = cols >= 0  # not padding
        self.positions = mx.maximum(cols, 0)  # each row's tokens are at positions 0, 1, ... after its padding
        self.scale = head_dim**-0.5
        self.offset = 0

    def _heads(self, x: mx.array) -> mx.array:
        """(batch, length, n_state) -> contiguous (batch, n_head, length, head_dim)."""
        n_batch, length, n_state = x.shape
        if length == 1:  # one token per row (every step): the same memory, no copy
            return x.reshape(n_batch, self.n_head, 1, n_state // self.n_head)
        return mx.contiguous(x.reshape(n_batch, length, self.n_head, n_state // self.n_head).transpose(0, 2, 1, 3))

    def _merge(self, x: mx.array) -> mx.array:
        """(batch, n_head, n, head_dim) -> (batch, n, n_state)."""
        n_batch, n_head, n, head_dim = x.shape
        if n == 1:
            return x.reshape(n_batch, 1, n_head * head_dim)
        return x.transpose(0, 2, 1, 3).reshape(n_batch, n, n_head * head_dim)

    def __call__(self, tokens: mx.array) -> mx.array:
        """tokens (batch, n) -> final hidden states (batch, n, n_state), after the last layer norm."""
        n = tokens.shape[1]
        start, end = self.offset, self.offset + n
        x = self.dec.token_embedding(tokens) + self.dec.positional_embedding[self.positions[:, start:end]]
        x = x.astype(self.dtype)
        key_ok = self.key_ok[:, None, None, :end]  # (batch, 1, 1, end)
        if n > 1:  # prompt: causal, and a padding query sees itself so its softmax is defined
            q_cols = mx.arange(start, end)[:, None]
            k_cols = mx.arange(end)[None, :]
            mask = (key_ok & (k_cols <= q_cols)) | (k_cols == q_cols)
        else:
            mask = key_ok
        sdpa = mx.fast.scaled_dot_product_attention
        for i, block in enumerate(self.dec.blocks):
            h = block.attn_ln(x)
            att = block.attn
            self.keys[i][:, :, start:end] = self._heads(att.key(h))
            self.values[i][:, :, start:end] = self._heads(att.value(h))
            q = self._heads(att.query(h))
            y = sdpa(q, self.keys[i][:, :, :end], self.values[i][:, :, :end], scale=self.scale, mask=mask)
            x = x + att.out(self._merge(y))
            h = block.cross_attn_ln(x)
            k, v = self.cross[i]
            y = sdpa(self._heads(block.cross_attn.query(h)), k, v, scale=self.scale)
            x = x + block.cross_attn.out(self._merge(y))
            x = x + block.mlp2(nn.gelu(block.mlp1(block.mlp_ln(x))))
        self.offset = end
        return self.dec.ln(x)

    def logits(self, hidden: mx.array) -> mx.array:
        """(batch, n_state) hidden states -> (batch, n_vocab) float32 logits."""
        return self.dec.token_embedding.as_linear(hidden).astype(mx.float32)


def decode_batch(
    model,
    tokenizers: Sequence[Tokenizer],
    audio_features: mx.array,
    prompts: Sequence[Sequence[int]],
    *,
    temperature: float,
    options: EngineOptions,
    rules: TokenRules,
) -> list[WindowResult]:
    """Greedily decode (temperature 0) or sample every window of the batch, together.

    model: mlx_whisper Whisper. tokenizers/prompts: one per row (rows may differ in language and
    prompt). audio_features: (batch, n_audio_ctx, n_audio_state) encoder output. rules: the
    vocabulary's TokenRules (the same for every language of a model).
    """
    n_batch = audio_features.shape[0]
    n_ctx = model.dims.n_text_ctx
    sample_len = options.sample_len or n_ctx // 2
    rows = [_initial_tokens(tok, p, n_ctx) for tok, p in zip(tokenizers, prompts)]
    width = max(len(r) for r in rows)
    sot_col = width - len(tokenizers[0].sot_sequence)  # same column in every row: right-aligned
    pads = [width - len(r) for r in rows]
    initial = mx.array([[tokenizers[0].eot] * p + r for p, r in zip(pads, rows)])  # (batch, width)
    sample_len = min(sample_len, n_ctx - width)
    decoder = _Decoder(model, audio_features, mx.array(pads), width + sample_len)

    hidden = decoder(initial)  # (batch, width, n_state)
    first_logits = decoder.logits(hidden[:, [sot_col, width - 1]])  # (batch, 2, n_vocab)
    no_speech_id = tokenizers[0].no_speech
    if no_speech_id is not None:
        no_speech = mx.softmax(first_logits[:, 0], axis=-1)[:, no_speech_id]
    else:
        no_speech = mx.full((n_batch,), float("nan"))
    logits = first_logits[:, 1]

    eot = tokenizers[0].eot
    ts_begin = tokenizers[0].timestamp_begin
    sampling = temperature > 0
    key = mx.random.key(0)
    temp = mx.array(temperature if sampling else 1.0, mx.float32)
    done = mx.zeros((n_batch,), mx.bool_)
    sum_logprob = mx.zeros((n_batch,), mx.float32)
    last_ts = mx.full((n_batch,), -1, mx.int32)
    last = penult = mx.full((n_batch,), ts_begin, mx.int32)  # before the first tokens: as timestamps
    sampled: list[mx.array] = []
    for step in range(sample_len):
        sub = key
        if sampling:
            key, sub = mx.random.split(key)
        fn = rules.step_fn(step == 0, sampling)
        token, done, sum_logprob, last_ts = fn(logits, last, penult, last_ts, done, sum_logprob, temp, sub)
        penult, last = last, token
        sampled.append(token)
        if step + 1 == sample_len:
            break
        logits = decoder.logits(decoder(token[:, None])[:, -1])
        mx.async_eval(logits, done, sum_logprob)
        if (step + 1) % options.check_every == 0 and bool(mx.all(done)):
            break

    tokens = mx.stack(sampled, axis=1)  # (batch, n_steps)
    mx.eval(tokens, sum_logprob, no_speech)
    tokens_np = np.array(tokens)
    sum_lp = np.array(sum_logprob).tolist()
    no_speech_l = np.array(no_speech).tolist()
    results = []
    for i in range(n_batch):
        row = tokens_np[i].tolist()
        row = row[: row.index(eot)] if eot in row else row
        text = tokenizers[i].decode([t for t in row if t < eot]).strip()
        results.append(
            WindowResult(
                tokens=tuple(row),
                avg_logprob=sum_lp[i] / (len(row) + 1),
                no_speech_prob=no_speech_l[i],
                compression_ratio=compression_ratio(text),
                temperature=temperature,
                text=text,
            )
        )
    return results


def _initial_tokens(tokenizer: Tokenizer, prompt: Sequence[int], n_ctx: int) -> list[int]:
    """[<|startofprev|>, prompt (its last n_ctx/2 - 1 tokens)] + SOT sequence, as Whisper builds it."""
    tokens = list(tokenizer.sot_sequence)
    if prompt:
        tokens = [tokenizer.sot_prev] + list(prompt)[-(n_ctx // 2 - 1) :] + tokens
    return tokens
