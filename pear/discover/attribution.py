"""Attribution patching: every head's Δπ to first order, from one forward and one backward.

With F = π/π_clean (π_clean held constant, so F = 1 on the clean run), the change under an
ablation δ is ΔF ≈ Σ ∂F/∂a · δ, where a is the output projection's input and δ = (batch mean
− a) on the head's slice of the suffix, zero elsewhere; the sum runs over samples, suffix
positions and the head's D channels. The gradient is taken with respect to a zero tensor
``eps`` added to a (`pear.discover.capture.clean_pass`), so it is the total derivative
through all later layers, whatever the weights' requires_grad.
"""

from __future__ import annotations

import torch


def first_order_estimates(probs: torch.Tensor, means: list[torch.Tensor], acts: list[torch.Tensor],
                          eps: list[torch.Tensor], n_heads: int, head_dim: int) -> torch.Tensor:
    """Estimated Δπ of every head. probs (N, P) clean p(correct next token), with the graph;
    per layer: means (S, H*D), acts and eps (N, S, H*D). Returns (L, H) on the CPU."""
    objective = probs.mean() / probs.mean().detach()  # π / π_clean: 1 at the clean run
    grads = torch.autograd.grad(objective, eps)
    return torch.stack([
        ((means[l].to(acts[l].dtype) - acts[l]).float() * g.float()).view(*g.shape[:2], n_heads, head_dim)
        .sum((0, 1, 3)).cpu() for l, g in enumerate(grads)])  # (L, H); layers may sit on different GPUs


def candidates(estimates: list[torch.Tensor], top_m: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Mean of the per-setting estimates (L, H), and the `top_m` heads by it, best first:
    the heads "fast" discovery re-scores exactly."""
    mean = torch.stack(estimates).mean(0).float().cpu()  # (L, H)
    H = mean.shape[1]
    order = mean.flatten().argsort(descending=True)[:top_m].tolist()
    return mean, [(i // H, i % H) for i in order]
