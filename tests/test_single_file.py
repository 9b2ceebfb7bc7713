"""One-file LLM / VLM encoders (encoders/single_file.py), as ComfyUI keeps them in models/text_encoders.

Each test builds a tiny model with the family's published settings (head size 128 where the file
cannot tell it), saves it as a Hugging Face folder (the reference), rewrites its weights into
ComfyUI's one-file layout, and checks that the one file loads into the same model: the same
features as the reference model under the same tokenizer, text and images.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny_vlms import CHATML_TEMPLATE, QWEN25VL_TEMPLATE, _chatml_tokenizer, _randomize, _save
from transformers import GenerationConfig

import unifusion_core as uf
from unifusion_core import encoders
from unifusion_core.encoders import VLMEncoder, single_file
from unifusion_core.encoders.gemma3_text import GEMMA_TURNS
from unifusion_core.encoders.qwen3 import QWEN3_EXTRA_TOKENS

COMFY_TOKENIZER = (Path(__file__).resolve().parents[2] / "shared" / "comfyui" / "comfy" / "text_encoders"
                   / "qwen25_tokenizer")
TEXT = dict(hidden_size=256, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
            rms_norm_eps=1e-6)


def reference(path: Path, family: str) -> Path:
    """A tiny model of `family` with the settings single_file assumes, saved as a folder."""
    import transformers

    specials = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = _chatml_tokenizer(specials, QWEN25VL_TEMPLATE if family == "qwen2_5_vl" else CHATML_TEMPLATE)
    if family == "qwen3":
        tok.add_special_tokens({"additional_special_tokens": list(QWEN3_EXTRA_TOKENS)},
                               replace_extra_special_tokens=False)
    ids = dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               tie_word_embeddings=True)
    rope = {"rope_type": "default", "rope_theta": 1_000_000.0}
    if family == "qwen2_5_vl":
        c = tok.convert_tokens_to_ids
        vision = dict(depth=2, hidden_size=160, num_heads=2, intermediate_size=32, patch_size=14, temporal_patch_size=2,
                      spatial_merge_size=2, out_hidden_size=256, window_size=112, fullatt_block_indexes=[])
        config = transformers.Qwen2_5_VLConfig(
            text_config={**TEXT, **ids, "max_position_embeddings": 128000,
                         "rope_parameters": {**rope, "mrope_section": [16, 24, 24]}},
            vision_config=vision, image_token_id=c("<|image_pad|>"), video_token_id=c("<|video_pad|>"),
            vision_start_token_id=c("<|vision_start|>"), vision_end_token_id=c("<|vision_end|>"),
            tie_word_embeddings=True)
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    elif family == "gemma3_text":
        config = transformers.Gemma3TextConfig(
            **TEXT, **ids, head_dim=64, query_pre_attn_scalar=64, sliding_window=1024, max_position_embeddings=131072,
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                             "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}})
        cls = transformers.Gemma3ForCausalLM
    elif family == "qwen3":
        config = transformers.Qwen3Config(**TEXT, **ids, head_dim=64, max_position_embeddings=40960,
                                          rope_parameters=rope)
        cls = transformers.Qwen3ForCausalLM
    else:
        config = transformers.Qwen2Config(**TEXT, **ids, max_position_embeddings=32768, rope_parameters=rope)
        cls = transformers.Qwen2ForCausalLM
    torch.manual_seed(0)
    model = cls(config).eval()
    _randomize(model)
    return _save(model, tok, GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id), path)


def to_comfy(folder: Path, out: Path, lm_head: bool = False, fp8: bool = False, prefix: str = "") -> Path:
    """The folder's weights in ComfyUI's one-file layout: model.layers..., visual..., no config."""
    sd = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(f))
    out_sd = {}
    for k, v in sd.items():
        k = re.sub(r"^model\.language_model\.", "model.", re.sub(r"^model\.visual\.", "visual.", k))
        if k == "lm_head.weight" and not lm_head:
            continue
        if fp8 and v.ndim == 2 and ".layers." in k:
            scale = v.abs().max().float() / 448.0
            out_sd[prefix + k[: -len("weight")] + "scale_weight"] = scale
            v = (v.float() / scale).to(torch.float8_e4m3fn)
        out_sd[prefix + k] = v
    if lm_head and "lm_head.weight" not in sd:  # a tied model saved no head: write it as its own matrix
        embed = "model.language_model.embed_tokens.weight"
        out_sd[prefix + "lm_head.weight"] = sd[embed if embed in sd else "model.embed_tokens.weight"].clone()
    if fp8:
        out_sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    if "model.layers.0.post_feedforward_layernorm.weight" in sd:  # Gemma: ComfyUI keeps the SentencePiece model inside
        out_sd["spiece_model"] = torch.frombuffer(bytearray(b"not read"), dtype=torch.uint8)
    save_file(out_sd, str(out))
    return out


def same_pipeline(encoder: VLMEncoder, folder: Path) -> VLMEncoder:
    """The reference model behind the single-file encoder's own tokenizer and adapter."""
    adapter = encoders.family(encoder.family)
    ref = uf.load_vlm(folder).model
    return VLMEncoder(ref, encoder.tokenizer, adapter(ref, encoder.tokenizer), name="reference")


