"""Local checkpoints of any size: tiny random models written by the tests themselves.

A 2-layer Llama is written as a Hugging Face folder and as a GGUF file (F32 tensors, the metadata
keys and tensor names llama.cpp writes, its tokenizer in the metadata); ``load_model`` must
match transformers' logits within 1e-4 and support a ROME edit and a causal trace. Tiny Gemma 2,
Gemma 3, Qwen 2 and GPT-2 folders check the derived configs of the other families; a GGUF of an
unsupported architecture must be refused from its metadata, at once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny import HAS_HOOKED, char_tokenizer

import rome_lens
from rome_lens import EditRequest, RomeHyperParams, UnsupportedModelError
from rome_lens.models import access

gguf = pytest.importorskip("gguf")

APIS = ["hooked", "bridge"] if HAS_HOOKED else ["bridge"]
needs_hooked = pytest.mark.skipif(
    not HAS_HOOKED, reason="TransformerLens 4.x has no HookedTransformer (derived configs)"
)
TOKENS = torch.tensor([[1, 5, 9, 13, 40, 3, 22, 61, 7, 30, 11, 2]])
REQUEST = EditRequest("{} lives in", "Alice Smith", "Paris", "Rome")
HPARAMS = RomeHyperParams(
    layer=1, v_num_grad_steps=5, n_contexts_short=2, context_len_short=3, n_contexts_long=2,
    context_len_long=5, stats_sequences=16, stats_seq_len=16, mom2_ridge=1e-3,
)


@pytest.fixture(autouse=True)
def _offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROME_LENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ------------------------------------------------------------------ writing tiny checkpoints


def gguf_vocab() -> list[str]:
    """The character tokenizer's vocabulary spelled as a byte-level BPE, plus one merge ("in")."""
    vocab = char_tokenizer().get_vocab()
    tokens = [t.replace(" ", "\u0120") for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    return [*tokens, "in"]


def randomise(model: Any, seed: int) -> Any:
    """Weights with TransformerLens's tiny-model scale; norms away from their init."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.3 if "norm" in name or "ln" in name else 0.8 / 32**0.5
            param.normal_(0.0, scale)
    return model.eval()


def tiny_llama(seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(gguf_vocab()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )
    return randomise(LlamaForCausalLM(config), seed)


def save_folder(model: Any, folder: Path) -> Path:
    model.save_pretrained(str(folder))
    char_tokenizer().save_pretrained(str(folder))
    return folder


def rotary_halves_to_pairs(weight: torch.Tensor, heads: int) -> np.ndarray:
    """llama.cpp's row order for a query/key projection: each head's two rotary halves
    interleaved (transformers' GGUF loader undoes this)."""
    rows, cols = weight.shape
    per_head = weight.reshape(heads, 2, rows // heads // 2, cols)
    return per_head.transpose(1, 2).reshape(rows, cols).numpy()


def write_llama_gguf(model: Any, path: Path, tokenizer: bool = True) -> Path:
    """The model as llama.cpp's converter writes a Llama (F32 tensors)."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if tokenizer:
        add_tokenizer(writer)
    for name, tensor in llama_tensors(model).items():
        writer.add_tensor(name, np.ascontiguousarray(tensor, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_tokenizer(writer: Any) -> None:
    tokens = gguf_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3)
    writer.add_token_types(types)
    writer.add_token_merges(["i n"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)


def llama_tensors(model: Any) -> dict[str, np.ndarray]:
    cfg, state = model.config, {k: v.detach() for k, v in model.state_dict().items()}
    out = {
        "token_embd.weight": state["model.embed_tokens.weight"].numpy(),
        "output_norm.weight": state["model.norm.weight"].numpy(),
        "output.weight": state["lm_head.weight"].numpy(),
    }
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for layer in range(cfg.num_hidden_layers):
        hf = f"model.layers.{layer}."
        for ours, theirs in names.items():
            out[f"blk.{layer}.{theirs}.weight"] = state[f"{hf}{ours}.weight"].numpy()
        out[f"blk.{layer}.attn_q.weight"] = rotary_halves_to_pairs(
            state[f"{hf}self_attn.q_proj.weight"], cfg.num_attention_heads)
        out[f"blk.{layer}.attn_k.weight"] = rotary_halves_to_pairs(
            state[f"{hf}self_attn.k_proj.weight"], cfg.num_key_value_heads)
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny Llama, its folder, and its GGUF file (in a folder of its own)."""
    model = tiny_llama()
    root = tmp_path_factory.mktemp("llama")
    folder = save_folder(model, root / "hf")
    (root / "gguf").mkdir()
    path = write_llama_gguf(model, root / "gguf" / "tiny-llama-f32.gguf")
    with torch.no_grad():
        logits = model(TOKENS).logits
    return {"model": model, "folder": folder, "gguf": path, "logits": logits}


def max_diff(model: Any, expected: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(TOKENS)
    return float((logits - expected).abs().max())


# ------------------------------------------------------------------ the tiny Llama


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("fmt", ["folder", "gguf"])
def test_llama_logits_match_transformers(llama: dict[str, Any], fmt: str, api: str) -> None:
    model = rome_lens.load_model(llama[fmt], api=api)
    assert model.cfg.n_layers == 2
    assert max_diff(model, llama["logits"]) < 1e-4


def test_gguf_matches_transformers_reading_the_same_file(llama: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM

    path = llama["gguf"]
    theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                  dtype=torch.float32).eval()
    with torch.no_grad():
        expected = theirs(TOKENS).logits
    assert float((expected - llama["logits"]).abs().max()) < 1e-5  # the file is faithful
    model = rome_lens.load_model(path, api=APIS[0])
    assert max_diff(model, expected) < 1e-4


@needs_hooked
def test_derived_model_is_cached(llama: dict[str, Any]) -> None:
    first = rome_lens.load_model(llama["gguf"])
    again = rome_lens.load_model(llama["gguf"])  # from the cache: no transformers model
    assert max_diff(again, llama["logits"]) < 1e-4
    assert access.parameters_checksum(first) == access.parameters_checksum(again)
    assert again.cfg.original_architecture == "LlamaForCausalLM"


def test_gguf_tokenizer_comes_from_its_metadata(llama: dict[str, Any]) -> None:
    model = rome_lens.load_model(llama["gguf"], api=APIS[0])
    ids = model.tokenizer("in Rome")["input_ids"]
    tokens = model.tokenizer.convert_ids_to_tokens(ids)
    assert tokens[-6:] == ["in", "\u0120", "R", "o", "m", "e"]  # "in": the file's one merge


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("fmt", ["folder", "gguf"])
def test_rome_edit_and_trace_run(llama: dict[str, Any], fmt: str, api: str) -> None:
    model = rome_lens.load_model(llama[fmt], api=api)
    before = access.parameters_checksum(model)
    edit = rome_lens.compute_edit(model, REQUEST, method="rome", hparams=HPARAMS,
                                  corpus=["Alice Smith lives in Paris. Bob likes tea."] * 8)
    assert access.parameters_checksum(model) == before
    with edit.applied(model):
        assert access.parameters_checksum(model) != before
    assert access.parameters_checksum(model) == before
    trace = rome_lens.causal_trace(model, "Alice Smith lives in", "Alice Smith",
                                   kinds=("resid", "mlp"), samples=2, window=2)
    assert trace.scores["resid"].shape[0] == model.cfg.n_layers
    assert torch.isfinite(trace.scores["resid"]).all()


# ------------------------------------------------------------------ the other families


def tiny_family(family: str) -> Any:
    import transformers as tf

    vocab = len(gguf_vocab())
    rotary = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=128, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    # sliding windows shorter than TOKENS, so their semantics are checked
    gemma = dict(rotary, sliding_window=4, query_pre_attn_scalar=16)
    llama3_rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 16}
    made = {
        # plain multi-head attention, and Llama 3's rotary scaling
        "llama-mha": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
            **dict(rotary, num_key_value_heads=4), rope_parameters=llama3_rope)),
        "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(
            **gemma, layer_types=["sliding_attention", "full_attention"])),
        "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
            **gemma, layer_types=["sliding_attention", "full_attention"])),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(
            **{k: v for k, v in rotary.items() if k != "head_dim"}, tie_word_embeddings=True)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128,
            bos_token_id=1, eos_token_id=1)),
    }
    return randomise(made[family](), seed=1)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("family", ["llama-mha", "gemma2", "gemma3", "qwen2", "gpt2"])
