"""Training FLOPs per token and device peaks, for `train/tflops` and `train/mfu` (model FLOPs utilisation).

Conventions (PaLM, Chowdhery et al. 2022, appendix B):

* A multiply-accumulate is 2 FLOPs, so a matmul with a d_in x d_out weight costs 2 * d_in * d_out FLOPs
  per token (row) it runs on. Biases, norms, activations, softmax, dropout and embedding lookups count 0.
* Training = forward + backward = 3 x forward (the backward pass does the two matmuls of grad-input and
  grad-weight). Activation recomputation is not counted: these are model FLOPs, not hardware FLOPs.
* Attention: per layer and per token, QK^T and AV each cost 2 * seq_len * d_attn, so 4 * seq_len * d_attn
  forward (d_attn = heads * head_dim, the hidden size for all but some T5 sizes). Causal models count the
  full seq_len x seq_len square, as PaLM does, not the half a causal mask keeps.

Forward FLOPs per token, with h the hidden size, i the FFN size, L the layers, V the vocabulary,
S = seq_len and f = head_fraction:

    transformer layer   2 * (4*h*d_attn + 2*h*i) + 4*S*d_attn       (QKV + O, FFN up + down, attention;
                                                                       a gated FFN has 3*h*i, not 2*h*i)
    BERT                L * layer + f * 2 * (h*h + h*V)               (MLM head: transform + decoder)
    GPT-2               L * layer + f * 2 * h*V                       (LM head on every token)
    T5 / BART / Pegasus per SOURCE token, T = target_len (default S // 4):
                        L_enc * layer(S)                              (encoder)
                        + L_dec * 2 * 2*h*d_attn                      (cross-attention K, V of the source)
                        + T/S * [L_dec * (2 * (4*h*d_attn + 2*h*d_attn + 2*h*i) + 4*T*d_attn + 4*S*d_attn)
                                 + f * 2 * h*V]                       (decoder per target token: self-attn,
                                                                       cross Q + O, FFN, LM head)
    wav2vec2            per output frame (50 per second of 16 kHz audio):
                        sum_j 2 * k_j * c_{j-1} * c_j * prod(stride_{j+1:})   (conv feature encoder, c_{-1} = 1)
                        + 2 * c_last * h                              (feature projection)
                        + 2 * K_pos * h * h / groups                  (positional conv embedding)
                        + L * layer + f * 2 * h*V                     (encoder, CTC head)
    anything else       L * layer (non-gated FFN) from hidden_size / num_hidden_layers / intermediate_size,
                        i.e. 6 x non-embedding parameters + attention in training; no head counted.

train_flops_per_token = 3 x forward. MFU = achieved FLOPs per second / `device_peak_tflops` (dense).
"""

from __future__ import annotations

import math
import re
from typing import Any

# Dense (no structured sparsity) peak TFLOPS by GPU name fragment, tensor cores with FP32 accumulate for
# bf16 / fp16 / tf32, CUDA cores for fp32. Sources: NVIDIA datasheets (H200, H100, A100, L4, L40S, A10,
# T4, V100), the H100 whitepaper (989.4 dense BF16 for SXM5), the Ada whitepaper (RTX 4090: FP32-accumulate
# rates, half the FP16-accumulate ones). Datasheets print the sparse rate; dense is half of it.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 67.0},  # H200 SXM
    "GH200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 67.0},
    "H100 SXM": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 67.0},
    "H100 80GB HBM3": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 67.0},  # the SXM board's name
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 67.0},  # unnamed variant: SXM
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},  # SXM4 and PCIe alike
    "L40S": {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    # NVIDIA publishes no A10G sheet (an AWS part); the A10 sheet's rates, an upper bound, are used.
    "A10G": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "T4": {"fp16": 65.0, "fp32": 8.1},
    "V100S": {"fp16": 130.0, "fp32": 16.4},
    "V100-PCIE": {"fp16": 112.0, "fp32": 14.0},
    "V100": {"fp16": 125.0, "fp32": 15.7},  # SXM2; no bf16 or tf32 on Volta
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},
}

