"""What a checkpoint was not trained for, said before a run: a size far from its training size,
words outside the embedded model's scene grammar, VERIFI rewrite on or off against its training;
and, once the first step is timed, how long the whole run will take. The demo CLI and the ComfyUI
nodes both ask `advice` and `timed`, so they say the same sentences.

What a checkpoint records: its training size and whether it was trained on VERIFI rewrites
(config.sampling.size, .rewrite). It records nothing of its training data, so the scene grammar is
checked only for a checkpoint whose stored config is the embedded scenes model's (knows_scenes).
"""

from __future__ import annotations

import functools
import logging
import time

from . import paraphrase, scenes
from .assets import bundled_model
from .checkpoint import read_config
from .config import UniFusionConfig
from .features import Features
from .sampling import MODEL_CALLS, Callback

log = logging.getLogger(__name__)

FAR = 4.0  # a size with this many times the trained size's pixels (or this many times fewer) is far from it
LONG_RUN = 60.0  # seconds: a run estimated longer than this is announced after its first step


def advice(config: UniFusionConfig, *, prompt: str | None = None, features: Features | None = None,
           rewrite: bool | None = None, width: int | None = None, height: int | None = None,
           lora: bool = False) -> list[str]:
    """Sentences on what this checkpoint was not trained for in a run; empty when there is nothing to say.

    prompt: the conditioning text (default: features.text, the rewrite or the prompt). rewrite:
    whether the conditioning is a VERIFI rewrite (default: what the features record, Features.rewrite;
    None: unknown, not checked). width, height: the image size (None: not checked). lora: the
    checkpoint runs with a LoRA, which may have taught it words beyond its grammar (not checked then).
    """
    notes = size_advice(config, width, height) if width and height else []
    if features is not None:
        prompt = features.text if prompt is None else prompt
        rewrite = features.rewrite if rewrite is None else rewrite
    trained = config.sampling.rewrite
    if rewrite is not None and rewrite != trained:
        notes.append(
            "this checkpoint was trained on VERIFI rewrites (rewrite on), but this conditioning is the prompt's own "
            "words: turn rewrite on, or expect a picture that follows the prompt less well" if trained else
            "this checkpoint was trained on the prompt's own words (rewrite off), but this conditioning is a VERIFI "
            "rewrite, words it never saw in training: turn rewrite off"
        )
    if prompt is not None and knows_scenes(config) and not lora:
        notes += grammar_advice(prompt)
    return notes


def grammar_advice(prompt: str) -> list[str]:
    """For the scenes model: nothing for a prompt of its grammar in any case and punctuation; for a
    paraphrase (another template of paraphrase.py) the canonical wording it was trained on; for
    anything else, that it knows only the grammar."""
    try:
        scene = paraphrase.canonical(prompt)
    except ValueError as e:
        return [f"{e}; this checkpoint knows only that grammar: expect a blank or meaningless picture (e.g. "
                f"{scenes.EXAMPLE!r})"]
    if paraphrase.normalise(prompt) == scene.prompt:
        return []
    return [f"{prompt!r} is a paraphrase of {scene.prompt!r}, the wording this checkpoint was trained on: if the "
            "picture misses, write that"]


def area_ratio(config: UniFusionConfig, width: int, height: int) -> float | None:
    """Pixels of width x height over those of the training size; None when the checkpoint records none."""
    if config.sampling.size is None:
        return None
    w, h = config.sampling.size
    return width * height / (w * h)


def size_advice(config: UniFusionConfig, width: int, height: int) -> list[str]:
    """A sentence when width x height is far from the checkpoint's training size."""
    r = area_ratio(config, width, height)
    if r is None or 1 / FAR < r < FAR:
        return []
    w, h = config.sampling.size
    if r < 1:
        return [f"{width}x{height} is far below the {w}x{h} this checkpoint was trained at ({_times(1 / r)} fewer "
                f"pixels): it has not learned this size; expect a worse picture, or use {w}x{h}"]
    return [f"{width}x{height} is far from the {w}x{h} this checkpoint was trained at: {_times(r)} the pixels, so "
            f"{_times(r)} the image tokens and up to {_times(r * r)} the attention work per step (tokens grow with "
            f"the area, attention with its square); it has not learned this size (expect a worse picture) and "
            f"runs that much slower: the whole run's time is estimated after its first step. Use {w}x{h} for what "
            "it was trained on"]


@functools.cache
def _scenes_config() -> UniFusionConfig | None:
    path = bundled_model()
    return None if path is None else read_config(path)


def knows_scenes(config: UniFusionConfig) -> bool:
    """Whether a checkpoint was trained on the scene grammar (scenes.py): its stored config is the
    embedded model's (that file, a copy, or a retrain of its recipe), the one record there is."""
    return config == _scenes_config()


def timed(callback: Callback | None, config: UniFusionConfig, width: int, height: int, sampler: str = "euler",
          report=None) -> Callback:
    """`callback` for sample(), timing the run's first model call: right after it, the whole run's
    estimate is logged (a warning at a size far above the trained one, else when longer than
    LONG_RUN) and handed to report(sentence). Make it right before sampling: the clock starts here.
    When the first call compiled the DiT (torch.compile), the estimate waits for the second step."""
    from .dit import graphs_compiled

    start, graphs = time.monotonic(), graphs_compiled()
    slow = (area_ratio(config, width, height) or 0) >= FAR
    compiled: list[float] = []  # (end of the first step, its seconds) when it compiled

    def announce(total: int, whole: float, left: float, basis: str) -> None:
        if slow or whole > LONG_RUN:
            until = time.strftime("%H:%M", time.localtime(time.time() + left))
            note = (f"sampling {width}x{height} will take about {_duration(whole)} for {total} steps (until about "
                    f"{until}), {basis}")
            (log.warning if slow else log.info)(note)
            if report is not None:
                report(note)

    def timed_callback(step: int, total: int, x, x0) -> None:
        if step == 0 or (step == 1 and compiled):
            x0.reshape(-1)[:1].cpu()  # waits for the device to finish the step, not only to queue it
            now = time.monotonic()
        if step == 0:
            first = now - start
            if graphs_compiled() > graphs:  # compiling is not sampling: time the next step instead
                compiled[:] = [now, first]
            else:
                whole = first * total * MODEL_CALLS.get(sampler, 1)
                announce(total, whole, whole - first, f"from its first model call, which took {_duration(first)}")
        elif step == 1 and compiled:
            step_s = now - compiled[0]  # one step: its model calls, the next step's first
            announce(total, compiled[1] + step_s * (total - 1), step_s * (total - 2),
                     f"from its second step, which took {_duration(step_s)} (the first took "
                     f"{_duration(compiled[1])}: it compiled the DiT)")
        if callback is not None:
            callback(step, total, x, x0)

    return timed_callback


def _times(x: float) -> str:
    return f"{x:,.0f}x" if x >= 10 else f"{x:.1f}x"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
