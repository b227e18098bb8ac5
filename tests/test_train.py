"""Trainer: LR schedule, weight-decay groups, accumulation, exact resume, bad checkpoints, NaN, time limit."""

import json
import math

import pytest
import torch
from conftest import FIXTURES

from minigpt import MiniGPT, ModelConfig
from minigpt.checkpoint import CheckpointError, load_checkpoint, load_model
from minigpt.monitor import SpikeDetector, plot_run
from minigpt.runtime import peak_flops
from minigpt.train import NothingToDoError, TrainConfig, Trainer, TrainingDivergedError, default_batch_size, load_recipe, lr_at, param_groups, recipes, train

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
    with pytest.raises(ValueError, match="--batch-size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="--min-lr"):
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


def _train_rows(run_dir):
    return [r for r in (json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]


def test_grad_accumulation_matches_big_batch(corpus, tmp_path):
    """2 micro-batches of 4 == 1 batch of 8: same losses AND same gradient norms (global and per
    group, before clipping), so a missing 1/grad_accum (gradients twice as large) fails here. On the CPU
    in fp32 on every machine: it checks arithmetic, and on a GPU the kernels chosen for each batch shape
    moved one group's norm by more than these tolerances (seen on the H200)."""
    train(_cfg(corpus, tmp_path / "a", batch_size=8, grad_accum=1, max_steps=4, grad_clip=0.0, device="cpu"))
    train(_cfg(corpus, tmp_path / "b", batch_size=4, grad_accum=2, max_steps=4, grad_clip=0.0, device="cpu"))
    a, b = _train_rows(tmp_path / "a" / "run"), _train_rows(tmp_path / "b" / "run")
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5, abs=1e-6)
    assert [r["grad_norm"] for r in a] == pytest.approx([r["grad_norm"] for r in b], rel=1e-4)
    for ra, rb in zip(a, b, strict=True):
        assert ra["grad_norms"] == pytest.approx(rb["grad_norms"], rel=1e-4)


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
    for (n, p), q in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), n


def test_resume_errors(corpus, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Trainer(_cfg(corpus, tmp_path, resume=True))
    train(_cfg(corpus, tmp_path, max_steps=2))
    with pytest.raises(CheckpointError, match=r"dim: checkpoint 32, now 64"):
        Trainer(_cfg(corpus, tmp_path, resume=True, model={**TINY, "dim": 64}))
    with pytest.raises(CheckpointError, match="batch_size: checkpoint 4, now 5"):
        Trainer(_cfg(corpus, tmp_path, resume=True, batch_size=5))


def test_resume_with_new_max_steps_says_the_schedule_changes(corpus, tmp_path, capsys):
    """Raising --max-steps on resume is allowed (train on), but it stretches the LR decay: say so, and how to
    keep the old schedule; no note when the schedule is pinned by --lr-decay-steps."""
    train(_cfg(corpus, tmp_path, max_steps=2))
    capsys.readouterr()
    Trainer(_cfg(corpus, tmp_path, resume=True, max_steps=4))
    err = capsys.readouterr().err
    assert "--max-steps 2 -> 4: the learning rate now decays over 4 steps" in err and "--lr-decay-steps 2" in err
    Trainer(_cfg(corpus, tmp_path, resume=True, max_steps=4, lr_decay_steps=2))
    assert "note:" not in capsys.readouterr().err


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
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"is not a checkpoint file.*pass a run directory or its ckpt.pt"):
        load_checkpoint(tmp_path / "tokenizer.json")  # a JSON file, not torch's 'weights_only' advice
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

    trainer.model.norm.register_forward_hook(poison)  # the final norm: the LM head is a matmul on its output, not a module call
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


def test_run_limits_steps_time_and_both(corpus, tmp_path):
    assert TrainConfig().max_steps == 200 and TrainConfig(max_minutes=2).max_steps == 0  # a time budget alone: no step limit
    assert train(_cfg(corpus, tmp_path / "a", max_steps=3, max_minutes=10.0))["steps"] == 3  # the steps come first
    timed = train(_cfg(corpus, tmp_path / "b", max_steps=10**6, max_minutes=0.01))  # the clock comes first
    assert 0 < timed["steps"] < 10**6 and timed["wall_s"] >= 0.6
    lrs = [r["lr"] for r in _train_rows(tmp_path / "b" / "run")]
    assert lrs[-1] == pytest.approx(lr_at(len(lrs) - 1, _cfg(corpus, tmp_path, max_steps=10**6)))  # with both, the LR follows the steps


