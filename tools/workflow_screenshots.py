"""Open every bundled workflow in ComfyUI's own frontend, in headless Chromium, and report what a
user sees: a screenshot per workflow and, as JSON on stdout, each node's rectangle on screen and
whether it is visible and unobstructed; then a screenshot of the pack's cards in the Templates dialog.

    python tools/workflow_screenshots.py --comfyui ../shared/comfyui --out /tmp/shots

Needs a ComfyUI checkout, `pip install playwright` and a Chromium (Debian: `apt-get install
chromium`; the default --chromium is /usr/bin/chromium). A tool for people, not a test: CI has no
browser. tests/test_workflows.py checks the same geometry without one.

The server runs with a temporary --base-directory holding only ComfyUI's example.png (as on a fresh
install) and this repository as custom_nodes/unifusion; workflows load as the Templates dialog
loads them (app.loadGraphData with the stored view).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK = "unifusion"
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_comfyui(comfyui: Path, python: str, base: Path, log: Path) -> tuple[subprocess.Popen, str]:
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / PACK).symlink_to(ROOT, target_is_directory=True)
    (base / "input").mkdir()
    shutil.copy(comfyui / "input" / "example.png", base / "input")  # what a fresh install has
    # A returning user: no first-run templates dialog over the canvas.
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    port = free_port()
    cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
           "--disable-api-nodes", "--base-directory", str(base), "--database-url", "sqlite:///:memory:"]
    proc = subprocess.Popen(cmd, cwd=comfyui, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 120
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited; see {log}")
        try:
            urllib.request.urlopen(url + "/system_stats", timeout=2).close()
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"ComfyUI not ready; see {log}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", type=Path,
                    default=Path(os.environ.get("COMFYUI_ROOT", ROOT.parent / "shared" / "comfyui")))
    ap.add_argument("--python", default=os.environ.get("COMFYUI_PYTHON", sys.executable))
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "unifusion-screenshots")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    names = sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_comfyui(args.comfyui.resolve(), args.python, Path(tmp) / "base", args.out / "comfyui.log")
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
                page = browser.new_page(viewport=VIEWPORT)
                page.goto(url)
                page.wait_for_function("() => (window.app ?? window.comfyAPI?.app?.app)?.graph", timeout=120_000)
                page.wait_for_timeout(3000)  # extensions, settings, first draw
                for name in names:
                    # as the Templates dialog does: fetch from the pack's route, load with the stored view
                    page.evaluate(
                        """async ([pack, name]) => {
                          const app = window.app ?? window.comfyAPI.app.app;
                          const r = await fetch(`/api/workflow_templates/${pack}/${encodeURIComponent(name)}.json`);
                          await app.loadGraphData(await r.json(), true, true, name);
                        }""",
                        [PACK, name],
                    )
                    page.wait_for_timeout(2500)  # image previews load and the nodes grow
                    page.mouse.move(1, 450)  # no hover highlight over a node
                    page.screenshot(path=str(args.out / f"{name}.png"))
                    report[name] = page.evaluate(MEASURE_JS)
                report["_covering_elements"] = page.evaluate(COVER_JS)
                # the Templates dialog on the pack's cards: titles and thumbnails as a user picks them
                page.get_by_text("Templates", exact=True).first.click()
                page.get_by_text(PACK, exact=True).first.click()
                page.wait_for_timeout(2000)
                page.screenshot(path=str(args.out / "templates.png"))
                report["_template_cards"] = page.evaluate(
                    "() => [...document.querySelectorAll('.template-card')].map((c) => c.innerText.split('\\n'))")
                browser.close()
        finally:
            proc.terminate()
            proc.wait(20)
    json.dump(report, sys.stdout, indent=1)
    print()
    bad = [(name, n["id"], n["type"]) for name, r in report.items() if not name.startswith("_")
           for n in r["nodes"] if n["unobstructed"] < 1]
    print(f"screenshots in {args.out}; nodes not fully visible: {bad or 'none'}", file=sys.stderr)


if __name__ == "__main__":
    main()
