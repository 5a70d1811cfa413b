"""Random transformers checkpoints for proving a model port against PyTorch."""

from __future__ import annotations


def rerandomize_torch_model(model, seed: int) -> None:
    """Redraws every parameter of a transformers model in place, reproducibly from `seed`.

    transformers' init (zero biases, unit norm gains, small matrices) would hide bugs in
    biases and norms and leave near-constant logits. Matrices get std 1/sqrt(fan_in), so
    activations stay O(1) (the untied LM head 3/sqrt(fan_in), so logits have std ≳ 1 either
    way); norm gains are 1 + N(0, 0.3²) and biases N(0, 0.3²), both visibly away from their
    init. Needs torch (imported here, not by `jaxsample.testing`).
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
