"""An exact compositional benchmark on the synthetic scenes (`unifusion_core.scenes`): no judge model.

detect -> score one image; run_benchmark -> a JSON report over prompts, seeds and splits;
model_generate_fn -> a generate_fn from a pixel-space UniFusion model; figures of the LAP layers.
"""

from .benchmark import CATEGORIES, BenchmarkRun, GenerateFn, evaluate, run_benchmark, write_grid
from .detect import Detection, classify_pixels, classify_shape, detect, match, position_ok, relation_ok, score
from .figures import layer_drop_study, layer_thirds, layer_weights_png
from .model_gen import check_pixel_space, image_size, load_features, model_generate_fn, save_features

__all__ = [
    "BenchmarkRun",
    "CATEGORIES",
    "Detection",
    "GenerateFn",
    "check_pixel_space",
    "classify_pixels",
    "classify_shape",
    "detect",
    "evaluate",
    "image_size",
    "layer_drop_study",
    "layer_thirds",
    "layer_weights_png",
    "load_features",
    "match",
    "model_generate_fn",
    "position_ok",
    "relation_ok",
    "run_benchmark",
    "save_features",
    "score",
    "write_grid",
]
