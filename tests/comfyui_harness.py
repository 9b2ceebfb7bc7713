"""A real, headless ComfyUI with this pack and tiny models: what tests/test_comfyui.py and
tools/soak_comfyui.py share. HTTP and the websocket through the standard library only.

The server runs with a temporary --base-directory holding tiny models (and files that are not
valid models, for the error paths), ComfyUI's example image and this repository as
custom_nodes/unifusion.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import tiny_vlms
import torch
from conftest import randomize
from PIL import Image

import unifusion_core as uf

ROOT = Path(__file__).resolve().parents[1]
WF = ROOT / "workflows"
PACK = "unifusion"  # the folder name under custom_nodes
OUR_NODES = {
    "UniFusionVLMLoad", "UniFusionTileImages", "UniFusionVERIFIRewrite",
    "UniFusionModelLoad", "UniFusionLAPEncode", "UniFusionSample", "UniFusionSceneRender", "UniFusionLoRALoader",
}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
IMAGES = {"example.png": (64, 48)}  # the bundled workflows load only ComfyUI's example image
SIZE = (32, 24)  # width, height of the generated images
READY_TIMEOUT = 60
RUN_TIMEOUT = 60
SCENES_TIMEOUT = 300  # the bundled workflow loads the real SmolLM2 GGUF


# --- the server -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_image(path: Path, size: tuple[int, int], seed: int) -> None:
    w, h = size
    rng = random.Random(seed)
    Image.frombytes("RGB", (w, h), rng.randbytes(w * h * 3)).save(path)


def build_base(base: Path, work: Path) -> None:
    models = base / "models"
    vlm_path = tiny_vlms.make_tiny_internvl(models / "text_encoders" / "tiny-internvl")
    (models / "unifusion").mkdir(parents=True)
    torch.manual_seed(0)
    # Random weights everywhere (not zero-init) so that the images depend on the conditioning.
    model = randomize(uf.UniFusionModel.from_preset("tiny", vlm=uf.load_vlm(vlm_path)), std=0.1)
    assert model.config.latent.name == "pixel"
    uf.save_model(model, models / "unifusion" / "tiny.safetensors")
    # A LoRA of it in ComfyUI's loras folder: the tiny stand-in for the bundled workflows' LoRA.
    uf.lora.add_lora(model, uf.lora.LoRAConfig(2), seed=0)
    with torch.no_grad():
        for lin in uf.lora.adapted(model).values():
            lin.lora_up.normal_(std=0.05)  # not zero: it changes the image
    uf.lora.save_lora(model, models / "loras" / TINY_LORA, base="tiny.safetensors")
    # A checkpoint trained against another encoder (a text-only Qwen2, kept outside the model
    # folders): LAP Encode must refuse tiny-internvl's features with it.
    other = randomize(
        uf.UniFusionModel.from_preset("tiny", vlm=uf.load_vlm(tiny_vlms.make_tiny_causal_lm(work / "tiny-qwen2"))),
        std=0.1)
    uf.save_model(other, models / "unifusion" / "tiny-qwen2.safetensors")
    write_one_file_encoder(models, Path(os.environ["COMFYUI_ROOT"]))
    write_bad_files(models, work)
    (base / "input").mkdir()
    for seed, (name, size) in enumerate(IMAGES.items()):
        write_image(base / "input" / name, size, seed)
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK).symlink_to(ROOT, target_is_directory=True)


ONE_FILE_VLM = "qwen_tiny_vocab.safetensors"
TINY_LORA = "tiny-lora.safetensors"  # in models/loras


def write_one_file_encoder(models: Path, comfyui_root: Path) -> None:
    """A Qwen2.5-style LLM text encoder as ComfyUI keeps them (one file, bf16, no LM head, no
    tokenizer) over the full Qwen vocabulary, so that ComfyUI's own Qwen tokenizer serves it; and
    a tiny UniFusion checkpoint trained against it."""
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=151669, hidden_size=128, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=1, num_key_value_heads=1, tie_word_embeddings=True)
    lm = Qwen2ForCausalLM(config)
    path = models / "text_encoders" / ONE_FILE_VLM
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in lm.state_dict().items() if k != "lm_head.weight"},
              str(path))
    vlm = uf.load_vlm(path, tokenizer=comfyui_root / "comfy" / "text_encoders" / "qwen25_tokenizer")
    model = randomize(uf.UniFusionModel.from_preset("tiny", vlm=vlm), std=0.1)
    uf.save_model(model, models / "unifusion" / "tiny-qwen-file.safetensors")


def write_bad_files(models: Path, work: Path) -> None:
    """Files a user may have in the model folders that cannot be loaded, each listed by ComfyUI and
    refused with a message when chosen: a cut checkpoint, a checkpoint with NaN weights, a VLM
    folder without tokenizer files, an empty and a corrupt GGUF."""
    good = (models / "unifusion" / "tiny.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    (models / "unifusion" / "truncated.safetensors").write_bytes(good[: 8 + n + (len(good) - 8 - n) // 2])
    broken = uf.load_model(models / "unifusion" / "tiny.safetensors")
    with torch.no_grad():
        next(broken.parameters()).view(-1)[0] = float("nan")
    uf.save_model(broken, models / "unifusion" / "nan-weights.safetensors")
    folder = models / "text_encoders" / "no-tokenizer"
    folder.mkdir(parents=True)
    for f in (models / "text_encoders" / "tiny-internvl").iterdir():
        if f.is_file() and not f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            (folder / f.name).write_bytes(f.read_bytes())
    (models / "LLM").mkdir(parents=True, exist_ok=True)
    (models / "LLM" / "empty.gguf").write_bytes(b"")
    (models / "LLM" / "corrupt.gguf").write_bytes(b"GGUF" + random.Random(0).randbytes(200))


BAD_VLMS = ["corrupt.gguf", "empty.gguf", "no-tokenizer"]
BAD_MODELS = ["nan-weights.safetensors", "truncated.safetensors"]


class Server:
    def __init__(self, base: Path, log: Path, comfyui_root: str, python: str | None = None, args: tuple = ()):
        self.base, self.log_path, self.port = base, log, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [python or sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--disable-api-nodes", "--base-directory", str(base),
               "--database-url", "sqlite:///:memory:", *args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(cmd, cwd=comfyui_root, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode}; log tail:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=2):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.25)
        raise RuntimeError(f"ComfyUI not ready after {timeout} s; log tail:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()

    # --- HTTP ---

    def get(self, path: str, raw: bool = False):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            body = r.read()
        return body if raw else json.loads(body)

    def post(self, path: str, data) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                body, status = r.read(), r.status
        except urllib.error.HTTPError as e:
            body, status = e.read(), e.code
        return status, (json.loads(body) if body.strip() else {})

    def queue(self, prompt: dict, client_id: str = "unifusion-tests") -> str:
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": client_id})
        assert status == 200, f"/prompt answered {status}: {json.dumps(body)[:2000]}"
        assert not body.get("node_errors"), body
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = RUN_TIMEOUT) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            assert self.proc.poll() is None, f"ComfyUI died; log tail:\n{self.log_tail()}"
            time.sleep(0.1)
        raise AssertionError(f"prompt {prompt_id} not done after {timeout} s; log tail:\n{self.log_tail()}")

    def run(self, prompt: dict) -> dict:
        return self.wait(self.queue(prompt))


# --- helpers ----------------------------------------------------------------------------------------


def messages(entry: dict) -> dict:
    return {event: data for event, data in entry["status"].get("messages", [])}


def assert_success(server: Server, entry: dict) -> None:
    assert entry["status"]["status_str"] == "success", (
        json.dumps(messages(entry).get("execution_error", entry["status"]), indent=1)[:4000]
        + "\n" + server.log_tail(30)
    )


def tiny_prompt(name: str, **sample) -> dict:
    """An API workflow of the pack with the tiny models, small sizes and few tokens."""
    prompt = json.loads((WF / "api" / f"{name}.json").read_text())
    for node in prompt.values():
        inputs = node["inputs"]
        replace = {"vlm_name": "tiny-internvl", "model_name": "tiny.safetensors", "vae_name": "pixel_space",
                   "lora_name": TINY_LORA, "max_new_tokens": 8, "max_tiles": 2, "steps": 2}
        for key, value in replace.items():
            if key in inputs:
                inputs[key] = value
        if node["class_type"] == "UniFusionVERIFIRewrite":
            inputs["system_prompt"] = "Describe the image to make."  # the tiny VLM's context is 512 tokens
            # Greedy, the random tiny VLM writes only newlines (an empty rewrite); seeded sampling
            # writes words.
            inputs["sample"] = True
        if node["class_type"] == "UniFusionSample":
            inputs["width"], inputs["height"] = SIZE
            inputs.update(sample)
    return prompt


def node_id(prompt: dict, class_type: str) -> str:
    (found,) = [i for i, n in prompt.items() if n["class_type"] == class_type]
    return found


def saved_images(server: Server, entry: dict) -> list[Image.Image]:
    images = []
    for out in entry["outputs"].values():
        for ref in out.get("images", []):
            if ref.get("type") != "output":
                continue
            query = urllib.parse.urlencode(
                {"filename": ref["filename"], "subfolder": ref.get("subfolder", ""), "type": "output"})
            data = server.get(f"/view?{query}", raw=True)
            assert data.startswith(b"\x89PNG\r\n\x1a\n"), ref
            img = Image.open(io.BytesIO(data))
            img.load()
            images.append(img)
    return images


def widget_count(spec: dict) -> int:
    """How many widgets_values the canvas saves for a node of this /object_info schema."""
    n = 0
    for section in ("required", "optional"):
        for kind, *opts in spec["input"].get(section, {}).values():
            opts = opts[0] if opts else {}
            if not (isinstance(kind, list) or kind in WIDGET_TYPES) or opts.get("forceInput"):
                continue  # a socket
            n += 1
            n += bool(opts.get("control_after_generate"))  # "fixed" / "randomize" / ...
            n += bool(opts.get("image_upload"))  # LoadImage's "upload" button value
    return n




# --- the websocket ----------------------------------------------------------------------------------


class Events:
    """ComfyUI's websocket for one client id (RFC 6455, client side, text frames as JSON; binary
    frames such as previews are counted and kept in `frames`, raw)."""

    def __init__(self, server: Server, client_id: str):
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        self.binary = 0
        self.frames: list[bytes] = []

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("the websocket closed")
            data += chunk
        return data

    def next(self) -> dict | None:
        """The next JSON event; None for a binary frame."""
        b0, b1 = self._exact(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack(">H", self._exact(2))
        elif n == 127:
            (n,) = struct.unpack(">Q", self._exact(8))
        payload = self._exact(n)  # frames from the server are not masked
        if b0 & 0x0F == 0x1:
            return json.loads(payload)
        self.binary += 1
        self.frames.append(payload)
        return None

    def until(self, done, timeout: float = 60) -> list[dict]:
        """Events up to and including the first for which done(event) is true."""
        seen, end = [], time.monotonic() + timeout
        while time.monotonic() < end:
            event = self.next()
            if event is not None:
                seen.append(event)
                if done(event):
                    return seen
        raise AssertionError(f"no final event after {timeout} s; saw {[e['type'] for e in seen][-20:]}")

    def close(self) -> None:
        self.sock.close()
