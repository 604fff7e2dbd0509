"""Attention sinks over the denoising trajectory.

For calibration windows noised at several timesteps, collect the attention mass
every key position receives in every layer (softmax probabilities summed over
heads and queries, the reference's unnormalised units), then summarise per layer
and timestep: the dominant position, the share of all attention it takes, and
how far the dominant position moves along the trajectory (the diagnostic of
Sink-Aware Pruning: DLM sinks move, AR sinks stay on the first token).
"""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from sinkprune.dlm.diffusion import noise_at_timesteps
from sinkprune.dlm.model import DiffusionLM


@torch.no_grad()
def collect_attention_mass(
    model: DiffusionLM,
    windows: torch.Tensor,
    timesteps: list[float],
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = False,
    causal: bool = False,
    sum_layers: bool = False,
) -> torch.Tensor:
    """Mass per (timestep, layer, window, key position), float32 on the CPU;
    with `sum_layers`, per (timestep, window, key position), summed over layers
    (all that sink scores need: 1/layers of the memory, which counts at 8B scale).

    BOS is never masked, as at generation time; the noise depends only on
    `seed`. `causal=True` gives the AR-style comparison on the same model.
    """
    device = model.embed_weight.device
    noisy = noise_at_timesteps(windows, timesteps, model.config.mask_token_id, seed)
    layers = () if sum_layers else (model.config.num_layers,)
    out = torch.zeros(len(timesteps), *layers, *windows.shape)
    jobs = [(i, lo) for i in range(len(timesteps)) for lo in range(0, len(windows), batch_size)]
    for i, lo in tqdm(jobs, desc="attention mass", disable=not progress, unit="batch"):
        chunk = noisy[i, lo:lo + batch_size].to(device)
        masses = torch.stack(layer_masses(model, chunk, causal)).float()
        if sum_layers:
            out[i, lo:lo + len(chunk)] = masses.sum(0).cpu()
        else:
            out[i, :, lo:lo + len(chunk)] = masses.cpu()
    return out


def layer_masses(model: DiffusionLM, input_ids: torch.Tensor, causal: bool = False) -> list[torch.Tensor]:
    """One (batch, seq) mass per layer: the blocks only, no output head (its logits
    would be thrown away; at LLaDA-8B shape the head is 7% of a forward pass)."""
    inputs = model.attention_inputs(input_ids, want_mass=True, causal=causal)
    hidden = model.embed(input_ids)
    masses = []
    for block in model.blocks:
        hidden, mass = block(hidden, inputs)
        masses.append(mass)
    return masses


def summarize(mass: torch.Tensor, timesteps: list[float]) -> dict:
    """Per layer and timestep: dominant position statistics and trajectory variance."""
    steps, layers, windows, seq = mass.shape
    share = mass / mass.sum(-1, keepdim=True)
    dominant = share.argmax(-1)  # (steps, layers, windows)
    report = {"timesteps": timesteps, "windows": windows, "seq_len": seq, "layers": []}
    for layer in range(layers):
        per_step = []
        for s in range(steps):
            dom = dominant[s, layer]
            top_share = share[s, layer].gather(-1, dom[:, None]).squeeze(-1)
            per_step.append({
                "t": timesteps[s],
                "most_common_dominant_position": int(dom.mode().values),
                "dominant_is_first_token": float((dom == 0).float().mean()),
                "dominant_share_mean": float(top_share.mean()),
                "dominant_vs_uniform": float(top_share.mean() * seq),
                "first_token_share_mean": float(share[s, layer, :, 0].mean()),
            })
        # dominant position of each window across timesteps: its variance, normalised by L^2
        positions = dominant[:, layer].float()
        variance = float((positions.var(dim=0, unbiased=False) / seq**2).mean())
        moved = float((positions != positions[0]).any(dim=0).float().mean())
        report["layers"].append({"layer": layer, "by_timestep": per_step,
                                 "dominant_position_variance_norm": variance,
                                 "windows_where_dominant_moves": moved})
    return report


def plot_mass(mass: torch.Tensor, timesteps: list[float], path: str | Path, positions: int = 64) -> Path:
    """Heat maps (timestep x key position) of the mean share of attention, one per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = (mass / mass.sum(-1, keepdim=True)).mean(2)[..., :positions]  # (steps, layers, positions)
    layers = share.shape[1]
    cols = min(4, layers)
    rows = (layers + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.4 * rows), squeeze=False)
    for layer in range(rows * cols):
        ax = axes[layer // cols][layer % cols]
        if layer >= layers:
            ax.axis("off")
            continue
        image = ax.imshow(share[:, layer].log10().numpy(), aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_yticks(range(len(timesteps)), [f"{t:.2f}" for t in timesteps], fontsize=7)
        ax.set_xlabel("key position", fontsize=8)
        ax.set_ylabel("t", fontsize=8)
        fig.colorbar(image, ax=ax, label="log10 share")
    fig.suptitle("Attention share per key position over the denoising trajectory")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
