"""Quantised layers that run fast on the CPU: unpack the weights, then multiply with BLAS.

MLX's CPU ``quantized_matmul`` has no BLAS behind it: measured on the 2-core test machine (MLX
0.32, a 2048x512 layer), 1,500 rows took 1.43 s against 0.04 s for unpacking the weights and one
float32 matmul; at 4 rows 3.7 ms against 2.1-2.7 ms; at 1 row they are level. So on the CPU a
quantised layer fed several rows (the encoder, cross-attention keys and values, a batch of
decoder rows, the word-timing pass) unpacks its weights for that one call, one layer at a time.

Unpacking is plain array arithmetic (bytes -> floats x scale + bias), exact and twice as fast as
``mx.dequantize`` on this CPU (tiny.en's token embedding: 50 ms against 100 ms). The output
projection (the token embedding, 51,864 rows) is unpacked in slices of the vocabulary, each
slice's logits written into one output array, and slices are cut so that their logits stay under
32 MiB: the word-timing pass takes logits for every token of every row (tiny.en, 16 rows: ~0.7 GiB),
and with fixed 8,192-token slices a long file's peak was 0.23 GiB above float32's.

Decoding is still slower than in float32 (each step unpacks the output projection: ~50 ms for
tiny.en against an 11 ms float matmul): on a CPU quantised models save memory, not time. GPUs keep
MLX's own quantised kernels (``engine.holder`` installs these on the CPU only), and full-precision
models are untouched.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

DEQUANTIZE_MIN_ROWS = 4  # below this MLX's quantized_matmul is as fast (see above)
VOCAB_SLICE_ROWS = 8192  # output projection rows unpacked at a time (base: 8192 x 512 float32 = 16 MiB)
SLICE_OUTPUT_BYTES = 32 << 20  # at most this much of the logits computed per slice


def _rows(x: mx.array) -> int:
    return x.size // x.shape[-1]


def unpack(layer, start: int = 0, stop: int | None = None) -> mx.array:
    """Rows start:stop of a quantised layer's weight as floats of its scales' dtype (affine mode,
    8 or 4 bits: what mx.dequantize gives, bit for bit)."""
    scales = layer["scales"][start:stop]  # (n, k // group_size)
    packed = mx.view(layer["weight"][start:stop], mx.uint8)  # (n, k * bits // 8), low bits first
    n = packed.shape[0]
    if layer.bits == 4:
        packed = mx.stack([packed & 0xF, packed >> 4], axis=-1).reshape(n, -1)
    elif layer.bits != 8:
        return mx.dequantize(layer["weight"][start:stop], scales=scales, biases=layer["biases"][start:stop],
                             group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
    q = packed.astype(scales.dtype).reshape(n, -1, layer.group_size)  # (n, groups, group_size)
    return (q * scales[..., None] + layer["biases"][start:stop][..., None]).reshape(n, -1)


class CpuQuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear whose many-row calls unpack the weights and use a float matmul."""

    def __call__(self, x: mx.array) -> mx.array:
        if _rows(x) < DEQUANTIZE_MIN_ROWS or self.mode != "affine":
            return super().__call__(x)
        y = x @ unpack(self).T
        if "bias" in self:
            y = y + self["bias"]
        return y


class CpuQuantizedEmbedding(nn.QuantizedEmbedding):
    """nn.QuantizedEmbedding whose many-row output projection (as_linear) unpacks the weights."""

    def as_linear(self, x: mx.array) -> mx.array:
        rows = _rows(x)
        if rows < DEQUANTIZE_MIN_ROWS or self.mode != "affine":
            return super().as_linear(x)
        n_vocab = self["weight"].shape[0]
        # slices small enough that their products stay a few MiB even for the word-timing pass's
        # thousands of rows (each is written into the one output, whose buffer is reused)
        step = max(256, min(VOCAB_SLICE_ROWS, SLICE_OUTPUT_BYTES // (rows * x.dtype.size)))
        logits = mx.zeros((*x.shape[:-1], n_vocab), x.dtype)  # (..., n_vocab)
        for a in range(0, n_vocab, step):
            logits[..., a : a + step] = x @ unpack(self, a, a + step).T
        return logits


def use_cpu_layers(model: nn.Module) -> int:
    """Switch a quantised model's layers to the CPU versions above, in place; return how many."""
    switched = 0
    for _, module in model.named_modules():
        # same attributes and parameters: only the methods change
        if type(module) is nn.QuantizedLinear:
            module.__class__ = CpuQuantizedLinear
            switched += 1
        elif type(module) is nn.QuantizedEmbedding:
            module.__class__ = CpuQuantizedEmbedding
            switched += 1
    return switched
