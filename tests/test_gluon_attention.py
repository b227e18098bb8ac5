"""The Gluon FlashAttention kernels (`minigpt/kernels/gluon_attention.py`): the Hopper forward and backward of
the model's attention, and every variant `gpu_flash_attention.py --gluon` and `--gluon-backward` time.

Gluon has no CPU interpreter. On a CPU the kernel is compiled for sm_90a with Triton's own ptxas, whose
report must not say that the wgmma matmuls were serialised: that warning is what the overlap's schedule
exists to avoid (leaving P V in flight across the loop's back edge brings it back); and the layout and
coverage rules the model's dispatch relies on are checked against the launcher's own. On a Hopper GPU the
kernel is held to float64 attention, output and log-sum-exp, for every tile the script times in three
memory layouts, the backward's gradients likewise at every tile, and both through `minigpt.ops`, eager
and compiled.
"""

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from test_flash_attention import reference

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
gluon_attention = pytest.importorskip("minigpt.kernels.gluon_attention", reason="needs triton.experimental.gluon (Triton >= 3.6)")
from gpu_flash_attention import GLUON_TILES, gluon_variants  # noqa: E402

GluonTile = gluon_attention.GluonTile
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def _ptxas_present() -> bool:
    import triton

    return os.path.isfile(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


def _in_a_fresh_process(code: str):
    """What `code` prints last, as JSON, run with the compiler in a fresh process: the test session runs Triton's
    interpreter (TRITON_INTERPRET=1), which replaces the library functions the compiler needs."""
    env = os.environ | {"TRITON_INTERPRET": "0"}  # else importing minigpt on a CPU turns the interpreter on
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600, cwd=SCRIPTS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _spilled(warnings: list[str]) -> list[int]:
    """The bytes ptxas spills, from `ptxas_warnings`'s spill lines."""
    return [int(w.split("bytes spill stores")[0].split(",")[-1]) for w in warnings if "spill stores" in w]


@pytest.mark.skipif(not _ptxas_present(), reason="this Triton wheel ships no ptxas")
def test_gluon_forward_compiles_for_sm90_with_its_matmuls_asynchronous():
    """Every variant the script times with the overlap (the plain kernel at each tile, the warp-specialised one),
    at both head sizes (`_in_a_fresh_process`)."""
    code = (
        "import json\nimport minigpt.kernels.gluon_attention as g\n"
        "from gpu_flash_attention import gluon_variants\n"
        "out = {}\n"
        "for d in (64, 128):\n"
        "    for schedule, t, maxnreg in gluon_variants(d):\n"
        "        if schedule != 'sequential':\n"
        "            k = g.compile_for_sm90(d, g.GluonTile(*t), schedule, maxnreg)\n"
        "            out[f'D{d} {schedule} {t}'] = [k.metadata.shared, g.ptxas_warnings(k)]\n"
        "print(json.dumps(out))\n"
    )
    compiled = _in_a_fresh_process(code)
    assert len(compiled) == sum(len(gluon_variants(d)) - len(GLUON_TILES) for d in (64, 128))
    for name, (shared, warnings) in compiled.items():
        assert shared <= 227 * 1024, name  # fits an H100/H200 SM's shared memory
        assert warnings == [], name  # no "wgmma serialized" (C7511/C7514), no spills


@pytest.mark.skipif(not _ptxas_present(), reason="this Triton wheel ships no ptxas")
def test_gluon_backward_compiles_for_sm90_with_its_matmuls_asynchronous():
    """The dK/dV and dQ kernels at the tiles `backward_plan` launches, at both head sizes, and the one pass at
    D=64: they fit in shared memory, ptxas serialises none of their wgmmas, and they spill at most a few
    registers (the dK/dV kernel at D=128 holds two 64 x 128 fp32 accumulators a warpgroup: 40 bytes spill
    there; the one pass none). The one pass at D=128 runs out of registers, which is why the plan keeps it
    to heads of 64."""
    code = (
        "import json\nimport minigpt.kernels.gluon_attention as g\n"
        "out = {}\n"
        "for d in (64, 128):\n"
        "    for kernel, tile in (('dkdv', g.BWD_TILE), ('dq', g.DQ_TILE), ('one-pass', g.ONE_PASS_TILE)):\n"
        "        k = g.compile_backward_for_sm90(d, tile, kernel)\n"
        "        out[f'D{d} {kernel} {tuple(tile)}'] = [k.metadata.shared, g.ptxas_warnings(k)]\n"
        "print(json.dumps(out))\n"
    )
    compiled = _in_a_fresh_process(code)
    assert len(compiled) == 6
    assert compiled["D64 one-pass (64, 128, 8, 2)"][1] == []
    # at D=128 each warpgroup computes half of dQ's columns; registers are short (Triton 3.6: a few spilled;
    # 3.7: also serialised wgmmas)
    assert all(n <= 512 for n in _spilled(compiled.pop("D128 one-pass (64, 128, 8, 2)")[1]))
    for name, (shared, warnings) in compiled.items():
        assert shared <= 227 * 1024, name
        assert not any("C75" in w for w in warnings), (name, warnings)
        assert all(n <= 64 for n in _spilled(warnings)), (name, warnings)


@pytest.mark.skipif(not _ptxas_present(), reason="this Triton wheel ships no ptxas")
def test_the_warp_specialised_dkdv_kernel_compiles_for_sm90():
    """`gluon_ws_backward.py`'s kernel (two consumer warpgroups, a load warp; 168 registers over 12 warps) at
    both head sizes: it fits in shared memory, no wgmma is serialised, and at most a few registers spill (at
    D=128 each consumer holds two 64 x 128 fp32 accumulators in its 240)."""
    code = (
        "import json\nimport gluon_ws_backward as w\nimport minigpt.kernels.gluon_attention as g\n"
        "print(json.dumps({d: [(k := w.compile_for_sm90(d)).metadata.shared, g.ptxas_warnings(k)] for d in (64, 128)}))\n"
    )
    compiled = _in_a_fresh_process(code)
    assert compiled["64"][1] == []
    for d, (shared, warnings) in compiled.items():
        assert shared <= 227 * 1024 and not any("C75" in w for w in warnings), (d, warnings)
        assert all(n <= 128 for n in _spilled(warnings)), (d, warnings)


@pytest.mark.skipif(not _ptxas_present(), reason="this Triton wheel ships no ptxas")
def test_the_one_pass_backward_compiles_for_sm90_with_its_adds():
    """`gluon_onepass_backward.py`'s kernel in every variant --gluon-one-pass times, at both head sizes (at 128
    warp-specialised only on two warpgroups): it fits in shared memory, no wgmma is serialised, none spills at D=64, and its dQ
    partials go out as TMA bulk reductions (`_tma_reduce_add`) or atomic adds, as asked."""
    code = (
        "import json\nimport gluon_onepass_backward as w\nimport minigpt.kernels.gluon_attention as g\n"
        "from gpu_flash_attention import one_pass_variants\nout = {}\n"
        "for d in (64, 128):\n"
        "    for label, tile, reduction, buffers, ws in one_pass_variants(d):\n"
        "        k = w.compile_for_sm90(d, g.GluonTile(*tile), reduction, buffers, ws)\n"
        "        ptx = k.asm['ptx']\n"
        "        out[f'D{d} {label}'] = [k.metadata.shared, g.ptxas_warnings(k), reduction,\n"
        "                                'cp.reduce.async.bulk.tensor.2d.global.shared::cta.add' in ptx, 'atom.global' in ptx]\n"
        "print(json.dumps(out))\n"
    )
    from gpu_flash_attention import GLUON_ONE_PASS, one_pass_variants

    compiled = _in_a_fresh_process(code)
    assert len(one_pass_variants(128)) == len(GLUON_ONE_PASS) - 1  # all but the one-warpgroup warp-specialised
    assert len(compiled) == len(one_pass_variants(64)) + len(one_pass_variants(128))
    for name, (shared, warnings, reduction, bulk, atomic) in compiled.items():
        assert shared <= 227 * 1024, name
        assert not name.startswith("D64") or warnings == [], (name, warnings)
        assert name == "D128 warp-specialised, 128 keys" or not any("C75" in w for w in warnings), (name, warnings)
        assert (bulk, atomic) == (reduction == "tma", reduction == "atomic"), name


def test_the_one_pass_backward_names_what_it_does_not_take():
    """A bad reduction, a count of tiles it has no room for, an accumulator of the wrong type or size: refused in one
    line each, before the device."""
    from gluon_onepass_backward import onepass_dkdv_dq

    q = k = v = do = torch.zeros(1, 2, 128, 64, dtype=torch.bfloat16)
    lse = delta = torch.zeros(1, 2, 128)
    acc = torch.zeros(1, 2, 128, 64)
    for kwargs, message in (({"reduction": "red"}, "reduction 'red'"), ({"buffers": 4}, "1 to 3 dQ tiles"),
                            ({"reduction": "atomic", "warp_specialised": True}, "TMA reductions only"),
                            ({"dq_acc": acc.bfloat16()}, "contiguous fp32"), ({"dq_acc": acc[..., :32]}, "contiguous fp32")):
        args = {"dq_acc": acc} | kwargs
        with pytest.raises(ValueError, match=message):
            onepass_dkdv_dq(q, k, v, do, lse, delta, args.pop("dq_acc"), **args)


def test_the_one_pass_is_planned_for_long_heads_of_64_unless_determinism_is_asked_for():
    """`backward_plan` runs the one pass where the H200 measured it faster (heads of 64, from 4096 keys, T a
    multiple of its 128 keys a program), the two kernels elsewhere, and never under
    `torch.use_deterministic_algorithms` (its dQ's last bits vary from run to run)."""
    plan = gluon_attention.backward_plan
    assert plan(64, 4096) == (None, None, gluon_attention.ONE_PASS_TILE) == plan(64, 16384)
    assert plan(64, 1024) == (None, gluon_attention.DQ_TILE, None) == plan(64, 4160) == plan(64, 4096, one_pass=False)
    assert plan(128, 16384) == (None, None, gluon_attention.ONE_PASS_TILE)
    assert plan(128, 4096) == (gluon_attention.BWD_TILE, gluon_attention.DQ_TILE, None) == plan(128, 16384, one_pass=False)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert plan(64, 16384) == (None, gluon_attention.DQ_TILE, None)
    finally:
        torch.use_deterministic_algorithms(was)


@pytest.mark.parametrize(("change", "message"), [
    ({"d": 128, "tile": GluonTile(64, 64, 4, 2)}, "heads of 128 on two"), ({"t": 192}, "multiple of the backward tile's"),
    ({"buffers": 0}, "1 to 3 dQ tiles"), ({"acc": "bf16"}, "contiguous fp32"),
    ({"t": 384, "tile": GluonTile(64, 192, 12, 2)}, "64 or 128 keys a program"),
])
def test_the_one_pass_kernel_names_what_it_does_not_take(change, message):
    """Heads other than 64, lengths off its tile, a bad accumulator or count of dQ tiles: one line each, before
    the device; and `gluon_attention_backward` refuses a one pass given beside the two kernels' tiles."""
    d, t = change.get("d", 64), change.get("t", 256)
    q = k = v = do = torch.zeros(1, 2, t, d, dtype=torch.bfloat16)
    lse = delta = torch.zeros(1, 2, t)
    acc = torch.zeros(1, 2, t, d, dtype=torch.bfloat16 if change.get("acc") else torch.float32)
    with pytest.raises(ValueError, match=message):
        gluon_attention.gluon_attention_dkdv_dq(q, k, v, do, lse, delta, acc, change.get("tile", gluon_attention.ONE_PASS_TILE),
                                                buffers=change.get("buffers", 2))
    with pytest.raises(ValueError, match="pass tile=None, dq_tile=None"):
        gluon_attention.gluon_attention_backward(do, q, k, v, q, lse, one_pass=gluon_attention.ONE_PASS_TILE)


def test_a_register_cap_without_the_dkdv_kernel_is_refused():
    """maxnreg caps the Gluon dK/dV kernel; with the portable one in its place (tile None) it would do nothing."""
    q = k = v = do = o = torch.zeros(1, 2, 256, 64, dtype=torch.bfloat16)
    lse = torch.zeros(1, 2, 256)
    with pytest.raises(ValueError, match="give it a tile"):
        gluon_attention.gluon_attention_backward(do, q, k, v, o, lse, None, gluon_attention.DQ_TILE, maxnreg=168)


def test_the_warp_specialised_dkdv_kernel_names_what_it_does_not_cover():
    """Its blocks are 128 keys: a length that is not a multiple of 128 is refused in one line, before the device."""
    from gluon_ws_backward import ws_dkdv

    q = k = v = do = torch.zeros(1, 2, 192, 64, dtype=torch.bfloat16)
    lse = delta = torch.zeros(1, 2, 192)
    with pytest.raises(ValueError, match="128 keys"):
        ws_dkdv(q, k, v, do, lse, delta)


@pytest.mark.skipif(not _ptxas_present(), reason="this Triton wheel ships no ptxas")
def test_a_register_cap_reaches_the_dkdv_kernels_compile():
    """maxnreg=168 (three 4-warp programs a SM) makes the D=64 dK/dV kernel, which takes 192 registers
    uncapped, spill a little, and its wgmmas stay asynchronous: the cap reaches ptxas."""
    code = (
        "import json\nimport minigpt.kernels.gluon_attention as g\n"
        "print(json.dumps([g.ptxas_warnings(g.compile_backward_for_sm90(64, g.BWD_TILE, 'dkdv', r)) for r in (None, 168)]))\n"
    )
    uncapped, capped = _in_a_fresh_process(code)
    assert uncapped == []
    assert not any("C75" in w for w in capped)
    assert 0 < sum(_spilled(capped)) <= 128, capped


@pytest.mark.parametrize(("change", "message"), [
    (dict(d=40), "head size 40"),
    (dict(dtype=torch.float32), "bf16 or fp16"),
    (dict(t=200), "multiple of the tile"),
    (dict(tk=128), "causal self-attention"),
    (dict(transpose=True), "contiguous"),
    (dict(tile=GluonTile(128, 64, 4, 2)), "4 warps"),
    (dict(), "Hopper GPU"),  # the test's tensors are on the CPU
])
def test_gluon_forward_names_what_it_does_not_cover(change, message):
    d, t = change.get("d", 64), change.get("t", 256)
    dtype = change.get("dtype", torch.bfloat16)
    q = torch.zeros(1, 2, t, d, dtype=dtype)
    k = v = torch.zeros(1, 1, change.get("tk", t), d, dtype=dtype)
    if change.get("transpose"):
        q = torch.zeros(1, 2, d, t, dtype=dtype).transpose(2, 3)  # D not the unit stride
    with pytest.raises(ValueError, match=message):
        gluon_attention.gluon_attention_forward(q, k, v, change.get("tile", GluonTile(64, 64, 4, 2)), "overlap")


def qkv(b, h, hkv, t, d, layout, device="cuda", dtype=torch.bfloat16, seed=0):
    """q [b, h, t, d], k, v [b, hkv, t, d] in a memory layout: "contiguous" [B, H, T, D]; "model", per-head views
    of [B, T, H * D] projections (the model's); "fused", views of one [B, T, (H + 2 Hkv) * D] projection."""
    gen = torch.Generator(device=device).manual_seed(seed)
    if layout == "contiguous":
        return tuple(torch.randn(b, n, t, d, device=device, dtype=dtype, generator=gen) for n in (h, hkv, hkv))
    if layout == "model":
        return tuple(torch.randn(b, t, n, d, device=device, dtype=dtype, generator=gen).transpose(1, 2) for n in (h, hkv, hkv))
    fused = torch.randn(b, t, (h + 2 * hkv) * d, device=device, dtype=dtype, generator=gen)
    q, k, v = fused.split([h * d, hkv * d, hkv * d], dim=-1)
    return tuple(x.view(b, t, -1, d).transpose(1, 2) for x in (q, k, v))


LAYOUTS = ("contiguous", "model", "fused")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gluon_forward_finds_each_heads_rows_in_its_matrix(layout):
    """`_layout`'s (row, column) formula against the element's real offset, for every (b, h, t) of each layout."""
    q, k, _ = qkv(2, 4, 2, 8, 64, layout, device="cpu")
    for x in (q, k):
        br, hr, hc = gluon_attention._layout(x)
        matrix = gluon_attention._matrix(x)
        _, h, t, _ = x.shape
        for bi, hi, ti in ((0, 0, 0), (1, h - 1, t - 1), (1, 1, 3)):
            assert torch.equal(matrix[bi * br + hi * hr + ti, hi * hc:hi * hc + x.shape[-1]], x[bi, hi, ti])
    assert gluon_attention.output_like(q).stride() == (q.contiguous().stride() if layout == "contiguous" else
                                                      torch.empty(2, 8, 4, 64).transpose(1, 2).stride())


@pytest.mark.parametrize(("change", "covered"), [
    (dict(), True), (dict(layout="model"), True), (dict(layout="fused"), True), (dict(hkv=1), True),
    (dict(causal=False), False), (dict(d=40), False), (dict(t=96), False), (dict(dtype=torch.float32), False),
    (dict(tk=512), False), (dict(sliced=True), False), (dict(offset=True), False),
])
def test_gluon_forward_covers_what_its_launcher_checks(change, covered):
    """`covers` (which ops asks, on fake tensors too) against the launcher's own checks: equal answers."""
    d, t = change.get("d", 64), change.get("t", 256)
    q, k, v = qkv(1, 4, change.get("hkv", 2), t, d, change.get("layout", "contiguous"), device="cpu",
                  dtype=change.get("dtype", torch.bfloat16))
    if "tk" in change:
        k = v = torch.zeros(1, 2, change["tk"], d, dtype=q.dtype)
    if change.get("sliced"):  # every other row: a layout TMA could read, but not one of the two
        q = torch.zeros(1, 4, 2 * t, d, dtype=q.dtype)[:, :, ::2]
    if change.get("offset"):  # starts 2 bytes into its buffer: TMA needs 16
        q = torch.zeros(1 * 4 * t * d + 1, dtype=q.dtype)[1:].view(1, 4, t, d)
    causal = change.get("causal", True)
    assert gluon_attention.covers(q, k, v, causal) is covered
    if covered:
        tile, schedule = gluon_attention.default_plan(d, t)
        with pytest.raises(ValueError, match="Hopper GPU"):  # every other check passed
            gluon_attention.check_inputs(q, k, v, tile, schedule)


@pytest.mark.parametrize("case", ["contiguous", "model", "head 40", "fp32", "length 96"])
def test_covers_traces_into_one_graph(case):
    """`minigpt.ops` asks `covers` inside the model's forward, so torch.compile traces it: with fullgraph=True any
    graph break raises (reading a view's storage_offset was one, first found on the H200), and the traced
    answer must be the eager one. Dynamo runs on the CPU, so this needs no GPU."""
    d, t = {"head 40": 40}.get(case, 64), {"length 96": 96}.get(case, 256)
    q, k, v = qkv(1, 4, 2, t, d, "contiguous" if case == "contiguous" else "model", device="cpu",
                  dtype=torch.float32 if case == "fp32" else torch.bfloat16)
    torch._dynamo.reset()
    traced = torch.compile(lambda q, k, v: q * 2 if gluon_attention.covers(q, k, v, True) else q * 3,
                           fullgraph=True, backend="eager")
    assert torch.equal(traced(q, k, v), q * 2) is gluon_attention.covers(q, k, v, True)


@pytest.mark.skipif(not HOPPER, reason="the Gluon kernel runs on compute capability 9.x only")
# (B, H, Hkv, T, D): GQA, 3 key blocks of 128, and 16 of 64 (the ping-pong's turns over many iterations)
@pytest.mark.parametrize("shape", [(2, 4, 2, 256, 64), (1, 2, 1, 384, 128), (1, 3, 3, 1024, 128)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gluon_forward_matches_float64(shape, layout):
    b, h, hkv, t, d = shape
    q, k, v = qkv(b, h, hkv, t, d, layout)
    want_o, want_lse = reference(q, k, v, causal=True)
    for schedule, tile, maxnreg in gluon_variants(d):
        o, lse = gluon_attention.gluon_attention_forward(q, k, v, GluonTile(*tile), schedule, maxnreg)
        assert (o.double() - want_o).abs().max().item() < 2e-2, (schedule, tile)
        assert (lse.double() - want_lse).abs().max().item() < 1e-2, (schedule, tile)


@pytest.mark.skipif(not HOPPER, reason="the Gluon kernel runs on compute capability 9.x only")
# (B, H, Hkv, T, D): GQA with several query blocks per key block, one head, many key blocks
@pytest.mark.parametrize("shape", [(2, 4, 2, 256, 64), (1, 2, 1, 384, 128), (1, 3, 3, 1024, 128)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gluon_backward_matches_float64(shape, layout):
    """dq, dk, dv of `gluon_attention_backward` with the dK/dV kernel at every tile the script times (and under its
    register caps, and warp-specialised: `gluon_ws_backward.py`), the dQ kernel at every tile, both, and the
    one-pass backward in every variant (`gluon_onepass_backward.py`, dQ added up in fp32), in three memory
    layouts and with dO in a fourth (a transposed copy), against float64, as close as the portable backward's."""
    from gluon_onepass_backward import onepass_dkdv_dq
    from gluon_ws_backward import ws_dkdv
    from gpu_flash_attention import GLUON_BWD_MAXNREG, GLUON_BWD_TILES, GLUON_DQ_TILES, one_pass_variants
    from test_flash_attention import reference_grads

    from minigpt.kernels.flash_attention import flash_attention_backward

    b, h, hkv, t, d = shape
    q, k, v = qkv(b, h, hkv, t, d, layout)
    do = torch.randn(b, t, h, d, device="cuda", dtype=q.dtype).transpose(1, 2)
    o, lse = gluon_attention.gluon_attention_forward(q, k, v, GluonTile(64, 64, 4, 2), "overlap")
    want = reference_grads(q, k, v, do, causal=True)[1:]
    portable = flash_attention_backward(do, q, k, v, o, lse)
    plans = [(GluonTile(*t), None, None) for t in GLUON_BWD_TILES[d]] + [(None, GluonTile(*t), None) for t in GLUON_DQ_TILES[d]]
    plans += [(GluonTile(*GLUON_BWD_TILES[d][0]), None, r) for r in GLUON_BWD_MAXNREG[d]]
    plans.append((gluon_attention.BWD_TILE, gluon_attention.DQ_TILE, None))
    runs = {(tuple(tiles), maxnreg): partial(gluon_attention.gluon_attention_backward, do, q, k, v, o, lse, *tiles, maxnreg=maxnreg)
            for *tiles, maxnreg in plans if not any(t % max(tile[:2]) for tile in tiles if tile is not None)}
    runs["warp-specialised dK/dV"] = partial(flash_attention_backward, do, q, k, v, o, lse, dkdv_kernel=ws_dkdv)
    for label, tile, reduction, buffers, ws in one_pass_variants(d):
        if t % tile[1] == 0:
            kernel = partial(onepass_dkdv_dq, tile=GluonTile(*tile), reduction=reduction, buffers=buffers,
                             warp_specialised=ws)
            runs[f"one pass, {label}"] = partial(flash_attention_backward, do, q, k, v, o, lse, atomic_dq=True,
                                                 dkdv_kernel=kernel)
    for plan, run in runs.items():
        for name, x, ours, ref in zip(("dq", "dk", "dv"), run(), portable, want, strict=True):
            err, err_ours = ((y.double() - ref).abs().max().item() / ref.abs().max().item() for y in (x, ours))
            assert err < max(2 * err_ours, 1e-2), (plan, name, err, err_ours)


@pytest.mark.parametrize(("tile", "schedule", "maxnreg", "message"), [
    (GluonTile(64, 64, 4, 2), "interleaved", None, "schedule 'interleaved' unknown"),
    (GluonTile(64, 64, 4, 2), "ping-pong", None, "block_m must be 128"),
])
def test_gluon_forward_names_a_schedule_it_cannot_run(tile, schedule, maxnreg, message):
    q = k = v = torch.zeros(1, 1, 256, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=message):
        gluon_attention.gluon_attention_forward(q, k, v, tile, schedule, maxnreg)


def test_backward_compile_names_its_kernels():
    with pytest.raises(ValueError, match="'dkdv', 'dq' or 'one-pass'"):
        gluon_attention.compile_backward_for_sm90(64, gluon_attention.BWD_TILE, "dk")


@pytest.mark.parametrize(("kernel", "change", "message"), [
    ("dkdv", dict(d=40), "head size 40"),
    ("dkdv", dict(tile=GluonTile(64, 64, 8, 2)), "num_warps = block_n / 16"),
    ("dkdv", dict(t=320, tile=GluonTile(64, 128, 8, 2)), "multiple of the backward tile's 64 queries and 128 keys"),
    ("dq", dict(tile=GluonTile(64, 64, 8, 2)), "4 warps"),
    ("dq", dict(), "needs a Hopper GPU"),
    ("dkdv", dict(), "needs a Hopper GPU"),
    ("dkdv", dict(maxnreg=300), "maxnreg 300"),
])
def test_gluon_backward_names_what_it_does_not_cover(kernel, change, message):
    """Each backward launcher's one-line error: the inputs' rules, the tile's, then the device (on a CPU)."""
    d, t = change.get("d", 64), change.get("t", 256)
    q = k = v = do = torch.zeros(1, 2, t, d, dtype=torch.bfloat16)
    lse = delta = torch.zeros(1, 2, t)
    launch = gluon_attention.gluon_attention_dkdv if kernel == "dkdv" else gluon_attention.gluon_attention_dq
    tile = change.get("tile", GluonTile(64, 64, 4, 2))
    regs = {"maxnreg": change["maxnreg"]} if "maxnreg" in change else {}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        launch(q, k, v, do, lse, delta, tile, **regs)


@pytest.mark.skipif(not HOPPER, reason="the Gluon kernel runs on compute capability 9.x only")
@pytest.mark.parametrize(("head_dim", "seq_len", "one_pass_from"),
                         [(64, 256, None), (128, 256, None), (64, 4096, None), (128, 512, 512)])
def test_the_models_attention_runs_the_gluon_kernels_on_hopper(monkeypatch, head_dim, seq_len, one_pass_from):
    """`ops.flash_attention` on inputs the Gluon forward covers: it runs (counted), and so do the Gluon kernels
    `backward_plan` names (the dK/dV and dQ kernels, or the one pass: at 4096 keys, and at heads of 128 with
    the plan's length lowered to a short sequence, the split kernel); the output and all three gradients match
    float64; inputs it does not cover (a head of 40) take our kernels."""
    if one_pass_from is not None:
        monkeypatch.setitem(gluon_attention.ONE_PASS_FROM, head_dim, one_pass_from)
    from test_flash_attention import reference_grads

    from minigpt import ops

    calls = []
    for name in ("gluon_attention_forward", "gluon_attention_dkdv", "gluon_attention_dq", "gluon_attention_dkdv_dq"):
        kernel = getattr(gluon_attention, name)
        monkeypatch.setattr(gluon_attention, name, lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw))
    q, k, v = (x.detach().requires_grad_() for x in qkv(1, 4, 2, seq_len, head_dim, "model"))
    do = torch.randn_like(q)
    o = ops.flash_attention(q, k, v)
    o.backward(do)
    plan = gluon_attention.backward_plan(head_dim, seq_len)
    assert (plan.one_pass is not None) is (seq_len == 4096 or one_pass_from is not None)
    assert calls == (["gluon_attention_forward"] + ["gluon_attention_dkdv"] * (plan.dkdv is not None)
                     + ["gluon_attention_dq"] * (plan.dq is not None)
                     + ["gluon_attention_dkdv_dq"] * (plan.one_pass is not None))
    want = reference_grads(q, k, v, do, causal=True)
    for got, ref, name in zip((o, q.grad, k.grad, v.grad), want, ("o", "dq", "dk", "dv"), strict=True):
        err = (got.double() - ref).abs().max().item() / ref.abs().max().item()
        assert err < 2e-2, (name, err)
    calls.clear()
    ops.flash_attention(*qkv(1, 2, 2, 256, 40, "model"))
    assert calls == []


@pytest.mark.skipif(not HOPPER, reason="the Gluon kernel runs on compute capability 9.x only")
@pytest.mark.parametrize("n_heads", [2, 1], ids=["D64", "D128"])
def test_compiled_model_calls_the_gluon_kernels_in_one_graph(n_heads):
    """torch.compile(fullgraph=True) of a model in bf16 autocast whose attention the Gluon forward covers: one
    graph, the Gluon ops in Inductor's code (opaque calls; the backward's where `backward_plan` has tiles), loss
    and gradients as the PyTorch path's."""
    from torch._inductor.utils import run_and_get_code

    from minigpt import MiniGPT, ModelConfig

    torch._dynamo.reset()
    cfg = dict(vocab_size=37, dim=128, n_layers=2, n_heads=n_heads, n_kv_heads=1, max_seq_len=128)
    torch.manual_seed(0)
    ref = MiniGPT(ModelConfig(**cfg)).cuda()
    fast = MiniGPT(ModelConfig(**cfg, kernels="triton")).cuda()
    fast.load_state_dict(ref.state_dict())
    idx, targets = torch.randint(0, 37, (2, 128), device="cuda"), torch.randint(0, 37, (2, 128), device="cuda")
    compiled = torch.compile(fast, fullgraph=True)

    def step(model):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(idx, targets)
        loss.backward()
        return loss

    loss, codes = run_and_get_code(lambda: step(compiled))
    code = "\n".join(codes)
    assert "flash_attention_hopper" in code
    assert ("flash_attention_hopper_backward" in code) is any(gluon_attention.backward_plan(128 // n_heads, 128))
    loss_ref = step(ref)
    torch.testing.assert_close(loss, loss_ref, rtol=2e-2, atol=2e-2)
    grads_ref = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        g, g_ref = p.grad.double(), grads_ref[name].grad.double()
        assert (g - g_ref).norm() / g_ref.norm() < 5e-2, name
