"""Training data: sources on tiny files, BadSample cases, the resumable task mixture, the latent cache, the VAE."""

import io
import json
import logging
import random
import tarfile

import numpy as np
import pytest
import torch
from damage import flip
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from unifusion_core.config import EncoderSpec
from unifusion_core.features import Features
from unifusion_core.latents import LATENT_SPACES, LatentSpace
from unifusion_core.pixels import to_8bit
from unifusion_core.train.data import BadSample, Sample
from unifusion_core.train.mixture import TaskMixture
from unifusion_core.train.setup import PromptFeatures
from unifusion_core.train.sources import ImageFolder, Manifest, TarShards, expand_shards, load_sources, preprocess
from unifusion_core.train.tasks import PAPER_RATIOS, TASKS, get_task, text_id
from unifusion_core.train.vae import LatentCache, load_vae, to_latent, to_latents


def image(w: int = 24, h: int = 20, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def image_bytes(fmt: str = "PNG", w: int = 24, h: int = 20, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    image(w, h, seed).save(buf, format=fmt)
    return buf.getvalue()


def write(path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)


def truncated(fmt: str) -> bytes:
    data = image_bytes(fmt, 40, 40)
    return data[: len(data) // 2]


# ---------------------------------------------------------------------------------- preprocess


def test_preprocess_resizes_shorter_side_and_center_crops():
    # 40x20: left quarter red, middle half green, right quarter blue -> the center crop is green.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :10, 0], arr[:, 10:30, 1], arr[:, 30:, 2] = 255, 255, 255
    x = preprocess(Image.fromarray(arr), 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1
    assert x[1].mean() > 0.9 and x[0].mean() < 0.1 and x[2].mean() < 0.1
    # An upscaled small image still comes out (3, R, R).
    assert preprocess(image(12, 30), 16).shape == (3, 16, 16)


# ---------------------------------------------------------------------------------- ImageFolder


def test_image_folder(tmp_path):
    write(tmp_path / "b.jpg", image_bytes("JPEG", 32, 24))
    write(tmp_path / "b.txt", " a photo \n")
    write(tmp_path / "sub/a.png", image_bytes("PNG", 20, 30, seed=1))
    write(tmp_path / "sub/a.txt", "a drawing")
    write(tmp_path / "notes.md", "not an image")
    src = ImageFolder(tmp_path, resolution=16)
    assert len(src) == 2 and src.ids == ["b", "sub/a"]
    s = src.get(1)
    assert (s.id, s.task, s.prompt, s.images) == ("sub/a", "t2i", "a drawing", [])
    assert s.target.shape == (3, 16, 16) and s.cond_id == text_id("a drawing")
    assert src.get(0).prompt == "a photo"
    assert load_sources(tmp_path, 16)["t2i"].get(1).id == "sub/a"
    with pytest.raises(ValueError, match="expected an image folder"):
        load_sources(tmp_path / "nothing.csv", 16)


def test_an_image_folder_without_images_says_what_it_expects(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no images in '.*empty' or its subfolders \(it is empty\); expected "
                                         r"\.png/\.jpg/\.jpeg/\.webp files, each with a same-stem \.txt caption "
                                         r"beside it \(cat\.png \+ cat\.txt\)"):
        load_sources(tmp_path / "empty", 16)
    write(tmp_path / "other/a.gif", b"GIF89a")
    write(tmp_path / "other/a.txt", "a caption")
    with pytest.raises(ValueError, match=r"it holds 2 other files, e\.g\. \['a\.gif', 'a\.txt'\]"):
        ImageFolder(tmp_path / "other", 16)
    with pytest.raises(ValueError, match=r"the sources of \['t2i'\] hold no samples but have a ratio > 0: give them "
                                         "data, or set their ratio to 0"):
        TaskMixture({"t2i": Numbers(0)}, {"t2i": 1.0})


def test_image_folder_same_stem_is_refused(tmp_path):
    write(tmp_path / "x.png", image_bytes())
    write(tmp_path / "x.jpg", image_bytes("JPEG"))
    with pytest.raises(ValueError, match="share the id 'x'"):
        ImageFolder(tmp_path, 16)


def test_a_16_bit_grayscale_png_loads_like_its_8_bit_twin(tmp_path):
    """PIL's convert("RGB") clips 16-bit values at 255 (a ramp came out nearly white): images are
    scaled to 8 bits, in every source and in the tiling of reference images."""
    from unifusion_core.tiling import to_pils
    from unifusion_core.train.sources import open_image

    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (64, 1))
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    Image.fromarray((ramp >> 8).astype(np.uint8)).save(tmp_path / "g8.png")
    for name in ("g16", "g8"):
        write(tmp_path / f"{name}.txt", "a grey ramp")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    src = ImageFolder(tmp_path, 64)
    g16, g8 = (src.get(src.ids.index(n)).target for n in ("g16", "g8"))
    assert float((g16 - g8).abs().max()) <= 1 / 255 + 1e-6 and abs(float(g16.mean()) - 0.5) < 0.01
    as_bytes = np.asarray(open_image((tmp_path / "g16.png").read_bytes(), "g16.png"), dtype=int)  # tar members
    tiled = np.asarray(to_pils(str(tmp_path / "g16.png"))[0], dtype=int)
    eight = np.asarray(Image.open(tmp_path / "g8.png").convert("RGB"), dtype=int)
    assert np.abs(as_bytes - eight).max() <= 1 and np.abs(tiled - eight).max() <= 1
    for other in (Image.fromarray(ramp.astype(np.int32)), Image.fromarray(ramp.astype(np.float32) / 65535)):  # I, F
        assert other.mode in ("I", "F") and np.abs(np.asarray(to_8bit(other), dtype=int) - eight[..., 0]).max() <= 1


@pytest.mark.parametrize("case", ["no caption", "empty caption", "truncated png", "truncated jpeg", "too small"])
def test_image_folder_bad_samples(tmp_path, case):
    name = "img.jpg" if case == "truncated jpeg" else "img.png"
    data = {"truncated png": truncated("PNG"), "truncated jpeg": truncated("JPEG"),
            "too small": image_bytes("PNG", 10, 30)}.get(case, image_bytes())
    write(tmp_path / name, data)
    if case != "no caption":
        write(tmp_path / "img.txt", "  \n" if case == "empty caption" else "a caption")
    src = ImageFolder(tmp_path, resolution=16, min_size=12)
    expect = {"no caption": "missing caption", "empty caption": "empty caption", "too small": "smaller than min_size",
              "truncated png": "unreadable or truncated", "truncated jpeg": "unreadable or truncated"}[case]
    with pytest.raises(BadSample, match=expect) as e:
        src.get(0)
    assert "img." in str(e.value)


# ---------------------------------------------------------------------------------- Manifest


def manifest_rows(tmp_path):
    write(tmp_path / "data/cat.png", image_bytes("PNG", 24, 20, 1))
    write(tmp_path / "data/dog.jpg", image_bytes("JPEG", 20, 28, 2))
    write(tmp_path / "data/src1.png", image_bytes("PNG", 18, 18, 3))
    return [
        {"id": "cat-1", "task": "t2i", "image": "data/cat.png", "caption": "a cat"},
        {"task": "reconstruction", "image": str(tmp_path / "data/dog.jpg")},
        {"task": "edit", "image": "data/cat.png", "prompt": "make it a cat",
         "sources": ["data/src1.png", "data/dog.jpg"]},
        {"image": "data/dog.jpg", "prompt": "a dog"},  # task defaults to t2i
    ]


def write_jsonl(path, rows) -> None:
    write(path, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_manifest_jsonl(tmp_path):
    rows = manifest_rows(tmp_path)
    write_jsonl(tmp_path / "m.jsonl", rows)
    m = Manifest(tmp_path / "m.jsonl", resolution=16)
    assert len(m) == 4 and m.tasks() == {"t2i": 2, "reconstruction": 1, "edit": 1}
    t2i, rec, edit, dog = (m.get(i) for i in range(4))
    assert (t2i.id, t2i.task, t2i.prompt, t2i.images) == ("cat-1", "t2i", "a cat", [])
    assert t2i.target.shape == (3, 16, 16)
    assert rec.task == "reconstruction" and rec.prompt == "" and len(rec.images) == 1
    assert rec.images[0].mode == "RGB" and rec.images[0].size == (20, 28) and rec.cond_id == rec.id
    assert edit.prompt == "make it a cat" and [im.size for im in edit.images] == [(18, 18), (20, 28)]
    assert dog.task == "t2i" and dog.id.startswith("m/")
    # Ids without "id" hash the row, not its line: reordering keeps them.
    write_jsonl(tmp_path / "other/m.jsonl", rows[::-1])
    write(tmp_path / "other/data/dog.jpg", image_bytes("JPEG"))
    assert Manifest(tmp_path / "other/m.jsonl", 16).rows[0].id == m.rows[3].id
    split = m.by_task()
    assert {t: len(s) for t, s in split.items()} == m.tasks()
    assert {t: len(s) for t, s in load_sources(tmp_path / "m.jsonl", 16).items()} == m.tasks()
    assert split["edit"].get(0).id == edit.id and split["t2i"].get(1).id == dog.id


def test_manifest_bad_rows(tmp_path):
    rows = manifest_rows(tmp_path)[:1] + [
        '{"task": "t2i", "image": "data/cat.png", "caption": ',  # malformed JSON, line 2
        {"task": "t2i", "image": "data/missing.png", "caption": "x"},
        {"task": "paint", "image": "data/cat.png", "caption": "x"},
        {"task": "t2i", "image": "data/cat.png", "caption": "  "},
        {"task": "edit", "image": "data/cat.png", "prompt": "redder"},
        {"task": "edit", "image": "data/cat.png", "prompt": "redder", "sources": ["data/gone.png"]},
        {"task": "t2i", "image": "data/broken.jpg", "caption": "x"},
    ]
    write(tmp_path / "data/broken.jpg", truncated("JPEG"))
    write_jsonl(tmp_path / "m.jsonl", rows)
    m = Manifest(tmp_path / "m.jsonl", resolution=16)
    assert m.tasks() == {"t2i": 4, "edit": 2}  # malformed and unknown-task rows are in no task
    expect = [None, "m.jsonl line 2: malformed JSON", "missing.png' not found", "unknown task 'paint'",
              "line 5.*empty caption", "line 6.*source images", "gone.png' not found", "broken.jpg.*truncated"]
    for i, pattern in enumerate(expect):
        if pattern is None:
            m.get(i)
            continue
        with pytest.raises(BadSample, match=pattern) as e:
            m.get(i)
        assert "m.jsonl" in str(e.value)


def test_manifest_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow not installed (pip install -c constraints.txt pyarrow)")
    import pyarrow.parquet as pq

    rows = manifest_rows(tmp_path)
    cols = {k: [r.get(k) for r in rows] for k in ("id", "task", "image", "prompt", "caption", "sources")}
    pq.write_table(pa.table(cols), tmp_path / "m.parquet")
    m = Manifest(tmp_path / "m.parquet", resolution=16)
    assert m.tasks() == {"t2i": 2, "reconstruction": 1, "edit": 1}
    assert m.get(0).id == "cat-1" and len(m.get(2).images) == 2 and m.get(3).prompt == "a dog"


# ---------------------------------------------------------------------------------- TarShards


def write_tar(path, members: dict[str, bytes | str]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            data = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_tar_shards(tmp_path):
    write_tar(tmp_path / "s-000.tar", {
        "k1.jpg": image_bytes("JPEG", 24, 20, 1), "k1.txt": "a jpeg",
        "k2.png": image_bytes("PNG", 20, 20, 2), "k2.json": json.dumps({"caption": "a png"}),
        "dir/k3.png": image_bytes("PNG", 20, 20, 3), "dir/k3.src.png": image_bytes("PNG", 16, 16, 4),
        "dir/k3.json": json.dumps({"task": "edit", "prompt": "make it blue", "sources": ["src.png"]}),
        "k4.txt": "no image",
    })
    write_tar(tmp_path / "s-001.tar", {
        "a.webp": image_bytes("WEBP", 20, 20, 5), "a.json": json.dumps({"task": "reconstruction"}),
        "b.png": image_bytes("PNG", 20, 20, 6),                                   # no caption
        "c.png": truncated("PNG"), "c.txt": "x",                                   # truncated
        "d.png": image_bytes("PNG", 20, 20, 7), "d.json": '{"task": "paint", "caption": "x"}',
        "e.png": image_bytes("PNG", 20, 20, 8), "e.txt": " ",                      # empty caption
        "f.png": image_bytes("PNG", 8, 8, 9), "f.txt": "small",                    # too small
    })
    assert expand_shards(str(tmp_path / "s-{000..001}.tar")) == [tmp_path / "s-000.tar", tmp_path / "s-001.tar"]
    src = TarShards(str(tmp_path / "s-*.tar"), resolution=16, min_size=12)
    assert len(src) == 9  # k4 has no image
    assert src.tasks() == {"t2i": 6, "reconstruction": 1, "edit": 1}  # d's task is unknown
    split = load_sources(str(tmp_path / "s-{000..001}.tar"), 16)
    assert split["edit"].get(0).id == "s-000/dir/k3" and split["reconstruction"].get(0).id == "s-001/a"
    by_id = {}
    for i in range(len(src)):
        try:
            s = src.get(i)
            by_id[s.id] = s
        except BadSample as e:
            by_id[src.samples[i][1]] = str(e)
    assert by_id["s-000/k1"].prompt == "a jpeg" and by_id["s-000/k1"].target.shape == (3, 16, 16)
    assert by_id["s-000/k2"].prompt == "a png"
    k3 = by_id["s-000/dir/k3"]
    assert k3.task == "edit" and k3.prompt == "make it blue" and k3.images[0].size == (16, 16)
    a = by_id["s-001/a"]
    assert a.task == "reconstruction" and a.images[0].size == (20, 20)
    for key, pattern in {"b": "s-001.tar:b.png: missing caption", "c": "s-001.tar:c.png: unreadable or truncated",
                         "d": "s-001.tar:d.png: unknown task 'paint'", "e": "s-001.tar:e.png: empty caption",
                         "f": "s-001.tar:f.png.*smaller than min_size"}.items():
        assert isinstance(by_id[key], str), key
        assert __import__("re").search(pattern, by_id[key]), by_id[key]


def test_tar_shards_of_one_name_in_two_folders_get_distinct_ids(tmp_path):
    """train/000.tar and extra/000.tar: a sample's id names its shard by the path below the folder the
    shards share (the stem alone gave both one id, and the id-keyed latent cache paired one's caption
    with the other's latent); the shards of one folder keep their stem; one id twice is refused."""
    for folder, caption, seed in (("train", "a red square", 1), ("extra", "a blue square", 2)):
        (tmp_path / folder).mkdir()
        write_tar(tmp_path / folder / "000.tar", {"0001.png": image_bytes(seed=seed), "0001.txt": caption})
    src = load_sources(str(tmp_path / "*/000.tar"), 16)["t2i"]
    assert src.ids == ["extra/000/0001", "train/000/0001"]
    assert [(s.id, s.prompt) for s in map(src.get, range(2))] == [("extra/000/0001", "a blue square"),
                                                                 ("train/000/0001", "a red square")]
    assert TarShards(str(tmp_path / "train/000.tar"), 16).get(0).id == "000/0001"  # one folder: as before
    with pytest.raises(ValueError, match=r"000\.tar:0001 and .*000\.tar:0001 share the id '000/0001'"):
        TarShards([tmp_path / "train/000.tar", tmp_path / "train/000.tar"], 16)


def test_a_utf8_bom_is_no_part_of_a_caption_or_a_manifest(tmp_path):
    """Notepad's and PowerShell's UTF-8 starts with a byte-order mark: it stayed in the caption (another
    cond_id, a features file's prompt missed) and made a JSONL manifest's first row malformed."""
    read = {}
    for name, encoding in (("plain", "utf-8"), ("bom", "utf-8-sig")):
        d = tmp_path / name
        write(d / "folder/a.png", image_bytes())
        (d / "folder/a.txt").write_text("a red circle", encoding=encoding)
        write(d / "a.png", image_bytes())
        (d / "m.jsonl").write_text(json.dumps({"image": "a.png", "caption": "a red circle"}) + "\n", encoding=encoding)
        row = json.dumps({"caption": "a red circle"})
        write_tar(d / "s.tar", {"k.png": image_bytes(), "k.txt": "a red circle".encode(encoding),
                                "j.png": image_bytes(), "j.json": row.encode(encoding)})
        m = Manifest(d / "m.jsonl", 16)
        assert m.tasks() == {"t2i": 1}, name
        tar = TarShards(str(d / "s.tar"), 16)
        read[name] = [ImageFolder(d / "folder", 16).get(0), m.get(0), tar.get(0), tar.get(1)]
    for plain, bom in zip(read["plain"], read["bom"]):
        assert (bom.prompt, bom.cond_id, bom.id) == (plain.prompt, plain.cond_id, plain.id) == (
            "a red circle", text_id("a red circle"), plain.id)


# ---------------------------------------------------------------------------------- tasks


def test_each_task_is_one_entry_read_by_every_source(tmp_path):
    assert PAPER_RATIOS == {"t2i": 0.85, "reconstruction": 0.05, "edit": 0.10}
    t2i, rec, edit = TASKS["t2i"], TASKS["reconstruction"], TASKS["edit"]
    # what a sample must hold, and what its features depend on
    assert t2i.check(" a cat ", 0) == "a cat" and t2i.cond_id("x", "a cat") == text_id("a cat")
    assert rec.check("ignored", 1) == "" and rec.cond_id("x", "") == "x"
    assert edit.check("redder", 2) == "redder" and edit.cond_id("x", "redder") == "x"
    for task, prompt, n, message in [(t2i, None, 0, "missing caption"), (edit, " ", 1, "empty instruction"),
                                     (edit, "redder", 0, "need one or more source images"),
                                     (rec, None, 0, "need one or more source images"),
                                     (t2i, "a cat", 1, "take no source images")]:
        with pytest.raises(ValueError, match=message):
            task.check(prompt, n)
    with pytest.raises(ValueError, match=r"unknown task 'paint'; expected one of \('t2i', 'reconstruction', 'edit'\)"):
        get_task("paint")
    with pytest.raises(ValueError, match="t2i samples take no images"):
        Sample(id="s", task="t2i", prompt="x", images=[image()])
    # the sources apply the same rules: a reconstruction row is image-only, a t2i row takes no sources
    write(tmp_path / "data/cat.png", image_bytes("PNG", 24, 20, 1))
    write_jsonl(tmp_path / "m.jsonl", [
        {"task": "reconstruction", "image": "data/cat.png", "caption": "a cat"},
        {"task": "t2i", "image": "data/cat.png", "caption": "a cat", "sources": ["data/cat.png"]},
        {"task": "edit", "image": "data/cat.png", "sources": ["data/cat.png"]},
    ])
    m = Manifest(tmp_path / "m.jsonl", 16)
    assert m.get(0).prompt == "" and len(m.get(0).images) == 1
    with pytest.raises(BadSample, match="line 2.*t2i samples take no source images"):
        m.get(1)
    with pytest.raises(BadSample, match="line 3.*missing instruction"):
        m.get(2)
    write_tar(tmp_path / "s.tar", {"a.png": image_bytes("PNG", 20, 20, 2), "a.json": json.dumps({"task": "edit"}),
                                   "a.src.png": image_bytes("PNG", 20, 20, 3)})
    with pytest.raises(BadSample, match="s.tar:a.png: edit samples need one or more source images"):
        TarShards(tmp_path / "s.tar", 16).get(0)


class RecordingVLM:
    """Stands in for the frozen VLM: records what each encode got."""

    def __init__(self, spec):
        self.spec, self.calls = spec, []

    def encode(self, text, images=None, rewrite=False, layers=(), system_prompt=None):
        self.calls.append((text, len(images or [])))
        return Features(torch.zeros(2, len(layers), self.spec.hidden_size), tuple(layers), self.spec, text)


def test_features_follow_the_task():
    """A prompt-only task may read the features file; a task with images is encoded with its images,
    even when its instruction is in the file."""
    spec = EncoderSpec("tiny", "tiny-random", hidden_size=8, num_layers=2, layers=(1, 2))
    table = {p: torch.ones(3, 2, 8) for p in ("a cat", "redder")}
    vlm = RecordingVLM(spec)
    feats = PromptFeatures(spec, (1, 2), vlm=vlm, table=table)
    samples = [Sample("t", "t2i", "a cat", cond_id=text_id("a cat")),
               Sample("e", "edit", "redder", images=[image()]),
               Sample("r", "reconstruction", "", images=[image(), image(seed=1)])]
    out = feats(samples)
    assert torch.equal(out[0].hidden, torch.ones(3, 2, 8))  # from the file
    assert vlm.calls == [("redder", 1), ("", 2)]
    assert out[1].hidden.shape == (2, 2, 8)


def test_prompt_features_kept_in_memory_are_bounded():
    """Each caption's features are kept for reuse up to PromptFeatures.MEMO_BYTES, least recently
    drawn out first and encoded again when drawn; what a call returns never changes."""
    spec = EncoderSpec("tiny", "tiny-random", hidden_size=8, num_layers=2, layers=(1, 2))

    class Numbered(RecordingVLM):
        def encode(self, text, images=None, rewrite=False, layers=(), system_prompt=None):
            self.calls.append((text, 0))
            return Features(torch.full((2, len(layers), 8), float(text[1:])), tuple(layers), self.spec, text)

        def encode_batch(self, texts, rewrite=False, layers=(), system_prompt=None):
            return [self.encode(t, layers=layers) for t in texts]

    vlm = Numbered(spec)
    feats = PromptFeatures(spec, (1, 2), vlm=vlm)
    feats.MEMO_BYTES = 3 * 2 * 2 * 8 * 4  # three captions of (2, 2, 8) fp32
    draws = [[f"p{i}", f"p{i + 1}"] for i in range(6)] + [["p6", "p0"]]
    for prompts in draws:
        out = feats([Sample(p, "t2i", p, cond_id=text_id(p)) for p in prompts])
        assert [float(f.hidden[0, 0, 0]) for f in out] == [float(p[1:]) for p in prompts]
        assert len(feats.memo) <= 3 and feats.memo_bytes <= feats.MEMO_BYTES
    # p1..p6 each encoded once (every draw's second caption is the next one's first), p0 twice: evicted by then
    assert [c[0] for c in vlm.calls] == ["p0", "p1", "p2", "p3", "p4", "p5", "p6", "p0"]
    assert feats.evicted == 5
    # --feature-memory sets the bound; 0 keeps nothing beyond the call
    nothing = PromptFeatures(spec, (1, 2), vlm=vlm, memo_gib=0)
    assert [float(f.hidden[0, 0, 0]) for f in nothing([Sample("p7", "t2i", "p7", cond_id=text_id("p7"))])] == [7.0]
    assert not nothing.memo and nothing.evicted == 1
    with pytest.raises(ValueError, match="--feature-memory must be >= 0 GiB"):
        PromptFeatures(spec, (1, 2), vlm=vlm, memo_gib=-1)


# ---------------------------------------------------------------------------------- TaskMixture


class Numbers:
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def get(self, index: int) -> Sample:
        return Sample(id=str(index), task="t2i", prompt="x")


def mixture(seed: int = 3) -> TaskMixture:
    return TaskMixture({"t2i": Numbers(50), "reconstruction": Numbers(7), "edit": Numbers(11)},
                       {"t2i": 85, "reconstruction": 5, "edit": 10}, seed=seed)


def test_mixture_resume_continues_the_same_sequence():
    m = mixture()
    whole = [m.draw(8) for _ in range(10)]
    first = mixture()
    part = [first.draw(8) for _ in range(4)]
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON
    resumed = mixture()
    resumed.load_state_dict(state)
    part += [resumed.draw(8) for _ in range(6)]
    assert part == whole
    # Grouping does not matter either, and another seed gives another sequence.
    assert mixture().draw(80) == [p for b in whole for p in b]
    assert mixture(seed=4).draw(80) != mixture().draw(80)


def test_mixture_ratios_and_epochs():
    m = mixture()
    pairs = m.draw(20_000)
    counts = {t: sum(1 for p in pairs if p[0] == t) / len(pairs) for t in m.tasks}
    assert counts == pytest.approx({"t2i": 0.85, "reconstruction": 0.05, "edit": 0.10}, abs=0.01)
    rec = [i for t, i in pairs if t == "reconstruction"]
    assert sorted(rec[:7]) == list(range(7)) and sorted(rec[7:14]) == list(range(7)) and rec[:7] != rec[7:14]
    assert m.state_dict()["epochs"]["reconstruction"] == len(rec) // 7


def test_mixture_errors():
    with pytest.raises(ValueError, match=r"ratios given for \['edit'\] but there is no source"):
        TaskMixture({"t2i": Numbers(3)}, {"t2i": 0.9, "edit": 0.1}, seed=0)
    m = TaskMixture({"t2i": Numbers(3), "edit": Numbers(3)}, {"t2i": 2, "edit": 1}, seed=0)
    assert m.ratios == pytest.approx({"t2i": 2 / 3, "edit": 1 / 3})
    other = TaskMixture({"t2i": Numbers(4), "edit": Numbers(3)}, {"t2i": 2, "edit": 1}, seed=0)
    with pytest.raises(ValueError, match=r"source lengths t2i: 4 -> 3"):
        m.load_state_dict(other.state_dict())
    m.load_state_dict(other.state_dict(), strict=False)  # goes on, t2i in a new epoch


# ---------------------------------------------------------------------------------- LatentCache

SPACE = LatentSpace("tiny-vae", channels=4, downscale=2)


def test_latent_cache_is_keyed_by_id(tmp_path):
    ids = [f"img/{i}" for i in range(10)]
    lat = {i: torch.randn(4, 8, 8) for i in ids}
    order = ids[:]
    random.Random(0).shuffle(order)
    with LatentCache(tmp_path, vae="vae-a", space=SPACE, resolution=16, shard_size=3) as cache:
        for i in order:
            cache.put(i, lat[i])
        assert "img/3" in cache and cache.get(order[-1]).equal(lat[order[-1]])  # from the buffer
    assert len(list(tmp_path.glob("shard-*.safetensors"))) == 4 and not list(tmp_path.glob(".tmp*"))
    cache = LatentCache(tmp_path, vae="vae-a", space=SPACE, resolution=16)
    assert len(cache) == 10 and "img/x" not in cache
    for i in reversed(ids):
        assert cache.get(i).equal(lat[i]), i
    with pytest.raises(KeyError, match="img/x"):
        cache.get("img/x")
    with pytest.raises(ValueError, match=r"latent shape \(4, 4, 4\) does not match"):
        cache.put("y", torch.zeros(4, 4, 4))


def test_latent_cache_refuses_another_setup(tmp_path):
    with LatentCache(tmp_path, vae="vae-a", space=SPACE, resolution=16) as cache:
        cache.put("a", torch.zeros(4, 8, 8))
    with pytest.raises(ValueError, match=r"vae: cache has 'vae-a', this run has 'vae-b'.*another folder"):
        LatentCache(tmp_path, vae="vae-b", space=SPACE, resolution=16)
    with pytest.raises(ValueError, match=r"resolution: cache has 16, this run has 32"):
        LatentCache(tmp_path, vae="vae-a", space=SPACE, resolution=32)
    with pytest.raises(ValueError, match=r"space: cache has"):
        LatentCache(tmp_path, vae="vae-a", space=LatentSpace("tiny-vae", 4, 2, scale=0.5), resolution=16)
    # a cache of the format that keyed latents by sample id alone (a replaced image kept its latent)
    meta = json.loads((tmp_path / "cache.json").read_text())
    (tmp_path / "cache.json").write_text(json.dumps({**meta, "format": "unifusion-latent-cache/1"}))
    with pytest.raises(ValueError, match=rf"written by an older version of the trainer .*by sample id alone.*"
                                         rf"Delete {tmp_path} to re-encode"):
        LatentCache(tmp_path, vae="vae-a", space=SPACE, resolution=16)


def test_a_bucketed_latent_cache_keeps_one_latent_a_sample_and_size(tmp_path):
    """With --buckets the cache holds latents of many sizes, each under '<id>#<pixels>@<H>x<W>': to_latents
    encodes what it lacks once (two sizes, one VAE call) and serves it again without the VAE; the
    size a key names is the shape it must have; a square cache and a bucketed one refuse each other."""
    from test_train import save_tiny_vae

    vae = load_vae(save_tiny_vae(tmp_path / "vae"), SPACE)
    g = torch.Generator().manual_seed(0)
    samples = [Sample(id=f"img/{i}", task="t2i", prompt="p", cond_id="p", target=torch.rand(3, h, w, generator=g))
               for i, (h, w) in enumerate([(16, 32), (24, 24), (16, 32)])]
    calls = []
    encode = vae.encode
    vae.encode = lambda x, generator=None: (calls.append(tuple(x.shape)), encode(x, generator=generator))[1]
    cache = LatentCache(tmp_path / "c", vae="vae-a", space=SPACE, resolution=64, buckets=(32,))
    first = [to_latents([s], SPACE, vae, cache) for s in samples]
    assert [z.shape[-2:] for z in first] == [(8, 16), (12, 12), (8, 16)] and len(calls) == 3
    cache.flush()
    again = LatentCache(tmp_path / "c", vae="vae-a", space=SPACE, resolution=64, buckets=(32,))
    keys = [again.key(s.id, s.target) for s in samples]
    assert sorted(again._index) == keys and [k.split("#")[0] + k[-6:] for k in keys] == \
        ["img/0@16x32", "img/1@24x24", "img/2@16x32"]
    for s, z in zip(samples, first):
        assert torch.equal(to_latents([s], SPACE, None, again), z)  # no VAE: all from the cache
    assert len(calls) == 3
    # the same image at another bucket size is another entry, beside the first
    other = Sample(id="img/0", task="t2i", prompt="p", cond_id="p", target=torch.rand(3, 32, 16, generator=g))
    z = to_latents([other], SPACE, vae, again)
    assert z.shape[-2:] == (16, 8) and len(calls) == 4
    assert again.key(other.id, other.target).endswith("@32x16")
    assert torch.equal(again.get(again.key(other.id, other.target)), z[0])
    assert torch.equal(again.get(keys[0]), first[0][0])
    with pytest.raises(ValueError, match=r"latent shape \(4, 8, 8\) does not match the cache's \(4, 8, 16\)"):
        again.put("img/9#0@16x32", torch.zeros(4, 8, 8))
    with pytest.raises(ValueError, match=r"resolution: cache has None, this run has 64"):
        LatentCache(tmp_path / "c", vae="vae-a", space=SPACE, resolution=64)
    # the trainer's wiring: --vae, --latent-cache and --buckets give a bucketed cache
    from types import SimpleNamespace

    from unifusion_core.train.setup import make_latents

    args = SimpleNamespace(vae=str(tmp_path / "vae"), latent_cache=str(tmp_path / "run-cache"), buckets="32,64",
                           resolution=64)
    latents = make_latents(args, SPACE, seed=0)
    assert latents(samples[:1], None).shape == first[0].shape  # (encoded anew: the posterior is sampled)
    latents.close()  # what the trainer calls at the end of a run
    run_cache = LatentCache(tmp_path / "run-cache", vae=latents.vae.identity, space=SPACE, resolution=64,
                            buckets=(32, 64))
    assert list(run_cache._index) == keys[:1]


def _run_latents(tmp_path, cache: str | None = "cache"):
    """The trainer's latents (setup.make_latents) with a tiny VAE and, unless None, --latent-cache tmp_path/cache."""
    from types import SimpleNamespace

    from test_train import save_tiny_vae

    from unifusion_core.train.setup import make_latents

    vae = tmp_path / "vae"
    if not vae.is_dir():
        save_tiny_vae(vae)
    return make_latents(SimpleNamespace(vae=str(vae), latent_cache=cache and str(tmp_path / cache), buckets=None,
                                        resolution=16), SPACE, seed=0)


def test_a_replaced_image_is_encoded_again_not_served_from_the_latent_cache(tmp_path):
    """0001.png (red) is cached, then replaced by a blue image of the same name. Before, the cache
    (keyed by sample id alone) served the red image's latent with the blue image's caption."""
    from unifusion_core.train.vae import posterior_generators

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (16, 16), "red").save(data / "0001.png")
    (data / "0001.txt").write_text("a red square")
    red = ImageFolder(data, 16).get(0)
    latents = _run_latents(tmp_path)
    z_red = latents([red], None)
    latents.close()  # the run ends
    Image.new("RGB", (16, 16), "blue").save(data / "0001.png")
    (data / "0001.txt").write_text("a blue square")
    blue = ImageFolder(data, 16).get(0)
    assert blue.id == red.id
    latents = _run_latents(tmp_path)  # the next run, with the same cache
    encoded = []
    encode = latents.vae.encode
    latents.vae.encode = lambda x, **kw: encoded.append(len(x)) or encode(x, **kw)
    z_blue = latents([blue], None)
    assert encoded == [1] and (z_blue - z_red).abs().max() > 0.1
    assert torch.equal(z_blue, encode(blue.target[None], generator=posterior_generators(0, [blue.id])))
    assert torch.equal(latents([red], None), z_red) and encoded == [1]  # the red image's latent is still there
    latents.close()
    cache = LatentCache(tmp_path / "cache", latents.vae.identity, SPACE, 16)
    assert len(cache) == 2 and torch.equal(to_latent(blue, SPACE, cache=cache), z_blue[0])  # no VAE


def test_a_cached_latent_is_the_same_whichever_step_row_or_rank_encodes_it(tmp_path):
    """With --latent-cache 2 processes train what 1 does: in a later epoch a sample can land on the
    other rank, whose cache lacks it, at another step and row. Before, that rank drew another
    posterior sample (the generators of its step and row). Without a cache each draw stays the
    step's and row's (a fresh posterior sample each time)."""
    from unifusion_core.train.loop import POSTERIOR, row_generators

    g = torch.Generator().manual_seed(0)
    samples = [Sample(id=f"img/{i}", task="t2i", prompt="p", target=torch.rand(3, 16, 16, generator=g))
               for i in range(3)]
    rank0, rank1 = _run_latents(tmp_path), _run_latents(tmp_path)  # one folder, each rank its own LatentCache
    z0 = rank0(samples, row_generators(0, 0, range(3), POSTERIOR))  # step 0, rows 0-2 on rank 0
    z1 = torch.cat([rank1([s], row_generators(0, 5, range(j + 2, j + 3), POSTERIOR))  # step 5, rows 2-4 on rank 1
                    for j, s in enumerate(samples)])
    torch.testing.assert_close(z1, z0, rtol=1e-5, atol=1e-5)  # float rounding: batches of 1 and of 3
    uncached = _run_latents(tmp_path, cache=None)
    a, b, a2 = (uncached(samples[:1], row_generators(0, step, range(1), POSTERIOR)) for step in (0, 5, 0))
    assert (a - b).abs().max() > 0.1 and torch.equal(a, a2)


VAE_LOG = "unifusion_core.train.vae"


def test_a_damaged_latent_shard_is_refused_with_its_path(tmp_path, caplog):
    """Before: a damaged latent was read back as it was, without a word."""
    lat = {i: torch.randn(4, 8, 8) for i in "abc"}
    with LatentCache(tmp_path, vae="vae-a", space=SPACE, resolution=16, shard_size=3) as cache:
        for i, z in lat.items():
            cache.put(i, z)
    (shard,) = tmp_path.glob("shard-*.safetensors")
    with caplog.at_level(logging.WARNING, logger=VAE_LOG):  # an undamaged cache loads silently
        cache = LatentCache(tmp_path, vae="vae-a", space=SPACE, resolution=16)
        assert all(cache.get(i).equal(z) for i, z in lat.items())
    assert not caplog.records

    flip(shard, "b")
    cache = LatentCache(tmp_path, vae="vae-a", space=SPACE, resolution=16)
    assert cache.get("a").equal(lat["a"])  # its own bytes are intact
    with caplog.at_level(logging.WARNING, logger=VAE_LOG):
        with pytest.raises(ValueError, match=rf"the latent of 'b' in {shard} does not match the checksum written "
                                             rf"with it .*set aside as damaged-{shard.name}: to_latents with the VAE"):
            cache.get("b")
    assert f"set aside as damaged-{shard.name}, its 3 latents are encoded again when next drawn" in caplog.text
    assert (tmp_path / f"damaged-{shard.name}").is_file() and not shard.exists()
    assert "a" not in cache and len(cache) == 0
    assert len(LatentCache(tmp_path, vae="vae-a", space=SPACE, resolution=16)) == 0  # a damaged shard is not read


def test_a_damaged_latent_is_refused_by_to_latents_without_a_vae(tmp_path):
    s = Sample(id="a", task="t2i", prompt="x", target=torch.rand(3, 16, 16))
    with LatentCache(tmp_path, vae="vae-a", space=SPACE, resolution=16) as cache:
        cache.put(cache.key(s.id, s.target), torch.randn(4, 8, 8))
    flip(next(tmp_path.glob("shard-*")), cache.key(s.id, s.target), n=2)
    with pytest.raises(ValueError, match=r"the latent of 'a#[0-9a-f]{16}' in .*shard-.* does not match the checksum"):
        to_latent(s, SPACE, cache=LatentCache(tmp_path, vae="vae-a", space=SPACE, resolution=16))


def test_an_old_or_unreadable_latent_shard_is_read_with_a_warning(tmp_path, caplog):
    with LatentCache(tmp_path, vae="vae-a", space=SPACE, resolution=16) as cache:
        cache.put("a", torch.randn(4, 8, 8))
    shard = next(tmp_path.glob("shard-*"))
    with safe_open(str(shard), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    del meta["checksums"]  # as an older version wrote it
    save_file(tensors, str(shard), metadata=meta)
    (tmp_path / "shard-truncated.safetensors").write_bytes(shard.read_bytes()[:40])
    with caplog.at_level(logging.WARNING, logger=VAE_LOG):
        cache = LatentCache(tmp_path, vae="vae-a", space=SPACE, resolution=16)
    assert f"{shard.name} was written without checksums (an older version), so damage to it cannot be found" \
        in caplog.text
    assert "skipping unreadable shard shard-truncated.safetensors" in caplog.text
    assert cache.get("a").equal(tensors["a"])


def test_pixel_latent_needs_no_vae():
    s = Sample(id="p", task="t2i", prompt="x", target=torch.rand(3, 8, 8))
    assert to_latent(s, "pixel").equal(s.target * 2 - 1)
    with pytest.raises(ValueError, match="'flux' needs a VAE"):
        to_latent(s, "flux")


# ---------------------------------------------------------------------------------- VAE


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    diffusers = pytest.importorskip(
        "diffusers", reason="diffusers is not installed: pip install -c constraints.txt -r requirements-train.txt")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=16)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path


def test_vae_encodes_to_the_latent_space(tiny_vae_dir, tmp_path):
    vae = load_vae(tiny_vae_dir, SPACE)
    x = torch.rand(2, 3, 16, 16)
    z = vae.encode(x)
    assert z.shape == (2, 4, 8, 8) and z.dtype == torch.float32
    assert vae.encode(x, sample=False).equal(vae.encode(x, sample=False))  # the mean is deterministic
    # Samples go through the cache by id and pixels; a second pass needs no VAE.
    samples = [Sample(id=f"s{i}", task="t2i", prompt="x", target=torch.rand(3, 16, 16)) for i in range(3)]
    cache = LatentCache(tmp_path / "cache", vae=vae.identity, space=SPACE, resolution=16)
    z1 = to_latents(samples, SPACE, vae=vae, cache=cache)
    cache.flush()
    assert z1.shape == (3, 4, 8, 8) and all(cache.key(s.id, s.target) in cache for s in samples)
    z2 = to_latents(samples[::-1], SPACE, cache=LatentCache(tmp_path / "cache", vae.identity, SPACE, 16))
    assert z2.equal(z1.flip(0))


def test_a_damaged_latent_shard_is_encoded_again_by_to_latents(tiny_vae_dir, tmp_path, caplog):
    """What the trainer does (setup.make_latents: to_latents with the VAE and the cache): the latents of
    a damaged shard are encoded again and written to a new shard, the damaged one set aside."""
    vae = load_vae(tiny_vae_dir, SPACE)
    samples = [Sample(id=f"s{i}", task="t2i", prompt="x", target=torch.rand(3, 16, 16)) for i in range(3)]
    with LatentCache(tmp_path, vae.identity, SPACE, 16) as cache:
        z1 = to_latents(samples, SPACE, vae=vae, cache=cache, generators=[torch.Generator().manual_seed(i)
                                                                            for i in range(3)])
    (shard,) = tmp_path.glob("shard-*.safetensors")
    k0, k1 = (cache.key(s.id, s.target) for s in samples[:2])
    flip(shard, k1)
    encoded = []
    encode = vae.encode
    vae.encode = lambda images, **kw: encoded.append(len(images)) or encode(images, **kw)
    with caplog.at_level(logging.WARNING, logger=VAE_LOG):
        with LatentCache(tmp_path, vae.identity, SPACE, 16) as cache:
            z2 = to_latents(samples, SPACE, vae=vae, cache=cache, generators=[torch.Generator().manual_seed(i)
                                                                                for i in range(3)])
    assert encoded == [2]  # s0 read (its bytes intact) before s1 was found damaged; s1 and s2 encoded again
    assert f"the latent of '{k1}' in {shard} does not match the checksum written with it" in caplog.text
    assert z2.equal(z1)  # the same generators draw the same posterior samples
    assert (tmp_path / f"damaged-{shard.name}").is_file() and not shard.exists()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=VAE_LOG):
        cache = LatentCache(tmp_path, vae.identity, SPACE, 16)
        assert to_latents(samples[1:], SPACE, cache=cache).equal(z1[1:])  # from the new shard, no VAE
    assert not caplog.records and k0 not in cache  # s0 is encoded again when next drawn


def test_vae_posterior_sample_per_row_is_independent_of_the_batch(tiny_vae_dir):
    """With one generator an image (what the trainer passes), an image's posterior sample is the
    same whether it is encoded alone or beside others (so it does not depend on how many
    processes share the batch), and it is a real sample: mean + std * noise, not the mean."""
    vae = load_vae(tiny_vae_dir, SPACE)
    x = torch.rand(3, 3, 16, 16)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    together = vae.encode(x, generator=gens([1, 2, 3]))
    alone = torch.cat([vae.encode(x[i : i + 1], generator=gens([s])) for i, s in enumerate([1, 2, 3])])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(together, vae.encode(x, sample=False), atol=1e-6)
    assert torch.equal(vae.encode(x, generator=gens([1, 2, 3])), together)
    with pytest.raises(ValueError, match="2 generators for 3 images"):
        vae.encode(x, generator=gens([1, 2]))
    samples = [Sample(id=f"s{i}", task="t2i", prompt="x", target=x[i]) for i in range(3)]
    torch.testing.assert_close(to_latents(samples[1:], SPACE, vae=vae, generators=gens([2, 3])), together[1:],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_vae_mismatch_and_single_file(tiny_vae_dir, tmp_path):
    with pytest.raises(ValueError, match=r"4-channel latents at 1/2 scale.*channels=16, downscale=8"):
        load_vae(tiny_vae_dir, LATENT_SPACES["flux"])
    from safetensors.torch import load_file, save_file

    single = tmp_path / "tiny.safetensors"
    save_file(load_file(tiny_vae_dir / "diffusion_pytorch_model.safetensors"), single)
    a = load_vae(tiny_vae_dir, SPACE)
    assert load_vae(single, SPACE, config=tiny_vae_dir).identity == a.identity
    with pytest.raises(ValueError, match="without downloading.*Use the folder form"):
        load_vae(single, SPACE)
