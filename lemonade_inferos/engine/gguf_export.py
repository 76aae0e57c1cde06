"""GGUF -> Hugging Face folder, run as a subprocess by ``build.py``.

``python -m lemonade_inferos.engine.gguf_export MODEL.gguf OUT_DIR``

transformers loads the GGUF (dequantizing it to fp32) as its own model class for the file's architecture
(``LlamaForCausalLM``, ``Gemma3ForCausalLM``, ...) but refuses to save a model loaded from GGUF, so a fresh model of
the same class is made from the config (minus its ``quantization_config``) on the meta device and handed the loaded
tensors themselves (``assign``): the weights are held once, not twice.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def export(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32",
                                                  config=_config(gguf))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config_dict)
    with torch.device("meta"):
        model = type(loaded)(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    del loaded
    # a tied lm_head is not in the state dict; anything else missing means the export is wrong
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
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
    fields = GGUFReader(str(gguf)).fields
    architecture = fields["general.architecture"].contents()
    key_length = fields.get(f"{architecture}.attention.key_length")
    if key_length is not None and hasattr(config, "head_dim"):
        config.head_dim = int(key_length.contents())
    return config


if __name__ == "__main__":
    export(Path(sys.argv[1]), Path(sys.argv[2]))
