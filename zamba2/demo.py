"""`python -m zamba2.demo`: build a tiny Zamba2 with random weights, run a forward pass and a short greedy
generation through the hybrid cache, and print what happened. No download needed."""

from __future__ import annotations

import time

import torch

from zamba2.config import Zamba2Config
from zamba2.model import Zamba2ForCausalLM


def main() -> None:
    torch.manual_seed(0)
    config = Zamba2Config.preset("tiny")
    model = Zamba2ForCausalLM(config).eval()
    print(f"tiny Zamba2: {model.num_parameters() / 1e6:.1f}M parameters, layers {config.layers_block_type}")
    prompt = torch.randint(3, config.vocab_size, (1, 12))
    with torch.no_grad():
        out = model(prompt, use_cache=False)
        print(f"forward: logits {tuple(out.logits.shape)}")
        t0 = time.perf_counter()
        ids = model.generate(prompt, max_new_tokens=24)
        dt = time.perf_counter() - t0
    print(f"generated {ids.shape[1] - prompt.shape[1]} tokens in {dt * 1000:.0f} ms: {ids[0, 12:].tolist()}")


if __name__ == "__main__":
    main()
