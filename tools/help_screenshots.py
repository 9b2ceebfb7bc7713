"""Open each UniFusion node's help page in ComfyUI's own frontend, in headless Chromium, and
screenshot it: the page as the node docs panel renders it, pictures included.

    python tools/help_screenshots.py --out /tmp/help        # help-<node id>.png per node

Needs a ComfyUI checkout (--comfyui, default $COMFYUI_ROOT or ../shared/comfyui), selenium
(`pip install selenium`, beside the pack's requirements: the script imports the pack's nodes for
their names; it starts ComfyUI with --python), Chromium and its driver (Debian:
`apt-get install chromium chromium-driver`). A tool for people, not a test:
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
import sys
import tempfile
import time
from pathlib import Path

from comfyui_browser import ROOT, add_arguments, comfyui_page, poll, wait_for

sys.path.insert(0, str(ROOT))

import nodes  # the pack's nodes, imported without ComfyUI: their ids and display names

VIEWPORT = {"width": 1600, "height": 1000}


# --- the figure -----------------------------------------------------------------------------------


def tiling_figure(out: Path) -> None:
    """A drawn 1200 x 800 landscape, cut by unifusion_core.tiling as VERIFI Rewrite cuts it for
    InternVL3 (448-px tiles, max_tiles 10, thumbnail on): the grid over the image, the tiles and
    the thumbnail, and the token count."""
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


# --- the help panel -------------------------------------------------------------------------------


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
    entries = poll(lambda: [e for e in driver.find_elements(By.CSS_SELECTOR, ".node-lib-node-container")
                            if e.is_displayed() and e.text.strip() == title],
                   timeout, f"{title!r} not found in the Node Library")
    ActionChains(driver).move_to_element(entries[0]).perform()
    button = entries[0].find_element(By.CSS_SELECTOR, ".help-button")
    ActionChains(driver).move_to_element(button).click().perform()
    panel = None

    def opened():
        nonlocal panel
        panel = driver.execute_script(PANEL_JS)
        return panel and panel["heading"] == title and not panel["loading"]

    poll(opened, timeout, lambda: f"the help page of {cls} did not open: {panel}")
    return panel


def close_help(driver) -> None:
    """The panel's back arrow (top left), which returns to the Node Library."""
    driver.execute_script("""
        const root = document.querySelector('.node-help-content')?.parentElement;
        root?.querySelector('button')?.click();""")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(ap)
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
    with comfyui_page(args, args.out / "comfyui.log", VIEWPORT) as driver:
        driver.find_element(By.CSS_SELECTOR, ".node-library-tab-button").click()
        wait_for(driver, "return !!document.querySelector('.p-splitter-gutter')")
        # a wider side panel, as a reader would drag it, so the pictures are legible
        gutter = driver.find_element(By.CSS_SELECTOR, ".p-splitter-gutter")
        ActionChains(driver).click_and_hold(gutter).move_by_offset(args.panel_width - 300, 0).release().perform()
        for cls, title in nodes.NODE_DISPLAY_NAME_MAPPINGS.items():
            report[cls] = open_help(driver, cls, title)
            time.sleep(0.5)  # layout settles after the pictures load
            driver.save_screenshot(str(args.out / f"help-{cls}.png"))
            if report[cls]["images"]:  # and one with the page's first picture in view
                driver.execute_script("document.querySelector('.node-help-content img')"
                                      ".scrollIntoView({block: 'center'})")
                time.sleep(0.3)
                driver.save_screenshot(str(args.out / f"help-{cls}-picture.png"))
            close_help(driver)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
