"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright) against a real server.

A missing browser fails these tests: the README's test command installs it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, sync_playwright

from lemonade_inferos.bench.servers import running_server
from tests.conftest import CHROMIUM, control_url

ARTIFACTS = Path(os.environ.get("INFEROS_TEST_ARTIFACTS", Path(__file__).parents[2] / ".cache" / "test-artifacts"))
MODEL = "SmolLM2-135M-Instruct-CPU"
CHARTS = ("chart-tps", "chart-latency", "chart-memory", "chart-kv-tiers", "chart-rates", "chart-quality")
SYSTEM = "You are a helpful assistant who answers in one short sentence. " * 10


@pytest.fixture(scope="module")
def server(isolated_home_module, tmp_path_factory):
    """A plugin server taking a history snapshot every second (the charts have history to draw) that has
    served a few chats, two of them sharing a prefix."""
    env = {"INFEROS_HOME": str(isolated_home_module), "INFEROS_HISTORY_PERIOD_S": "1"}
    with running_server("--plugin", "inferos", "--inferos-prefix-spill-mb", "0", env=env,
                        log_path=tmp_path_factory.mktemp("logs") / "server.log") as base:
        for question in ("Say hi.", "What is Python?", "Name a colour.", "What is 2+2?"):
            reply = httpx.post(f"{base}/api/v1/chat/completions", timeout=120, json={
                "model": MODEL, "max_tokens": 12, "temperature": 0,
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]})
            assert reply.status_code == 200
            time.sleep(1.1)  # a snapshot between requests
        yield base, control_url(base).removesuffix("/v1"), isolated_home_module


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield instance
        instance.close()


class PageLog:
    """What the page said on its console, its uncaught errors and its failed requests."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("requestfailed", lambda r: self.errors.append(f"requestfailed: {r.url} {r.failure}"))


def open_dashboard(browser, url: str, polls: int = 2) -> tuple[Page, PageLog]:
    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    log = PageLog(page)
    page.goto(f"{url}/dashboard")
    wait_until(page, f"Number(document.body.dataset.polls || 0) >= {polls}")
    return page, log


def wait_until(page: Page, expression: str, timeout_s: float = 30.0) -> None:
    """Poll ``expression`` in the page (``page.wait_for_function`` evaluates strings, which the page's
    Content-Security-Policy forbids, as it should)."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"the page never satisfied {expression}"
        time.sleep(0.2)


def painted_pixels(page: Page, chart_id: str) -> int:
    """Pixels of the chart's canvas that are not transparent (an empty uPlot canvas has only its grid)."""
    return page.evaluate("""(id) => {
        const canvas = document.querySelector(`#${id} canvas`);
        const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
        let n = 0;
        for (let i = 3; i < data.length; i += 4) if (data[i] > 0) n++;
        return n;
    }""", chart_id)