@pytest.fixture(scope="module")
def qwen25vl(tmp_path_factory) -> Path:
    return reference(tmp_path_factory.mktemp("q25vl") / "ref", "qwen2_5_vl")


def test_qwen25vl_one_file_loads_the_same_model(qwen25vl, tmp_path):
    """ComfyUI's qwen_2.5_vl layout (model.layers..., visual..., no LM head, no config) with the
    tokenizer folder named: sizes read from the shapes, the same features as the reference for
    text and for an image, and a VERIFI rewrite through the tied head."""
    path = to_comfy(qwen25vl, tmp_path / "qwen_2.5_vl_tiny.safetensors")
    enc = uf.load_vlm(path, tokenizer=qwen25vl)
    assert enc.family == "qwen2_5_vl" and enc.name == "qwen_2.5_vl_tiny" and enc.num_layers == 3 and not enc.no_lm_head
    ref = same_pipeline(enc, qwen25vl)
    image = Image.new("RGB", (70, 56), (200, 40, 40))
    for kw in (dict(prompt="a red circle on the left", rewrite=False),
               dict(prompt="make it blue", images=[image], rewrite=False),
               dict(prompt="a red circle", rewrite=True, max_new_tokens=4)):
        a, b = enc.encode(**kw), ref.encode(**kw)
        assert a.sequence_ids == b.sequence_ids  # the same rewrite tokens, too
        # exact for one forward; KV-cached decoding of the rewrite differs in the last bits
        tol = 1e-5 if kw["rewrite"] else 0
        torch.testing.assert_close(a.hidden, b.hidden, rtol=tol, atol=tol)
    assert int(enc.encode("make it blue", images=[image], rewrite=False).is_image.sum()) > 0


def test_fp8_scaled_weights_are_dequantised_with_their_scales(qwen25vl, tmp_path):
    """scaled_fp8 files: each fp8 matrix times its scale_weight, in the load dtype; the features
    then follow the full-precision model within fp8's rounding."""
    path = to_comfy(qwen25vl, tmp_path / "q_fp8_scaled.safetensors", fp8=True,
                    prefix="text_encoders.qwen25_7b.transformer.")
    enc = uf.load_vlm(path, tokenizer=qwen25vl)
    raw = load_file(path)
    key = "text_encoders.qwen25_7b.transformer.model.layers.1.mlp.down_proj."
    want = raw[key + "weight"].float() * raw[key + "scale_weight"]
    got = enc.model.model.language_model.layers[1].mlp.down_proj.weight
    assert raw[key + "weight"].dtype == torch.float8_e4m3fn and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    a = enc.encode("a red circle on the left", rewrite=False).hidden
    b = same_pipeline(enc, qwen25vl).encode("a red circle on the left", rewrite=False).hidden
    assert (a - b).norm() / b.norm() < 0.1


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "gemma3_text"])
def test_text_only_one_file_llms(family, tmp_path):
    """Qwen3 (Z-Image's qwen_3_4b layout: per-head q/k norms give the head size), Qwen2.5 and
    Gemma-3 (sliding and global layers, its tokenizer tensor ignored): the same features as the
    reference; Qwen3's template asks for a direct answer (empty <think>)."""
    folder = reference(tmp_path / "ref", family)
    enc = uf.load_vlm(to_comfy(folder, tmp_path / f"{family}.safetensors"), tokenizer=folder)
    cfg = enc.model.config
    assert enc.family == family and (cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 1)
    a, b = enc.encode("a blue square", rewrite=False), same_pipeline(enc, folder).encode("a blue square", rewrite=False)
    torch.testing.assert_close(a.hidden, b.hidden, rtol=0, atol=0)
    if family == "gemma3_text":
        return
    rendered = enc.tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                 add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n" + ("<think>\n\n</think>\n\n" if family == "qwen3" else ""))


