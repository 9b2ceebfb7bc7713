"""Open each UniFusion node's help page in ComfyUI's own frontend, in headless Chromium, and
screenshot it: the page as the node docs panel renders it, pictures included.

    python tools/help_screenshots.py --out /tmp/help        # help-<node id>.png per node

Needs a ComfyUI checkout (--comfyui, default $COMFYUI_ROOT or ../shared/comfyui), selenium
(`pip install selenium`, any environment: the script starts ComfyUI with --python), Chromium and
its driver (Debian: `apt-get install chromium chromium-driver`). A tool for people, not a test:
tests/test_help_pages.py and tests/test_comfyui.py check the pages and their URLs without a browser.

The server runs with a temporary --base-directory holding only this repository as
custom_nodes/unifusion. For each node the script opens the Node Library side panel, searches for
the node and presses its "?" button, as a user would; it reports, as JSON on stdout, each page's
heading and its pictures (whether each loaded, and its size on screen). Screenshots:
help-<node id>.png (the top of the page) and, for a page with pictures, help-<node id>-picture.png
(its first picture in view).

`--figures` instead renders web/docs/tiling-grid.png (the tiling picture of the Tile Images page)
with unifusion_core.tiling and PIL, and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK = "unifusion"
NODES = {
    "UniFusionVLMLoad": "UniFusion VLM Load",
    "UniFusionTileImages": "UniFusion Tile Images",
    "UniFusionVERIFIRewrite": "UniFusion VERIFI Rewrite",
    "UniFusionModelLoad": "UniFusion Model Load",
    "UniFusionLAPEncode": "UniFusion LAP Encode",
    "UniFusionSample": "UniFusion Sample",
}
VIEWPORT = {"width": 1600, "height": 1000}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  f"--window-size={VIEWPORT['width']},{VIEWPORT['height']}"]


# --- the figure -----------------------------------------------------------------------------------


def tiling_figure(out: Path) -> None:
    """A drawn 1200 x 800 landscape, cut by unifusion_core.tiling as VERIFI Rewrite cuts it for
    InternVL3 (448-px tiles, max_tiles 10, thumbnail on): the grid over the image, the tiles and
    the thumbnail, and the token count."""
    sys.path.insert(0, str(ROOT))
    from PIL import Image, ImageDraw, ImageFont

    from unifusion_core.tiling import tile_images

    w, h = 1200, 800
    img = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(img)
    for y in range(h):  # sky
        t = y / h
        d.line([(0, y), (w, y)], fill=(int(70 + 120 * t), int(130 + 80 * t), int(200 + 40 * t)))
    d.ellipse([860, 90, 1020, 250], fill=(250, 210, 90))
    d.polygon([(0, 560), (260, 330), (520, 560)], fill=(90, 110, 140))
    d.polygon([(380, 560), (700, 280), (1050, 560)], fill=(110, 125, 155))
    d.rectangle([0, 560, w, h], fill=(70, 140, 80))
    d.rectangle([160, 600, 300, 720], fill=(180, 60, 50))
    d.polygon([(140, 600), (230, 530), (320, 600)], fill=(120, 40, 40))
    tiled = tile_images(img, max_tiles=10, tile_size=448, thumbnail=True)[0]
    rows, cols = tiled.grid
    font, small = ImageFont.load_default(size=22), ImageFont.load_default(size=18)

    src = img.resize((int(w * 0.4), int(h * 0.4)))
    sd = ImageDraw.Draw(src)
    for c in range(1, cols):
        sd.line([(c * src.width / cols, 0), (c * src.width / cols, src.height)], fill="white", width=3)
    for r in range(1, rows):
        sd.line([(0, r * src.height / rows), (src.width, r * src.height / rows)], fill="white", width=3)

    size, gap, pad = 120, 8, 24

    def tile(i: int) -> Image.Image:
        t = tiled.tiles[i].permute(1, 2, 0).clamp(0, 1)
        return Image.fromarray((t * 255).byte().numpy()).resize((size, size))

    grid_w = cols * size + (cols - 1) * gap
    canvas = Image.new("RGB", (pad + src.width + 60 + grid_w + 40 + size + pad,
                               pad + 40 + max(src.height, rows * size + (rows - 1) * gap) + 70), (250, 250, 250))
    cd, top = ImageDraw.Draw(canvas), pad + 40
    cd.text((pad, pad), f"the image, {w} x {h}", fill="black", font=font)
    canvas.paste(src, (pad, top))
    cd.text((pad + src.width + 12, top + src.height // 2 - 14), "->", fill="black", font=font)
    x0 = pad + src.width + 60
    cd.text((x0, pad), f"{cols} x {rows} tiles of 448 px", fill="black", font=font)
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        canvas.paste(tile(i), (x0 + c * (size + gap), top + r * (size + gap)))
        cd.text((x0 + c * (size + gap) + 6, top + r * (size + gap) + 4), str(i + 1), fill="white", font=small)
    if tiled.has_thumbnail:
        xt = x0 + grid_w + 40
        cd.text((xt, pad), "+ thumbnail", fill="black", font=font)
        canvas.paste(tile(tiled.num_tiles - 1), (xt, top))
        cd.text((xt + 6, top + 4), str(tiled.num_tiles), fill="white", font=small)
    cd.text((pad, canvas.height - 46), f"max_tiles = 10, thumbnail on: {tiled.num_tiles} tiles; InternVL3: 256 tokens "
            f"each = {256 * tiled.num_tiles} image tokens", fill="black", font=font)
    canvas.save(out, optimize=True)


# --- ComfyUI and the browser ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_comfyui(comfyui: Path, python: str, base: Path, log: Path) -> tuple[subprocess.Popen, str]:
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / PACK).symlink_to(ROOT, target_is_directory=True)
    settings = base / "user" / "default" / "comfy.settings.json"  # a returning user: no first-run dialog
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


def browser(chromium: str, chromedriver: str, profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(chromedriver))
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**VIEWPORT, "deviceScaleFactor": 1, "mobile": False})
    return driver


def wait_for(driver, script: str, timeout: float = 60):
    end = time.monotonic() + timeout
    while not (value := driver.execute_script(script)):
        if time.monotonic() > end:
            raise TimeoutError(script)
        time.sleep(0.25)
    return value


# Runs in the page: the open help panel's heading, and each picture in it (loaded or not, its
# address and its size on screen).
PANEL_JS = """
const root = document.querySelector('.node-help-content');
if (!root || !root.querySelector('h1')) return null;
const imgs = [...root.querySelectorAll('img')];
return {heading: root.querySelector('h1').textContent.trim(),
        loading: imgs.some((i) => !i.complete),
        images: imgs.map((i) => ({src: i.getAttribute('src'), loaded: i.complete && i.naturalWidth > 0,
                                  natural: [i.naturalWidth, i.naturalHeight],
                                  shown: [Math.round(i.getBoundingClientRect().width),
                                          Math.round(i.getBoundingClientRect().height)]}))};
