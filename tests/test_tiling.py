import numpy as np
import pytest
import torch
from PIL import Image

from unifusion_core.tiling import TiledImage, closest_grid, tile_images


def rand_pixels(w: int, h: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)  # (H, W, 3)


def to_comfy(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).float()[None] / 255  # (1, H, W, 3)


def pil_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255  # (3, H, W)


@pytest.mark.parametrize(
    "size, max_tiles, grid, n",
    [
        ((448, 448), 10, (1, 1), 1),  # one tile, no thumbnail
        ((896, 448), 10, (1, 2), 3),  # wide: 2 tiles + thumbnail
        ((4000, 500), 10, (1, 8), 9),  # very wide
        ((4000, 500), 6, (1, 6), 7),  # max_tiles limits the grid
        ((448, 1344), 10, (3, 1), 4),  # tall
        ((300, 1200), 10, (4, 1), 5),  # tall 1:4
        ((4000, 500), 1, (1, 1), 1),  # max_tiles=1: exactly one tile, no thumbnail
        ((1000, 1000), 10, (3, 3), 10),  # square and large: 3x3 (4x4 would exceed 10 tiles)
        ((1000, 1000), 3, (1, 1), 1),  # 2x2 does not fit in 3 tiles
    ],
)
def test_grid_choice(size, max_tiles, grid, n):
    (t,) = tile_images(Image.new("RGB", size, (10, 20, 30)), max_tiles=max_tiles)
    assert isinstance(t, TiledImage)
    assert t.grid == grid
    assert t.num_tiles == n
    assert t.has_thumbnail == (n > 1)
    assert t.source_size == size
    assert t.tiles.shape == (n, 3, 448, 448) and t.tiles.dtype == torch.float32


def test_tie_break_prefers_larger_grid_only_above_half_its_area():
    # 1x1 and 2x2 tie on aspect ratio for a square; 2x2 wins only if w*h > 0.5 * 448^2 * 4 = 401408.
    assert closest_grid(633, 633, 10, 448) == (1, 1)  # 400689 px
    assert closest_grid(634, 634, 10, 448) == (2, 2)  # 401956 px
    # 2:1 image: (2,1) vs (4,2) tie; (4,2) needs > 0.5 * 448^2 * 8 = 802816 px.
    assert closest_grid(1266, 633, 10, 448) == (2, 1)  # 801378 px
    assert closest_grid(1268, 634, 10, 448) == (4, 2)  # 803912 px
    # The rule scales with tile_size: 634x634 is small next to 512 px tiles.
    assert closest_grid(634, 634, 10, 512) == (1, 1)


@pytest.mark.parametrize("size, max_tiles", [((70, 30), 10), ((25, 90), 6), ((40, 40), 10), ((33, 17), 1)])
def test_tiles_reassemble_resized_image_and_thumbnail(size, max_tiles):
    T = 16
    im = Image.fromarray(rand_pixels(*size))
    (t,) = tile_images(im, max_tiles=max_tiles, tile_size=T)
    rows, cols = t.grid
    expected = pil_tensor(im.resize((cols * T, rows * T), Image.Resampling.BICUBIC))  # (3, rows*T, cols*T)
    grid_tiles = t.tiles[: rows * cols]
    assembled = torch.cat([torch.cat(list(grid_tiles[r * cols : (r + 1) * cols]), dim=2) for r in range(rows)], dim=1)
    assert torch.equal(assembled, expected)
    if rows * cols > 1:
        assert t.has_thumbnail and t.num_tiles == rows * cols + 1
        assert torch.equal(t.tiles[-1], pil_tensor(im.resize((T, T), Image.Resampling.BICUBIC)))
    else:
        assert not t.has_thumbnail and t.num_tiles == 1


def test_thumbnail_off_and_resample_used():
    im = Image.fromarray(rand_pixels(64, 32))
    (t,) = tile_images(im, tile_size=16, thumbnail=False, resample=Image.Resampling.NEAREST)
    assert not t.has_thumbnail and t.num_tiles == t.grid[0] * t.grid[1] == 8  # (2, 4)
    nearest = pil_tensor(im.resize((64, 32), Image.Resampling.NEAREST))  # (3, 32, 64)
    assert torch.equal(t.tiles[0], nearest[:, :16, :16])
    assert torch.equal(t.tiles[5], nearest[:, 16:, 16:32])  # row 1, col 1


def test_comfy_batch_gives_one_tiled_image_per_item():
    batch = torch.rand(3, 40, 80, 3)  # (B, H, W, 3)
    out = tile_images(batch, tile_size=16)
    assert len(out) == 3
    # 3200 px > 0.5 * 16^2 * 8, so the 4x2 grid wins its aspect-ratio tie with 2x1.
    assert all(t.grid == (2, 4) and t.num_tiles == 9 and t.source_size == (80, 40) for t in out)
    assert not torch.equal(out[0].tiles, out[1].tiles)
    assert torch.equal(out[2].tiles, tile_images(batch[2], tile_size=16)[0].tiles)  # [H, W, 3] works too


