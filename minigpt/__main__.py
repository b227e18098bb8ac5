"""Command line: ``python -m minigpt {train,generate,export,serve,bench} ...``.

Flag scheme of ``train``: every ``TrainConfig`` field is ``--field-name`` (``--max-steps 200``,
``--compile``/``--no-compile``), and every ``ModelConfig`` field is ``--model.FIELD VALUE``
(``--model.dim 256 --model.n_kv_heads 2 --model.kernels triton``), applied on top of
``--preset``. ``python -m minigpt train`` with no flags trains the tiny char model on Tiny
Shakespeare for a minute on CPU. ``--recipe NAME`` starts from a published run's settings
(``minigpt/recipes/NAME.toml``); any flag given as well overrides the recipe.

How long a run trains: ``--max-steps N`` (the LR decays over N steps; default 200), or
``--max-minutes M`` alone (a time budget: the LR decays over M minutes), or both (it stops at
whichever comes first; the LR follows the steps). Ctrl-C saves a checkpoint; ``--resume`` continues.
Multi-GPU: ``torchrun --nproc_per_node 8 -m minigpt train ...`` (only rank 0 prints and writes).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

import torch

from . import runtime
from .checkpoint import CKPT_FILE, load_model
from .cli import Parser
from .config import _CHOICES, ModelConfig
from .distributed import is_master_process
from .model import MiniGPT
from .monitor import METRICS_FILE
from .sampling import sample_next
from .tokenizer import TOKENIZER_FILE
from .train import NothingToDoError, TrainConfig, TrainingDivergedError, TrainingInterrupted, load_recipe, recipes, start_ids, train

__all__ = ["build_parser", "generate_sliding", "main"]


def _parse_bool(s: str) -> bool:
    low = s.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _optional(kind):
    def parse(s: str):
        return None if s.lower() == "none" else kind(s)

    parse.__name__ = kind.__name__
    return parse


_TYPES = {"int": int, "float": float, "str": str, "bool": _parse_bool}


def _split_optional(annotation: object) -> tuple[str, bool]:
    """('int', True) for a field annotated 'Optional[int]' or 'int | None'; ('int', False) for 'int'."""
    a = str(annotation).replace(" ", "")
    if a.startswith("Optional[") and a.endswith("]"):
        return a[len("Optional["):-1], True
    if a.endswith("|None"):
        return a[:-len("|None")], True
    if a.startswith("None|"):
        return a[len("None|"):], True
    return a, False


def _arg_type(annotation: object):
    """argparse type for a dataclass field annotation such as 'int', 'Optional[int]' or 'int | None'."""
    base, optional = _split_optional(annotation)
    return _optional(_TYPES[base]) if optional else _TYPES[base]


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """Every TrainConfig field as a flag. Defaults are left out of the namespace (SUPPRESS), so
    ``train_config_from_args`` knows which flags were given and lets them override a recipe."""
    p.add_argument("--recipe", default=None, metavar="NAME",
                   help=f"start from a published run's settings: {', '.join(recipes())} (or a path to a .toml); flags override it")
    g = p.add_argument_group("training (TrainConfig)")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model":
            continue
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata["help"]
        if "default" not in text:  # a help text that explains its own default (e.g. "lr / 10") keeps only that
            text += f" (default: {f.default})" if f.type == "bool" else f" (default: {f.default!r})"
        if f.type == "bool":
            g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        else:
            g.add_argument(flag, dest=f.name, type=_arg_type(f.type), default=argparse.SUPPRESS, metavar=_split_optional(f.type)[0].upper(),
                           help=text)
    m = p.add_argument_group("model (ModelConfig overrides on top of --preset)")
    for f in dataclasses.fields(ModelConfig):
        text = f"ModelConfig.{f.name} ({f.type}; 'none' for None)" if _split_optional(f.type)[1] else f"ModelConfig.{f.name} ({f.type})"
        if f.name in _CHOICES:
            text += ": one of " + ", ".join("none" if c is None else c for c in _CHOICES[f.name])
        m.add_argument(f"--model.{f.name}", dest=f"model.{f.name}", type=_arg_type(f.type), default=argparse.SUPPRESS, metavar="VALUE", help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m minigpt", description="Train, sample from, export and benchmark MiniGPT models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,generate,export,serve,bench}")

    tp = sub.add_parser("train", help="train a model", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_train_args(tp)

    gp = sub.add_parser("generate", help="sample text from a checkpoint (past the context, the window slides)")
    gp.add_argument("--ckpt", required=True, help="run directory (with ckpt.pt) or checkpoint file")
    gp.add_argument("--prompt", default="", help="text to continue ('' = start of a document)")
    gp.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    gp.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0 = greedy)")
    gp.add_argument("--top-k", type=int, default=None, help="keep only the k most likely tokens")
    gp.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep the smallest set with this mass")
    gp.add_argument("--num-samples", type=int, default=1, help="independent samples to print")
    gp.add_argument("--seed", type=int, default=0, help="sampling seed")
    gp.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: auto, cuda if available)")

    ep = sub.add_parser("export", help="export a checkpoint to the Hugging Face Llama format")
    ep.add_argument("--ckpt", required=True, help="run directory (with ckpt.pt) or checkpoint file")
    ep.add_argument("--hf", required=True, help="output directory for config.json, weights and tokenizer.json")
    ep.add_argument("--overwrite", action="store_true", help="replace an earlier export in --hf")

    sp = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API")
    sp.add_argument("--ckpt", required=True, help="run directory (with ckpt.pt) or checkpoint file")
    sp.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1, this machine only)")
    sp.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    sp.add_argument("--max-batch-size", type=int, default=64, help="sequences per engine step (default: 64)")
    sp.add_argument("--max-num-tokens", type=int, default=8192, help="tokens per engine step (default: 8192)")
    sp.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: auto, cuda if available)")
    sp.add_argument("--model-name", default="minigpt", help="the model id clients pass (default: minigpt)")

    sub.add_parser("bench", help="kernel and model benchmarks (python -m minigpt bench --help)", add_help=False)
    return parser


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The recipe's fields (if ``--recipe``), overridden by the flags given, on TrainConfig's defaults."""
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"model"}
    kw = load_recipe(args.recipe) if getattr(args, "recipe", None) else {}
    kw.update({k: v for k, v in vars(args).items() if k in names})
    kw["model"] = {**kw.get("model", {}), **{k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith("model.")}}
    return TrainConfig(**kw)