"""


def open_help(driver, cls: str, title: str, timeout: float = 30, tries: int = 3) -> dict:
    """In the Node Library side panel: search for the node, hover its entry, press its "?"
    (again when the search results were redrawn under the pointer)."""
    from selenium.common.exceptions import StaleElementReferenceException

    for attempt in range(tries):
        try:
            return _open_help(driver, cls, title, timeout)
        except StaleElementReferenceException:
            if attempt == tries - 1:
                raise
            time.sleep(1)


def _open_help(driver, cls: str, title: str, timeout: float) -> dict:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, ".side-bar-panel input, .sidebar-content-container input")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(title)
    end = time.monotonic() + timeout
    while True:
        entries = [e for e in driver.find_elements(By.CSS_SELECTOR, ".node-lib-node-container")
                   if e.is_displayed() and e.text.strip() == title]
        if entries:
            break
        if time.monotonic() > end:
            raise TimeoutError(f"{title!r} not found in the Node Library")
        time.sleep(0.25)
    ActionChains(driver).move_to_element(entries[0]).perform()
    button = entries[0].find_element(By.CSS_SELECTOR, ".help-button")
    ActionChains(driver).move_to_element(button).click().perform()
    end = time.monotonic() + timeout
    while not ((panel := driver.execute_script(PANEL_JS)) and panel["heading"] == title and not panel["loading"]):
        if time.monotonic() > end:
            raise TimeoutError(f"the help page of {cls} did not open: {panel}")
        time.sleep(0.25)
    return panel


def close_help(driver) -> None:
    """The panel's back arrow (top left), which returns to the Node Library."""
    driver.execute_script("""
        const root = document.querySelector('.node-help-content')?.parentElement;
        root?.querySelector('button')?.click();""")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", type=Path,
                    default=Path(os.environ.get("COMFYUI_ROOT", ROOT.parent / "shared" / "comfyui")))
    ap.add_argument("--python", default=os.environ.get("COMFYUI_PYTHON", sys.executable),
                    help="the Python that runs ComfyUI")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "unifusion-help")
    ap.add_argument("--panel-width", type=int, default=700, help="drag the side panel to about this width (px)")
    ap.add_argument("--figures", action="store_true", help="render web/docs/tiling-grid.png and exit")
    args = ap.parse_args()
    if args.figures:
        tiling_figure(ROOT / "web" / "docs" / "tiling-grid.png")
        return
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    args.out.mkdir(parents=True, exist_ok=True)
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_comfyui(args.comfyui.resolve(), args.python, Path(tmp) / "base", args.out / "comfyui.log")
        driver = None
        try:
            driver = browser(args.chromium, args.chromedriver, Path(tmp) / "profile")
            driver.get(url)
            wait_for(driver, "return !!(window.app ?? window.comfyAPI?.app?.app)?.graph")
            time.sleep(3)  # extensions, settings, first draw
            driver.find_element(By.CSS_SELECTOR, ".node-library-tab-button").click()
            wait_for(driver, "return !!document.querySelector('.p-splitter-gutter')")
            # a wider side panel, as a reader would drag it, so the pictures are legible
            gutter = driver.find_element(By.CSS_SELECTOR, ".p-splitter-gutter")
            ActionChains(driver).click_and_hold(gutter).move_by_offset(args.panel_width - 300, 0).release().perform()
            for cls, title in NODES.items():
                report[cls] = open_help(driver, cls, title)
                time.sleep(0.5)  # layout settles after the pictures load
                driver.save_screenshot(str(args.out / f"help-{cls}.png"))
                if report[cls]["images"]:  # and one with the page's first picture in view
                    driver.execute_script("document.querySelector('.node-help-content img')"
                                          ".scrollIntoView({block: 'center'})")
                    time.sleep(0.3)
                    driver.save_screenshot(str(args.out / f"help-{cls}-picture.png"))
                close_help(driver)
        finally:
            if driver is not None:
                driver.quit()
            proc.terminate()
            proc.wait(20)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
