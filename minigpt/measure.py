"""One measurement layer: how the book times kernels, what the card can do, and what a number is.

Everything that turns a run on a GPU into a number lives here, so `minigpt.bench`, the scripts and
the chapters time, count and label the same way:

- `time_call`: median ms of a call as a user makes it (`triton.testing.do_bench`: the L2 cache is
  flushed before every repetition), host work (Python, checks, launches) included;
- `time_graph`: median ms of the same work replayed from a CUDA graph, i.e. the GPU time alone.
  A graph replay is one launch whatever the number of kernels inside, so when the GPU work is
  shorter than the host cost of issuing it (~20 us per launch on the book's H200 VM),
  `time_call` measures the host and `time_graph` the kernel; `host_ms = call - graph`;
- `time_ms`: the chapters' timer: one of the two above on a GPU, wall clock on a CPU;
- `paired_ratio`: the median over interleaved rounds of one timing over another taken in the same round,
  how the scripts and chapters judge kernels whose single timings move by 10% or more between calls;
- `ceilings`: the card's own limits, device copy bandwidth (GB/s) and bf16 matmul (TFLOP/s);
- `provenance`: card, dtype, torch/triton versions, git commit and date, for every result file;
- `attention_flops`: the FLOP count of (causal) attention, the one formula used everywhere
  (``exact=True``: every unmasked (query, key) pair, as chapter 10 counts a decode step);
- `peak_memory_bytes`: the CUDA memory one call allocates on top of what was there (its peak);
- `saved_tensors`: the storages autograd keeps alive for a call's backward pass (activation memory).
"""

from __future__ import annotations

import datetime
import os
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from minigpt import runtime

__all__ = [
    "SavedStorage",
    "attention_flops",
    "ceilings",
    "git_commit",
    "peak_memory_bytes",
    "provenance",
    "saved_tensors",
    "time_call",
    "time_graph",
    "time_ms",
]

FLUSH_BYTES = 256 * 2**20  # larger than any L2 (H200: 60 MiB), as triton.testing.do_bench uses


def attention_flops(batch: int, heads: int, q_len: int, head_dim: int, causal: bool = True,
                    kv_len: int | None = None, backward: bool = False, exact: bool = False) -> float:
    """Matmul FLOPs of softmax attention: 4 * B * H * pairs * D (QK^T and PV, 2 FLOPs per MAC).

    ``pairs`` is the number of (query, key) scores computed: Tq * Tk, or for causal attention with
    the queries at the end of the keys (Tq <= Tk, bottom-right aligned) Tq * Tk - Tq^2 / 2, which
    is T^2 / 2 for Tq = Tk (the convention of the FlashAttention papers, and the default: the
    kernels and benchmarks quote TFLOP/s against it). ``exact=True`` counts the unmasked pairs
    one by one instead, each query's own key included: Tq * Tk - Tq * (Tq - 1) / 2, i.e.
    T (T + 1) / 2 for a prefill and Tk for one decode step. That is what a loop computing each
    query only against the keys it may see does (and what ``torch.utils.flop_counter`` counts for
    it); it is Tq / 2 pairs more than the default, which matters for short rows (2.6% more at 1
    query over 20 keys) and vanishes for long ones. ``backward=True`` counts forward + backward: the
    backward does 5 matmuls to the forward's 2, so 3.5x the forward.
    """
    kv_len = q_len if kv_len is None else kv_len
    for name, v in dict(batch=batch, heads=heads, q_len=q_len, head_dim=head_dim, kv_len=kv_len).items():
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"attention_flops: {name} must be a non-negative int, got {v!r}")
    if causal and q_len > kv_len:
        raise ValueError(f"attention_flops: causal attention needs q_len <= kv_len, got {q_len} > {kv_len}")
    pairs: float
    if not causal:
        pairs = q_len * kv_len
    elif exact:
        pairs = q_len * kv_len - q_len * (q_len - 1) / 2
    else:
        pairs = q_len * kv_len - q_len * q_len / 2
    fwd = 4.0 * batch * heads * pairs * head_dim
    return 3.5 * fwd if backward else fwd


