"""Trainer: LR schedule, weight-decay groups, accumulation, exact resume, bad checkpoints, NaN, time limit."""

import json
import math

import pytest
import torch

from minigpt import MiniGPT, ModelConfig
from minigpt.checkpoint import CheckpointError, load_checkpoint, load_model
from conftest import FIXTURES
from minigpt.train import TrainConfig, Trainer, TrainingDivergedError, lr_at, param_groups, peak_flops, train

TINY = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "shakespeare_head.txt"
    path.write_text((FIXTURES / "shakespeare_head.txt").read_text()[:40_000])
    return str(path)


def _cfg(corpus, tmp_path, **kw):
    base = dict(data=corpus, out_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), model=dict(TINY),
                block_size=16, batch_size=4, max_steps=6, warmup_steps=2, log_interval=1, eval_interval=1000,
                eval_batches=2, sample_tokens=0, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _losses(run_dir):
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["type"] == "train"]


def test_lr_schedule_values():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(1e-3 / 11)
    assert lr_at(9, cfg) == pytest.approx(1e-3 * 10 / 11)
    assert lr_at(10, cfg) == pytest.approx(1e-3)  # peak right after warmup
    assert lr_at(60, cfg) == pytest.approx(5.5e-4)  # cosine midpoint: halfway between peak and floor
    assert lr_at(35, cfg) == pytest.approx(1e-4 + 9e-4 * (1 + math.cos(math.pi / 4)) / 2)
    assert lr_at(110, cfg) == pytest.approx(1e-4) and lr_at(500, cfg) == pytest.approx(1e-4)
    assert lr_at(110, TrainConfig(lr=2e-3, warmup_steps=0, max_steps=110)) == pytest.approx(2e-4)  # default floor lr/10
    assert lr_at(60, TrainConfig(lr=1e-3, min_lr=0.0, warmup_steps=10, max_steps=50, lr_decay_steps=110)) == pytest.approx(5e-4)
    timed = TrainConfig(lr=1e-3, min_lr=0.0, warmup_steps=0, max_steps=0, max_minutes=5)
    assert lr_at(7, timed, time_fraction=0.5) == pytest.approx(5e-4) and lr_at(7, timed, 1.3) == 0.0
    with pytest.raises(ValueError, match="time_fraction"):
        lr_at(7, timed)


def test_train_config_validation():
    with pytest.raises(ValueError, match="max-minutes"):
        TrainConfig(max_steps=0)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(lr=1e-3, min_lr=1e-2)
    with pytest.raises(ValueError, match="dtype"):
        TrainConfig(dtype="fp8")


def test_weight_decay_groups():
    for cfg in (ModelConfig(vocab_size=50, **TINY), ModelConfig(vocab_size=50, norm="layernorm", pos_encoding="learned", tie_embeddings=False, **TINY)):
        model = MiniGPT(cfg)
        decay, no_decay = param_groups(model, 0.1)
        assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
        named = dict(model.named_parameters())
        assert {id(p) for p in decay["params"]} == {id(p) for n, p in named.items() if p.dim() >= 2}
        assert {id(p) for p in no_decay["params"]} == {id(p) for n, p in named.items() if "norm" in n}
        assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == cfg.num_params()


def test_peak_flops_table():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
    assert peak_flops("Tesla T4") == 65e12
    assert peak_flops("cpu") is None


def test_loss_decreases_and_outputs(corpus, tmp_path):
    summary = train(_cfg(corpus, tmp_path, max_steps=30, lr=3e-3, eval_interval=15, sample_tokens=15))
    run = tmp_path / "run"
    losses = _losses(run)
    assert len(losses) == 30 and losses[-1] < losses[0] - 0.5
    assert summary["steps"] == 30 and summary["tokens_seen"] == 30 * 4 * 16
    assert summary["val_bpb"] == pytest.approx(summary["val_loss"] / math.log(2))  # char model on ASCII
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["type"] == "eval"]
    assert [e["step"] for e in evals] == [15, 30] and len(evals[0]["sample"]) == 15
    assert (run / "tokenizer.json").is_file()
    model, tok, ckpt = load_model(run)
    assert ckpt["step"] == 30 and tok.vocab_size == model.config.vocab_size and model.config.max_seq_len == 16


