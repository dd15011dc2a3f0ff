"""Tiny random HookedTransformers with a character-level tokenizer (no downloads)."""

from __future__ import annotations

import functools
import string
import tempfile
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from rome_lens.models.loading import has_hooked_transformer

# TransformerLens 4.x has no HookedTransformer: there the suite runs on the bridge only.
HAS_HOOKED = has_hooked_transformer()
CHARS = string.ascii_letters + string.digits + " .,'?!-:;{}()"


@functools.cache
def _tokenizer_dir() -> str:
    """Save the tokenizer once per test session (TransformerLens reloads it by path)."""
    vocab = {"<pad>": 0, "<bos>": 1, "<unk>": 2}
    for ch in CHARS:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<bos>", pad_token="<pad>",
        unk_token="<unk>",
    )
    folder = tempfile.mkdtemp(prefix="rome_lens_char_tok_")
    fast.save_pretrained(folder)
    return folder


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer (offsets included), no downloads."""
    return PreTrainedTokenizerFast.from_pretrained(_tokenizer_dir())


def tiny_model(kind: str = "gpt2", seed: int = 0, n_layers: int = 3) -> Any:
    """A tiny random model: 'gpt2' (LayerNorm, GELU MLP with bias) or 'gemma' (RMS, gated MLP,
    norms before and after each sublayer, rotary); 'bridge' gives :func:`tiny_bridge`."""
    if kind == "bridge":
        return tiny_bridge(seed=seed, n_layers=n_layers)
    from transformer_lens import HookedTransformer, HookedTransformerConfig  # 3.9 only
    tok = char_tokenizer()
    common = dict(
        n_layers=n_layers, d_model=32, d_head=8, n_heads=4, d_mlp=64, n_ctx=128,
        d_vocab=len(tok.get_vocab()), seed=seed, default_prepend_bos=True,
    )
    if kind == "gpt2":
        cfg = HookedTransformerConfig(act_fn="gelu", normalization_type="LN", **common)
    else:
        cfg = HookedTransformerConfig(
            act_fn="gelu_pytorch_tanh", normalization_type="RMS", gated_mlp=True,
            positional_embedding_type="rotary", rotary_dim=8,
            use_normalization_before_and_after=True, final_rms=True, **common,
        )
    torch.manual_seed(seed)
    model = HookedTransformer(cfg, tokenizer=tok)
    model.eval()
    return model


def tiny_bridge(seed: int = 0, n_layers: int = 3) -> Any:
    """A tiny random Gemma 3 Hugging Face model wrapped in a TransformerLens TransformerBridge
    (raw mode: Hugging Face weights and layout), with the character-level tokenizer."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = char_tokenizer()
    types = ["sliding_attention"] * (n_layers - 1) + ["full_attention"]
    config = Gemma3TextConfig(
        vocab_size=len(tok.get_vocab()), hidden_size=32, intermediate_size=64,
        num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=128, sliding_window=16, layer_types=types,
        pad_token_id=0, bos_token_id=1, eos_token_id=1,
        initializer_range=0.8 / 32**0.5,  # TransformerLens's tiny-model scale, not HF's 0.02
    )
    config.architectures = ["Gemma3ForCausalLM"]
    torch.manual_seed(seed)
    hf_model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # norms away from their all-ones init, so they matter in tests
        for name, param in hf_model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.3)
    bridge = TransformerBridge.boot_transformers(
        "tiny-gemma3", hf_model=hf_model, tokenizer=tok, device="cpu", dtype=torch.float32
    )
    bridge.eval()
    return bridge
