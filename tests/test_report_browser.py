"""report.html in a real headless Chromium (Debian's package, driven by Playwright), built by the
real CLI from three evaluations of the embedded default: the base model, trained adapters, and an
API model served by a fake OpenAI-compatible server on 127.0.0.1. One test dialogue carries a
<script> tag, which must show as text.

Skips, saying why, where Chromium or the playwright package is absent. .ci/run installs Chromium in
the background while the package installs; these tests wait for its marker file ($CHROMIUM_INSTALLING)
to go."""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import SAMPLE_DATA, set_args, smoke_overrides
from test_cli import run_cli

from samsum_qlora import chat, files, metrics, report_page

pytestmark = pytest.mark.slow
INJECTED = "\nEve: <script>alert(1)</script> & </script><b>not bold</b>"
INJECTED_ID = "smp-test-003"
RUN_ON = {"smp-test-002", "smp-test-007", "smp-test-011"}  # where the fake API says finish_reason "length"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium() -> str:
    """The browser's path, once .ci/run's background install (if any) has finished; else skip."""
    installing = os.environ.get("CHROMIUM_INSTALLING")
    deadline = time.time() + 600
    while installing and Path(installing).exists() and time.time() < deadline:
        time.sleep(1)
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    return path


class FakeApi(BaseHTTPRequestHandler):
    """/v1/chat/completions: the dialogue's first line, speaker dropped; RUN_ON rows run out of tokens."""

    ids: dict[str, str] = {}  # cleaned dialogue -> row id

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        dialogue = body["messages"][-1]["content"]
        text = dialogue.splitlines()[0].partition(":")[2].strip()
        finish = "length" if self.ids[dialogue] in RUN_ON else "stop"
        reply = json.dumps(
            {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": finish}], "usage": {}}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)


def sample_with_a_script_tag(folder: Path) -> Path:
    shutil.copytree(SAMPLE_DATA, folder)
    rows = files.read_jsonl(folder / "test.jsonl")
    for row in rows:
        row["dialogue"] += INJECTED if row["id"] == INJECTED_ID else ""
    files.write_jsonl(folder / "test.jsonl", rows)
    FakeApi.ids = {chat.clean(r["dialogue"]): r["id"] for r in rows}
    return folder


def cli(*args):
    result = run_cli(list(args))
    assert result.exit_code == 0, result.output + result.stderr
    return result


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Three eval folders made by the CLI, and the report over them."""
    tmp = tmp_path_factory.mktemp("browser")
    overrides = smoke_overrides(tmp, **{"data.source": sample_with_a_script_tag(tmp / "data"), "train.max_steps": 4})
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeApi)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENAI_API_KEY", "sk-fake")
        mp.setenv("NO_PROXY", "127.0.0.1,localhost")
        cli("train", *set_args(overrides))
        cli("eval", *set_args(overrides), "--base-only")
        cli("eval", *set_args(overrides))
        cli("eval", *set_args(overrides), "--api-model", "fake-model", "--api-base", base_url)
    server.shutdown()
    server.server_close()
    run = tmp / "run"
    result = cli("report", str(run), "--out", str(tmp / "report"))
    assert str(tmp / "report" / "report.html") in result.stderr
    return run, tmp / "report" / "report.html"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    executable = chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium-profile"),  # a fresh user-data-dir
            executable_path=executable,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        context.set_default_timeout(10_000)  # a page that fails to render fails in seconds
        yield context
        context.close()


def open_page(context, url):
    """A page with every console error, uncaught exception and JS dialog recorded."""
    page = context.new_page()
    seen = {"errors": [], "dialogs": []}
    page.on("console", lambda m: seen["errors"].append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))
    page.on("dialog", lambda d: (seen["dialogs"].append(d.message), d.dismiss()))
    page.goto(url)
    page.wait_for_selector("#examples .row")
    return page, seen


def shown_ids(page) -> list[str]:
    return page.eval_on_selector_all("#examples .row", "rows => rows.map(r => r.dataset.id)")


def test_the_page_in_chromium(browser, built):  # browser first: without one, skip before building
    run, html = built
    page, seen = open_page(browser, html.as_uri())
    folders = {files.read_json(f / "metrics.json")["type"]: f for f in sorted(run.glob("eval*"))}
    assert sorted(folders) == ["API", "QLoRA adapters", "base"]

    # the table's numbers are metrics.json's, x100 with 2 decimals, rows in the report's order
    table = page.eval_on_selector_all(
        "table.scores tbody tr",
        "rows => rows.map(r => [r.cells[1].textContent, ...[...r.querySelectorAll('.mean')].map(s => s.textContent)])",
    )
    kinds = [row[0] for row in table]
    assert kinds == ["base", "API", "QLoRA adapters"]
    for kind, *shown in table:
        saved = files.read_json(folders[kind] / "metrics.json")
        assert shown == [f"{100 * saved[m]:.2f}" for m in ("rouge1", "rouge2", "rougeL")]

    # every dialogue, in row order; the <script> one as literal text, never run
    assert shown_ids(page) == [f"smp-test-{i:03d}" for i in range(1, 13)]
    injected = page.locator(f'#examples .row[data-id="{INJECTED_ID}"] .dialogue').text_content()
    assert "Eve: <script>alert(1)</script> & </script><b>not bold</b>" in injected
    assert page.locator("#examples script, #examples b").count() == 0

    # sorting by the adapters' ROUGE-L orders the rows by it, high first, ties in row order; then low first
    records = files.read_jsonl(folders["QLoRA adapters"] / "predictions.jsonl")
    rouge_l = metrics.rouge_per_example([r["prediction"] for r in records], [r["reference"] for r in records])["rougeL"]
    assert len(set(rouge_l)) > 2  # something to sort
    page.select_option("#sort", f"model:{kinds.index('QLoRA adapters')}")
    page.select_option("#metric", "2")
    assert shown_ids(page) == [r["id"] for _, r in sorted(zip(rouge_l, records), key=lambda x: -x[0])]
    page.click("#direction")
    assert shown_ids(page) == [r["id"] for _, r in sorted(zip(rouge_l, records), key=lambda x: x[0])]

    # "browse A − B" in the paired comparison sorts by that difference, largest first
    page.click("#pairs-section button[data-a='1'][data-b='0']")
    assert page.input_value("#sort") == "diff:1:0" and page.text_content("#direction") == "↓ high first"
    by_diff = page.eval_on_selector_all("#examples .row .sortval", "spans => spans.map(s => s.textContent)")
    assert all(text.startswith("Δ RL ") for text in by_diff)
    values = [float(text.split()[-1]) for text in by_diff]
    assert len(values) == 12 and values == sorted(values, reverse=True)

    # the text filter narrows the rows; so does "did not end", for one model or any
    page.fill("#filter", "alert(1)")
    assert shown_ids(page) == [INJECTED_ID]
    page.fill("#filter", "")
    page.select_option("#sort", "order")
    page.select_option("#ended", f"model:{kinds.index('API')}")
    assert shown_ids(page) == sorted(RUN_ON)
    assert page.text_content("#count") == "3 of 12 dialogues"
    page.select_option("#ended", "any")
    ran_on = {r["id"] for f in folders.values() for r in files.read_jsonl(f / "predictions.jsonl") if not r["ended"]}
    assert set(shown_ids(page)) == ran_on and RUN_ON <= ran_on

    # report.html#id=...: that row, highlighted, even past a filter that hid it; from a fresh load too
    page.fill("#filter", "no row says this")
    assert shown_ids(page) == []
    page.evaluate("location.hash = '#id=smp-test-009'")
    page.wait_for_selector("#examples .row.target")
    assert page.eval_on_selector_all("#examples .row.target", "rows => rows.map(r => r.dataset.id)") == ["smp-test-009"]
    page.evaluate("location.hash = '#id=50%'")  # hand-typed, not a valid escape: no row, no error
    fresh, seen_fresh = open_page(browser, html.as_uri() + "#id=smp-test-012")
    assert fresh.eval_on_selector_all("#examples .row.target", "rows => rows.map(r => r.dataset.id)") == [
        "smp-test-012"
    ]
    top = fresh.evaluate("document.querySelector('#examples .row.target').getBoundingClientRect().top")
    assert 0 <= top < 1000  # scrolled into view

    assert seen == seen_fresh == {"errors": [], "dialogs": []}
    page.close()
    fresh.close()


@dataclass
class Synthetic:
    """An evaluation as report.Scored holds it, made up: no ROUGE of 3,000 rows computed here."""

    folder: Path
    model: str
    kind: str
    records: list[dict]
    per_example: dict[str, list[float]]

    def mean(self, metric: str) -> float:
        return sum(self.per_example[metric]) / len(self.per_example[metric])


def thousand_rows(n=1000) -> list[Synthetic]:
    rng = random.Random(0)
    words = "apple meeting tomorrow call back dinner flight late sorry okay party gift train".split()
    dialogues = [
        "\n".join(f"P{k}: " + " ".join(rng.choices(words, k=12)) for k in range(rng.randint(3, 18))) for _ in range(n)
    ]
    references = [" ".join(rng.choices(words, k=15)) for _ in dialogues]  # a row's reference is the same in every eval
    evals = []
    for k, kind in enumerate(("base", "API", "QLoRA adapters")):
        records = [
            {
                "index": i,
                "id": f"r{i}",
                "dialogue": d,
                "reference": references[i],
                "prediction": " ".join(rng.choices(words, k=rng.randint(5, 40))),
                "ended": rng.random() > 0.1,
            }
            for i, d in enumerate(dialogues)
        ]
        scores = {m: [rng.random() * (k + 1) / 3 for _ in records] for m in ("rouge1", "rouge2", "rougeL")}
        evals.append(Synthetic(Path(f"/runs/{k}"), "model", kind, records, scores))
    return evals


def test_a_thousand_rows_sort_and_filter_at_once(browser, tmp_path):
    evals = thousand_rows()
    cis = [{m: (0.1, 0.2) for m in ("rouge1", "rouge2", "rougeL")} for _ in evals]
    html = tmp_path / "report.html"
    html.write_text(report_page.render_page(evals, cis, b"not a png"), encoding="utf-8")
    started = time.perf_counter()
    page, seen = open_page(browser, html.as_uri())
    loaded = time.perf_counter() - started
    assert len(shown_ids(page)) == 1000
    took = page.evaluate(TIMED)  # milliseconds, each change with the layout it causes
    print(f"1000 rows: page ready in {loaded:.2f} s; " + ", ".join(f"{k} {v:.0f} ms" for k, v in took.items()))
    assert max(took.values()) < 500, took
    page.select_option("#ended", "")
    page.select_option("#sort", "order")
    page.fill("#filter", "r99")  # ids r99, r990-r999
    assert shown_ids(page) == ["r99"] + [f"r{i}" for i in range(990, 1000)]
    assert seen == {"errors": [], "dialogs": []}
    page.close()


TIMED = """() => {
  const time = (change) => { const t = performance.now(); change(); void document.body.offsetHeight;
    return performance.now() - t; };
  const set = (id, value, type) => { const el = document.getElementById(id); el.value = value;
    el.dispatchEvent(new Event(type)); };
  return {
    "sort by a model": time(() => set("sort", "model:2", "change")),
    "sort by a difference": time(() => set("sort", "diff:2:0", "change")),
    "text filter": time(() => set("filter", "apple late", "input")),
    "clear the filter": time(() => set("filter", "", "input")),
    "did not end": time(() => set("ended", "any", "change")),
  };
}"""


def test_the_page_fits_a_phone_and_prints_without_its_controls(browser, built):
    _, html = built
    page, seen = open_page(browser, html.as_uri())
    page.set_viewport_size({"width": 375, "height": 800})
    # the page itself never scrolls sideways: wide tables scroll inside their own box
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    boxes = page.eval_on_selector_all("div.wide", "els => els.map(e => e.getBoundingClientRect().right)")
    assert len(boxes) == 3 and max(boxes) <= 375  # the scores, what differs, the paired comparison
    page.emulate_media(media="print")
    assert page.eval_on_selector(".toolbar", "e => getComputedStyle(e).display") == "none"
    assert page.eval_on_selector(".scroller", "e => getComputedStyle(e).overflowY") == "visible"
    assert seen["errors"] == []
