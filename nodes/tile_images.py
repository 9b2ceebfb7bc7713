"""UniFusion Tile Images: reference images for the VLM, each with its own tiling."""

from __future__ import annotations

from .common import CATEGORY, IMAGES, ReferenceImage, expect_image, expect_references, uf

NATIVE = uf.encoders.registry.labels(uf.encoders.registry.native_resolution_families())  # "Qwen2.5-VL, Qwen3-VL"


class UniFusionTileImages:
    DESCRIPTION = (
        "Adds reference images for VERIFI Rewrite. Each image is cut into up to max_tiles tiles matching "
        "its aspect ratio, plus a thumbnail, at the VLM's own tile size (paper Fig. 7: more tiles keep "
        "more detail). Chain several of these nodes to pass any number of images of different sizes."
    )
    CATEGORY = CATEGORY
    FUNCTION = "add"
    RETURN_TYPES = (IMAGES,)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The reference images so far, in order.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": (
                    "One or more images (each image of a batch is a reference of its own).")}),
                "max_tiles": ("INT", {"default": 10, "min": 1, "max": 40, "tooltip": (
                    f"At most this many tiles per image (the paper trains with up to 10). {NATIVE} take each image "
                    "whole at its own resolution, up to this many 448x448 tiles' worth of pixels.")}),
                "thumbnail": ("BOOLEAN", {"default": True, "tooltip": (
                    "Also give the VLM the whole image as one tile when it has several.")}),
            },
            "optional": {
                "images": (IMAGES, {"tooltip": "Reference images from an earlier Tile Images node; these come first."}),
            },
        }

    def add(self, image, max_tiles: int = 10, thumbnail: bool = True, images=None):
        expect_image(image)
        expect_references(images)
        new = [ReferenceImage(image[i : i + 1], max_tiles, thumbnail) for i in range(image.shape[0])]
        return (tuple(images or ()) + tuple(new),)
