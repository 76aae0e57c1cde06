"""onnxruntime-genai's model builder, given the config fields it reads.

``python -m lemonade_inferos.engine.og_builder ARGS`` runs ``python -m onnxruntime_genai.models.builder ARGS``
after one fix-up: transformers 5 keeps Gemma 3's two RoPE bases as ``rope_parameters`` per layer type
(``{"full_attention": {...}, "sliding_attention": {...}}``), where the builder (0.18) reads the flat
``rope_parameters["rope_type"]``, ``rope_theta`` and ``rope_local_base_freq`` of transformers 4. The config is
given both shapes, nothing else changes.
"""

from __future__ import annotations

import runpy
from typing import Any


def with_flat_rope(config: Any) -> Any:
    """``config`` with a per-layer-type ``rope_parameters`` also readable the flat way (the global layers' base as
    ``rope_theta``, the sliding layers' as ``rope_local_base_freq``); other configs unchanged."""
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or "full_attention" not in rope:
        return config
    full = rope["full_attention"]
    rope.setdefault("rope_type", full.get("rope_type", "default"))
    rope.setdefault("rope_theta", full.get("rope_theta"))
    config.rope_theta = full.get("rope_theta")
    if "sliding_attention" in rope:
        config.rope_local_base_freq = rope["sliding_attention"].get("rope_theta")
    return config


def main() -> None:
    from transformers import AutoConfig

    load = AutoConfig.from_pretrained.__func__

    def from_pretrained(cls: type, *args: Any, **kwargs: Any) -> Any:
        return with_flat_rope(load(cls, *args, **kwargs))

    AutoConfig.from_pretrained = classmethod(from_pretrained)
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