_DTYPES = {
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "tf32": "tf32",
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
}


def device_peak_tflops(device_name: str, dtype: str) -> float | None:
    """The dense peak TFLOPS of a device for a compute dtype, or None when unknown (a CPU, an unlisted GPU,
    or a dtype the GPU has no tensor-core rate for, e.g. bf16 on a V100): the loop then logs tflops, not mfu.

    `device_name` is what `torch.cuda.get_device_name()` returns ("NVIDIA H200", "NVIDIA A100-SXM4-80GB");
    the longest `PEAK_TFLOPS` fragment found in it as a whole word (case-insensitive) wins, so "A100" is
    not read as "A10". `dtype`: bf16 | fp16 | tf32 | fp32 (or the torch names, "torch." prefix allowed);
    pass "tf32" for fp32 training with TF32 matmuls allowed. Any other dtype is a ValueError.
    """
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: expected one of {', '.join(sorted(set(_DTYPES)))}")
    for fragment in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if re.search(rf"(?<![a-z0-9]){re.escape(fragment.lower())}(?![a-z0-9])", device_name.lower()):
            return PEAK_TFLOPS[fragment].get(_DTYPES[key])
    return None


def _layer(h: int, d_attn: int, ffn: int, seq_len: float, gated: bool = False) -> float:
    """Forward FLOPs per token of one transformer layer: QKV + O, the FFN, attention scores and values."""
    return 2 * (4 * h * d_attn + (3 if gated else 2) * h * ffn) + 4 * seq_len * d_attn


def _bert(c: Any, seq_len: int, head_fraction: float) -> float:
    h, V = c.hidden_size, c.vocab_size
    body = c.num_hidden_layers * _layer(h, h, c.intermediate_size, seq_len)
    return body + head_fraction * 2 * (h * h + h * V)


def _gpt2(c: Any, seq_len: int, head_fraction: float) -> float:
    h = c.n_embd
    body = c.n_layer * _layer(h, h, c.n_inner or 4 * h, seq_len)
    return body + head_fraction * 2 * h * c.vocab_size


def _encoder_decoder(c: Any, seq_len: int, target_len: int, head_fraction: float) -> float:
    if c.model_type == "t5":
        h, d_attn, gated = c.d_model, c.num_heads * c.d_kv, bool(c.is_gated_act)
        enc_layers, dec_layers = c.num_layers, c.num_decoder_layers
        enc_ffn = dec_ffn = c.d_ff
    else:  # bart, pegasus
        h = d_attn = c.d_model
        gated = False
        enc_layers, dec_layers = c.encoder_layers, c.decoder_layers
        enc_ffn, dec_ffn = c.encoder_ffn_dim, c.decoder_ffn_dim
    encoder = enc_layers * _layer(h, d_attn, enc_ffn, seq_len, gated)
    cross_kv = dec_layers * 2 * 2 * h * d_attn  # per source token, once per decoder layer
    dec_layer = (
        2 * (4 * h * d_attn + 2 * h * d_attn + (3 if gated else 2) * h * dec_ffn)
        + 4 * target_len * d_attn
        + 4 * seq_len * d_attn
    )
    decoder = dec_layers * dec_layer + head_fraction * 2 * h * c.vocab_size  # per target token
    return encoder + cross_kv + target_len / seq_len * decoder


def _wav2vec2(c: Any, seq_len: int, head_fraction: float, frozen_feature_encoder: bool) -> float:
    h = c.hidden_size
    conv, in_ch = 0.0, 1
    for j, (out_ch, kernel) in enumerate(zip(c.conv_dim, c.conv_kernel)):
        frames_per_output_frame = math.prod(c.conv_stride[j + 1 :])
        conv += 2 * kernel * in_ch * out_ch * frames_per_output_frame
        in_ch = out_ch
    if frozen_feature_encoder:  # no backward through it: count its forward once, not three times
        conv /= 3
    projection = 2 * c.conv_dim[-1] * h
    position = 2 * c.num_conv_pos_embeddings * h * h / c.num_conv_pos_embedding_groups
    body = c.num_hidden_layers * _layer(h, h, c.intermediate_size, seq_len)
    return conv + projection + position + body + head_fraction * 2 * h * c.vocab_size


