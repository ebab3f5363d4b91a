"""Do the native OpenVLA build and OpenVLA's own remote code agree on *your* checkpoint?

    python -m policies.openvla_parity /data/openvla-7b [--device cuda] [--dtype bfloat16] [--frames 8]

Loads the checkpoint twice, one loader at a time (``loader=native``, then ``loader=hf``: OpenVLA's remote code
through :func:`policies.openvla.load_openvla_remote`, which needs timm 0.9.x), runs both on the same random frames
(224 px) and instructions, and prints how far apart they are: teacher-forced log-probs of random action tokens and
the greedy actions. The comparison is scaled by what the frames themselves do to the log-probs (the same tokens with the
frames shuffled across the batch), so a vision path that ignored the image could not pass. Exits 1 when the loaders
differ by more than a tenth of that effect.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys

import torch

INSTRUCTIONS = ("pick coke can", "open top drawer", "close middle drawer", "move the sponge near the apple")
AGREEMENT = 0.1  # loaders agree when their log-probs differ by < this fraction of the frames' own effect


def _outputs(loader: str, weights_dir: str, batch, tokens: torch.Tensor, shuffled, device: str, dtype: str,
             unnorm_key: str | None, dims) -> dict[str, torch.Tensor]:
    from policies.openvla import OpenVLAOptions, build_openvla_policy
    from policies.vla_policy import OPENVLA_PROMPT

    options = OpenVLAOptions(weights_dir=weights_dir, loader=loader, device=device, dtype=dtype,
                             unnorm_key=unnorm_key, fused_ops=False, fused_lora=False, compile_layers=False)
    policy = build_openvla_policy(options, prompt_template=OPENVLA_PROMPT, temperature=1.0, dims=dims).eval()
    with torch.no_grad():
        out = {"log_probs": policy.token_log_probs(batch, tokens).float().cpu(),
               "shuffled": policy.token_log_probs(shuffled, tokens).float().cpu(),
               "greedy": policy.sample_tokens(batch, greedy=True).cpu()}
    del policy
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def loader_agreement(weights_dir: str, *, device: str = "auto", dtype: str = "auto", frames: int = 4,
                     unnorm_key: str | None = None, seed: int = 0, dims=None) -> dict:
    """How far ``loader=native`` is from ``loader=hf`` on ``frames`` random frames (see the module docstring).
    ``dims`` overrides the sizes read from config.json, as in :func:`~policies.openvla.build_openvla_policy`."""
    from tensordict import TensorDict

    from policies.openvla import OPENVLA_7B

    g = torch.Generator().manual_seed(seed)
    size = (dims or OPENVLA_7B).dino.image_size
    images = torch.randint(0, 256, (frames, 3, size, size), generator=g, dtype=torch.uint8)
    instructions = [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(frames)]
    batch = TensorDict({("observation", "image"): images, "language_instruction": instructions}, batch_size=[frames])
    shuffled = batch.clone()
    shuffled["observation", "image"] = images.roll(1, dims=0)
    tokens = torch.randint(0, 256, (frames, 7), generator=g)
    native, remote = (_outputs(loader, weights_dir, batch, tokens, shuffled, device, dtype, unnorm_key, dims)
                      for loader in ("native", "hf"))
    diff = (native["log_probs"] - remote["log_probs"]).abs().max().item()
    image_effect = (native["log_probs"] - native["shuffled"]).abs().max().item()
    return {"max_abs_log_prob_diff": diff, "image_effect": image_effect,
            "greedy_actions_equal": (native["greedy"] == remote["greedy"]).all(-1).float().mean().item(),
            "agree": diff < AGREEMENT * image_effect}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights_dir", help="an OpenVLA checkpoint folder (config.json, tokenizer, safetensors, "
                                            "remote code) or hub id")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--unnorm-key", default=None, help="a norm_stats entry (needed when there are several)")
    args = parser.parse_args(argv)
    try:
        report = loader_agreement(args.weights_dir, device=args.device, dtype=args.dtype, frames=args.frames,
                                  unnorm_key=args.unnorm_key)
    except (ImportError, ValueError, FileNotFoundError) as err:
        print(f"openvla_parity: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1))
    return 0 if report["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
