"""Proving a model port against transformers' PyTorch models: random checkpoints, and the
reference's logits and greedy tokens (torch and transformers are imported by each function,
not by `jaxsample.testing`)."""

from __future__ import annotations

import numpy as np


def rerandomize_torch_model(model, seed: int) -> None:
    """Redraws every parameter of a transformers model in place, reproducibly from `seed`.

    transformers' init (zero biases, unit norm gains, small matrices) would hide bugs in
    biases and norms and leave near-constant logits. Matrices get std 1/sqrt(fan_in), so
    activations stay O(1) (the untied LM head 3/sqrt(fan_in), so logits have std ≳ 1 either
    way); norm gains are 1 + N(0, 0.3²) and biases N(0, 0.3²), both visibly away from their
    init.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.3 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            elif name == "lm_head.weight":
                p.copy_(3.0 * noise / p.shape[1] ** 0.5)
            else:
                p.copy_(noise / p.shape[1] ** 0.5)


def transformers_model(directory, **kwargs):
    """transformers' float32 model of a checkpoint directory, in eval mode (the reference a port
    is compared with); `kwargs` go to `from_pretrained` (e.g. `gguf_file=`)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs).eval()


def transformers_logits(model, tokens) -> np.ndarray:
    """float32 logits `[B, T, V]` of int `tokens [B, T]` under a transformers model."""
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def transformers_greedy(model, prompt, max_new_tokens: int, pad_token_id: int,
                        eos_token_ids=None) -> np.ndarray:
    """transformers' greedy continuation of one prompt `[T]`: the generated ids, up to and
    including the first stop token (`eos_token_ids`, default the model's generation config)."""
    import torch

    prompt = torch.tensor(np.asarray(prompt), dtype=torch.long)[None]  # a copy: JAX arrays are read-only
    stop = {} if eos_token_ids is None else {"eos_token_id": list(eos_token_ids)}
    with torch.no_grad():
        tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, **stop)
    return tokens[0, prompt.shape[1]:].numpy()