def test_clear_errors_for_bad_runs(corpus, tmp_path):
    with pytest.raises(ValueError, match="--lr must be > 0"):
        _cfg(corpus, tmp_path, lr=0.0)
    with pytest.raises(ValueError, match="unknown ModelConfig field"):  # a typo fails at once, before any data preparation
        _cfg("no/such/corpus.txt", tmp_path, model={"dimm": 32})
    with pytest.raises(ValueError, match="norm='rmsnrom'"):
        _cfg("no/such/corpus.txt", tmp_path, model={**TINY, "norm": "rmsnrom"})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: no CUDA GPU"):
            Trainer(_cfg(corpus, tmp_path, device="cuda"))
    train(_cfg(corpus, tmp_path, max_steps=2))
    with pytest.raises(ValueError, match=r"already holds a run.*--resume.*--overwrite"):
        Trainer(_cfg(corpus, tmp_path, max_steps=2))
    assert train(_cfg(corpus, tmp_path, max_steps=3, overwrite=True))["steps"] == 3
    assert len(_train_rows(tmp_path / "run")) == 3  # replaced, not appended to
    with pytest.raises(NothingToDoError, match=r"nothing left to do.*step 3 of --max-steps 3"):
        Trainer(_cfg(corpus, tmp_path, max_steps=3, resume=True))


def test_monitoring_records_tensorboard_and_spikes(corpus, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(_cfg(corpus, tmp_path, max_steps=4, eval_interval=2, log_interval=2))
    row = _train_rows(tmp_path / "run")[-1]
    assert set(row["grad_norms"]) == {"embed", "attn", "ffn", "norm"}  # tied embeddings: no separate head
    assert row["grad_norm"] == pytest.approx(math.sqrt(sum(v * v for v in row["grad_norms"].values())), rel=1e-4)
    assert 1e-5 < row["update_ratio"] < 1.0 and row["ppl"] == pytest.approx(math.exp(row["loss"]))
    events = EventAccumulator(str(tmp_path / "run")).Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/update_ratio", "grad_norm/attn", "eval/val_loss"} <= set(tags)
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]
    assert events.Scalars("train/loss")[-1].value == pytest.approx(row["loss"], rel=1e-6)

    det = SpikeDetector(window=10, grad_factor=4.0)
    quiet = [{"type": "train", "step": s, "loss": 4.0 - 0.01 * s, "grad_norm": 0.5} for s in range(1, 9)]
    found = det.scan([*quiet, {"type": "train", "step": 9, "loss": 3.9, "grad_norm": 17.5}, {"type": "train", "step": 10, "loss": 5.0, "grad_norm": 0.5}])
    assert [f["step"] for f in found] == [9, 10] and "35.0x" in found[0]["message"] and "loss 5" in found[1]["message"]


def test_plot_run_draws_a_dashboard(corpus, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    train(_cfg(corpus, tmp_path, max_steps=4, log_interval=1))
    fig = plot_run(tmp_path / "run")
    assert len(fig.axes) == 6 and fig.axes[0].get_lines()[0].get_ydata().tolist() == pytest.approx([r["loss"] for r in _train_rows(tmp_path / "run")])


def test_recipes_load_and_build():
    assert {"shakespeare-char", "gutenberg-small", "gutenberg-medium"} <= set(recipes())
    small = TrainConfig(**load_recipe("gutenberg-small"))
    assert (small.preset, small.block_size, small.batch_size, small.lr, small.max_minutes, small.max_steps) == ("small", 1024, 32, 1e-3, 4.0, 0)
    char = TrainConfig(**load_recipe("shakespeare-char"))
    assert char.model["n_layers"] == 6 and char.max_steps == 5000
    with pytest.raises(ValueError, match="unknown recipe 'gutenberg-huge'"):
        load_recipe("gutenberg-huge")


def test_default_batch_size_fills_the_card(monkeypatch):
    """CPU: 12. GPU: 32768 tokens per micro-batch when the estimate fits 80% of free memory, else halved."""
    small = ModelConfig.preset("small", max_seq_len=1024)
    assert default_batch_size(small, 1024, torch.device("cpu")) == 12
    gib = 2**30
    for free, expected in ((140 * gib, 32), (12 * gib, 16), (3 * gib, 4), (1 * gib, 1)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 141 * gib))
        assert default_batch_size(small, 1024, torch.device("cuda", 0)) == expected, free
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (140 * gib, 141 * gib))
    assert default_batch_size(small, 128, torch.device("cuda", 0)) == 256  # short sequences: more of them


