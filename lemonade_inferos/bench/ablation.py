"""The design document's ablation study (plus speculative decoding) and its synergy analysis.

Each configuration turns a set of the plugin's features on and the rest off, through the control API on a fresh
plugin server (nothing cached from another configuration):

- ``kv``: the tiered quantizing KV cache (``kv.mode`` dynamic, INT8 live form) and its reuse (prefix store,
  warm caches); off: ``kv.mode`` disabled, the model's live form, and every request sent with
  ``cache_prompt: false``;
- ``io``: IOBinding (``io.enable_iobinding``);
- ``hybrid``: the hybrid prefill/decode scheduler (``scheduler.mode`` hybrid; off: gpu_only, one device);
- ``spec``: speculative decoding (``speculative.mode`` auto; off: off).

What each configuration really ran with is read back from ``/v1/metrics`` (``optimization_status``): a feature
the machine cannot use (hybrid scheduling with one device) is reported inactive with the controller's reason,
and its effect is then measurement noise, not a feature's.
"""

from __future__ import annotations

from typing import Any

FEATURES = ("kv", "io", "hybrid", "spec")
CONFIGURATIONS: dict[str, tuple[str, ...]] = {
    "baseline": (), "kv_only": ("kv",), "io_only": ("io",), "hybrid_only": ("hybrid",), "kv_io": ("kv", "io"),
    "full": ("kv", "io", "hybrid"), "spec_only": ("spec",), "full_spec": ("kv", "io", "hybrid", "spec"),
}
DESCRIPTIONS = {"baseline": "our engine with every feature off", "kv_only": "KV quantization and reuse only",
                "io_only": "IOBinding only", "hybrid_only": "hybrid scheduling only",
                "kv_io": "KV + IOBinding", "full": "KV + IOBinding + hybrid (the document's full Infer-OS)",
                "spec_only": "speculative decoding only", "full_spec": "full + speculative decoding"}
# individual effects summed for each combination's expected effect
COMBINATIONS = {"kv_io": ("kv_only", "io_only"), "full": ("kv_only", "io_only", "hybrid_only"),
                "full_spec": ("kv_only", "io_only", "hybrid_only", "spec_only")}


def policy_update(features: tuple[str, ...]) -> dict[str, Any]:
    """The partial policy that turns exactly ``features`` on."""
    on = set(features)
    return {"kv": {"mode": "dynamic", "live_format": "int8"} if "kv" in on
            else {"mode": "disabled", "live_format": "model"},
            "io": {"enable_iobinding": "io" in on},
            "scheduler": {"mode": "hybrid" if "hybrid" in on else "gpu_only"},
            "speculative": {"mode": "auto" if "spec" in on else "off"}}


def uses_cache(features: tuple[str, ...]) -> bool:
    """Whether requests may reuse cached KV (``cache_prompt``): part of the ``kv`` feature."""
    return "kv" in features


def active_features(metrics: dict[str, Any]) -> dict[str, Any]:
    """What the last request ran with, from the controller's ``optimization_status``."""
    status = metrics.get("optimization_status", {})
    totals = metrics.get("totals", {})
    return {"kv": bool(status.get("kv_quantization_active")), "io": bool(status.get("io_binding_active")),
            "hybrid": bool(status.get("hybrid_scheduling_active")),
            "hybrid_reason": status.get("hybrid_scheduling_reason"),
            "spec": bool(totals.get("drafted_tokens")), "live_form": status.get("live_form"),
            "accept_rate": metrics.get("quality", {}).get("accept_rate", {}).get("current")}


def interpret(synergy: float) -> str:
    """The document's bands (points of TPS improvement)."""
    if synergy > 5:
        return "strong positive synergy"
    if synergy > 0:
        return "weak positive synergy"
    if synergy > -5:
        return "no synergy"
    return "negative interaction"


def synergy(results: dict[str, dict[str, Any]], metric: str = "tokens_per_second") -> dict[str, Any]:
    """Individual and combined effects (% TPS over the ablation's baseline), expected = sum of the individual
    effects, synergy = actual - expected, with the document's interpretation."""
    base = results["baseline"]["throughput"][metric]
    effect = {name: (r["throughput"][metric] / base - 1) * 100 for name, r in results.items() if name != "baseline"}
    individual = {name: effect[name] for name in ("kv_only", "io_only", "hybrid_only", "spec_only") if name in effect}
    analysis = {}
    for combined, parts in COMBINATIONS.items():
        if combined in effect and all(p in individual for p in parts):
            expected = sum(individual[p] for p in parts)
            analysis[combined] = {"actual": effect[combined], "expected": expected,
                                  "synergy": effect[combined] - expected,
                                  "interpretation": interpret(effect[combined] - expected)}
    return {"baseline_tps": base, "individual_effects": individual,
            "combined_effects": {k: effect[k] for k in COMBINATIONS if k in effect}, "synergy_analysis": analysis}
