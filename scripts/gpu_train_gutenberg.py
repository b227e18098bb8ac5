"""GPU run B: BPE on Project Gutenberg, train `small` then `medium` on the clock, then throughput.

1. Tokenizer: byte-level BPE, 20k vocab, trained on the training books (held-out books never
   seen), or read from ``--tokenizer PATH`` (pretrained on CPU and carried, saves ~40 s).
2. Tokenise both splits (parallel Rust threads), cached as memmaps.
3. Train ``small`` for ``--small-minutes`` and ``medium`` for ``--medium-minutes`` with the LR
   decayed over the wall clock (``max_steps=0``); evaluate on held-out books: val loss, bits per
   byte, tokens seen, tokens/s, MFU, peak memory, 3 samples.
4. Throughput of small and medium, same batch and sequence: (a) eager + SDPA, (b) torch.compile
   + SDPA, (c) ``kernels="triton"`` (when its kernels import), ``--bench-steps`` steps after warmup.

Writes ``$OUT/gutenberg.json``, each run's metrics JSONL, ``gutenberg.png`` and the tokenizer (``--name`` changes
the stem). ``--small-minutes 0 --medium-minutes 7 --bench-steps 0 --name gutenberg_medium_long`` trains only
``medium``, for as long as one 10-minute call allows.

    MINIGPT_DATA_DIR=.carry/data python scripts/gpu_train_gutenberg.py [--tokenizer .carry/gutenberg_bpe20k/tokenizer.json]
    python scripts/gpu_train_gutenberg.py --smoke --out /tmp/smoke     # CPU check on a small book sample
"""

from __future__ import annotations

import argparse
import gc
import json
import lzma
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from gpu_train_common import Deadline, bundle_metrics, fmt, loss_curve, print_table, provenance, pyplot, save_figure, time_steps, write_json

from minigpt.data import find_data_file, load_corpus, tokenize_split
from minigpt.tokenizer import load_tokenizer, train_bpe
from minigpt.train import TrainConfig, Trainer, load_recipe

PROMPTS = ["", "It was a dark and stormy night", "CHAPTER I.\n\n"]


def smoke_corpus(work: Path) -> str:
    """A small gutenberg-format sample (first 12 books, 30 kB each) for a CPU check of the script."""
    path = work / "gutenberg_sample.jsonl.xz"
    with lzma.open(find_data_file("gutenberg"), "rt", encoding="utf-8") as src, lzma.open(path, "wt", encoding="utf-8") as dst:
        for _, line in zip(range(12), src, strict=False):
            book = json.loads(line)
            dst.write(json.dumps({**book, "text": book["text"][:30_000]}) + "\n")
    return str(path)


