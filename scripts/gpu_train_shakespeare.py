"""GPU run A: Tiny Shakespeare (char level), the 2017 block against the 2024 block, and an ablation.

(a) nanoGPT's "baby GPT" budget (6 layers, 6 heads, dim 384, block 256, batch 64, dropout 0.2,
    lr 1e-3 -> 1e-4, warmup 100, beta2 0.99, 5000 iters, val every 500 iters on 200 batches):
    2017 (learned positions, LayerNorm, post-norm, GELU MLP, MHA, untied) vs 2024 (RoPE, RMSNorm,
    pre-norm, SwiGLU, GQA 6 query / 2 KV heads, tied) with the 2024 ffn_dim chosen so both have
    the same parameter count (within 2%). nanoGPT's published val loss for this budget: 1.4697.
(b) Ablation: from the 2017 block swap one technique at a time, every row (and a 2017 baseline
    row) at the same reduced budget (--ablation-iters, shrunk uniformly if the time budget needs it).
    ``--parts b --rows ... --ablation-iters 5000 --no-shrink --name ablation_full_1`` runs a subset of
    rows at the full budget, so the whole table can be measured over several 10-minute calls.

torch.compile is used for a run only when it pays: ``--compile auto`` times eager and compiled
steps and the compile itself, then compiles a run iff (eager - compiled step time) * iters >
compile time. Writes ``$OUT/shakespeare.json``, the runs' metrics, and ``shakespeare.png``.

    MINIGPT_DATA_DIR=.carry/data python scripts/gpu_train_shakespeare.py           # on the H100
    python scripts/gpu_train_shakespeare.py --smoke --out /tmp/smoke               # CPU check, seconds
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from gpu_train_common import Deadline, bundle_metrics, fmt, loss_curve, print_table, provenance, pyplot, save_figure, sync, time_steps, write_json

from minigpt import ModelConfig
from minigpt.data import load_corpus
from minigpt.train import TrainConfig, Trainer

NANOGPT_VAL_LOSS = 1.4697
GPT2017 = dict(norm="layernorm", norm_position="post", pos_encoding="learned", mlp="gelu", tie_embeddings=False)
SWAPS = [  # (row name, the one field changed from the 2017 block)
    ("2017 baseline", {}),
    ("+ pre-norm", {"norm_position": "pre"}),
    ("+ RMSNorm", {"norm": "rmsnorm"}),
    ("+ RoPE", {"pos_encoding": "rope"}),
    ("+ SwiGLU", {"mlp": "swiglu", "ffn_dim": None}),
    ("+ GQA (2 KV heads)", {"n_kv_heads": 2}),
    ("+ tied embeddings", {"tie_embeddings": True}),
]


def slug(name: str) -> str:
    """A file-name-safe form of a row name: '+ GQA (2 KV heads)' -> 'plus_GQA_2_KV_heads'."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name.replace("+", "plus")).strip("_")


