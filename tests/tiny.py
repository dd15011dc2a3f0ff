"""Tiny random HookedTransformers with a character-level tokenizer (no downloads)."""

from __future__ import annotations

import functools
import string
import tempfile

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerFast

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


def tiny_model(kind: str = "gpt2", seed: int = 0, n_layers: int = 3) -> HookedTransformer:
    """A tiny random model: 'gpt2' (LayerNorm, GELU MLP with bias) or 'gemma' (RMS, gated MLP,
    norms before and after each sublayer, rotary)."""
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