def test_list_of_differently_sized_images(tmp_path):
    path = tmp_path / "tall.png"
    Image.fromarray(rand_pixels(20, 60, seed=1)).save(path)
    mixed = [Image.new("L", (64, 16), 128), torch.rand(2, 16, 16, 3), str(path), path]
    out = tile_images(mixed, tile_size=16)  # the batch of 2 expands in place
    assert [t.grid for t in out] == [(1, 4), (1, 1), (1, 1), (3, 1), (3, 1)]
    assert [t.source_size for t in out] == [(64, 16), (16, 16), (16, 16), (20, 60), (20, 60)]
    assert [t.num_tiles for t in out] == [5, 1, 1, 4, 4]
    assert torch.equal(out[3].tiles, out[4].tiles)


def test_pil_tensor_and_path_inputs_agree(tmp_path):
    arr = rand_pixels(50, 30, seed=2)
    path = tmp_path / "img.png"
    Image.fromarray(arr).save(path)
    a = tile_images(Image.fromarray(arr), tile_size=16)[0]
    b = tile_images(to_comfy(arr), tile_size=16)[0]
    c = tile_images(path, tile_size=16)[0]
    d = tile_images(Image.fromarray(arr).convert("RGBA"), tile_size=16)[0]
    for other in (b, c, d):
        assert other.grid == a.grid and torch.equal(other.tiles, a.tiles)


@pytest.mark.parametrize("orientation", [6, 3, 2])  # rotated 90 degrees, 180 degrees, mirrored
def test_a_photo_is_tiled_as_it_is_displayed(tmp_path, orientation):
    """A phone photo stores its pixels sideways with an EXIF orientation tag: as a path or an opened
    PIL image it is tiled upright, as ComfyUI's Load Image and the trainer read it (grid included)."""
    from PIL import ImageOps

    arr = rand_pixels(40, 20, seed=3)  # stored 40 wide, 20 high
    path = tmp_path / "photo.png"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, exif=exif)
    upright = ImageOps.exif_transpose(Image.open(path))
    want = tile_images(Image.fromarray(np.asarray(upright)), max_tiles=10, tile_size=16)[0]  # no tag left
    for given in (path, Image.open(path)):
        got = tile_images(given, max_tiles=10, tile_size=16)[0]
        assert got.source_size == upright.size and got.grid == want.grid and torch.equal(got.tiles, want.tiles)
    if orientation == 6:
        assert want.source_size == (20, 40) and want.grid == (2, 1)  # (rows, cols): portrait


def test_float_tensor_is_rounded_and_clamped():
    x = torch.tensor([[[-0.5, 0.5, 2.0]]]).expand(4, 4, 3)  # (H, W, 3)
    (t,) = tile_images(x, tile_size=4, resample=Image.Resampling.NEAREST)
    assert torch.equal(t.tiles[0, :, 0, 0] * 255, torch.tensor([0.0, 128.0, 255.0]))


@pytest.mark.parametrize(
    "images, kwargs, match",
    [
        (torch.rand(1, 8, 8, 3), {"max_tiles": 0}, r"max_tiles must be an integer >= 1, got 0"),
        (torch.rand(1, 8, 8, 3), {"tile_size": 0}, r"tile_size must be an integer >= 1.*got 0"),
        (torch.rand(8, 8), {}, r"shape \(8, 8\); expected the ComfyUI IMAGE convention \[B, H, W, 3\]"),
        (torch.rand(1, 3, 8, 8), {}, r"shape \(1, 3, 8, 8\).*\[B, H, W, 3\].*float 0\.\.1"),
        (torch.rand(1, 8, 8, 4), {}, r"shape \(1, 8, 8, 4\).*drop any alpha"),
        (torch.zeros(1, 8, 8, 3, dtype=torch.uint8), {}, r"dtype torch\.uint8; expected float 0\.\.1"),
        (torch.full((1, 8, 8, 3), float("nan")), {}, r"NaN or inf"),
        (torch.full((8, 8, 3), float("inf")), {}, r"NaN or inf"),
        (torch.rand(0, 8, 8, 3), {}, r"shape \(0, 8, 8, 3\) is empty"),
        (torch.rand(1, 0, 8, 3), {}, r"shape \(1, 0, 8, 3\) is empty"),
        (Image.new("RGB", (0, 5)), {}, r"PIL image has size \(0, 5\)"),
        ([], {}, r"empty list of images"),
        ([Image.new("RGB", (8, 8)), ()], {}, r"empty list of images"),
    ],
)
def test_value_errors(images, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tile_images(images, **kwargs)


def test_path_errors_name_the_path(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(ValueError, match=r"missing\.png' does not exist"):
        tile_images(str(missing))
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match=r"cannot decode '.*notes\.png' as an image"):
        tile_images(bad)
    truncated = tmp_path / "cut.png"
    Image.fromarray(rand_pixels(64, 64)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"cannot decode '.*cut\.png'"):
        tile_images(truncated)


@pytest.mark.parametrize("obj, name", [(42, "int"), (np.zeros((8, 8, 3)), "ndarray"), ({"a": 1}, "dict")])
def test_unsupported_type(obj, name):
    with pytest.raises(TypeError, match=rf"type {name}; expected a ComfyUI IMAGE tensor \[B, H, W, 3\]"):
        tile_images(obj)
