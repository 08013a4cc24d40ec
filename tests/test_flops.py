"""Training FLOPs per token against hand arithmetic and 6N, and the device peak lookup (configs only)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    BartConfig,
    BertConfig,
    DistilBertConfig,
    GPT2Config,
    GPT2LMHeadModel,
    PegasusConfig,
    RobertaConfig,
    T5Config,
    Wav2Vec2Config,
)

from recipebox.launch.flops import PEAK_TFLOPS, device_peak_tflops, train_flops_per_token

# BERT-base at seq 128, by hand: 12 layers of (QKV+O 4*768*768 + FFN 2*768*3072) matmul weights at
# 2 FLOPs each, plus QK^T and AV (2 * 2 * 128 * 768); the MLM head 768*768 + 768*30522; training x3.
BERT_LAYERS = 12 * (2 * (4 * 768 * 768 + 2 * 768 * 3072) + 2 * 2 * 128 * 768)  # 174_587_904
BERT_HEAD = 2 * (768 * 768 + 768 * 30522)  # 48_061_440
BERT_BASE_128 = 3 * (BERT_LAYERS + BERT_HEAD)

# GPT-2 small at seq 1024: the same layer with i = 4 * 768 and the full 1024 x 1024 attention square,
# plus the LM head 768 * 50257 on every token.
GPT2_LAYERS = 12 * (2 * (4 * 768 * 768 + 2 * 768 * 3072) + 2 * 2 * 1024 * 768)  # 207_618_048
GPT2_HEAD = 2 * 768 * 50257  # 77_194_752
GPT2_SMALL_1024 = 3 * (GPT2_LAYERS + GPT2_HEAD)


def test_bert_base_matches_the_hand_count():
    assert BERT_BASE_128 == 667_948_032
    assert train_flops_per_token(BertConfig(), seq_len=128) == BERT_BASE_128


def test_gpt2_small_matches_the_hand_count():
    assert GPT2_SMALL_1024 == 854_438_400
    assert train_flops_per_token(GPT2Config(), seq_len=1024) == GPT2_SMALL_1024


def test_gpt2_small_against_6n():
    """6N with N the non-embedding parameters leaves out the LM head (6*h*V, tied to the token embedding
    but a matmul all the same) and attention (12*L*seq*h): at seq 1024 those are +45 % and +22 % of 6N,
    so the full count is ~1.67 x 6N. With both added back, what remains is the biases and LayerNorm
    weights that 6N counts and the matmul count does not: 6 * 121_344 FLOPs, 0.09 %."""
    config = GPT2Config()
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    n_all = sum(p.numel() for p in model.parameters())  # the tied LM head counts once
    n_embed = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    n = n_all - n_embed
    assert (n_all, n) == (124_439_808, 85_056_000)
    h, layers, vocab = 768, 12, 50257

    flops = train_flops_per_token(config, seq_len=1024)
    assert 1.6 < flops / (6 * n) < 1.75
    with_head_and_attention = 6 * (n + h * vocab) + 12 * layers * 1024 * h
    assert flops == pytest.approx(with_head_and_attention, rel=2e-3)
    assert with_head_and_attention - flops == 6 * 121_344

    # At seq 128 attention is ~2 %: 6 x (all parameters but the position table) is within 3 %.
    short = train_flops_per_token(config, seq_len=128)
    n_matmul = n_all - model.transformer.wpe.weight.numel()
    assert short == pytest.approx(6 * n_matmul, rel=3e-2)
    assert short > 6 * n_matmul


@pytest.mark.parametrize(
    "config, seq_len, head",
    [(BertConfig(), 128, BERT_HEAD), (GPT2Config(), 1024, GPT2_HEAD)],
    ids=["bert", "gpt2"],
)
def test_head_fraction_scales_only_the_head(config, seq_len, head):
    full = train_flops_per_token(config, seq_len=seq_len)
    none = train_flops_per_token(config, seq_len=seq_len, head_fraction=0.0)
    part = train_flops_per_token(config, seq_len=seq_len, head_fraction=0.15)
    assert full - none == 3 * head
    assert part - none == pytest.approx(0.15 * 3 * head)
    with pytest.raises(ValueError, match="head_fraction"):
        train_flops_per_token(config, seq_len=seq_len, head_fraction=1.5)


def test_generic_estimate_and_unknown_model_type():
    # RoBERTa has no formula of its own: the generic body equals BERT's without the head.
    roberta = train_flops_per_token(RobertaConfig(vocab_size=30522), seq_len=128)
    assert roberta == 3 * BERT_LAYERS
    with pytest.raises(ValueError, match="'distilbert'"):  # no intermediate_size (it is hidden_dim)
        train_flops_per_token(DistilBertConfig(), seq_len=128)


TINY_T5 = dict(d_model=16, d_kv=4, num_heads=4, d_ff=32, num_layers=2, num_decoder_layers=2, vocab_size=100)
TINY_BART = dict(
    d_model=16,
    encoder_layers=2,
    decoder_layers=2,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    vocab_size=100,
)


@pytest.mark.parametrize(
    "config",
    [
        T5Config(**TINY_T5),
        T5Config(**TINY_T5, feed_forward_proj="gated-gelu"),
        BartConfig(**TINY_BART),
        PegasusConfig(**TINY_BART),
    ],
    ids=["t5", "t5-gated", "bart", "pegasus"],
)
def test_encoder_decoder_is_positive_and_grows_with_the_target(config):
    default = train_flops_per_token(config, seq_len=64)
    assert math.isfinite(default) and default > 0
    assert default == train_flops_per_token(config, seq_len=64, target_len=16)
    assert train_flops_per_token(config, seq_len=64, target_len=64) > default


def test_tiny_t5_by_hand():
    # Per source token, S = 64, T = 16, h = d_attn = 16, d_ff = 32, 2 + 2 layers, V = 100.
    encoder = 2 * (2 * (4 * 16 * 16 + 2 * 16 * 32) + 4 * 64 * 16)
    cross_kv = 2 * 2 * (2 * 16 * 16)
    decoder = 2 * (2 * (4 * 16 * 16 + 2 * 16 * 16 + 2 * 16 * 32) + 4 * 16 * 16 + 4 * 64 * 16) + 2 * 16 * 100
    expected = 3 * (encoder + cross_kv + 16 / 64 * decoder)
    assert train_flops_per_token(T5Config(**TINY_T5), seq_len=64) == pytest.approx(expected)


def test_wav2vec2_is_positive_and_counts_the_feature_encoder():
    config = Wav2Vec2Config(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(8, 8),
        conv_kernel=(10, 3),
        conv_stride=(5, 2),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        vocab_size=10,
    )
    flops = train_flops_per_token(config, seq_len=50)
    assert math.isfinite(flops) and flops > 0
    conv = 2 * 10 * 1 * 8 * 2 + 2 * 3 * 8 * 8 * 1  # the first layer runs twice per output frame
    rest = 2 * 8 * 16 + 2 * 16 * 16 * 16 / 4 + 2 * (2 * (4 * 16 * 16 + 2 * 16 * 32) + 4 * 50 * 16)
    assert flops == pytest.approx(3 * (conv + rest + 2 * 16 * 10))
    frozen = train_flops_per_token(config, seq_len=50, frozen_feature_encoder=True)
    assert flops - frozen == pytest.approx(2 * conv)


def test_device_peaks():
    assert device_peak_tflops("NVIDIA H200", "bf16") == PEAK_TFLOPS["H200"]["bf16"] > 900
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB", "torch.float32") == 19.5
    assert device_peak_tflops("NVIDIA A10G", "fp16") == PEAK_TFLOPS["A10G"]["fp16"]
    assert device_peak_tflops("NVIDIA H100 PCIe", "bf16") == PEAK_TFLOPS["H100 PCIe"]["bf16"]
    assert device_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == PEAK_TFLOPS["H100 SXM"]["bf16"]
    assert device_peak_tflops("cpu", "fp32") is None
    assert device_peak_tflops("NVIDIA RTX A1000 Laptop GPU", "fp16") is None  # not an A100
    assert device_peak_tflops("Tesla V100-SXM2-16GB", "bf16") is None  # no bf16 on Volta
    with pytest.raises(ValueError, match="unknown dtype"):
        device_peak_tflops("NVIDIA H200", "fp8")
