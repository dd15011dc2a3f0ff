"""What a local checkpoint is, read from its metadata alone (no weight is read).

A GGUF file's architecture is a metadata field (``general.architecture``) at the start of the
file; a Hugging Face folder's is ``model_type`` in ``config.json``. Reading these first lets an
unsupported checkpoint be refused at once, instead of after minutes of de-quantisation. The
tokenizer of a GGUF file is in its metadata too (``tokenizer.ggml.*``, as llama.cpp writes it);
a GGUF without one can take the tokenizer files of the model's Hugging Face repository placed
beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rome_lens.errors import UnsupportedModelError
from rome_lens.models.local.families import Family, family_of
from rome_lens.models.local.gguf_header import read_fields

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def checkpoint_family(path: Path) -> Family:
    """The supported family of a GGUF file or Hugging Face folder, from its metadata only.

    Args:
        path: a ``.gguf`` file or a folder with a ``config.json``.

    Returns:
        The family.

    Raises:
        UnsupportedModelError: the architecture is not supported, or the metadata is missing.
    """
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.exists():
            raise UnsupportedModelError(f"{path} has no config.json (not a Hugging Face folder)")
        return family_of(model_type=str(json.loads(config_file.read_text()).get("model_type")))
    meta = read_fields(path, ("general.architecture",))
    if "general.architecture" not in meta:
        raise UnsupportedModelError(f"{path} has no general.architecture metadata field")
    return family_of(gguf_architecture=str(meta["general.architecture"]))


def load_tokenizer(source: Path) -> Any:
    """The tokenizer of a Hugging Face folder or GGUF file.

    A GGUF file's own tokenizer (``tokenizer.ggml.*`` metadata) is used when it has one;
    otherwise the tokenizer files (``tokenizer.json`` ...) in the same folder.

    Raises:
        UnsupportedModelError: a GGUF file with no tokenizer in it or beside it.
    """
    from transformers import AutoTokenizer

    if source.is_dir():
        return AutoTokenizer.from_pretrained(str(source))
    if read_fields(source, ("tokenizer.ggml.model",)):
        return AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    if any((source.parent / name).exists() for name in _TOKENIZER_FILES):
        return AutoTokenizer.from_pretrained(str(source.parent))
    raise UnsupportedModelError(
        f"{source} has no tokenizer (no tokenizer.ggml.* metadata) and no tokenizer files "
        f"({', '.join(_TOKENIZER_FILES)}) beside it; copy the model's tokenizer files from its "
        "Hugging Face repository into that folder"
    )
