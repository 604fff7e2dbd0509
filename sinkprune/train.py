"""Training a masked-diffusion LM from scratch (the embedded default model).

The objective is LLaDA's: t ~ U(0, 1), every token but BOS masked with
probability (1 - eps) t + eps, cross-entropy on the masked positions weighted by
1 / p_mask, averaged over all positions. AdamW with linear warm-up and cosine
decay. Every random draw is a function of (seed, step), so a run resumed from a
checkpoint continues exactly as the uninterrupted run would.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sinkprune.dlm.config import DLMConfig
from sinkprune.dlm.diffusion import add_noise
from sinkprune.dlm.loading import build_model, save_model, saved_model_names
from sinkprune.dlm.model import DiffusionLM
from sinkprune.safe_output import staged_output

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.jsonl"
FINAL = "final"
TOKEN_CACHES = ("train_tokens.npy", "eval_tokens.npy")
RUN_FILES = {CHECKPOINT, CHECKPOINT + ".tmp", LOG, FINAL, *TOKEN_CACHES}


def is_run_dir(out: Path) -> bool:
    """True if `out` holds nothing but what `train` writes there (a run to resume, or a new one)."""
    return out.is_dir() and all(p.name in RUN_FILES or p.name.startswith(f".{FINAL}.partial-")
                                for p in out.iterdir())


def checkpoint_config(out: Path) -> dict | None:
    """The model config of the run's checkpoint (None without one)."""
    if not (out / CHECKPOINT).is_file():
        return None
    return torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)["train_config"]["model"]


@dataclass
class TrainConfig:
    steps: int = 4000
    batch_size: int = 16
    seq_len: int = 256  # informational: the windows given to train() define it
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_windows: int = 64
    checkpoint_every: int = 100
    seed: int = 0
    init_std: float = 0.02
    bf16: bool = False
    compile: bool = False
    max_minutes: float | None = None
    model: dict = field(default_factory=dict)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


RESIDUAL_OUTPUTS = ("attn_out.weight", "o_proj.weight", "down_proj.weight")


def _is_residual_output(name: str) -> bool:
    """Projections writing into the residual stream (LLaDA's `ff_out` also names the LM head)."""
    return name.endswith(RESIDUAL_OUTPUTS) or (".blocks." in name and name.endswith("ff_out.weight"))


def init_weights(model: DiffusionLM, std: float, seed: int) -> None:
    """GPT-2 style init: N(0, std) for matrices, residual outputs scaled by 1/sqrt(2 * layers)."""
    generator = torch.Generator().manual_seed(seed)
    depth_scale = 1 / math.sqrt(2 * model.config.num_layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                scale = depth_scale if _is_residual_output(name) else 1.0
                param.copy_(torch.randn(param.shape, generator=generator) * std * scale)


def diffusion_loss(model: DiffusionLM, windows: torch.Tensor, generator: torch.Generator, bf16: bool = False) -> torch.Tensor:
    """LLaDA's pre-training loss on a batch of BOS-led windows."""
    batch, seq = windows.shape
    t = torch.rand(batch, generator=generator)
    protect = torch.zeros_like(windows, dtype=torch.bool)
    protect[:, 0] = True
    noisy, masked, p_mask = add_noise(windows, t, model.config.mask_token_id, generator=generator, protect=protect)
    with torch.autocast("cpu" if windows.device.type == "cpu" else "cuda", dtype=torch.bfloat16, enabled=bf16):
        logits = model(noisy).logits
    ce = F.cross_entropy(logits[masked].float(), windows[masked], reduction="none")
    return (ce / p_mask[masked]).sum() / (batch * (seq - 1))


@torch.no_grad()
def eval_loss(model: DiffusionLM, windows: torch.Tensor, seed: int) -> float:
    """The training objective on held-out windows with fixed noise: comparable across steps."""
    model.eval()
    generator = torch.Generator().manual_seed(seed + 12345)
    losses = [diffusion_loss(model, windows[i:i + 16], generator).item() for i in range(0, len(windows), 16)]
    model.train()
    return sum(losses) / len(losses)


def batch_for_step(train: torch.Tensor, step: int, cfg: TrainConfig) -> torch.Tensor:
    """Windows for `step`: epoch-wise permutation seeded by (seed, epoch)."""
    per_epoch = len(train) // cfg.batch_size
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
    return train[order[index * cfg.batch_size:(index + 1) * cfg.batch_size]]


def train(
    model_config: DLMConfig,
    train_windows: torch.Tensor,
    eval_windows: torch.Tensor,
    out_dir: str | Path,
    cfg: TrainConfig,
    tokenizer=None,
    progress: bool = True,
    device: str = "cpu",
) -> dict:
    """Train (or resume) into `out_dir`; returns a summary. Writes a checkpoint every
    `checkpoint_every` steps, a JSONL log, and the final model in HF layout under `final/`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = build_model(model_config)
    init_weights(model, cfg.init_std, cfg.seed)
    model.to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    start, elapsed = _resume(out, model, optimizer)
    model.train()
    forward = torch.compile(model) if cfg.compile else model
    eval_windows = eval_windows[: cfg.eval_windows].to(device)
    began = time.monotonic() - elapsed
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train", disable=not progress)
    step = start
    with open(out / LOG, "a") as log:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            loss = diffusion_loss(forward, batch_for_step(train_windows, step, cfg).to(device),
                                  torch.Generator().manual_seed(cfg.seed * 1_000_003 + step), cfg.bf16)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
            optimizer.step()
            record = {"step": step + 1, "loss": loss.item(), "lr": lr_at(step, cfg), "grad_norm": grad_norm,
                      "elapsed_s": round(time.monotonic() - began, 1)}
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                record["eval_loss"] = eval_loss(model, eval_windows, cfg.seed)
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{record['loss']:.3f}", eval=record.get("eval_loss", ""))
            out_of_time = cfg.max_minutes is not None and time.monotonic() - began > cfg.max_minutes * 60
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps or out_of_time:
                _save_checkpoint(out, model, optimizer, step + 1, time.monotonic() - began, cfg)
            if out_of_time:
                break
    finished = step + 1 >= cfg.steps
    if finished and tokenizer is not None:
        with staged_output(out / FINAL, overwrite=True, ours=saved_model_names(out / FINAL)) as staging:
            save_model(model, staging, tokenizer=tokenizer)
    return {"steps_done": step + 1, "finished": finished, "elapsed_s": time.monotonic() - began,
            "eval_loss": eval_loss(model, eval_windows, cfg.seed)}


def _save_checkpoint(out: Path, model, optimizer, step: int, elapsed: float, cfg: TrainConfig) -> None:
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "elapsed_s": elapsed, "train_config": asdict(cfg)}, tmp)
    tmp.replace(out / CHECKPOINT)  # atomic: a crash never leaves a half-written checkpoint


def _resume(out: Path, model, optimizer) -> tuple[int, float]:
    path = out / CHECKPOINT
    if not path.is_file():
        return 0, 0.0
    state = torch.load(path, map_location=next(model.parameters()).device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _truncate_log(out / LOG, state["step"])
    return state["step"], state["elapsed_s"]


def _truncate_log(log: Path, step: int) -> None:
    """Drop log lines written after the checkpoint, so a resumed log has no duplicates."""
    if log.is_file():
        lines = [line for line in log.read_text().splitlines() if json.loads(line)["step"] <= step]
        log.write_text("".join(line + "\n" for line in lines))
