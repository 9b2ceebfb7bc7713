"""Open every bundled workflow in ComfyUI's own frontend, in headless Chromium, and report what a
user sees: a screenshot per workflow and, as JSON on stdout, each node's rectangle on screen and
whether it is visible and unobstructed; then the Templates dialog on the pack's cards: a screenshot
of the dialog (templates-dialog.png), one of each card (templates-card-<n>.png) and the cards' text.

    python tools/workflow_screenshots.py --comfyui ../shared/comfyui --out /tmp/shots

Needs a ComfyUI checkout, `pip install selenium` (in any venv: the server runs with --python), a
Chromium and its driver (Debian: `apt-get install chromium chromium-driver`; the defaults are
/usr/bin/chromium and /usr/bin/chromedriver). A tool for people, not a test: CI has no browser.
tests/test_workflows.py checks the same geometry without one.

The server runs with a temporary --base-directory holding only ComfyUI's example.png (as on a fresh
install) and this repository (or --pack) as custom_nodes/unifusion; workflows load as the Templates
dialog loads them (app.loadGraphData with the stored view).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from comfyui_browser import PACK, ROOT, add_arguments, comfyui_page, poll

VIEWPORT = {"width": 1600, "height": 900}

# Runs in the page: the canvas transform, every node's rectangle in screen pixels (title bar
# included), its stored and minimum size, and how much of it the page's other elements cover
# (sampled on a grid with elementFromPoint; a node's own DOM widgets, e.g. text areas, count as it).
MEASURE_JS = """
() => {
  const app = window.app ?? window.comfyAPI.app.app;
  const canvas = app.canvas, el = canvas.canvas, box = el.getBoundingClientRect();
  const [ox, oy] = canvas.ds.offset, s = canvas.ds.scale;
  const TITLE = LiteGraph.NODE_TITLE_HEIGHT;
  const nodes = app.graph._nodes.map((n) => {
    const x = box.left + (n.pos[0] + ox) * s, y = box.top + (n.pos[1] - TITLE + oy) * s;
    const w = n.size[0] * s, h = (n.size[1] + TITLE) * s;
    let seen = 0, total = 0, inside = 0;
    for (let i = 0; i < 12; i++) for (let j = 0; j < 12; j++) {
      const px = x + (i + 0.5) * w / 12, py = y + (j + 0.5) * h / 12;
      total++;
      if (px < 0 || py < 0 || px >= innerWidth || py >= innerHeight) continue;
      inside++;
      const hit = document.elementFromPoint(px, py);
      // the canvas itself, or a DOM widget (text area...) drawn over this node
      if (hit === el || (hit && hit.closest('.dom-widget') && !hit.closest('.p-dialog'))) seen++;
    }
    return {id: n.id, type: n.type, title: n.title, pos: [...n.pos], size: [...n.size],
            min_size: Array.from(n.computeSize()), screen: [x, y, w, h].map(Math.round),
            on_screen: inside / total, unobstructed: seen / total,
            widgets: (n.widgets ?? []).map((w) => [w.name, w.type])};
  });
  return {ds: {scale: s, offset: [ox, oy]}, canvas: [box.left, box.top, box.width, box.height], nodes};
}
"""

# Which page elements cover the canvas: sample the window and collect the covering elements' boxes.
COVER_JS = """
() => {
  const el = (window.app ?? window.comfyAPI.app.app).canvas.canvas, found = new Map();
  for (let x = 2; x < innerWidth; x += 8) for (let y = 2; y < innerHeight; y += 8) {
    let hit = document.elementFromPoint(x, y);
    if (!hit || hit === el) continue;
    // climb to the largest ancestor that does not hold the canvas and is not an overlay over all of it
    const area = (e) => { const r = e.getBoundingClientRect(); return r.width * r.height; };
    while (hit.parentElement && hit.parentElement !== document.body && !hit.parentElement.contains(el)
           && area(hit.parentElement) < area(el) / 2) {
      hit = hit.parentElement;
    }
    const r = hit.getBoundingClientRect();
    const key = [r.left, r.top, r.width, r.height].map(Math.round).join(',');
    if (!found.has(key)) found.set(key, {tag: hit.tagName, cls: String(hit.className).slice(0, 80),
                                         rect: [r.left, r.top, r.width, r.height].map(Math.round)});
  }
  return [...found.values()];
}
"""


def click_text(driver, text: str, timeout: float = 20) -> None:
    """Click the first visible element whose own text is `text`, as a user would."""
    from selenium.webdriver.common.by import By

    def clicked() -> bool:
        for el in driver.find_elements(By.XPATH, f"//*[text()[normalize-space(.)={json.dumps(text)}]]"):
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", el)
            if el.is_displayed():
                el.click()
                return True
        return False

    poll(clicked, timeout, f"no visible {text!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    ap.add_argument("--pack", type=Path, default=ROOT, help="the pack to serve (default: this repository)")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "unifusion-screenshots")
    args = ap.parse_args()
    from selenium.webdriver.common.by import By

    args.out.mkdir(parents=True, exist_ok=True)
    pack = args.pack.resolve()
    names = sorted(p.stem for p in (pack / "workflows").glob("*.json"))
    report = {}
    with comfyui_page(args, args.out / "comfyui.log", VIEWPORT, pack, example_image=True, script_timeout=60,
                      app_timeout=120) as driver:
        for name in names:
            # as the Templates dialog does: fetch from the pack's route, load with the stored view
            driver.execute_async_script(
                """const [pack, name, done] = arguments;
                const app = window.app ?? window.comfyAPI.app.app;
                fetch(`/api/workflow_templates/${pack}/${encodeURIComponent(name)}.json`)
                  .then((r) => r.json()).then((w) => app.loadGraphData(w, true, true, name))
                  .then(() => done(null), (e) => done(String(e)));""",
                PACK, name,
            )
            time.sleep(2.5)  # image previews load and the nodes grow
            # no hover highlight over a node
            driver.execute_cdp_cmd("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": 1, "y": 450})
            driver.save_screenshot(str(args.out / f"{name}.png"))
            report[name] = driver.execute_script(f"return ({MEASURE_JS})()")
            # what the frontend kept of the file's extra.description (it saves it back with the graph)
            report[name]["extra_description"] = driver.execute_script(
                "return (window.app ?? window.comfyAPI.app.app).graph.extra?.description ?? null")
        report["_covering_elements"] = driver.execute_script(f"return ({COVER_JS})()")
        # the Templates dialog on the pack's cards, as a user opens it: titles, descriptions, thumbnails
        try:
            click_text(driver, "Templates")
            click_text(driver, PACK)
        except TimeoutError:
            driver.save_screenshot(str(args.out / "templates-failed.png"))
            print(driver.execute_script(
                "return [...document.querySelectorAll('.p-dialog *')].filter((e) => e.children.length === 0"
                " && /unifusion|custom/i.test(e.textContent)).map((e) => e.outerHTML.slice(0, 200))"),
                file=sys.stderr)
            raise
        time.sleep(2.5)  # thumbnails load
        driver.save_screenshot(str(args.out / "templates-dialog.png"))
        cards = driver.find_elements(By.CSS_SELECTOR, ".template-card")
        for k, c in enumerate(cards, 1):
            c.screenshot(str(args.out / f"templates-card-{k}.png"))
        report["_template_cards"] = [c.text.split("\n") for c in cards]
    json.dump(report, sys.stdout, indent=1)
    print()
    bad = [(name, n["id"], n["type"]) for name, r in report.items() if not name.startswith("_")
           for n in r["nodes"] if n["unobstructed"] < 1]
    print(f"screenshots in {args.out}; nodes not fully visible: {bad or 'none'}", file=sys.stderr)


if __name__ == "__main__":
    main()
