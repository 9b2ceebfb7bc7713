"""The bundled workflows against the nodes' schemas, in both formats, without ComfyUI."""

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

import unifusion_core as uf
import unifusion_core.scenes  # noqa: F401  (uf.scenes)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import make_workflows as mw  # noqa: E402

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


def test_there_are_four_workflows_each_with_api_form_and_thumbnail():
    assert NAMES == ["unifusion_edit_image", "unifusion_multi_reference", "unifusion_scenes_cpu", "unifusion_text_to_image"]
    for name in NAMES:
        assert (WF / "api" / f"{name}.json").is_file()
        Image.open(WF / f"{name}.jpg").verify()


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
    api = json.loads((WF / "api" / "unifusion_scenes_cpu.json").read_text())
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
    assert (sample["width"], sample["height"]) == s.size, "make_workflows.SCENES_SIZE differs from the checkpoint's size"
    assert (sample["steps"], sample["cfg"]) == (s.steps, s.cfg), "SCENES_STEPS / SCENES_CFG differ from the checkpoint's"
    assert sample["shift"] == 0.0  # the checkpoint's own shift
    assert verifi["rewrite"] == s.rewrite, "SCENES_REWRITE differs from how the checkpoint was trained"
    assert verifi["system_prompt"] == config.encoder.system_prompt
    # VERIFI Rewrite captures the VLM's default layers (every third): the checkpoint must read those.
    assert config.encoder.layers == uf.every_nth_layer(config.encoder.num_layers)
