"""A GGUF's config and tokenizer as a Hugging Face folder, run as a subprocess by ``build.py``.

``python -m lemonade_inferos.engine.gguf_export MODEL.gguf OUT_DIR``

onnxruntime-genai's builder reads a model's shape from a transformers config and writes its tokenizer and chat
template from a transformers tokenizer; transformers reads both from the GGUF's metadata. The weights are not
exported: the builder takes them from the GGUF itself, block for block (og_builder.py, gguf_weights.py), so no
step holds the model in fp32.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np


def export(gguf: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    read_granite()
    config = _config(gguf)
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(config).from_dict(config_dict)
    # the builder picks its exporter by ``architectures[0]``, which a config saved without its model lacks
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    config.save_pretrained(str(tmp))
    GenerationConfig.from_model_config(config).save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out_dir)


def _config(gguf: Path):
    """The model's config as transformers reads it from the GGUF, with the head size the file states: transformers
    does not map Qwen3's ``attention.key_length`` and falls back to 128 (right for Qwen3's own sizes only)."""
    from gguf import GGUFReader
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    reader = GGUFReader(str(gguf))
    fields = reader.fields
    architecture = fields["general.architecture"].contents()
    key_length = fields.get(f"{architecture}.attention.key_length")
    if key_length is not None and hasattr(config, "head_dim"):
        config.head_dim = int(key_length.contents())
    if architecture == "phi3":
        _long_rope(config, reader)
    return config


def _long_rope(config, reader) -> None:
    """Phi-3's LongRoPE (128K files: Phi-3-mini-128k, Phi-3.5-mini), which transformers' GGUF reader drops: the
    file's short and long factor tensors and its original context become the config's ``longrope`` parameters (the
    short factors rotate every position below the original context, so a build without them is another model)."""
    factors = {t.name: [float(x) for x in np.asarray(t.data).reshape(-1)] for t in reader.tensors
               if t.name in ("rope_factors_short.weight", "rope_factors_long.weight")}
    if len(factors) != 2:
        return
    original = reader.fields.get("phi3.rope.scaling.original_context_length")
    if original is None:
        raise ValueError("a Phi-3 GGUF with LongRoPE factors but no phi3.rope.scaling.original_context_length")
    config.original_max_position_embeddings = int(original.contents())
    config.rope_parameters = {**(config.rope_parameters or {}), "rope_type": "longrope", "type": "longrope",
                              "short_factor": factors["rope_factors_short.weight"],
                              "long_factor": factors["rope_factors_long.weight"],
                              "original_max_position_embeddings": config.original_max_position_embeddings}


GRANITE_KEYS = {"embedding_scale": "embedding_multiplier", "residual_scale": "residual_multiplier",
                "attention.scale": "attention_multiplier", "logit_scale": "logits_scaling"}


def read_granite() -> None:
    """Teach transformers' GGUF reader (5.x reads no Granite file) Granite 3's keys: Llama's, and the four
    multipliers llama.cpp's converter writes, without which the model computes something else. The tokenizer is
    then read as for any other architecture."""
    from transformers import modeling_gguf_pytorch_utils
    from transformers.integrations import ggml

    if "granite" not in ggml.GGUF_CONFIG_MAPPING:
        ggml.GGUF_CONFIG_MAPPING["granite"] = {**ggml.GGUF_CONFIG_MAPPING["llama"], **GRANITE_KEYS}
    if "granite" not in modeling_gguf_pytorch_utils.GGUF_SUPPORTED_ARCHITECTURES:
        modeling_gguf_pytorch_utils.GGUF_SUPPORTED_ARCHITECTURES.append("granite")


if __name__ == "__main__":
    export(Path(sys.argv[1]), Path(sys.argv[2]))