def _generic(c: Any, seq_len: int) -> float:
    sizes = [getattr(c, name, None) for name in ("hidden_size", "num_hidden_layers", "intermediate_size")]
    if not all(isinstance(v, int) and v > 0 for v in sizes):
        raise ValueError(
            f"no FLOPs formula for model_type {getattr(c, 'model_type', None)!r}: it is not one of "
            "bert, gpt2, t5, bart, pegasus, wav2vec2, and its config lacks hidden_size, "
            "num_hidden_layers or intermediate_size for the generic estimate"
        )
    h, layers, ffn = sizes
    return layers * _layer(h, h, ffn, seq_len)


def train_flops_per_token(
    config: Any,
    *,
    seq_len: int,
    head_fraction: float = 1.0,
    target_len: int | None = None,
    frozen_feature_encoder: bool = False,
) -> float:
    """Training (forward + backward = 3 x forward) FLOPs per token of `config`'s model; formulas and
    conventions in the module docstring (PaLM appendix B: 2 FLOPs per multiply-accumulate, the full
    attention square counted for causal models too).

    seq_len: the length attention runs over (the padded batch length; wav2vec2: frames, 50 per second).
    head_fraction: the share of tokens the output head runs on; it scales the head term only.
        BERT: the MLM head (h x h transform + h x V decoder). The mlm_nsp recipe runs it on the masked
        ~15 % only: pass 0.15 (1.0 with static shapes, where it runs on every position). A sequence
        classification, token classification or QA head on a BERT body is negligible (h x labels):
        pass 0.0. GPT-2: the LM head on every token (1.0). T5 / BART / Pegasus: the LM head on the target
        tokens. wav2vec2: the CTC head. The NSP / pooler layers run once per sequence and are not counted.
    target_len (T5 / BART / Pegasus): the target length, default seq_len // 4. The result is per SOURCE
        token: (encoder FLOPs for seq_len tokens + decoder FLOPs for target_len tokens) / seq_len, so
        multiply by the number of source tokens in a step.
    frozen_feature_encoder (wav2vec2): the conv feature encoder is frozen (no backward through it, as in
        CTC fine-tuning with `freeze_feature_encoder()`): its FLOPs count once, not three times.

    Unknown model types fall back to 3 x L * layer from hidden_size / num_hidden_layers /
    intermediate_size (6 x non-embedding matmul parameters + attention, no head, a non-gated FFN, full
    multi-head K/V: a rough estimate for gated or grouped-query models); without them, a ValueError
    naming the model_type.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if not 0.0 <= head_fraction <= 1.0:
        raise ValueError(f"head_fraction must be in [0, 1], got {head_fraction}")
    model_type = getattr(config, "model_type", None)
    if model_type == "bert":
        forward = _bert(config, seq_len, head_fraction)
    elif model_type == "gpt2":
        forward = _gpt2(config, seq_len, head_fraction)
    elif model_type in ("t5", "bart", "pegasus"):
        target = max(1, seq_len // 4) if target_len is None else target_len
        if target <= 0:
            raise ValueError(f"target_len must be positive, got {target_len}")
        forward = _encoder_decoder(config, seq_len, target, head_fraction)
    elif model_type == "wav2vec2":
        forward = _wav2vec2(config, seq_len, head_fraction, frozen_feature_encoder)
    else:
        forward = _generic(config, seq_len)
    return 3.0 * float(forward)


def flops_per_token_or_zero(config, *, seq_len: int, head_fraction: float = 1.0) -> float:
    """`train_flops_per_token`, or 0.0 for a model family it does not know (the loop then logs no tflops)."""
    try:
        return train_flops_per_token(config, seq_len=seq_len, head_fraction=head_fraction)
    except ValueError:
        return 0.0
