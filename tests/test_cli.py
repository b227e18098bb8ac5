"""CLI: python -m minigpt train / generate / export / bench with a tiny model."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES

from minigpt.__main__ import build_parser, main, train_config_from_args
from minigpt.checkpoint import load_model
from minigpt.cli import Parser
from minigpt.train import TrainConfig, load_recipe, train

REPO = Path(__file__).resolve().parents[1]

TINY = ["--model.dim", "32", "--model.n_layers", "2", "--model.n_heads", "4", "--model.n_kv_heads", "2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    data = tmp / "head.txt"
    data.write_text((FIXTURES / "shakespeare_head.txt").read_text()[:30_000])
    out = tmp / "run"
    argv = ["train", "--data", str(data), "--out-dir", str(out), "--cache-dir", str(tmp / "cache"), "--max-steps", "5",
            "--block-size", "32", "--batch-size", "4", "--eval-interval", "5", "--eval-batches", "2", "--sample-tokens", "10",
            "--no-progress", "--model.tie_embeddings", "false", *TINY]
    assert main(argv) == 0
    return out


def test_defaults_are_the_train_config_defaults():
    args = build_parser().parse_args(["train"])
    assert train_config_from_args(args) == TrainConfig()


def test_flags_reach_the_configs():
    args = build_parser().parse_args(["train", "--max-steps", "7", "--min-lr", "none", "--compile", "--model.n_kv_heads", "none",
                                      "--model.kernels", "triton", "--model.rope_theta", "500000", "--preset", "small"])
    cfg = train_config_from_args(args)
    assert cfg.max_steps == 7 and cfg.min_lr is None and cfg.compile and cfg.preset == "small"
    assert cfg.model == {"n_kv_heads": None, "kernels": "triton", "rope_theta": 500000.0}


def test_train_writes_a_run(run_dir, capsys):
    """The run's files, and the closing line that names the checkpoint and the command to sample from it."""
    files = {p.name for p in run_dir.iterdir()}
    assert {"ckpt.pt", "tokenizer.json", "metrics.jsonl"} <= files
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["type"] == "config" and rows[0]["model_config"]["dim"] == 32 and not rows[0]["model_config"]["tie_embeddings"]
    assert rows[-1]["type"] == "summary" and rows[-1]["steps"] == 5


