"""Features: what the frozen VLM hands to LAP for one prompt (Sec. 2.1, 3.3)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from .config import EncoderSpec
from .guard import require_finite


def require_finite_features(hidden: Tensor) -> Tensor:
    """hidden, or ValueError when the VLM handed over NaN or inf."""
    return require_finite("the VLM features", hidden,
                          "the encoder produced NaN/inf (in fp16? load the VLM in bf16 or fp32)")


@dataclass
class Features:
    """Hidden states of the selected VLM layers for the conditioning tokens of one prompt.

    Conditioning tokens are the rewritten (VERIFI) or the user's text tokens plus every image
    token. Index i of `layers` is the residual stream after block i (0 = embedding output),
    always before the final norm.
    """

    hidden: Tensor  # (T, L, D)
    layers: tuple[int, ...] | None = None  # None: the encoder's (encoder.layers); given, it must be those
    encoder: EncoderSpec | None = None
    text: str = ""  # the rewritten prompt, or the user's prompt without VERIFI
    sequence_ids: list[int] = field(default_factory=list)  # every token the VLM saw
    positions: Tensor | None = None  # (T,) index of each conditioning token in sequence_ids
    is_image: Tensor | None = None  # (T,) bool
    image_index: Tensor | None = None  # (T,) which reference image (-1 for text tokens)
    rewrite: bool | None = None  # True: text tokens of a VERIFI rewrite; False: the prompt's own; None: unknown

    def __post_init__(self) -> None:
        # The encoder's spec owns the layer list; `layers` is only needed without one.
        if self.encoder is not None:
            if self.layers is not None and tuple(int(i) for i in self.layers) != self.encoder.layers:
                raise ValueError(f"Features.layers {list(self.layers)} differ from the layers of their encoder "
                                 f"{self.encoder.name!r}, {list(self.encoder.layers)}; leave layers out to use the "
                                 "encoder's")
            self.layers = self.encoder.layers
        elif self.layers is None:
            raise ValueError("Features need their layers: give layers, or the EncoderSpec (encoder=) they come from")
        else:
            self.layers = tuple(int(i) for i in self.layers)
        if self.hidden.ndim != 3 or self.hidden.shape[1] != len(self.layers):
            raise ValueError(
                f"Features.hidden must be (T, {len(self.layers)}, D) for layers {list(self.layers)}, "
                f"got {tuple(self.hidden.shape)}"
            )
        # once, where features enter (a VLM pass, a features file): not again at every training step
        if self.hidden.device.type != "meta":
            require_finite_features(self.hidden)

    @property
    def num_tokens(self) -> int:
        return self.hidden.shape[0]

    def image_tokens(self) -> Features:
        """Only the image tokens (e.g. to condition the first steps on the images, Sec. 5.2)."""
        return self._select(self.is_image, "image",
                            "no reference images were encoded: connect images to VERIFI Rewrite, or use all tokens")

    def text_tokens(self) -> Features:
        """Only the text tokens."""
        return self._select(None if self.is_image is None else ~self.is_image, "text",
                            "the prompt is empty: give a prompt, or use all tokens")

    def _select(self, keep: Tensor | None, kind: str, hint: str) -> Features:
        if keep is None:
            raise ValueError("these Features do not record which tokens are image tokens")
        if not bool(keep.any()):
            raise ValueError(f"these features have no {kind} tokens ({hint})")

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[keep]

        return Features(
            self.hidden[keep], self.layers, self.encoder, self.text, self.sequence_ids,
            pick(self.positions), pick(self.is_image), pick(self.image_index), self.rewrite,
        )


# --- features files -------------------------------------------------------------------------------
# One format for precomputed prompt features (tools/encode_scene_prompts.py writes it; the trainer,
# the eval CLI, the benchmarks and the ablation tool read it): tensors "0", "1", ... each (T, L, D)
# fp16; metadata "prompts" (JSON list, tensor order), "encoder" (JSON EncoderSpec of the stored
# layers) and optionally "rewrite" (bool) and "texts" (the rewritten prompts).


def save_features_file(path, table, encoder: EncoderSpec | None = None, **extra) -> None:
    """Write {prompt: hidden (T, L, D)} as a features file (fp16); extra metadata is JSON-encoded.
    Written to PATH.tmp and then renamed over PATH."""
    import json
    import os
    from dataclasses import asdict
    from pathlib import Path

    from safetensors.torch import save_file

    prompts = list(table)
    meta = {"prompts": json.dumps(prompts), **{k: json.dumps(v) for k, v in extra.items()}}
    if encoder is not None:
        meta["encoder"] = json.dumps(asdict(encoder))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({str(i): table[p].detach().half().contiguous().cpu() for i, p in enumerate(prompts)}, str(tmp),
              metadata=meta)
    # A run killed while writing (an hour of encoding) must not leave a truncated file under the
    # real name, which the trainer and the eval then refuse: the previous file stays until this one is whole.
    os.replace(tmp, path)


def read_features_file(path) -> tuple[dict[str, Tensor], EncoderSpec | None]:
    """A features file -> ({prompt: hidden (T, L_stored, D) fp16}, the stored layers' EncoderSpec or None)."""
    import json
    from pathlib import Path

    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"features file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            prompts = json.loads(meta["prompts"])
            table = {p: f.get_tensor(str(i)) for i, p in enumerate(prompts)}
    except KeyError as e:
        raise ValueError(f"{path}: no {e} in the features file; expected tensors '0', '1', ... and metadata "
                         "'prompts' (a JSON list of prompts in tensor order)") from None
    except (SafetensorError, json.JSONDecodeError, OSError) as e:
        raise ValueError(f"{path}: not a readable features file ({e})") from None
    described = meta.get("encoder") or meta.get("spec")  # "spec": files written before 0.3
    return table, (EncoderSpec(**json.loads(described)) if described else None)
