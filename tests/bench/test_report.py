"""``inferos bench report``: fixed prompt sets, the document's statistics, and a small run through real servers."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lemonade_inferos.bench.prompt_sets import AGENT_SYSTEM, CONVERSATION, prompt_items
from lemonade_inferos.bench.report import improvements, summarize
from lemonade_inferos.cli.inferos import cli
from tests.conftest import CHROMIUM


def test_the_prompt_sets_are_fixed_and_runs_differ_where_real_traffic_does():
    assert prompt_items("conversation", 0, 3).turns == (CONVERSATION[0],)
    assert prompt_items("agent", 1, 2, 4) == prompt_items("agent", 1, 2, 4)
    first, second = prompt_items("agent", 0, 0, 4), prompt_items("agent", 0, 1, 4)
    assert first.system == second.system == AGENT_SYSTEM and first.turns != second.turns and len(first.turns) == 4
    rag_a, rag_b = prompt_items("rag", 2, 0).turns[0], prompt_items("rag", 2, 1).turns[0]
    assert rag_a.split("Question:")[0] == rag_b.split("Question:")[0] and rag_a != rag_b  # same passages
    with pytest.raises(ValueError):
        prompt_items("poetry", 0, 0)


def _record(ttft: float, latency: float, tokens: int, score: float | None = -1.0, set_name: str = "x") -> dict:
    return {"ttft_s": ttft, "latency_s": latency, "completion_tokens": tokens, "prompt_tokens": 10,
            "cached_tokens": 0, "quality_score": score, "set": set_name}


def test_throughput_is_tokens_over_request_time_and_ttft_is_measured_not_estimated():
    summary = summarize([_record(0.1, 1.0, 10), _record(0.3, 3.0, 30, None)])
    assert summary["throughput"]["tokens_per_second"] == pytest.approx(10.0)
    assert summary["throughput"]["requests_per_second"] == pytest.approx(0.5)
    assert summary["first_token_latency"]["mean_ms"] == pytest.approx(200.0)
    assert summary["latency"]["median_ms"] == pytest.approx(2000.0)
    assert summary["quality"]["mean_score"] == -1.0  # the empty reply has no score and is not counted


def test_improvements_are_the_documents_percentages():
    base = {**summarize([_record(1.0, 4.0, 40, -2.0)]), "memory": {"peak_rss_mb": 1000.0}}
    ours = {**summarize([_record(0.25, 2.0, 40, -1.5)]), "memory": {"peak_rss_mb": 800.0}}
    imp = improvements(base, ours)
    assert imp["tps_improvement"] == pytest.approx(100.0) and imp["throughput_ratio"] == pytest.approx(2.0)
    assert imp["latency_reduction"] == pytest.approx(50.0) and imp["ftl_reduction"] == pytest.approx(75.0)
    assert imp["ttft_ratio"] == pytest.approx(0.25) and imp["memory_reduction"] == pytest.approx(20.0)
    assert imp["quality_change"] == pytest.approx(0.5)


def test_bench_report_measures_both_modes_and_every_ablation_configuration_through_real_servers(model_dir, tmp_path):
    from playwright.sync_api import sync_playwright

    out = tmp_path / "report"
    result = CliRunner().invoke(cli, ["bench", "report", "--quick", "--runs", "1", "--warmup", "0", "--prompts", "1",
                                      "--max-tokens", "8", "--sets", "conversation,agent", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["generation"]["seed"] == 42 and report["config"]["generation"]["top_k"] == 50
    for mode in ("baseline", "inferos"):
        records = report["raw"][mode]
        assert len(records) == 1 + 3  # one conversation prompt, one 3-turn agent chat
        assert all(0 < r["ttft_s"] < r["latency_s"] and r["completion_tokens"] for r in records)
        assert all(r["quality_score"] < 0 for r in records)  # a log-probability, scored by the reference model
        assert report[mode]["memory"]["peak_rss_mb"] > 100
        assert set(report[mode]["by_set"]) == {"conversation", "agent"}
    assert all(r["cached_tokens"] == 0 for r in report["raw"]["baseline"])
    assert report["raw"]["inferos"][-1]["cached_tokens"] > 800  # the agent's system prompt and history reused
    ablation = report["ablation"]
    assert list(ablation["configurations"]) == ["baseline", "kv_only", "io_only", "hybrid_only", "kv_io", "full",
                                                 "spec_only", "full_spec"]
    for name, row in ablation["configurations"].items():
        assert row["active"]["kv"] == ("kv" in row["features"]), name  # what ran, read back from the controller
        assert row["active"]["io"] == ("io" in row["features"]), name
        assert row["active"]["hybrid"] is False and row["active"]["hybrid_reason"]  # one device here
    assert set(ablation["analysis"]["synergy_analysis"]) == {"kv_io", "full", "full_spec"}
    charts = sorted(p.name for p in out.glob("*.png"))
    assert (out / "report.md").read_text().count("| full_spec |") == 2  # the ablation row and its synergy
    assert charts == ["report-ablation.png", "report-first-token-latency.png", "report-latency-p95.png",
                      "report-synergy.png", "report-throughput.png"]
    with sync_playwright() as p:  # the HTML opens in a browser and shows its charts
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page()
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto((out / "report.html").as_uri())
        assert page.evaluate("[...document.images].map(i => i.naturalWidth > 0)") == [True] * 5
        assert "Ablation" in page.inner_text("body") and "synergy" in page.inner_text("body")
        browser.close()
    assert errors == []