def test_generate(run_dir, capsys):
    argv = ["generate", "--ckpt", str(run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "12", "--seed", "3", "--top-k", "5"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert first.startswith("ROMEO:") and len(first.rstrip("\n")) >= len("ROMEO:") + 1
    assert main(argv) == 0 and capsys.readouterr().out == first  # seeded
    assert main(["generate", "--ckpt", str(run_dir / "ckpt.pt"), "--temperature", "0", "--max-new-tokens", "5", "--num-samples", "2"]) == 0
    assert "-" * 40 in capsys.readouterr().out


def test_export_loads_in_transformers(run_dir, tmp_path):
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path / "hf"
    assert main(["export", "--ckpt", str(run_dir), "--hf", str(out)]) == 0
    with pytest.raises(SystemExit) as e:  # an earlier export is not replaced silently
        main(["export", "--ckpt", str(run_dir), "--hf", str(out)])
    assert e.value.code == 2
    assert main(["export", "--ckpt", str(run_dir), "--hf", str(out), "--overwrite"]) == 0
    assert (out / "tokenizer.json").read_text() == (run_dir / "tokenizer.json").read_text()
    model, _, _ = load_model(run_dir)
    hf = LlamaForCausalLM.from_pretrained(out).eval()
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    ids = torch.tensor([hf_tok.encode("First Citizen:", add_special_tokens=False)])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("argv, message", [
    (["train", "--max-steps", "many"], "invalid int value"),
    (["train", "--model.norm", "batchnorm", "--max-steps", "1", "--data", str(FIXTURES / "shakespeare_head.txt")], "norm='batchnorm' is not supported"),
    (["train", "--data", "no/such/file.txt"], "neither a known corpus"),
    (["train", "--preset", "huge", "--data", str(FIXTURES / "shakespeare_head.txt")], "unknown preset"),
    (["train", "--lr", "0"], "--lr must be > 0"),
    (["train", "--lr", "-1e-3"], "--lr must be > 0, got -0.001"),  # a value, not a flag ("expected one argument")
    (["train", "--recipe", "nope"], "unknown recipe 'nope'"),
    (["train", "--resume", "--overwrite"], "contradict"),
    (["train", "--model.tie_embeddings", "maybe"], "expected true/false"),
    (["generate", "--ckpt", "no/such/run"], "no checkpoint"),
    (["generate"], "required: --ckpt"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_exit_with_a_message(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, line", [
    (["train", "--model.dim", "abc"], "python -m minigpt train: error: argument --model.dim: invalid int value: 'abc'"),
    (["generate", "--ckpt", "x", "--top-k", "many"], "python -m minigpt generate: error: argument --top-k: invalid int value: 'many'"),
    (["export", "--ckpt", "x"], "python -m minigpt export: error: the following arguments are required: --hf"),
    (["serve", "--ckpt", "x", "--port", "http"], "python -m minigpt serve: error: argument --port: invalid int value: 'http'"),
    (["trian"], "python -m minigpt: error: argument {train,generate,export,serve,bench}: invalid choice: 'trian'"),
])
def test_argparse_errors_are_one_line(argv, line, capsys):
    """No usage block before the error: train's usage alone is dozens of lines of flags that buried it."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    prog = line.split(": error:")[0]
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(line) and err.endswith(f"(see {prog} --help)\n"), err


def test_a_mistyped_subcommand_names_the_closest(capsys):
    with pytest.raises(SystemExit) as e:
        main(["trian"])
    assert e.value.code == 2 and "invalid choice: 'trian' (choose from " in (err := capsys.readouterr().err)
    assert err.endswith("); did you mean train? (see python -m minigpt --help)\n"), err
    with pytest.raises(SystemExit):
        main(["frobnicate"])
    assert "did you mean" not in capsys.readouterr().err


@pytest.mark.parametrize("word, value", [("-1e-3", -1e-3), ("-2.5E+2", -250.0), ("-.5", -0.5), ("-3", -3.0), ("-1.e2", -100.0)])
def test_negative_numbers_in_any_notation_are_values(word, value):
    parser = Parser(prog="p")
    parser.add_argument("--lr", type=float)
    parser.add_argument("-v", action="store_true")
    assert parser.parse_args(["--lr", word]).lr == value
    assert parser.parse_args(["-v"]).v  # a flag is still a flag


@pytest.mark.parametrize("argv, message", [
    (["train", "--max-step", "10"], "python -m minigpt train: error: unrecognized argument --max-step; did you mean --max-steps?"),
    (["train", "--model.n_layer", "2"], "unrecognized argument --model.n_layer; did you mean --model.n_layers?"),  # was taken as an abbreviation
    (["train", "--model.n-layers", "2"], "unrecognized argument --model.n-layers; did you mean --model.n_layers?"),
    (["train", "--max-stps=10", "--frobnicate"], "unrecognized arguments --max-stps=10 (did you mean --max-steps?), --frobnicate (see"),
    (["generate", "--ckpt", "x", "--tmperature", "2"], "python -m minigpt generate: error: unrecognized argument --tmperature; did you mean --temperature?"),
    (["serve", "--ckpt", "x", "--prot", "80"], "unrecognized argument --prot; did you mean --port?"),
    # no suggestion beats a wrong one: the shared "--" made --foo look like --lr; after "--" a real flag is not a typo
    (["train", "--foo", "1", "--bar", "2"], "unrecognized arguments --foo, --bar (see"),
    (["train", "--", "foo"], "unrecognized argument foo (see"),
    (["train", "--max-steps", "3", "--", "--lr"], "unrecognized argument --lr (see"),
])
def test_unknown_flags_suggest_the_closest(argv, message, capsys):
    """A typo'd flag names the real one, from the subcommand's own flags; a prefix is no longer silently expanded."""
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1, err


def test_block_size_beyond_the_data_is_refused_before_the_model_is_built(tmp_path, capsys, monkeypatch):
    """--block-size 100000000 on a small corpus is one line, checked before the model exists: building it sized
    the RoPE table by max_seq_len = block_size (12.8 GB for the tiny preset) and the run was OOM-killed."""
    import minigpt.train

    def no_model(config):
        raise AssertionError(f"the model (max_seq_len={config.max_seq_len}) was built before the data length check")

    monkeypatch.setattr(minigpt.train, "MiniGPT", no_model)
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(FIXTURES / "shakespeare_head.txt"), "--block-size", "100000000", "--out-dir", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert "too few for block_size=100000000 (need at least 100000002): use a smaller --block-size or more data" in err
    assert not out.exists()


def test_triton_is_required_on_linux_only():
    """Triton publishes Linux wheels only: unmarked, `pip install -r requirements.txt` (or the [triton] extra)
    fails on macOS and Windows; on Linux the pin is unchanged."""
    import tomllib

    from packaging.requirements import Requirement

    lines = [l.split(" #")[0].strip() for f in sorted(REPO.glob("requirements*.txt")) for l in f.read_text().splitlines()]
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    reqs = [Requirement(l) for l in lines if l and not l.startswith(("#", "-"))] + [Requirement(r) for rs in extras.values() for r in rs]
    tritons = [r for r in reqs if r.name == "triton"]
    assert {str(r.specifier) for r in tritons} == {"==3.7.1", ">=3.0"}
    for r in tritons:
        assert r.marker is not None and r.marker.evaluate({"sys_platform": "linux"}), r
        assert not r.marker.evaluate({"sys_platform": "darwin"}) and not r.marker.evaluate({"sys_platform": "win32"}), r


def test_bench_dispatches_to_minigpt_bench(monkeypatch):
    calls = []
    fake = type(sys)("minigpt.bench")
    fake.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "minigpt.bench", fake)
    assert main(["bench", "--op", "rmsnorm", "--help-me"]) == 0 and calls == [["--op", "rmsnorm", "--help-me"]]


def test_module_entry_point_help():
    proc = subprocess.run([sys.executable, "-m", "minigpt", "train", "--help"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert proc.returncode == 0
    for f in dataclasses.fields(TrainConfig):
        if f.name != "model":
            assert "--" + f.name.replace("_", "-") in proc.stdout
    assert "--model.kernels" in proc.stdout and "--model.dim" in proc.stdout
    text = " ".join(proc.stdout.split())
    assert "one of rmsnorm, layernorm" in text and "one of torch, triton" in text  # allowed values of --model.* choices
    assert "whichever comes first" in text and "gutenberg-small" in text


def test_recipe_with_overrides():
    args = build_parser().parse_args(["train", "--recipe", "gutenberg-small", "--batch-size", "8", "--no-compile", "--model.dim", "192"])
    cfg = train_config_from_args(args)
    recipe = load_recipe("gutenberg-small")
    assert cfg.batch_size == 8 and not cfg.compile and cfg.model == {"dim": 192}  # flags win
    assert (cfg.preset, cfg.lr, cfg.max_minutes, cfg.block_size) == (recipe["preset"], recipe["lr"], recipe["max_minutes"], recipe["block_size"])
    char = train_config_from_args(build_parser().parse_args(["train", "--recipe", "shakespeare-char", "--model.dropout", "0"]))
    assert char.model["dropout"] == 0.0 and char.model["n_layers"] == 6  # one [model] field overridden, the others kept


def _rows(run_dir, kind="train"):
    return [r for r in (json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def test_sigint_saves_and_resume_is_bit_identical(tmp_path):
    """Ctrl-C mid-run: one-line message, exit 130, a checkpoint; --resume finishes with the very
    losses of an uninterrupted run."""
    data = tmp_path / "head.txt"
    data.write_text((FIXTURES / "shakespeare_head.txt").read_text()[:30_000])
    flags = ["--data", str(data), "--cache-dir", str(tmp_path / "cache"), "--max-steps", "300", "--block-size", "16", "--batch-size", "4",
             "--warmup-steps", "2", "--log-interval", "1", "--eval-interval", "1000", "--eval-batches", "2", "--sample-tokens", "0",
             "--no-progress", "--no-tensorboard", *TINY]
    cmd = [sys.executable, "-m", "minigpt", "train", "--out-dir", str(tmp_path / "cut"), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count('"train"') >= 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert len(err.strip().splitlines()) == 1 and "interrupted at step" in err and "--resume" in err
    cut_at = len(_rows(tmp_path / "cut"))
    assert 5 <= cut_at < 300 and load_checkpoint_step(tmp_path / "cut") == cut_at

    done = subprocess.run([*cmd, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    args = build_parser().parse_args(["train", "--out-dir", str(tmp_path / "straight"), *flags])
    train(train_config_from_args(args))
    assert [r["loss"] for r in _rows(tmp_path / "cut")] == [r["loss"] for r in _rows(tmp_path / "straight")]

    again = subprocess.run([*cmd, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0 and "nothing left to do" in again.stdout


def load_checkpoint_step(run_dir) -> int:
    from minigpt.checkpoint import load_checkpoint

    return load_checkpoint(run_dir)["step"]


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_device_flag_errors_name_the_fix(command, capsys, monkeypatch):
    """--device cuda without a visible GPU, or a device name that is none of auto/cpu/cuda, is one line
    naming the fix (it was a torch traceback for generate and serve)."""
    if command == "serve":
        pytest.importorskip("starlette")  # without it serve stops earlier, at the missing extra
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, message in (("cuda", "no CUDA GPU is visible to PyTorch here; use --device cpu"),
                            ("gpu", "use auto, cpu, cuda or cuda:N")):
        with pytest.raises(SystemExit) as e:
            main([command, "--ckpt", "no/such/run", "--device", device, *(["--port", "0"] if command == "serve" else [])])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_serve_refuses_a_port_in_use_before_loading(capsys):
    """A taken port is reported in one line before the model loads (uvicorn used to log 'serving ...' and then die)."""
    import socket

    pytest.importorskip("starlette")

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as e:
            main(["serve", "--ckpt", "no/such/run", "--port", str(port)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"cannot listen on 127.0.0.1:{port}" in err and "another --port" in err


def test_serve_refuses_a_port_outside_tcp_range(capsys):
    pytest.importorskip("starlette")
    with pytest.raises(SystemExit) as e:
        main(["serve", "--ckpt", "no/such/run", "--port", "70000"])
    assert e.value.code == 2 and "--port 70000: a TCP port is 0-65535" in capsys.readouterr().err


def test_serve_without_its_extra_names_the_install(tmp_path):
    """Without starlette (the [serve] extra) `serve` says what to install instead of an ImportError traceback."""
    code = "import sys; sys.modules['starlette'] = None; from minigpt.__main__ import main; sys.exit(main(['serve', '--ckpt', 'x']))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 2 and "pip install 'minigpt[serve]'" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_val_split_too_short_fails_before_training(tmp_path, capsys, monkeypatch):
    """The val split's length is checked with the train split's, before step 1: no half-written run is left
    behind that --resume cannot continue and a plain rerun refuses to replace."""
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "small.txt"
    data.write_text((FIXTURES / "shakespeare_head.txt").read_text()[:3000])  # 2700 train characters, 300 val
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(data), "--block-size", "512", "--batch-size", "2", "--max-steps", "3",
              "--out-dir", str(out), "--no-progress", *TINY])
    assert e.value.code == 2 and "the val split has 300 tokens, too few for block_size=512" in capsys.readouterr().err
    assert not (out / "metrics.jsonl").exists()


def test_train_ends_naming_the_checkpoint_and_the_next_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "head.txt"
    data.write_text((FIXTURES / "shakespeare_head.txt").read_text()[:20_000])
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out-dir", str(out), "--max-steps", "2", "--block-size", "16", "--batch-size", "2",
                 "--eval-batches", "1", "--sample-tokens", "0", "--no-progress", *TINY]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"saved {out / 'ckpt.pt'}") and f"python -m minigpt generate --ckpt {out}" in last
    assert (out / "ckpt.pt").is_file()