def test_grad_accumulation_matches_big_batch(corpus, tmp_path):
    train(_cfg(corpus, tmp_path / "a", batch_size=8, grad_accum=1, max_steps=4))
    train(_cfg(corpus, tmp_path / "b", batch_size=4, grad_accum=2, max_steps=4))
    a, b = _losses(tmp_path / "a" / "run"), _losses(tmp_path / "b" / "run")
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_resume_is_exact(corpus, tmp_path):
    """6 steps straight == 3 steps, save, resume, 3 steps: identical losses and weights (dropout on)."""
    kw = dict(max_steps=6, lr_decay_steps=6, model={**TINY, "dropout": 0.1}, grad_accum=2)
    straight = Trainer(_cfg(corpus, tmp_path / "a", **kw))
    straight.run()
    train(_cfg(corpus, tmp_path / "b", **{**kw, "max_steps": 3}))
    resumed = Trainer(_cfg(corpus, tmp_path / "b", **kw, resume=True))
    assert resumed.step == 3 and resumed.elapsed() >= load_checkpoint(tmp_path / "b" / "run")["elapsed_s"] > 0
    resumed.run()
    assert _losses(tmp_path / "a" / "run") == _losses(tmp_path / "b" / "run")
    for (n, p), q in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), n


def test_resume_errors(corpus, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Trainer(_cfg(corpus, tmp_path, resume=True))
    train(_cfg(corpus, tmp_path, max_steps=2))
    with pytest.raises(CheckpointError, match=r"dim: checkpoint 32, now 64"):
        Trainer(_cfg(corpus, tmp_path, resume=True, model={**TINY, "dim": 64}))
    with pytest.raises(CheckpointError, match="batch_size"):
        Trainer(_cfg(corpus, tmp_path, resume=True, batch_size=5))


def test_corrupt_and_truncated_checkpoints(corpus, tmp_path):
    train(_cfg(corpus, tmp_path, max_steps=1))
    path = tmp_path / "run" / "ckpt.pt"
    good = path.read_bytes()
    load_checkpoint(path)

    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF  # inside a tensor: torch.load itself would not notice
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "run")
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(tmp_path / "run")
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        Trainer(_cfg(corpus, tmp_path, resume=True))
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a minigpt checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nowhere")


def test_nan_loss_raises_with_step(corpus, tmp_path):
    trainer = Trainer(_cfg(corpus, tmp_path, max_steps=8, log_interval=4))
    calls = {"n": 0}

    def poison(module, inputs, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 3 else output

    trainer.model.lm_head.register_forward_hook(poison)
    with pytest.raises(TrainingDivergedError, match="loss became nan at step 3"):
        trainer.run()


def test_max_minutes_stops_then_evaluates_and_saves(corpus, tmp_path):
    summary = train(_cfg(corpus, tmp_path, max_steps=100_000, max_minutes=0.02))
    assert 0 < summary["steps"] < 100_000 and math.isfinite(summary["val_loss"])
    assert load_checkpoint(tmp_path / "run")["step"] == summary["steps"]


def test_time_limited_schedule_and_bpe(tmp_path):
    """max_steps=0 trains for max_minutes with the LR decayed over time; BPE tokenizer, documents with EOS."""
    path = tmp_path / "stories.jsonl"
    stories = (FIXTURES / "tinystories_head.txt").read_text().split("\n\n")[:300]
    path.write_text("\n".join(json.dumps({"text": s}) for s in stories))
    cfg = _cfg(str(path), tmp_path, tokenizer="bpe", bpe_vocab_size=300, max_steps=0, max_minutes=0.03, warmup_steps=1, min_lr=0.0)
    summary = train(cfg)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if r["type"] == "train"]
    assert summary["steps"] >= 3 and lrs[-1] < 0.5 * max(lrs)
    _, tok, _ = load_model(tmp_path / "run")
    assert tok.kind == "bpe" and tok.vocab_size == 300 and tok.eos_id == 1
    assert summary["val_bpb"] > 0 and summary["val_bpb"] != pytest.approx(summary["val_loss"] / math.log(2), rel=0.05)
