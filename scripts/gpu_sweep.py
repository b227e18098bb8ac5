"""GPU sweeps behind chapters 7 and 8: model shapes and the training recipe, on Gutenberg BPE-20k.

Every run is the same trainer and data stream, eager bf16, batch 32 x 512 tokens, ``--steps``
optimizer steps (600: 9.8M tokens), evaluated on held-out books every 100 steps. Plans:

- ``design`` (chapter 7, ``results/design/sweep.json``):
  * ``depth``: 4, 6, 12 (= ``small``) and 24 layers at ``small``'s non-embedding parameter count,
    each shaped by ``minigpt.design.width_for_depth`` (4 x 640, 6 x 512, 12 x 384, 24 x 256; within
    0.6%), seeds 0 and 1;
  * ``tying``: 8 x 448 untied, 8 x 448 tied, 12 x 448 tied (the untied total, spent on depth);
  * ``head_dim``: ``medium`` with 16 heads of 40 vs 10 heads of 64, training-step throughput only.
- ``recipe`` (chapter 8, ``results/recipe/sweep.json``):
  * ``lr``: tiny, small, medium x peak LR {1e-4, 3e-4, 1e-3, 3e-3};
  * ``warmup``: small at 0 and 1% warm-up (5% is the ``lr`` run at 1e-3);
  * ``beta2``: small at beta2 0.99 (0.95 is the ``lr`` run at 1e-3).

Several workers (one per GPU) share one job list: each claims the next unclaimed job by creating
``<work>/claims/<job>`` (atomic ``mkdir``), runs it if it still fits its deadline, and writes its
records to ``<out>/sweep_w<rank>.json``; ``--merge`` joins them into the two results files.

    python scripts/gpu_sweep.py --prepare --work /tmp/sw --tokenizer results/train/gutenberg_tokenizer.json
    CUDA_VISIBLE_DEVICES=0 python scripts/gpu_sweep.py --worker 0 --work /tmp/sw --out $OUT &
    CUDA_VISIBLE_DEVICES=1 python scripts/gpu_sweep.py --worker 1 --work /tmp/sw --out $OUT; wait
    python scripts/gpu_sweep.py --merge --out $OUT
    python scripts/gpu_sweep.py --smoke --out /tmp/smoke   # CPU check: all of the above, tiny
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from gpu_train_common import Deadline, fmt, print_table, provenance, time_steps, write_json

from minigpt.config import ModelConfig
from minigpt.data import load_corpus, tokenize_split
from minigpt.design import width_for_depth
from minigpt.monitor import read_metrics
from minigpt.tokenizer import load_tokenizer
from minigpt.train import TrainConfig, Trainer

SMALL = ModelConfig.preset("small")
NON_EMBEDDING = SMALL.num_params() - SMALL.vocab_size * SMALL.dim  # 18,589,056: `small` without its embedding
DEPTHS = (4, 6, 12, 24)  # 4 x 640, 6 x 512, 12 x 384 (= small), 24 x 256: minigpt.design.width_for_depth, head_dim 32
SMOKE_MODEL = dict(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=128)


def jobs() -> list[dict]:
    """The job list in priority order (a short call runs the head of it)."""
    out = []

    def add(plan, group, name, preset="small", model=None, seed=0, kind="train", **train):
        out.append(dict(plan=plan, group=group, name=name, preset=preset, model=model or {}, seed=seed, kind=kind, train=train))

    def shape(layers):
        c = width_for_depth(layers, NON_EMBEDDING, head_dim=32)
        return f"{layers}x{c.dim}", dict(n_layers=layers, dim=c.dim, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, ffn_dim=c.ffn_dim)

    shapes = [shape(layers) for layers in DEPTHS]
    for name, model in shapes:
        add("design", "depth", f"{name}_s0", model=model, seed=0)
    for lr in (1e-4, 3e-4, 3e-3):
        add("recipe", "lr", f"small_lr{lr:g}", lr=lr)
    for tie, layers in ((False, 8), (True, 8), (True, 12)):
        add("design", "tying", f"{layers}x448_{'tied' if tie else 'untied'}",
            model=dict(n_layers=layers, dim=448, n_heads=14, n_kv_heads=7, tie_embeddings=tie))
    for name, model in shapes:
        add("design", "depth", f"{name}_s1", model=model, seed=1)
    for lr in (1e-4, 3e-4, 1e-3, 3e-3):
        add("recipe", "lr", f"tiny_lr{lr:g}", preset="tiny", lr=lr)
    add("recipe", "warmup", "small_warmup0", warmup_frac=0.0)
    add("recipe", "warmup", "small_warmup1pct", warmup_frac=0.01)
    add("recipe", "beta2", "small_beta2_0.99", beta2=0.99)
    for lr in (3e-4, 1e-3, 1e-4, 3e-3):
        add("recipe", "lr", f"medium_lr{lr:g}", preset="medium", lr=lr)
    add("design", "head_dim", "medium_hd40", preset="medium", kind="throughput")
    add("design", "head_dim", "medium_hd64", preset="medium", model=dict(n_heads=10, n_kv_heads=2), kind="throughput")
    return out


def base_config(args, work: Path) -> TrainConfig:
    steps = 6 if args.smoke else args.steps
    return TrainConfig(data=str(work / "corpus.txt") if args.smoke else "gutenberg", tokenizer=str(work / "tokenizer.json"),
                       val_fraction=0.05, cache_dir=str(work / "cache"), block_size=32 if args.smoke else 512,
                       batch_size=4 if args.smoke else 32, max_steps=steps, lr=1e-3, warmup_steps=max(1, round(0.05 * steps)),
                       eval_interval=3 if args.smoke else 100, eval_batches=2 if args.smoke else 20, log_interval=2 if args.smoke else 10,
                       sample_tokens=0, progress=False, compile=False)


def prepare(args, work: Path) -> None:
    """Tokenizer and token caches once, before the workers start (they map the cache files)."""
    work.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        text = "".join(f"Chapter {i}. The quick brown fox jumps over the lazy dog number {i * 7 % 13}.\n" for i in range(400))
        (work / "corpus.txt").write_text(text)
        from minigpt.tokenizer import train_bpe

        train_bpe([text], 300, show_progress=False).save(work / "tokenizer.json")
    else:
        load_tokenizer(args.tokenizer).save(work / "tokenizer.json")
    cfg = base_config(args, work)
    corpus = load_corpus(cfg.data, cfg.val_fraction)
    tok = load_tokenizer(cfg.tokenizer)
    t = time.perf_counter()
    sizes = {s: tokenize_split(corpus, s, tok, cfg.cache_dir, progress=False).n_tokens for s in ("train", "val")}
    (work / "claims").mkdir(exist_ok=True)
    print(f"prepared {sizes} tokens in {time.perf_counter() - t:.1f} s", flush=True)


def run_job(job: dict, base: TrainConfig, corpus, smoke: bool, work: Path) -> dict:
    model = dict(job["model"])
    if smoke:
        model = {**SMOKE_MODEL, **{k: v for k, v in model.items() if k == "tie_embeddings"}}
    train = dict(job["train"])
    frac = train.pop("warmup_frac", None)
    cfg = replace(base, preset=job["preset"], model=model, seed=job["seed"], out_dir=str(work / "runs" / job["name"]), **train)
    if frac is not None:
        cfg = replace(cfg, warmup_steps=round(frac * cfg.max_steps))
    rec = {k: job[k] for k in ("plan", "group", "name", "seed", "kind", "preset")}
    rec.update(lr=cfg.lr, warmup_steps=cfg.warmup_steps, beta2=cfg.beta2)
    tr = Trainer(cfg, corpus)
    mc = tr.model_config
    embedding = mc.vocab_size * mc.dim * (1 if mc.tie_embeddings else 2)
    rec.update(model_config=mc.to_dict(), n_params=mc.num_params(), non_embedding_params=mc.num_params() - embedding)
    if job["kind"] == "throughput":
        timed = time_steps(tr, 1 if smoke else 3, 2 if smoke else 20)
        rec.update(steps=timed["steps"], ms_per_step=timed["ms_per_step"], tokens_per_s=timed["tokens_per_s"], peak_mem_gb=tr._mem_gb())
        return rec
    summary = tr.run()
    rows = read_metrics(cfg.out_dir)
    evals = [{k: r[k] for k in ("step", "val_loss", "val_bpb")} for r in rows if r["type"] == "eval"]
    best = min(evals, key=lambda r: r["val_loss"])
    rec.update(steps=summary["steps"], tokens=summary["tokens_seen"], wall_s=summary["wall_s"], tokens_per_s=summary["tokens_per_s"],
               peak_mem_gb=summary["peak_mem_gb"], final_val_loss=summary["val_loss"], final_val_bpb=summary["val_bpb"],
               best_val_loss=best["val_loss"], best_val_bpb=best["val_bpb"], best_step=best["step"], evals=evals,
               train=[{k: r.get(k) for k in ("step", "loss", "grad_norm", "lr")} for r in rows if r["type"] == "train"])
    return rec


def worker(args, work: Path, out: Path) -> None:
    deadline = Deadline(args.budget_minutes)
    base = base_config(args, work)
    corpus = load_corpus(base.data, base.val_fraction)
    records, prov = [], provenance()
    path = out / f"sweep_w{args.worker}.json"
    for job in jobs():
        est_min = 0.02 if args.smoke else {"tiny": 0.25, "small": 0.55, "medium": 1.3}[job["preset"]] * (1.6 if job["name"].startswith("24x") else 1.0)
        if deadline.left_min() < est_min:
            continue  # another worker may still have time for it: it stays unclaimed
        try:
            os.mkdir(work / "claims" / job["name"])
        except FileExistsError:
            continue
        t = time.perf_counter()
        try:
            rec = {**run_job(job, base, corpus, args.smoke, work), "status": "ok"}
        except Exception as e:  # one failed run must not lose the others
            rec = {**{k: job[k] for k in ("plan", "group", "name", "seed", "kind", "preset")}, "status": "failed", "error": f"{type(e).__name__}: {e}"[:500]}
        rec["job_s"] = time.perf_counter() - t
        records.append(rec)
        print(f"[w{args.worker}] {job['name']}: {rec['status']} in {rec['job_s']:.0f} s "
              f"val {fmt(rec.get('best_val_loss'), '.4f')} tok/s {fmt(rec.get('tokens_per_s'), ',.0f')}", flush=True)
        write_json(path, {"provenance": prov, "worker": args.worker, "records": records})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    write_json(path, {"provenance": prov, "worker": args.worker, "records": records})


def merge(args, out: Path) -> None:
    parts = [json.loads(p.read_text()) for p in sorted(out.glob("sweep_w*.json"))]
    if not parts:
        sys.exit(f"no sweep_w*.json in {out}: run the workers first")
    done = {r["name"]: r for p in parts for r in p["records"]}
    base = base_config(args, Path("work"))
    setup = {"data": "gutenberg (held-out books, val_fraction 0.05)", "tokenizer": "BPE 20k (results/train/gutenberg_tokenizer.json)",
             "block_size": base.block_size, "batch_size": base.batch_size, "steps": base.max_steps,
             "tokens": base.max_steps * base.block_size * base.batch_size, "lr": base.lr, "warmup_steps": base.warmup_steps,
             "min_lr": base.lr / 10, "beta2": base.beta2, "eval_batches": base.eval_batches, "eval_interval": base.eval_interval,
             "compile": False, "note": "eager PyTorch, SDPA attention, bf16 autocast; tokens/s is eager, so host overhead (per layer) shows",
             "non_embedding_target": NON_EMBEDDING}
    for plan, dest in (("design", "design"), ("recipe", "recipe")):
        runs = []
        for job in jobs():
            if job["plan"] != plan:
                continue
            runs.append(done.get(job["name"], {**{k: job[k] for k in ("plan", "group", "name", "seed", "kind", "preset")},
                                               "status": "skipped", "error": "not run: out of device time"}))
        if plan == "recipe" and "12x384_s0" in done:  # small at lr 1e-3, 5% warm-up, beta2 0.95 is the depth run of small
            runs.append({**done["12x384_s0"], "plan": "recipe", "group": "lr", "name": "small_lr0.001", "shared_with": "design/12x384_s0"})
        obj = {"provenance": parts[0]["provenance"], "workers": len(parts), "setup": setup, "runs": runs}
        d = out / dest
        d.mkdir(parents=True, exist_ok=True)
        write_json(d / "sweep.json", obj)
        print_table(f"{plan} sweep ({obj['provenance']['gpu']}, {obj['provenance']['dtype']}, torch {obj['provenance']['torch']})",
                    ["group", "run", "params", "best val", "bpb", "step", "final val", "tok/s", "status"],
                    [[r["group"], r["name"], fmt(r.get("n_params") and r["n_params"] / 1e6, ".2f"), fmt(r.get("best_val_loss"), ".4f"),
                      fmt(r.get("best_val_bpb"), ".4f"), r.get("best_step", "-"), fmt(r.get("final_val_loss"), ".4f"),
                      fmt(r.get("tokens_per_s"), ",.0f"), r["status"]] for r in runs])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", action="store_true", help="tokenizer + token caches into --work, then exit")
    p.add_argument("--worker", type=int, default=None, help="run jobs as worker N (one per GPU)")
    p.add_argument("--merge", action="store_true", help="join the workers' files into <out>/design and <out>/recipe")
    p.add_argument("--smoke", action="store_true", help="CPU check: prepare, one worker and merge on a tiny corpus")
    p.add_argument("--work", default="/tmp/minigpt_sweep", help="token cache, claims and run folders")
    p.add_argument("--out", default=os.environ.get("OUT", "results"), help="output folder")
    p.add_argument("--tokenizer", default="results/train/gutenberg_tokenizer.json", help="the Gutenberg BPE-20k tokenizer")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    p.add_argument("--budget-minutes", type=float, default=7.5, help="a worker claims no job it cannot finish by then")
    args = p.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.worker = 0
        prepare(args, work)
        worker(args, work, out)
        merge(args, out)
    elif args.prepare:
        prepare(args, work)
    elif args.worker is not None:
        worker(args, work, out)
    elif args.merge:
        merge(args, out)
    else:
        p.error("give --prepare, --worker N, --merge or --smoke")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