def test_other_families_match_transformers(family: str, api: str, tmp_path: Path) -> None:
    hf_model = tiny_family(family)
    with torch.no_grad():
        expected = hf_model(TOKENS).logits
    model = rome_lens.load_model(save_folder(hf_model, tmp_path / family), api=api)
    assert max_diff(model, expected) < 1e-4
    if api == "hooked":  # a config derived from the checkpoint
        assert model.cfg.use_NTK_by_parts_rope == (family == "llama-mha")


# ------------------------------------------------------------------ refusals


def test_unsupported_gguf_is_refused_at_once(tmp_path: Path) -> None:
    path = tmp_path / "tiny-mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((1000, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for api in APIS:
        start = time.perf_counter()
        with pytest.raises(UnsupportedModelError, match="mamba") as info:
            rome_lens.load_model(path, api=api)
        assert time.perf_counter() - start < 1.0
        assert "Llama" in str(info.value) and "Qwen" in str(info.value)
        assert isinstance(info.value, rome_lens.RomeLensError)


def test_unsupported_folder_is_refused_before_its_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    (tmp_path / "model.safetensors").write_bytes(b"not read")
    for api in APIS:
        with pytest.raises(UnsupportedModelError, match="Gemma 2"):
            rome_lens.load_model(tmp_path, api=api)


def test_gguf_without_tokenizer(llama: dict[str, Any], tmp_path: Path) -> None:
    path = write_llama_gguf(llama["model"], tmp_path / "no-tokenizer.gguf", tokenizer=False)
    with pytest.raises(UnsupportedModelError, match=r"tokenizer\.json"):
        rome_lens.load_model(path, api=APIS[0])
    char_tokenizer().save_pretrained(str(tmp_path))  # the files a user copies beside it
    model = rome_lens.load_model(path, api=APIS[0])
    assert max_diff(model, llama["logits"]) < 1e-4
    assert model.tokenizer.get_vocab() == char_tokenizer().get_vocab()


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 a zip file, not a GGUF")
    with pytest.raises(UnsupportedModelError, match="not a readable GGUF|not a GGUF"):
        rome_lens.load_model(path, api=APIS[0])


def test_only_the_asked_fields_are_read(llama: dict[str, Any]) -> None:
    from rome_lens.models.local import read_fields

    fields = read_fields(llama["gguf"], ("general.architecture", "llama.block_count", "absent"))
    assert fields == {"general.architecture": "llama", "llama.block_count": 2}
