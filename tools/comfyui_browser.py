"""ComfyUI's own frontend in headless Chromium, for the tools that screenshot it
(tools/help_screenshots.py, tools/workflow_screenshots.py): a ComfyUI server on a temporary
--base-directory holding this pack as custom_nodes/unifusion, and a selenium-driven Chromium on it.

Selenium is imported only when a browser starts; the server runs with the given Python (--python).
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
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK = "unifusion"  # the folder name under custom_nodes
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
APP_JS = "return !!(window.app ?? window.comfyAPI?.app?.app)?.graph"  # the frontend's app has a graph


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options every such tool takes: the ComfyUI checkout, its Python, Chromium and its driver."""
    ap.add_argument("--comfyui", type=Path,
                    default=Path(os.environ.get("COMFYUI_ROOT", ROOT.parent / "shared" / "comfyui")))
    ap.add_argument("--python", default=os.environ.get("COMFYUI_PYTHON", sys.executable),
                    help="the Python that runs ComfyUI")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--chromedriver", default="/usr/bin/chromedriver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_comfyui(comfyui: Path, python: str, base: Path, log: Path, pack: Path = ROOT,
                  example_image: bool = False) -> tuple[subprocess.Popen, str]:
    """Start ComfyUI on a free port with `base` as its base directory (`pack` as custom_nodes/unifusion,
    and with `example_image` ComfyUI's input/example.png in its input folder, as on a fresh install);
    return the process and its URL once /system_stats answers."""
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / PACK).symlink_to(pack, target_is_directory=True)
    if example_image:
        (base / "input").mkdir()
        shutil.copy(comfyui / "input" / "example.png", base / "input")
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


def browser(chromium: str, chromedriver: str, profile: Path, viewport: dict[str, int],
            script_timeout: float | None = None):
    """Headless Chromium under selenium whose page viewport is exactly `viewport` ({"width", "height"}),
    whatever the window's frame takes."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--window-size={viewport['width']},{viewport['height']}",
                                  f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(chromedriver))
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**viewport, "deviceScaleFactor": 1, "mobile": False})
    if script_timeout is not None:
        driver.set_script_timeout(script_timeout)
    return driver


def poll(check, timeout: float, error) -> object:
    """Call check() every 0.25 s until it returns something true, and return that; past `timeout`
    seconds raise TimeoutError(error), or TimeoutError(error()) where error is a function."""
    end = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > end:
            raise TimeoutError(error() if callable(error) else error)
        time.sleep(0.25)
    return value


def wait_for(driver, script: str, timeout: float = 60):
    """Run `script` in the page until it returns something true; return that."""
    return poll(lambda: driver.execute_script(script), timeout, script)


@contextmanager
def comfyui_page(args: argparse.Namespace, log: Path, viewport: dict[str, int], pack: Path = ROOT,
                 example_image: bool = False, script_timeout: float | None = None, app_timeout: float = 60):
    """ComfyUI (started from the add_arguments options) and a browser on its page once the app is up;
    yields the driver, and quits both on the way out."""
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_comfyui(args.comfyui.resolve(), args.python, Path(tmp) / "base", log, pack, example_image)
        driver = None
        try:
            driver = browser(args.chromium, args.chromedriver, Path(tmp) / "profile", viewport, script_timeout)
            driver.get(url)
            wait_for(driver, APP_JS, app_timeout)
            time.sleep(3)  # extensions, settings, first draw
            yield driver
        finally:
            if driver is not None:
                driver.quit()
            proc.terminate()
            proc.wait(20)