def test_read_metrics_archive_round_trip(tmp_path):
    import io
    import tarfile

    from minigpt.monitor import read_metrics_archive

    runs = {"runs_2017": [{"type": "train", "step": 1, "loss": 4.0}], "runs_2024": [{"type": "eval", "step": 2, "val_loss": 3.5}]}
    path = tmp_path / "x_metrics.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, records in runs.items():
            data = ("\n".join(json.dumps(r) for r in records) + "\n\n").encode()
            info = tarfile.TarInfo(f"{name}.jsonl")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert read_metrics_archive(path) == runs
    with pytest.raises(FileNotFoundError, match="no metrics archive"):
        read_metrics_archive(tmp_path / "missing.tar.gz")


@pytest.mark.parametrize(("capability", "want"), [((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_dtype_is_fp16_below_sm80_even_where_torch_emulates_bf16(monkeypatch, capability, want):
    """A Colab T4 (sm_75) gets fp16: torch.cuda.is_bf16_supported() says True there (emulated bf16), but
    its tensor cores and Triton's tl.dot have no bf16, so bf16 would break the kernels. `--dtype bfloat16`
    is refused there with the fix named."""
    from minigpt import runtime
    from minigpt.train import _autocast_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # as on a T4 with emulation
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    assert runtime.dtype() == want
    cuda = torch.device("cuda")
    assert _autocast_dtype(TrainConfig(dtype="auto"), cuda) == want
    if want == torch.float16:
        with pytest.raises(ValueError, match=r"no native bf16.*--dtype float16"):
            _autocast_dtype(TrainConfig(dtype="bfloat16"), cuda)


def test_a_run_with_a_progress_bar_prints_its_evaluations(corpus, tmp_path, capsys):
    train(_cfg(corpus, tmp_path, max_steps=4, eval_interval=2, progress=True))
    out = capsys.readouterr().out
    assert "step 2: val loss" in out and "step 4: val loss" in out and "bits/byte" in out
    train(_cfg(corpus, tmp_path / "quiet", max_steps=2))  # progress=False: nothing printed
    assert "val loss" not in capsys.readouterr().out


def test_grad_scaler_scales_only_fp16(monkeypatch):
    """The chapters' hand-written loops scale the loss on a T4 (fp16) and nowhere else; autocast is off on the CPU."""
    from minigpt import runtime

    cpu = torch.device("cpu")
    assert not runtime.grad_scaler(cpu).is_enabled()
    with runtime.autocast(cpu):
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, scaled in (((7, 5), True), ((8, 0), False), ((9, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, capability=capability, **k: capability)
        assert runtime.grad_scaler(torch.device("cuda")).is_enabled() == scaled, capability


def test_published_runs_load_all_or_none(tmp_path):
    """Chapters 8 and 9 read the GPU runs through one loader: every record, or None when any is missing."""
    from minigpt.monitor import PUBLISHED_RUNS, load_published_runs
    from minigpt.runtime import measured_on

    for name in PUBLISHED_RUNS[:-1]:
        (tmp_path / f"{name}.json").write_text(json.dumps({"provenance": {"gpu": "G", "dtype": "bf16", "torch": "t",
                                                                         "triton": "tr", "date": "2026-11-25T00:00"}}))
    assert load_published_runs(tmp_path) is None  # one missing
    (tmp_path / f"{PUBLISHED_RUNS[-1]}.json").write_text("{}")
    runs = load_published_runs(tmp_path)
    assert runs is not None and set(runs) == set(PUBLISHED_RUNS)
    assert measured_on(runs["shakespeare"]["provenance"]) == "measured on G, bf16, torch t, triton tr, 2026-11-25"


def test_pick_device_names_the_devices_there_are(monkeypatch):
    """A --device that names no device here is a ValueError listing what there is (it was a torch error later)."""
    from minigpt.runtime import pick_device

    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="use auto, cpu, cuda or cuda:N"):
        pick_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda", 1) and pick_device("cuda", local_rank=1) == torch.device("cuda", 1)
    for bad in ("cuda:2", "cuda:x", "cuda:-1"):
        with pytest.raises(ValueError, match=r"has 2 CUDA device\(s\): use cuda or cuda:0 \.\. cuda:1"):
            pick_device(bad)
