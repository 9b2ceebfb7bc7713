"""UniFusion Sample: rectified-flow sampling of the DiT, returning a LATENT for the stock VAE Decode."""

from __future__ import annotations

import contextlib

from . import host
from .common import CATEGORY, COND, MODEL, advise, expect, log, uf, with_notes

MAX_RESOLUTION = 16384


class UniFusionSample:
    DESCRIPTION = (
        "Generates latents with the UniFusion DiT from LAP Encode conditioning, with classifier-free "
        "guidance against the model's learned empty conditioning (or a negative). The result is a "
        "plain LATENT in the VAE's own space: decode it with the stock VAE Decode and the VAE the "
        "checkpoint was trained with (pixel_space for pixel models). A size far from the checkpoint's "
        "training size is warned about (in the log and on the node) with the run's estimated time after "
        "its first step."
    )
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Latents for VAE Decode.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL, {"tooltip": "From UniFusion Model Load."}),
                "conditioning": (COND, {"tooltip": "From LAP Encode."}),
                "width": ("INT", {"default": 1024, "min": 16, "max": MAX_RESOLUTION, "step": 16,
                                  "tooltip": "Image width in pixels."}),
                "height": ("INT", {"default": 1024, "min": 16, "max": MAX_RESOLUTION, "step": 16,
                                   "tooltip": "Image height in pixels."}),
                "steps": ("INT", {"default": 28, "min": 1, "max": 1000,
                                  "tooltip": "Sampling steps (Heun costs two model calls per step)."}),
                "cfg": ("FLOAT", {"default": 4.0, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance scale; 1 turns guidance off and halves "
                                             "the cost."}),
                "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.01,
                                    "tooltip": "Timestep shift (SD3/Flux style; higher spends more steps at high "
                                               "noise). 0: chosen from the resolution."}),
                "sampler": (sorted(uf.SAMPLERS), {"default": "euler",
                                                  "tooltip": "euler: first order; heun: second order, two model "
                                                             "calls per step."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Noise seed; the same seed gives the same images."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                       "tooltip": "Images per run (image i of a batch matches seed's batch "
                                                  "position, as in ComfyUI)."}),
            },
            "optional": {
                "negative": (COND, {"tooltip": "Guide away from this instead of the learned empty conditioning."}),
                "second_conditioning": (COND, {"tooltip": "Conditioning for the steps after switch_at (e.g. image "
                                                          "tokens first, text after: paper Sec. 5.2)."}),
                "switch_at": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 1.0, "step": 0.01,
                                        "tooltip": "Fraction of the steps conditioned on `conditioning` before "
                                                   "switching to `second_conditioning`."}),
                "compile": ("BOOLEAN", {"default": False, "label_on": "compiled", "label_off": "eager",
                                        "tooltip": "Run the DiT's blocks through torch.compile (meant for GPUs, "
                                                   "where it fuses the work between the matrix multiplies). The "
                                                   "first run compiles one block's worth; later runs reuse it until "
                                                   "ComfyUI restarts, and a new size, prompt length, dtype or "
                                                   "guidance setting compiles once more. The node says what it "
                                                   "did. Needs Triton on GPUs, a C++ compiler on CPUs."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def sample(self, model, conditioning, width: int, height: int, steps: int, cfg: float, shift: float,
               sampler: str, seed: int, batch_size: int = 1, negative=None, second_conditioning=None,
               switch_at: float = 0.2, compile: bool = False, unique_id=None):
        expect(model, host.Managed, "model", "UniFusion Model Load", uf.UniFusionModel)
        conds = {"conditioning": conditioning, "negative": negative, "second_conditioning": second_conditioning}
        for name, c in conds.items():  # which socket is miswired; the sampler checks the values themselves
            if c is not None or name == "conditioning":
                expect(c, uf.Conditioning, name, "UniFusion LAP Encode")
        tokens = max(c.tokens.shape[1] for c in conds.values() if c is not None)
        if compile and (why := uf.dit.compile_unavailable(model.device)):
            raise ValueError(why)
        net = model.load(memory_required=model.obj.memory_required(batch_size, tokens, width, height, cfg != 1))
        blocked = host.compile_blocker(net.dit) if compile else None
        notes = advise("UniFusion Sample", uf.advice.advice(net.config, width=width, height=height))
        host.show_text(unique_id, notes)
        progress = host.Progress(steps)
        previewer = host.previewer(net.config.latent.name, model.device)
        lh, lw, _, _ = uf.sampling.latent_grid(net.config, width, height)  # previews without the patch padding

        def callback(step, total, x, x0):
            progress.update(step + 1, total, previewer(x0[:, :, :lh, :lw]) if previewer else None)

        timed = uf.advice.timed(callback, net.config, width, height, sampler,
                                report=lambda estimate: host.show_text(unique_id, [*notes, estimate]))
        compiling = bool(compile) and blocked is None
        net.dit.compile_blocks(compiling)
        session = uf.dit.compile_session() if compiling else contextlib.nullcontext({})
        try:  # Cancel between DiT blocks too, not only between steps
            with uf.guard.interruptible(host.interrupt_check()), session as compiled:
                latent = net.sample(
                    conditioning, width, height, steps=steps, cfg=cfg, seed=seed, shift=shift or None,
                    sampler=sampler, negative=negative, batch_size=batch_size, callback=timed,
                    next_cond=second_conditioning, switch_at=switch_at, device=model.device,
                )
        finally:
            net.dit.compile_blocks(False)  # the loaded model is shared: nothing stays compiled for others
        if compile:
            notes = [*notes, compile_note(compiled, blocked)]
            log.info("UniFusion Sample: %s", notes[-1])
            host.show_text(unique_id, notes)
        return with_notes(({"samples": latent.to(host.intermediate_device())},), notes)


def compile_note(report: dict, blocked: str | None) -> str:
    """What compile did this run, said on the node."""
    if blocked:
        return f"compile: off for this run: {blocked}"
    if report["limit_reached"]:
        return (f"compile: {report['graphs']} graph(s) compiled this run, and dynamo now holds its limit of "
                f"{uf.dit.RECOMPILE_LIMIT}: new sizes and settings run eagerly until ComfyUI restarts")
    if report["graphs"]:
        return f"compile: {report['graphs']} graph(s) compiled this run"
    return "compile: reused the graphs compiled before (nothing compiled)"
