"""The forward (noising) process of masked diffusion, shared by training,
calibration and likelihood estimation."""
from __future__ import annotations

import torch

DEFAULT_EPS = 1e-3


def mask_probability(t: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """LLaDA's schedule: a token is masked with probability (1 - eps) * t + eps."""
    return (1 - eps) * t + eps


def add_noise(
    input_ids: torch.Tensor,
    t: torch.Tensor | float,
    mask_id: int,
    eps: float = DEFAULT_EPS,
    generator: torch.Generator | None = None,
    protect: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask each token independently at time `t` (a float or one value per row).

    `protect` (bool, same shape) marks positions never masked, e.g. BOS or a prompt.
    Returns `(noisy_ids, masked, p_mask)` with `p_mask` broadcast to (batch, seq).
    """
    batch, seq = input_ids.shape
    t = torch.as_tensor(t, dtype=torch.float32).to(input_ids.device)
    p_mask = mask_probability(t, eps).reshape(-1, 1).expand(batch, seq)
    draws = torch.rand((batch, seq), generator=generator, device=input_ids.device if generator is None else generator.device)
    masked = draws.to(input_ids.device) < p_mask
    if protect is not None:
        masked &= ~protect
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    return noisy, masked, p_mask


def noise_at_timesteps(windows: torch.Tensor, timesteps: list[float], mask_id: int, seed: int = 0) -> torch.Tensor:
    """Every BOS-led window noised at every timestep: (timesteps, windows, seq).

    One draw per timestep from a generator seeded by (seed, timestep index), so
    the noise never depends on batching, and calibration, sink scores and
    analysis all see the same inputs for the same seed. BOS is never masked.
    """
    protect = torch.zeros_like(windows, dtype=torch.bool)
    protect[:, 0] = True
    out = []
    for i, t in enumerate(timesteps):
        generator = torch.Generator().manual_seed(seed * 1009 + i)
        out.append(add_noise(windows, t, mask_id, generator=generator, protect=protect)[0])
    return torch.stack(out)