def matched_2024(base: dict, vocab: int, target: int) -> dict:
    """The 2024 block with the SwiGLU width (a multiple of 64) whose parameter count is closest to ``target``."""
    arch = dict(base, norm="rmsnorm", norm_position="pre", pos_encoding="rope", mlp="swiglu", tie_embeddings=True, n_kv_heads=base["n_heads"] // 3)
    best = min(range(64, 16 * base["dim"], 64), key=lambda f: abs(ModelConfig(vocab_size=vocab, **{**arch, "ffn_dim": f}).num_params() - target))
    return {**arch, "ffn_dim": best}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes and step counts: checks the script on CPU in seconds")
    p.add_argument("--out", default=os.environ.get("OUT", "results/train"), help="output folder (default: $OUT or results/train)")
    p.add_argument("--budget-minutes", type=float, default=7.0, help="wall clock for the whole script; later parts shrink to fit")
    p.add_argument("--iters", type=int, default=5000, help="iterations of each run of part (a)")
    p.add_argument("--ablation-iters", type=int, default=1500, help="iterations of every ablation row (upper bound)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="torch.compile policy")
    p.add_argument("--work-dir", default=None, help="where run checkpoints go (default: a temp dir; not $OUT)")
    p.add_argument("--parts", choices=("ab", "a", "b"), default="ab", help="run part (a), part (b) or both")
    p.add_argument("--rows", default="", help="comma-separated subset of the ablation rows (default: all), e.g. "
                   "'2017 baseline,+ RoPE'; lets a full-budget ablation be split over several calls")
    p.add_argument("--name", default="shakespeare", help="stem of the output files (<name>.json, <name>.png)")
    p.add_argument("--no-shrink", action="store_true", help="run every ablation row at exactly --ablation-iters (rows that "
                   "do not fit the budget are skipped, never shortened), so tables from several calls compare")
    args = p.parse_args(argv)
    known_rows = [name for name, _ in SWAPS]
    rows_wanted = [r.strip() for r in args.rows.split(",") if r.strip()] or known_rows
    unknown = [r for r in rows_wanted if r not in known_rows]
    if unknown:
        p.error(f"unknown ablation row(s) {unknown}; choose from {known_rows}")
    swaps = [(name, change) for name, change in SWAPS if name in rows_wanted]
    deadline = Deadline(args.budget_minutes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="minigpt_shakespeare_"))

    if args.smoke:
        model = dict(dim=48, n_layers=2, n_heads=6, dropout=0.2)
        base = TrainConfig(block_size=32, batch_size=8, max_steps=30, warmup_steps=5, eval_interval=10, eval_batches=4)
        iters, abl_iters = 30, 10
    else:
        model = dict(dim=384, n_layers=6, n_heads=6, dropout=0.2)
        base = TrainConfig(block_size=256, batch_size=64, max_steps=5000, warmup_steps=100, eval_interval=500, eval_batches=200)
        iters, abl_iters = args.iters, args.ablation_iters
    base = replace(base, data="shakespeare", tokenizer="char", lr=1e-3, min_lr=1e-4, beta2=0.99, weight_decay=0.1, grad_clip=1.0,
                   log_interval=10 if args.smoke else 50, sample_tokens=0, progress=False, cache_dir=str(work / "cache"))
    corpus = load_corpus("shakespeare", base.val_fraction)
    vocab = len(set(corpus.train[0] + corpus.val[0]))
    arch17 = {**model, **GPT2017, "n_kv_heads": model["n_heads"]}
    n17 = ModelConfig(vocab_size=vocab, max_seq_len=base.block_size, **arch17).num_params()
    arch24 = matched_2024(model, vocab, n17)
    n24 = ModelConfig(vocab_size=vocab, max_seq_len=base.block_size, **arch24).num_params()
    print(f"params: 2017 {n17:,}  2024 {n24:,} (ffn_dim {arch24['ffn_dim']}, {100 * (n24 / n17 - 1):+.2f}%)", flush=True)

    def make(name: str, arch: dict, n_iters: int, compile_: bool, minutes: float = 0.0) -> Trainer:
        cfg = replace(base, model=arch, max_steps=n_iters, lr_decay_steps=n_iters, compile=compile_, max_minutes=max(minutes, 0.0),
                      out_dir=str(work / slug(name)))
        return Trainer(cfg, corpus)

    # -- how fast is a step, eager and compiled; what does compiling cost? ---------------------------
    probe_steps = 5 if args.smoke else 30
    eager = time_steps(make("probe_eager", arch24, 10**6, False), 3, probe_steps)
    timing = {"eager_ms_per_step": eager["ms_per_step"], "probe_steps": probe_steps}
    if args.compile != "off":
        t = make("probe_compiled", arch24, 10**6, True)
        sync()
        t0 = time.perf_counter()
        t.train_step()
        sync()
        timing["compile_s"] = time.perf_counter() - t0
        timing["compiled_ms_per_step"] = time_steps(t, 2, probe_steps)["ms_per_step"]
    saved_ms = timing.get("eager_ms_per_step", 0) - timing.get("compiled_ms_per_step", float("inf"))

    def use_compile(n_iters: int) -> bool:
        if args.compile != "auto":
            return args.compile == "on"
        return saved_ms > 0 and saved_ms / 1000 * n_iters > timing["compile_s"]

    def est_minutes(n_iters: int, evals: int) -> float:
        c = use_compile(n_iters)
        ms = timing["compiled_ms_per_step"] if c else timing["eager_ms_per_step"]
        fwd_ms = timing["eager_ms_per_step"] / 3  # an eval batch is one eager forward
        return (n_iters * ms + evals * base.eval_batches * fwd_ms) / 60000 + (timing["compile_s"] / 60 if c else 0) + 0.05

    # -- plan: part (a) as asked; the ablation budget shrinks uniformly to what is left ------------------
    main_min = [est_minutes(iters, iters // base.eval_interval + 1) if "a" in args.parts else 0.0] * 2
    left_for_ablation = deadline.left_min() - sum(main_min)
    min_iters = 10 if args.smoke else 300
    while (not args.no_shrink and abl_iters > min_iters
           and len(swaps) * est_minutes(abl_iters, abl_iters // base.eval_interval + 1) > left_for_ablation):
        abl_iters -= 10 if args.smoke else 100
    plan = {"main_iters": iters, "ablation_iters": abl_iters, "ablation_iters_asked": args.ablation_iters if not args.smoke else 10,
            "estimated_minutes": {"main_each": main_min[0], "ablation_row": est_minutes(abl_iters, abl_iters // base.eval_interval + 1)}}
    print(f"timing {timing}\nplan {plan}", flush=True)

    results = {"provenance": provenance(), "timing": timing, "plan": plan, "nanogpt_val_loss": NANOGPT_VAL_LOSS,
               "train_config": base.to_dict(), "vocab_size": vocab, "runs": {}, "ablation": {}}
    run_dirs: dict[str, Path] = {}

    def do_run(name: str, arch: dict, n_iters: int, est: float, section: str) -> None:
        left = deadline.left_min()
        if left < 0.3:
            results[section][name] = {"skipped": f"out of time ({left:.2f} min left)"}
            return
        comp = use_compile(n_iters)
        tr = make(name, arch, n_iters, comp, minutes=min(left - 0.2, 1.5 * est + 0.5))
        s = tr.run()
        steps, vals = loss_curve(tr.out_dir)
        rec = {"arch": arch, "n_params": tr.n_params, "iters_planned": n_iters, "steps": s["steps"], "stopped_by_time": s["steps"] < n_iters,
               "val_loss": s["val_loss"], "best_val_loss": min(vals), "val_bpb": s["val_bpb"], "wall_s": s["wall_s"],
               "tokens_per_s": s["tokens_per_s"], "mfu": s["mfu"], "compiled": comp, "first_step_s": s["first_step_s"],
               "eval_steps": steps, "val_losses": vals}
        if section == "runs":
            rec["sample"] = tr.sample(200 if not args.smoke else 20, prompt="\n", temperature=0.8, top_k=None)
        results[section][name] = rec
        run_dirs[slug(f"{section} {name}")] = tr.out_dir
        write_json(out / f"{args.name}.json", results)
        print(f"{name}: val {s['val_loss']:.4f} after {s['steps']} steps, {s['wall_s']:.0f} s", flush=True)

    if "a" in args.parts:
        do_run("2017", arch17, iters, main_min[0], "runs")
        do_run("2024", arch24, iters, main_min[1], "runs")
    for name, change in (swaps if "b" in args.parts else []):
        arch = {**arch17, **change}
        if arch.get("ffn_dim", 0) is None:
            arch.pop("ffn_dim")
        do_run(name, arch, abl_iters, plan["estimated_minutes"]["ablation_row"], "ablation")

    results["metrics_files"] = bundle_metrics(run_dirs, out, args.name)
    plot(results, out / f"{args.name}.png", abl_iters)
    write_json(out / f"{args.name}.json", results)

    def row(label: str, r: dict) -> list:
        return [label, f"{r['n_params']:,}", r["steps"], fmt(r["val_loss"], ".4f"), fmt(r["best_val_loss"], ".4f"),
                fmt(r["tokens_per_s"], ",.0f"), fmt(r["wall_s"], ".0f"), "yes" if r["compiled"] else "no"]

    rows = [row(f"(a) {k}", r) for k, r in results["runs"].items() if "skipped" not in r]
    rows += [row(f"(b) {k}", r) for k, r in results["ablation"].items() if "skipped" not in r]
    skipped = [k for sec in ("runs", "ablation") for k, r in results[sec].items() if "skipped" in r]
    p = results["provenance"]
    print_table(f"Tiny Shakespeare char, {p['gpu']}, {p['dtype']}, torch {p['torch']}; (b) rows all at {abl_iters} iters "
                f"(nanoGPT 5000-iter val loss: {NANOGPT_VAL_LOSS})",
                ["run", "params", "steps", "val loss", "best val", "tokens/s", "wall s", "compiled"], rows)
    if skipped:
        print(f"skipped (time budget): {skipped}")
    return 0


def plot(results: dict, path: Path, abl_iters: int) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in results["runs"].items():
        if "skipped" not in r:
            a.plot(r["eval_steps"], r["val_losses"], marker="o", label=f"{name} ({r['n_params'] / 1e6:.2f}M params)")
    a.axhline(NANOGPT_VAL_LOSS, color="gray", ls="--", lw=1, label=f"nanoGPT published ({NANOGPT_VAL_LOSS})")
    a.set(xlabel="iteration", ylabel="val loss (nats/char)", title="2017 vs 2024 block, matched parameters")
    a.legend()
    rows = [(k, r["val_loss"]) for k, r in results["ablation"].items() if "skipped" not in r]
    if rows:
        b.barh([k for k, _ in rows][::-1], [v for _, v in rows][::-1], color="tab:blue")
        b.axvline(rows[0][1], color="gray", ls="--", lw=1)
        lo = min(v for _, v in rows)
        b.set_xlim(lo - 0.1, max(v for _, v in rows) + 0.05)
    b.set(xlabel=f"val loss after {abl_iters} iters", title="one change at a time from the 2017 block")
    save_figure(fig, path, "Tiny Shakespeare", results["provenance"])


if __name__ == "__main__":
    raise SystemExit(main())