def peak_memory_bytes(fn: Callable[[], object]) -> int | None:
    """Run ``fn`` once; the peak CUDA memory it allocated above what was allocated before it (its
    activations, workspaces and outputs at their largest). None on a CPU, where PyTorch keeps no such count."""
    if not torch.cuda.is_available():
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


class SavedStorage(NamedTuple):
    """One storage autograd keeps for the backward pass: its size in bytes and in elements (of the
    dtype of the tensor saved from it)."""

    nbytes: int
    numel: int


def saved_tensors(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> dict[int, SavedStorage]:
    """Run ``fn`` once; the distinct storages autograd saved for its backward pass, by storage address.

    Why: what a layer costs in activation memory is what its forward leaves alive until the
    backward, and that depends on how the layer is implemented (an eager composite saves its
    intermediates, a fused kernel only what its backward reads), not on the formula. PyTorch's
    ``saved_tensors_hooks`` sees every tensor an operation saves; keying them by storage counts a
    buffer once however many ops (or views of it) save it, so summing ``nbytes`` gives the bytes
    held, and ``numel`` tells an input-sized buffer from a hidden-sized one. Storages of the
    ``exclude`` tensors (the parameters, which live on whether or not a backward follows) are left
    out. A storage's size is the whole buffer, which for a view saved from a larger tensor is more
    than the view itself: what is kept alive is the buffer.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    saved: dict[int, SavedStorage] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = SavedStorage(storage.nbytes(), storage.nbytes() // t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    return torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device=device)


def _fresh_grads(fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor]) -> Callable[[], object]:
    """``fn`` preceded by ``t.grad = None`` for each tensor, so a timed backward allocates its gradients
    instead of accumulating into the last call's (an extra read-modify-write a training step has not)."""
    if not grad_to_none:
        return fn

    def run():
        for t in grad_to_none:
            t.grad = None
        return fn()
    return run


def time_call(fn: Callable[[], object], warmup: int = 10, rep: int = 50,
              grad_to_none: Sequence[torch.Tensor] = ()) -> float:
    """Median ms of ``fn()`` as called from Python (host cost included), L2 flushed before each call."""
    import triton

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=list(grad_to_none) or None,
                                         return_mode="median"))


def time_graph(fn: Callable[[], object], reps: int = 50, warmup: int = 3,
               grad_to_none: Sequence[torch.Tensor] = ()) -> float:
    """Median ms of ``fn``'s GPU work replayed from a CUDA graph, L2 flushed before each replay.

    ``fn`` is captured once (after ``warmup`` eager calls on a side stream, which also triggers
    any JIT compilation); each timed replay is one launch, queued behind the cache flush, so the
    events measure the kernels and not the Python that issued them. ``grad_to_none``: tensors whose
    ``.grad`` is reset inside the captured call, so a backward writes fresh gradients each replay.
    Raises RuntimeError (from PyTorch) when ``fn`` cannot be captured (e.g. it synchronises with the host).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("time_graph needs a CUDA GPU")
    fn = _fresh_grads(fn, grad_to_none)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    flush = _l2_flush_buffer(torch.device("cuda"))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    graph.replay()
    for start, end in zip(starts, ends, strict=True):
        flush.zero_()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))
    del graph
    return float(times[len(times) // 2])


def time_ms(fn: Callable[[], object], graph: bool = False, reps: int = 5,
            grad_to_none: Sequence[torch.Tensor] = ()) -> float:
    """Median ms of ``fn()`` on whatever device the chapter runs on: the one timer of the notebooks.

    On CUDA: ``time_graph`` (GPU time alone) when ``graph``, falling back to ``time_call`` for work
    that cannot be captured, else ``time_call`` (the call as a user makes it). On a CPU (the smoke
    runs of CI): one warm-up call, then the median of ``reps`` wall-clock calls. ``grad_to_none``:
    leaves whose ``.grad`` is reset before every call, for timing a backward pass.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    if torch.cuda.is_available():
        if graph:
            try:
                return time_graph(fn, grad_to_none=grad_to_none)
            except RuntimeError as err:  # e.g. fn synchronises with the host: time it per call instead
                torch.cuda.synchronize()
                warnings.warn(f"time_ms: CUDA-graph capture failed ({str(err).splitlines()[0][:120]}); "
                              "timed per call instead, host cost included", stacklevel=2)
        return time_call(fn, grad_to_none=grad_to_none)
    fn = _fresh_grads(fn, grad_to_none)
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return float(statistics.median(times))