def test_the_host_health_links_to_the_dashboard_and_the_page_needs_no_token_to_read(server):
    base, url, _ = server
    assert httpx.get(f"{base}/api/v1/health").json()["inferos"]["control_api"]["dashboard"] == f"{url}/dashboard"
    page = httpx.get(f"{url}/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert httpx.get(f"{url}/dashboard/static/vendor/uPlot.iife.min.js").status_code == 200


def test_the_page_shows_charts_and_the_values_the_endpoints_report_without_console_errors(server, browser):
    _, url, _ = server
    page, log = open_dashboard(browser, url, polls=3)
    shown = page.evaluate("""() => {
        const tiles = {};
        document.querySelectorAll('.kpi').forEach(t => { tiles[t.dataset.metric] = t.dataset.value; });
        const d = window.inferosDashboard;
        const charts = {};
        for (const [id, u] of Object.entries(d.charts)) charts[id] = u.data;
        return {tiles, charts, metrics: d.metrics, policy: d.policy,
                text: Object.fromEntries([...document.querySelectorAll('.kpi')].map(
                    t => [t.dataset.metric, t.querySelector('.value').textContent]))};
    }""")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    metrics = httpx.get(f"{url}/v1/metrics").json()
    # nothing ran since the chats: the totals and the window's latencies are what the page drew
    assert float(shown["tiles"]["requests"]) == metrics["totals"]["requests"] == 4
    assert shown["text"]["requests"] == "4"
    for tile, keys in {"ttft_mean": ("first_token_latency", "mean_ms"), "ttft_p95": ("first_token_latency", "p95_ms"),
                       "latency_mean": ("latency", "mean_ms"), "latency_p95": ("latency", "p95_ms")}.items():
        assert float(shown["tiles"][tile]) == pytest.approx(metrics[keys[0]][keys[1]]), tile
        assert shown["text"][tile] == f"{metrics[keys[0]][keys[1]]:,.0f} ms"
    assert float(shown["tiles"]["prefix_hit_rate"]) == pytest.approx(100 * metrics["prefix_cache"]["hit_rate"])
    assert metrics["prefix_cache"]["hit_rate"] > 0  # the shared system prompt was reused
    assert float(shown["tiles"]["rss_mb"]) == pytest.approx(metrics["memory"]["rss_mb"], rel=0.2)
    assert float(shown["tiles"]["kv_at_rest_mb"]) > 0
    delta = metrics["quality"]["delta_ppl_est"]["delta"]  # a shadow pass may have measured it, or not yet
    if delta is None:  # not measured: no number
        assert shown["tiles"]["delta_ppl"] == "" and shown["text"]["delta_ppl"] == "—"
    else:
        assert float(shown["tiles"]["delta_ppl"]) == pytest.approx(delta)
        assert shown["text"]["delta_ppl"] == f"{delta:,.3f}"
    # the tile is the decode speed (tokens over the time spent decoding them), not a rate that averages idle time
    throughput = shown["metrics"]["throughput"]
    assert float(shown["tiles"]["tps"]) == pytest.approx(throughput["decode_tokens_per_second"])
    assert throughput["decode_tokens_per_second"] > 3 * throughput["tokens_per_second"]
    # the charts: history snapshots plus the polls, every series drawn
    for chart in CHARTS:
        xs, *series = shown["charts"][chart]
        assert len(xs) >= 4 and xs == sorted(xs), chart
        assert painted_pixels(page, chart) > 2000, chart
        if chart != "chart-quality":
            assert any(v is not None for s in series for v in s), chart
    latency = shown["charts"]["chart-latency"]
    assert latency[1][-1] == pytest.approx(metrics["first_token_latency"]["mean_ms"])
    # the effective policy with the controller's overrides and their reasons (no DirectML/NPU here)
    overridden = page.locator("#policy-table tr.override").all_inner_texts()
    assert any("scheduler.prefill_device" in row and "not in this onnxruntime build" in row for row in overridden)
    assert page.locator("#policy-table tbody tr").count() >= 20
    assert log.errors == []
    page.close()


def test_changing_the_policy_from_the_page_needs_the_token(server, browser):
    _, url, home = server
    version = httpx.get(f"{url}/v1/policy").json()["version"]
    page, log = open_dashboard(browser, url)
    page.fill("#policy-update", '{"kv": {"recent_window": 192}}')
    page.click("#apply-policy")
    assert "enter the control token" in page.locator("#policy-result").inner_text()
    page.fill("#token", "not-the-token-at-all")
    page.click("#apply-policy")
    wait_until(page, "document.getElementById('policy-result').textContent.startsWith('401')")
    assert "unauthorized" in page.locator("#policy-result").inner_text()
    assert httpx.get(f"{url}/v1/policy").json()["version"] == version
    page.fill("#token", (home / "agent-token").read_text().strip())
    page.click("#apply-policy")
    wait_until(page, "document.getElementById('policy-result').textContent.startsWith('applied')")
    policy = httpx.get(f"{url}/v1/policy").json()
    assert policy["version"] == version + 1 and policy["effective"]["kv"]["recent_window"] == 192
    # the change is an event in the table and on the charts' time axis
    wait_until(page, "window.inferosDashboard.events.some(e => e.kind === 'policy')")
    wait_until(page, "[...document.querySelectorAll('#events-table td')].some(td => td.textContent === 'policy')")
    wait_until(page, "document.querySelector('#policy-table tbody').textContent.includes('192')")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-after-policy-change.png"), full_page=True)
    # the one console error is the browser reporting the refused (401) request
    assert [e for e in log.errors if "status of 401" not in e] == []
    page.close()


OVERLAPPING_TIME_LABELS = """async (spans) => {
    const overlaps = [];
    for (const [id, u] of Object.entries(window.inferosDashboard.charts)) {
        const axis = u.axes[0];
        for (const span of spans) {
            const now = Date.now() / 1000;
            u.setScale("x", {min: now - span, max: now});
            await new Promise((done) => setTimeout(done, 50));  // uPlot lays the axis out on its next commit
            u.ctx.save();
            u.ctx.font = axis.font[0];
            const widths = axis._values.map((label) => Math.max(
                ...String(label).split("\\n").map((line) => u.ctx.measureText(line).width)) / devicePixelRatio);
            u.ctx.restore();
            const xs = axis._splits.map((t) => u.valToPos(t, "x"));
            for (let i = 0; i + 1 < xs.length; i++)
                if (xs[i + 1] - xs[i] < (widths[i] + widths[i + 1]) / 2 + 4)
                    overlaps.push({chart: id, span, labels: [axis._values[i], axis._values[i + 1]]});
        }
    }
    return overlaps;
}"""


@pytest.mark.parametrize("width", [700, 1400])
def test_time_axis_labels_never_overlap_from_a_minute_to_a_month(server, browser, width):
    _, url, _ = server
    page = browser.new_page(viewport={"width": width, "height": 1400})
    page.goto(f"{url}/dashboard")
    wait_until(page, "Number(document.body.dataset.polls || 0) >= 1")
    spans = [60, 600, 3600, 6 * 3600, 2 * 86400, 30 * 86400]
    assert page.evaluate(OVERLAPPING_TIME_LABELS, spans) == []
    page.close()