def free(*objs) -> None:
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on a small book sample: checks the script on CPU")
    p.add_argument("--out", default=os.environ.get("OUT", "results/train"), help="output folder (default: $OUT or results/train)")
    p.add_argument("--budget-minutes", type=float, default=8.2, help="wall clock for the whole script; later parts shrink or skip to fit")
    p.add_argument("--tokenizer", default=None, help="a pretrained tokenizer.json (default: train BPE here on the training books)")
    p.add_argument("--vocab-size", type=int, default=20000, help="BPE vocabulary when training the tokenizer")
    p.add_argument("--small-minutes", type=float, default=4.0, help="training wall clock of the small model")
    p.add_argument("--medium-minutes", type=float, default=1.5, help="training wall clock of the medium model")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    p.add_argument("--block-size", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--bench-steps", type=int, default=20, help="timed steps per throughput row (0: no throughput table)")
    p.add_argument("--no-compile", action="store_true", help="train without torch.compile")
    p.add_argument("--name", default="gutenberg", help="stem of the output files (<name>.json, <name>.png, <name>_<model>.jsonl)")
    p.add_argument("--work-dir", default=None, help="checkpoints and token cache (default: a temp dir; not $OUT)")
    args = p.parse_args(argv)
    deadline = Deadline(args.budget_minutes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="minigpt_gutenberg_"))
    results: dict = {"provenance": provenance(), "setup": {}, "runs": {}, "throughput": {}}

    t = time.perf_counter()
    data = smoke_corpus(work) if args.smoke else "gutenberg"
    corpus = load_corpus(data, val_fraction=load_recipe("gutenberg-small")["val_fraction"])
    results["setup"].update(load_s=time.perf_counter() - t, train_books=len(corpus.train), val_books=len(corpus.val),
                            train_bytes=sum(len(d.encode()) for d in corpus.train), val_bytes=sum(len(d.encode()) for d in corpus.val))
    t = time.perf_counter()
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)
        results["setup"]["tokenizer"] = f"loaded from {args.tokenizer}"
    else:
        tok = train_bpe(corpus.train, 500 if args.smoke else args.vocab_size, show_progress=False)
        results["setup"]["tokenizer"] = "trained here on the training books"
    tok_path = tok.save(work / "tokenizer.json")
    shutil.copyfile(tok_path, out / f"{args.name}_tokenizer.json")
    results["setup"].update(tokenizer_s=time.perf_counter() - t, vocab_size=tok.vocab_size)
    t = time.perf_counter()
    splits = {s: tokenize_split(corpus, s, tok, work / "cache", progress=False) for s in ("train", "val")}
    results["setup"].update(tokenize_s=time.perf_counter() - t, train_tokens=splits["train"].n_tokens, val_tokens=splits["val"].n_tokens,
                            bytes_per_token_val=splits["val"].n_bytes / splits["val"].n_tokens)
    print(f"setup {results['setup']}", flush=True)

    smoke_model = dict(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=128) if args.smoke else {}
    # the settings of both runs are the package's recipes (python -m minigpt train --recipe gutenberg-small)
    recipe = {name: load_recipe(f"gutenberg-{name}") for name in ("small", "medium")}
    r = recipe["small"]
    base = TrainConfig(data=data, tokenizer=str(tok_path), val_fraction=r["val_fraction"], cache_dir=str(work / "cache"), max_steps=0,
                       block_size=64 if args.smoke else args.block_size, batch_size=4 if args.smoke else args.batch_size,
                       eval_interval=20 if args.smoke else r["eval_interval"], eval_batches=2 if args.smoke else r["eval_batches"],
                       log_interval=5 if args.smoke else r["log_interval"], sample_tokens=0, progress=False,
                       compile=not args.no_compile and not args.smoke, max_minutes=1.0, save_interval=0)
    sizes = {name: dict(lr=recipe[name]["lr"], warmup_steps=recipe[name]["warmup_steps"], minutes=minutes)
             for name, minutes in (("small", args.small_minutes), ("medium", args.medium_minutes))}
    bench_reserve = 0.0 if args.bench_steps == 0 else 0.2 if args.smoke else 1.3  # minutes kept for the throughput table
    trainers: dict[str, Trainer] = {}

    def config(name: str, **kw) -> TrainConfig:
        return replace(base, preset=name, model=dict(smoke_model), out_dir=str(work / name), **kw)

    for name, hp in sizes.items():
        if hp["minutes"] <= 0:
            results["runs"][name] = {"skipped": f"not requested (--{name}-minutes {hp['minutes']})"}
            continue
        later = sizes["medium"]["minutes"] if name == "small" else 0.0
        minutes = min(hp["minutes"], deadline.left_min() - bench_reserve - later - 0.4)
        if args.smoke:
            minutes = min(hp["minutes"], 0.1)
        if minutes < 0.2 and not args.smoke:
            results["runs"][name] = {"skipped": f"out of time ({deadline.left_min():.2f} min left)"}
            continue
        tr = Trainer(config(name, lr=hp["lr"], warmup_steps=5 if args.smoke else hp["warmup_steps"], max_minutes=minutes), corpus)
        s = tr.run()
        n_new = 10 if args.smoke else 200
        samples = [{"prompt": pr, "text": tr.sample(n_new, pr, temperature=0.8, top_k=200, seed=i)} for i, pr in enumerate(PROMPTS)]
        steps, vals = loss_curve(tr.out_dir)
        results["runs"][name] = {**{k: s[k] for k in ("val_loss", "val_ppl", "val_bpb", "steps", "tokens_seen", "wall_s", "tokens_per_s", "mfu",
                                                      "peak_mem_gb", "n_params", "first_step_s")},
                                 "minutes": minutes, "lr": hp["lr"], "compiled": tr.cfg.compile, "model_config": tr.model_config.to_dict(),
                                 "eval_steps": steps, "val_losses": vals, "samples": samples}
        write_json(out / f"{args.name}.json", results)
        print(f"{name}: val {s['val_loss']:.4f} ({s['val_bpb']:.4f} bpb) after {s['steps']} steps / {s['tokens_seen']:,} tokens", flush=True)
        trainers[name] = tr

    # -- throughput, same batch and sequence for every row ----------------------------------------------
    for name in sizes if args.bench_steps > 0 else ():
        rows = results["throughput"].setdefault(name, {})
        for variant in ("eager", "compile", "triton"):
            if deadline.left_min() < (0.05 if args.smoke else 0.35):
                rows[variant] = {"skipped": "out of time"}
                continue
            if variant == "compile" and args.smoke:
                rows[variant] = {"skipped": "not in --smoke (CPU)"}
                continue
            try:
                reuse = variant == "compile" and name in trainers and trainers[name].cfg.compile
                if reuse:
                    tr = trainers.pop(name)  # already compiled for this shape: no second compile
                else:
                    model = {**smoke_model, "kernels": "triton"} if variant == "triton" else dict(smoke_model)
                    tr = Trainer(replace(config(name), max_steps=10**6, max_minutes=0.0, compile=variant == "compile", model=model,
                                         out_dir=str(work / f"bench_{name}_{variant}")), corpus)
                rows[variant] = time_steps(tr, 1 if reuse or args.smoke else 3, 1 if args.smoke else args.bench_steps)
            except Exception as e:  # a variant that cannot run here (e.g. Triton kernels missing) is reported, not fatal
                rows[variant] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            tr = None
            free(tr)
            print(f"throughput {name} {variant}: {rows[variant]}", flush=True)
        trainers.pop(name, None)
        free()
        write_json(out / f"{args.name}.json", results)

    done = {n: Path(base.cache_dir).parent / n for n, r in results["runs"].items() if "skipped" not in r}
    results["metrics_files"] = bundle_metrics(done, out, args.name)
    plot(results, out / f"{args.name}.png")
    write_json(out / f"{args.name}.json", results)

    pv = results["provenance"]
    rows = [[n, f"{r['n_params'] / 1e6:.1f}M", r["steps"], f"{r['tokens_seen'] / 1e6:.1f}M", fmt(r["val_loss"], ".4f"), fmt(r["val_bpb"], ".4f"),
             fmt(r["tokens_per_s"], ",.0f"), fmt(r["mfu"] and 100 * r["mfu"], ".1f"), fmt(r["peak_mem_gb"], ".1f")]
            for n, r in results["runs"].items() if "skipped" not in r]
    print_table(f"Gutenberg BPE-{tok.vocab_size}, held-out books; {pv['gpu']}, {pv['dtype']}, torch {pv['torch']}, triton {pv['triton']}",
                ["model", "params", "steps", "tokens", "val loss", "val bpb", "tokens/s", "MFU %", "peak GB"], rows)
    trows = []
    for n, rs in results["throughput"].items():
        for v, r in rs.items():
            trows.append([n, v, fmt(r.get("tokens_per_s"), ",.0f"), fmt(r.get("ms_per_step"), ".1f"),
                          fmt(r.get("mfu") and 100 * r["mfu"], ".1f"), r.get("error", r.get("skipped", ""))[:60]])
    if trows:
        print_table(f"Throughput, batch {base.batch_size} x {base.block_size} tokens", ["model", "variant", "tokens/s", "ms/step", "MFU %", "note"], trows)
    return 0


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in results["runs"].items():
        if "skipped" in r:
            continue
        a.plot(r["eval_steps"], r["val_losses"], marker="o", label=f"{name} ({r['n_params'] / 1e6:.0f}M, {r['minutes']:.1f} min)")
    a.set(xlabel="step", ylabel="val loss (nats/token), held-out books", title="training on the clock")
    a.legend()
    labels, values = [], []
    for name, rs in results["throughput"].items():
        for v, r in rs.items():
            if "tokens_per_s" in r:
                labels.append(f"{name} {v}")
                values.append(r["tokens_per_s"])
    b.barh(labels[::-1], values[::-1], color="tab:green")
    b.set(xlabel="training tokens/s", title="throughput (same batch and sequence)")
    save_figure(fig, path, "Gutenberg", results["provenance"])


if __name__ == "__main__":
    raise SystemExit(main())