def test_a_file_without_its_lm_head_encodes_but_does_not_rewrite(qwen25vl, tmp_path, monkeypatch):
    """Qwen2.5-VL-7B's head is its own matrix: without lm_head.weight the file still encodes, and
    a rewrite is refused with the reason (instead of generating from the embeddings)."""
    monkeypatch.setattr(encoders.Qwen25VL, "untied_from", 256)  # as if the tiny model were 7B wide
    enc = uf.load_vlm(to_comfy(qwen25vl, tmp_path / "q.safetensors"), tokenizer=qwen25vl)
    assert enc.encode("a red circle", rewrite=False).num_tokens > 0
    for call in (lambda: enc.encode("a red circle", rewrite=True), lambda: enc.rewrite_batch(["a red circle"])):
        with pytest.raises(ValueError, match="has no LM head .* cannot write a VERIFI rewrite; turn rewrite off"):
            call()
    with_head = uf.load_vlm(to_comfy(qwen25vl, tmp_path / "h.safetensors", lm_head=True), tokenizer=qwen25vl)
    assert not with_head.no_lm_head
    assert with_head.encode("a red circle", rewrite=True, max_new_tokens=2).text is not None


def test_what_one_file_cannot_be(qwen25vl, tmp_path, monkeypatch):
    clip = tmp_path / "clip_l.safetensors"
    save_file({"text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(4, 4)}, str(clip))
    with pytest.raises(ValueError, match="not an LLM text encoder"):
        uf.load_vlm(clip)
    llama = tmp_path / "llava_llama3.safetensors"
    save_file({f"model.layers.0.{n}.weight": torch.zeros(4, 4) for n in
               ("self_attn.q_proj", "self_attn.k_proj", "post_attention_layernorm")}, str(llama))
    with pytest.raises(ValueError, match="Llama-style decoder in one file.*Hugging Face folder"):
        uf.load_vlm(llama)
    monkeypatch.setattr(single_file, "TOKENIZER_FOLDERS", {})
    with pytest.raises(ValueError, match="without a tokenizer: name the folder of the model's tokenizer files"):
        uf.load_vlm(to_comfy(qwen25vl, tmp_path / "q.safetensors"))
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        uf.load_vlm(empty)
    wrong = tmp_path / "wrong.safetensors"
    sd = load_file(to_comfy(qwen25vl, tmp_path / "w.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(sd, str(wrong))
    with pytest.raises(ValueError, match="do not fit a qwen2_5_vl model .*up_proj"):
        uf.load_vlm(wrong, tokenizer=qwen25vl)


@pytest.mark.skipif(not COMFY_TOKENIZER.is_dir(), reason="ComfyUI's source is not beside this checkout")
def test_comfyuis_qwen_tokenizer_serves_qwen25vl_and_qwen3():
    """The tokenizer ComfyUI ships for Qwen-Image: our ChatML writes Qwen2.5-VL's image tokens,
    and Qwen3's four extra tokens land on Qwen3's ids (151665-151668)."""

    def layout(family: str) -> single_file.Layout:
        return single_file.Layout(family, {"model.embed_tokens.weight": (151936, 8)}, "", False, False)

    tok = single_file.load_tokenizer(Path("x"), layout("qwen2_5_vl"), COMFY_TOKENIZER)
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 151655
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n"
    q3 = single_file.load_tokenizer(Path("x"), layout("qwen3"), COMFY_TOKENIZER)
    assert [q3.convert_tokens_to_ids(t) for t in QWEN3_EXTRA_TOKENS] == [151665, 151666, 151667, 151668]
    assert q3("<|im_end|><think>")["input_ids"] == [151645, 151667] and len(q3) == 151669  # Qwen3's vocabulary


def test_gemma_turns_put_the_system_prompt_in_the_first_user_turn():
    """The template a Gemma tokenizer folder without one gets (Gemma has no system role)."""
    import jinja2

    render = jinja2.Environment().from_string(GEMMA_TURNS).render
    system = [{"role": "system", "content": "Describe it."}]
    user = [{"role": "user", "content": "a red circle"}]
    assert render(bos_token="<bos>", messages=system + user, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nDescribe it.\n\na red circle<end_of_turn>\n<start_of_turn>model\n")
    assert render(bos_token="<bos>", messages=user, add_generation_prompt=False) == (
        "<bos><start_of_turn>user\na red circle<end_of_turn>\n")


def test_a_tokenizer_beyond_the_files_vocabulary_is_named(tmp_path, monkeypatch):
    """Another model's tokenizer (more tokens than the file's embedding rows): not transformers'
    'Padding_idx must be within num_embeddings', but which folder does not fit the file and what to do."""
    folder = reference(tmp_path / "ref", "qwen2")
    sd = load_file(to_comfy(folder, tmp_path / "q.safetensors"))
    sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"][:100].clone()
    small = tmp_path / "small.safetensors"
    save_file(sd, str(small))
    with pytest.raises(ValueError, match=(
            rf"small.safetensors has embeddings for 100 tokens, but the tokenizer in {re.escape(str(folder))} has "
            r"\d+ tokens \(pad id \d+, eos id \d+\): it is not this model's tokenizer; name the folder of the "
            r"model's tokenizer files \(tokenizer.json")):
        uf.load_vlm(small, tokenizer=folder)
    monkeypatch.setattr(single_file, "TOKENIZER_FOLDERS", {"qwen": folder})
    with pytest.raises(ValueError, match=r"has embeddings for 100 tokens, but the tokenizer in .* \(the default for "
                                         r"Qwen2.5 files\) has"):
        uf.load_vlm(small)


def test_vlm_load_names_each_file_it_does_not_offer(tmp_path, monkeypatch, caplog):
    """Model folders hold files VLM Load cannot use: each is named in the log once, with the reason
    (CLIP / T5 files, ComfyUI's own encoders, only at debug level); the one-file encoder is listed."""
    import nodes

    te = tmp_path / "text_encoders"
    te.mkdir()
    good = to_comfy(reference(tmp_path / "ref", "qwen2"), te / "qwen_tiny.safetensors")
    data = good.read_bytes()
    (te / "empty.safetensors").write_bytes(b"")
    (te / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (te / "page.safetensors").write_bytes(b"<html>404 Not Found</html>" * 4)  # a failed download
    save_file({"text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(2, 2)}, str(te / "clip_l.safetensors"))
    save_file({f"model.layers.0.{n}.weight": torch.zeros(4, 4) for n in
               ("self_attn.q_proj", "self_attn.k_proj", "post_attention_layernorm")}, str(te / "llama3.safetensors"))
    monkeypatch.setattr(nodes.host, "MODELS_DIR", tmp_path)
    monkeypatch.setattr(nodes.host, "_reported", set())
    with caplog.at_level("DEBUG", logger="nodes.host"):
        assert "qwen_tiny.safetensors" in nodes.host.list_vlms()
        nodes.host.list_vlms()  # each file is named once, not at every listing
    records = [r for r in caplog.records if "UniFusion VLM Load does not list" in r.getMessage()]
    reasons = {r.args[0].name: (r.levelname, r.args[1]) for r in records}
    assert len(records) == len(reasons) == 5, [r.getMessage() for r in records]
    assert reasons["empty.safetensors"] == ("INFO", "the file is empty (0 bytes): the download or copy did not "
                                                    "finish; fetch it again")
    for name in ("cut.safetensors", "page.safetensors"):
        level, reason = reasons[name]
        assert level == "INFO" and reason.startswith("not a readable safetensors file ("), reason
        assert reason.endswith("it is truncated or corrupt; copy or download it again"), reason
    assert reasons["clip_l.safetensors"][0] == "DEBUG" and "not an LLM text encoder" in reasons["clip_l.safetensors"][1]
    assert reasons["llama3.safetensors"][0] == "INFO"
    assert "RoPE settings (Llama 3 or 3.1) cannot be read" in reasons["llama3.safetensors"][1]


def test_one_file_encoders_need_transformers_5_and_nothing_else_does(qwen25vl, tmp_path, monkeypatch):
    """On transformers 4.x (which ComfyUI-Manager leaves installed) a one-file encoder is refused with
    what to upgrade and how; a folder loads, and a .gguf file goes on to its conversion."""
    import transformers

    one_file = to_comfy(qwen25vl, tmp_path / "qwen_2.5_vl_tiny.safetensors")
    monkeypatch.setattr(transformers, "__version__", "4.57.0")
    with pytest.raises(ValueError) as refused:
        uf.load_vlm(one_file, tokenizer=qwen25vl)
    assert str(refused.value).startswith("qwen_2.5_vl_tiny.safetensors is a one-file encoder, which needs "
                                         "transformers 5 or newer; this Python has transformers 4.57.0")
    assert '<ComfyUI\'s python> -m pip install -U "transformers>=5"' in str(refused.value)
    assert "restart ComfyUI" in str(refused.value)

    assert uf.load_vlm(qwen25vl).family == "qwen2_5_vl"  # a folder: no floor
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")

    class Reached(Exception):
        pass

    def conversion(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", conversion)
    with pytest.raises(Reached):  # past every check, at transformers' GGUF reader
        uf.load_vlm(gguf, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(transformers, "__version__", "5.0.0")
    single_file.require_transformers_5(one_file, transformers.__version__)  # 5.0.0 passes


def test_the_demo_cli_loads_a_one_file_encoder_with_its_tokenizer_folder(tmp_path):
    """Before: the demo CLI had no way to name a tokenizer, so every one-file --vlm failed outside
    ComfyUI ("name the folder of the model's tokenizer files", with nowhere to name it)."""
    from dataclasses import replace

    from unifusion_core.__main__ import main

    folder = reference(tmp_path / "ref", "qwen2")
    one_file = to_comfy(folder, tmp_path / "qwen_2.5_tiny.safetensors")
    spec = uf.load_vlm(one_file, tokenizer=folder).encoder_spec(layers=3)
    model = uf.UniFusionModel.from_preset("tiny", vlm=spec)
    model.config = replace(model.config, sampling=replace(model.config.sampling, size=(16, 16)))
    uf.save_model(model, tmp_path / "tiny.safetensors")
    args = ["--model", str(tmp_path / "tiny.safetensors"), "--vlm", str(one_file), "--steps", "1", "--no-rewrite",
            "--prompt", "a red circle on the left", "--out", str(tmp_path / "out")]
    with pytest.raises(ValueError, match="without a tokenizer: name the folder"):
        main(args)
    summary = main(args + ["--tokenizer", str(folder)])
    assert summary["conditioning"] == "a red circle on the left" and summary["size"] == [16, 16]
    with pytest.raises(SystemExit, match="--tokenizer is for a one-file .safetensors --vlm; .*leave --tokenizer out"):
        main(["--vlm", str(tmp_path / "other.gguf"), "--tokenizer", str(folder), "--out", str(tmp_path / "out")])