def _train(args: argparse.Namespace) -> None:
    cfg = train_config_from_args(args)
    summary = train(cfg)
    if is_master_process():
        keys = ("steps", "tokens_seen", "val_loss", "val_bpb", "tokens_per_s", "mfu", "wall_s")
        print(" ".join(f"{k}={summary[k]:.4g}" if isinstance(summary[k], float) else f"{k}={summary[k]}" for k in keys))
        print(f"saved {Path(cfg.out_dir) / CKPT_FILE} (metrics: {Path(cfg.out_dir) / METRICS_FILE}); "
              f"sample from it: python -m minigpt generate --ckpt {cfg.out_dir}")


@torch.no_grad()
def generate_sliding(model: MiniGPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                     top_k: int | None = None, top_p: float | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``max_new_tokens`` new tokens ``[B, n]`` after ``idx[B, T]``, continuing past the context.

    While prompt + output fit in ``max_seq_len``, ``model.generate`` samples with its KV cache.
    Past that, each token is sampled from the last ``max_seq_len`` tokens, re-prefilled from
    scratch (nanoGPT's sampler): positions stop at the context, so the window slides instead of
    the cache growing. ``MiniGPT.generate`` itself keeps refusing to go past the context.
    """
    ctx, start = model.config.max_seq_len, idx.shape[1]
    model.eval()
    cached = min(max_new_tokens, max(ctx - start, 0))
    if cached:
        idx = model.generate(idx, cached, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    for _ in range(max_new_tokens - cached):
        logits, _ = model(idx[:, -ctx:])
        nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
        idx = torch.cat([idx, nxt[:, None].to(idx.dtype)], dim=1)
    return idx[:, start:]


def _generate(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1 or args.num_samples < 1:
        raise ValueError("--max-new-tokens and --num-samples must be >= 1")
    device = runtime.pick_device(args.device)
    model, tok, _ = load_model(args.ckpt, device)
    ids = tok.encode(args.prompt) if args.prompt else start_ids(tok)
    idx = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    new = generate_sliding(model, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=g)
    for i in range(args.num_samples):
        if i:
            print("\n" + "-" * 40)
        print(args.prompt + tok.decode(new[i].tolist()))


def _export(args: argparse.Namespace) -> None:
    from .hf import save_hf

    out = Path(args.hf)
    if (out / "config.json").exists() and not args.overwrite:
        raise ValueError(f"--hf {out} already holds an export (config.json): pass --overwrite to replace it, or pick another --hf")
    model, _, _ = load_model(args.ckpt)
    save_hf(model, out)
    ckpt_dir = Path(args.ckpt) if Path(args.ckpt).is_dir() else Path(args.ckpt).parent
    shutil.copyfile(ckpt_dir / TOKENIZER_FILE, out / TOKENIZER_FILE)
    print(f"exported to {out}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from .bench import main as bench_main

        return bench_main(argv[1:]) or 0
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            _train(args)
        elif args.command == "generate":
            _generate(args)
        elif args.command == "serve":
            try:
                from .serve.server import serve
            except ImportError as e:  # starlette / uvicorn: the [serve] extra
                raise ValueError(f"serving needs {e.name or 'starlette and uvicorn'}, which is not installed: "
                                 "pip install 'minigpt[serve]'") from None
            serve(args.ckpt, args.host, args.port, args.max_batch_size, args.max_num_tokens, args.device, args.model_name)
        else:
            _export(args)
    except NothingToDoError as e:
        if is_master_process():
            print(e)
    except TrainingInterrupted as e:
        if is_master_process():
            print(e, file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before the training loop took over the signal: nothing to save yet
        if is_master_process():
            print(f"python -m minigpt {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, TrainingDivergedError) as e:  # includes DataNotFoundError, CheckpointError
        parser.exit(2, f"python -m minigpt {args.command}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
