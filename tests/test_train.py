"""Training the masked-diffusion LM: the loss falls, and resume reproduces the run."""
from __future__ import annotations

import json

import torch

from sinkprune.dlm import DLMConfig
from sinkprune.dlm.loading import load_model
from sinkprune.train import TrainConfig, diffusion_loss, lr_at, train
from tests.conftest import MASK_ID, VOCAB, tiny_hf_config


def _data(seed: int = 0):
    """Windows with learnable structure: BOS, then a repeated short pattern."""
    generator = torch.Generator().manual_seed(seed)
    pattern = torch.randint(4, 40, (8,), generator=generator)
    rows = []
    for i in range(64):
        body = pattern.roll(i % 8).repeat(4)[:31]
        rows.append(torch.cat([torch.tensor([0]), body]))
    return torch.stack(rows)


def _losses(out_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (out_dir / "train_log.jsonl").read_text().splitlines()]


def test_loss_goes_down(tmp_path):
    config = DLMConfig.from_hf_config(tiny_hf_config("llada"))
    cfg = TrainConfig(steps=40, batch_size=8, lr=3e-3, warmup=5, eval_every=20, checkpoint_every=40, eval_windows=16)
    windows = _data()
    summary = train(config, windows, windows[:16], tmp_path, cfg, progress=False)
    losses = _losses(tmp_path)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    evals = [json.loads(line).get("eval_loss") for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e is not None]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert summary["finished"]


def test_resume_reproduces_the_same_loss_curve(tmp_path):
    config = DLMConfig.from_hf_config(tiny_hf_config("llada"))
    windows = _data()
    cfg = TrainConfig(steps=6, batch_size=8, warmup=2, eval_every=100, checkpoint_every=100, eval_windows=8)
    train(config, windows, windows[:8], tmp_path / "straight", cfg, progress=False)
    interrupted = TrainConfig(**{**cfg.__dict__, "max_minutes": 0.0})
    first = train(config, windows, windows[:8], tmp_path / "resumed", interrupted, progress=False)
    assert first["steps_done"] == 1 and not first["finished"]
    train(config, windows, windows[:8], tmp_path / "resumed", cfg, progress=False)
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")


def test_final_model_is_saved_in_hf_layout(tmp_path):
    from sinkprune.data.tokenizer import PACKAGE_TOKENIZER_DIR
    from sinkprune.dlm.loading import load_tokenizer

    tokenizer = load_tokenizer(PACKAGE_TOKENIZER_DIR)
    hf = tiny_hf_config("llada") | {"vocab_size": len(tokenizer), "embedding_size": len(tokenizer),
                                    "mask_token_id": tokenizer.mask_token_id}
    config = DLMConfig.from_hf_config(hf)
    cfg = TrainConfig(steps=2, batch_size=4, warmup=1, eval_every=100, checkpoint_every=100, eval_windows=4)
    train(config, _data(), _data()[:4], tmp_path, cfg, tokenizer=tokenizer, progress=False)
    model, loaded_tokenizer = load_model(tmp_path / "final")
    assert model.config == config
    assert loaded_tokenizer.mask_token_id == tokenizer.mask_token_id


def test_objective_ignores_bos_and_weights_by_mask_ratio():
    config = DLMConfig.from_hf_config(tiny_hf_config("llada"))

    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = config

        def forward(self, ids):
            from sinkprune.dlm.model import DLMOutput
            return DLMOutput(torch.zeros(*ids.shape, VOCAB))

    # with uniform predictions, E[loss] = log V whatever t is (the 1/p_mask weighting is unbiased)
    windows = torch.randint(3, 90, (4000, 9))
    loss = diffusion_loss(Uniform(), windows, torch.Generator().manual_seed(0))
    assert abs(loss.item() / torch.log(torch.tensor(float(VOCAB))).item() - 1) < 0.05
    assert MASK_ID not in windows


def test_learning_rate_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == 0.1 and lr_at(9, cfg) == 1.0
    assert abs(lr_at(99, cfg) - 0.1) < 1e-3
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))


def test_ship_writes_a_model_card_with_measured_numbers(tmp_path):
    from sinkprune.data.tokenizer import PACKAGE_TOKENIZER_DIR
    from sinkprune.dlm.loading import load_tokenizer
    from sinkprune.ship import ship

    tokenizer = load_tokenizer(PACKAGE_TOKENIZER_DIR)
    hf = tiny_hf_config("llada") | {"vocab_size": len(tokenizer), "embedding_size": len(tokenizer),
                                    "mask_token_id": tokenizer.mask_token_id, "bos_token_id": 0, "eos_token_id": 1}
    config = DLMConfig.from_hf_config(hf)
    cfg = TrainConfig(steps=3, batch_size=4, warmup=1, eval_every=100, checkpoint_every=100, eval_windows=4, seq_len=32)
    train(config, _data(), _data()[:4], tmp_path / "run", cfg, tokenizer=tokenizer, progress=False)
    card = ship(tmp_path / "run", tmp_path / "shipped", eval_windows=2, samples=2)
    model, _ = load_model(tmp_path / "shipped")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert card["parameters"] == sum(p.numel() for p in model.parameters())
    assert card["training"]["steps"] == 3
    assert card["evaluation"]["windows"] == 2 and card["evaluation"]["seq_len"] == 32
    text = (tmp_path / "shipped" / "README.md").read_text()
    assert f"{card['evaluation']['shipped']['nll']:.3f}" in text
    assert set(card["samples_temperature_0"]) and "untrained" in text