def round_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """num[i] / den[i] for each round i: two timings taken in the same interleaved round (e.g. ours over the
    two kernels'), round by round, so a verdict can ask whether every round agrees."""
    if len(num) != len(den) or not num:
        raise ValueError(f"round_ratios needs two equally long, non-empty series of timings; got {len(num)} and {len(den)}")
    return [a / b for a, b in zip(num, den, strict=True)]


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of `round_ratios` (e.g. cuDNN's ms over ours: our speed as a share of cuDNN's).
    Pairing by round cancels what drifts between rounds (clocks, neighbours on the card); the median keeps one
    lucky or unlucky round from deciding."""
    return float(statistics.median(round_ratios(num, den)))


def _copy_gbps(n: int) -> dict[str, float]:
    """GB/s (read + write) of copying ``n`` bf16 elements, by method (see `ceilings`)."""
    cuda = torch.cuda.is_available()
    src = torch.empty(n, device="cuda" if cuda else "cpu", dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    nbytes = 2 * src.numel() * src.element_size()
    if cuda:
        copy_ms = {"copy_ (call)": time_call(lambda: dst.copy_(src)),
                   "neg (graph)": time_graph(lambda: torch.neg(src, out=dst), reps=20)}
    else:
        copy_ms = {"copy_": time_ms(lambda: dst.copy_(src)), "neg": time_ms(lambda: torch.neg(src, out=dst))}
    return {k: nbytes / ms / 1e6 for k, ms in copy_ms.items()}


def ceilings(quick: bool = False) -> dict:
    """The card's own limits: device copy GB/s and bf16 matmul TFLOP/s (8192^3; 4096^3 when ``quick``).

    Copy bandwidth counts read + write (2 x bytes); it is the ceiling every bandwidth-bound kernel
    is judged against. It is a practical ceiling, not a law: a kernel that reads more than it writes
    can run a few percent above a copy (chapter 5's SwiGLU gate reads two tensors per one written). It is
    the best of two copies of 1 GiB: ``copy_`` called from Python (the driver's copy kernel; the host
    cost is ~4% of the 0.5 ms it takes) and an elementwise kernel (``torch.neg``) replayed from a
    CUDA graph. A ``copy_`` captured in a graph alone is not used: it becomes a memcpy node run by
    the copy engines, which is slower (about 2.7 against 4 TB/s on the H200). On a CPU (the smoke
    runs) both are wall clock at small sizes, so the chapters' ratios still compute.
    """
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    copy_gbps = _copy_gbps((2**27 if quick else 2**29) if cuda else 2**22)  # bf16: 256 MiB / 1 GiB; 8 MiB on a CPU
    size = (4096 if quick else 8192) if cuda else 512
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    ms = time_graph(lambda: a @ b, reps=20) if cuda else time_ms(lambda: a @ b)
    best = max(copy_gbps, key=lambda k: copy_gbps[k])
    return {"copy_gbps": round(copy_gbps[best], 1), "copy_method": best,
            "copy_gbps_by_method": {k: round(v, 1) for k, v in copy_gbps.items()},
            "matmul_bf16_tflops": round(2 * size**3 / ms / 1e9, 1 if cuda else 4), "matmul_size": size,
            "peak_bf16_tflops": (runtime.peak_flops(runtime.gpu_name()) or 0) / 1e12}


def git_commit(repo: Path | None = None) -> str:
    """``$MINIGPT_COMMIT`` when set (a copied tree's git metadata can be stale), else the short hash of
    HEAD (with ``-dirty`` if the tree has changes), or ``unknown`` outside git."""
    if os.environ.get("MINIGPT_COMMIT"):
        return os.environ["MINIGPT_COMMIT"]
    cwd = repo or Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5, cwd=cwd)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def provenance() -> dict:
    """What every measured number carries: card, dtype, torch/triton versions, commit, UTC date."""
    prov = {k: v for k, v in runtime.provenance().items() if k in ("gpu", "dtype", "torch", "triton", "python")}
    return {**prov, "commit": git_commit(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
