"""GGUF files of tiny random-weight models, written the way llama.cpp's converter writes them (its tensor names,
metadata keys and, for Llama, its Q/K row order), with SmolLM2's tokenizer copied from the GGUF it ships: what a
user's file of another architecture looks like, in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ARCH_CONFIGS = {   # transformers config class, GGUF architecture
    "llama": ("LlamaConfig", "llama"),
    "qwen2": ("Qwen2Config", "qwen2"),
    "qwen3": ("Qwen3Config", "qwen3"),
    "phi3": ("Phi3Config", "phi3"),   # fused QKV and gate/up matrices
    "gemma2": ("Gemma2Config", "gemma2"),   # four norms a layer, stored +1 as llama.cpp's converter does
    "granite": ("GraniteConfig", "granite"),   # Llama's layout with four multipliers
    "llama3": ("LlamaConfig", "llama"),   # Llama 3.1/3.2's RoPE scaling: the file's rope_freqs
    "phi3-128k": ("Phi3Config", "phi3"),   # LongRoPE: the file's short and long factors
}
LONG_ROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + 0.25 * i for i in range(8)],
             "long_factor": [2.0 + 0.5 * i for i in range(8)]}
GRANITE_MULTIPLIERS = dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0078125,
                           logits_scaling=8.0)   # Granite 3's own values


def tiny_gguf(arch: str, tokenizer_gguf: Path, root: Path, qtype: str = "F32", tied: bool = True) -> Path:
    """A 2-layer random-weight model of ``arch`` as ``root/ARCH.gguf`` (written once); ``qtype`` (``Q4_0``,
    ``Q8_0``, ...: what ``gguf`` quantizes) stores its matrices as llama-quantize would (``root/ARCH-Q4_0.gguf``);
    ``tied=False`` gives it an output matrix of its own (``root/ARCH-Q4_0-untied.gguf``)."""
    import gguf

    out = root / (arch + ("" if qtype == "F32" else f"-{qtype}") + ("" if tied else "-untied") + ".gguf")
    if out.is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    gguf_arch = ARCH_CONFIGS[arch][1]
    model = tiny_model(arch, tied)
    config = model.config
    partial = out.with_suffix(".partial")
    writer = gguf.GGUFWriter(str(partial), gguf_arch)
    _metadata(writer, config, qtype)
    _copy_tokenizer(writer, tokenizer_gguf)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[gguf_arch.upper()], config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and tied:   # the token embedding
            continue
        data = tensor.detach().float().numpy()
        if arch == "gemma2" and name.endswith("norm.weight"):
            data = data + 1.0
        if arch in ("llama", "llama3", "granite") and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            data = _llama_cpp_rows(data, heads)
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if qtype != "F32" and data.ndim == 2:
            kind = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(data))
    for name, values in _rope_tensors(config).items():   # as llama.cpp's converter adds them
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(out)
    return out


def tiny_model(arch: str, tied: bool = True):
    """The transformers model a tiny GGUF of ``arch`` is written from (the same weights every time)."""
    import torch
    import transformers

    shape = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                 bos_token_id=1, eos_token_id=2, tie_word_embeddings=tied)
    shape.update({"qwen3": {"head_dim": 16},   # Phi-3 mini 4K's context is its original one (no LongRoPE)
                  "phi3": {"max_position_embeddings": 4096, "original_max_position_embeddings": 4096},
                  "gemma2": {"head_dim": 16, "sliding_window": 512},
                  "granite": GRANITE_MULTIPLIERS,
                  "llama3": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 32.0,
                                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 8192}},
                  "phi3-128k": {"max_position_embeddings": 8192, "original_max_position_embeddings": 4096,
                                "rope_parameters": LONG_ROPE}}.get(arch, {}))
    if "rope_parameters" in shape:
        del shape["rope_theta"]
    config = getattr(transformers, ARCH_CONFIGS[arch][0])(**shape)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _metadata(writer, config, qtype: str) -> None:
    import math

    import gguf

    writer.add_name("tiny-random")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_file_type(0 if qtype == "F32" else int(gguf.LlamaFileType[f"MOSTLY_{qtype}"]))
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") == "longrope":   # Phi-3's LongRoPE, as llama.cpp's converter writes it
        scale = config.max_position_embeddings / config.original_max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(config.original_max_position_embeddings)
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(
            config.original_max_position_embeddings)))
    if config.model_type == "granite":   # as llama.cpp's converter names them
        writer.add_embedding_scale(config.embedding_multiplier)
        writer.add_residual_scale(config.residual_multiplier)
        writer.add_attention_scale(config.attention_multiplier)
        writer.add_logit_scale(config.logits_scaling)


def _rope_tensors(config) -> dict[str, np.ndarray]:
    """llama.cpp's converter's RoPE tensors: Llama 3's ``rope_freqs`` (per-frequency divisors), Phi-3's LongRoPE
    ``rope_factors_short``/``_long``."""
    import math

    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") == "longrope":
        return {"rope_factors_long.weight": np.asarray(rope["long_factor"], np.float32),
                "rope_factors_short.weight": np.asarray(rope["short_factor"], np.float32)}
    if rope.get("rope_type") != "llama3":
        return {}
    dim = config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    old, low, high, factor = (rope["original_max_position_embeddings"], rope["low_freq_factor"],
                              rope["high_freq_factor"], rope["factor"])
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return {"rope_freqs.weight": np.asarray(factors, np.float32)}


def _copy_tokenizer(writer, source: Path) -> None:
    import gguf

    for key, field in gguf.GGUFReader(str(source)).fields.items():
        if key.startswith("tokenizer."):
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type)


def _llama_cpp_rows(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter reorders Llama's Q/K rows (rotary halves interleaved); transformers undoes it."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def read_metadata(path: Path) -> dict:
    import gguf

    fields = gguf.GGUFReader(str(path)).fields
    return json.loads(json.dumps({k: str(f.contents()) for k, f in fields.items() if not k.startswith("tokenizer.")}))
