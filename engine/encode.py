"""The audio encoder over a batch of windows, with the CPU's slow spot worked around.

On a GPU this is the model's own encoder. On an x86 CPU, MLX's elementwise kernels run one
element at a time (no SIMD): in the encoder's self-attention the softmax over the
(n_head x 1500 x 1500) scores of each layer costs more than all its matrix products together
(measured here: ~190-450 ms per window and layer, against ~65 ms for numpy's vectorised exp on
the same scores). So on the CPU the encoder is run block by block with the model's own layers,
and only that softmax is done by numpy, in place in the evaluated scores' buffer.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

WINDOWS_PER_PASS = 4  # CPU: windows whose attention scores are held at once (54 MB each for tiny)


def encode(model, mel: mx.array) -> mx.array:
    """(n, n_frames=3000, n_mels) log-mel, in the model's dtype -> (n, n_audio_ctx, n_audio_state)."""
    if mx.default_device() == mx.gpu or mel.dtype != mx.float32:
        return model.encoder(mel)
    parts = [_encode_cpu(model.encoder, mel[i : i + WINDOWS_PER_PASS]) for i in range(0, mel.shape[0], WINDOWS_PER_PASS)]
    return parts[0] if len(parts) == 1 else mx.concatenate(parts)


def _encode_cpu(encoder, mel: mx.array) -> mx.array:
    x = nn.gelu(encoder.conv1(mel))
    x = nn.gelu(encoder.conv2(x))
    x = x + encoder._positional_embedding  # (n, n_audio_ctx, n_audio_state)
    for block in encoder.blocks:
        att = block.attn
        h = block.attn_ln(x)
        x = x + att.out(_self_attention(att.query(h), att.key(h), att.value(h), att.n_head))
        x = x + block.mlp2(nn.gelu(block.mlp1(block.mlp_ln(x))))
        mx.eval(x)
    return encoder.ln_post(x)


def _self_attention(q: mx.array, k: mx.array, v: mx.array, n_head: int) -> mx.array:
    n, ctx, state = q.shape
    head = state // n_head
    q = q.reshape(n, ctx, n_head, head).transpose(0, 2, 1, 3)
    k = k.reshape(n, ctx, n_head, head).transpose(0, 2, 3, 1)
    v = v.reshape(n, ctx, n_head, head).transpose(0, 2, 1, 3)
    scores = (q * head**-0.5) @ k  # (n, n_head, ctx, ctx)
    mx.eval(scores)
    s = np.asarray(memoryview(scores))  # the evaluated buffer itself, not a copy
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return (scores @ v).transpose(0, 2, 1, 3).reshape(n, ctx, state)
