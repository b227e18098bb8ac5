"""The Gluon FlashAttention forward that `gpu_flash_attention.py --gluon` times (scripts/gluon_attention.py).

Gluon has no CPU interpreter. On a CPU the kernel is compiled for sm_90a with Triton's own ptxas, whose
report must not say that the wgmma matmuls were serialised: that warning is what the overlap's schedule
exists to avoid (leaving P V in flight across the loop's back edge brings it back). On a Hopper GPU the
kernel is held to float64 attention, output and log-sum-exp, for every tile the script times.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_flash_attention import reference

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
gluon_attention = pytest.importorskip("gluon_attention", reason="needs triton.experimental.gluon (Triton >= 3.6)")
from gpu_flash_attention import GLUON_TILES, gluon_variants  # noqa: E402

GluonTile = gluon_attention.GluonTile
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def _ptxas_present() -> bool:
    import triton

    return os.path.isfile(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


@pytest.mark.skipif(not _ptxas_present(), reason="this Triton wheel ships no ptxas")
def test_gluon_forward_compiles_for_sm90_with_its_matmuls_asynchronous():
    """Every variant the script times with the overlap (the plain kernel at each tile, the warp-specialised one),
    at both head sizes. In a fresh process: the test session runs Triton's interpreter (TRITON_INTERPRET=1),
    which replaces the library functions the compiler needs."""
    code = (
        "import json, gluon_attention as g\n"
        "from gpu_flash_attention import gluon_variants\n"
        "out = {}\n"
        "for d in (64, 128):\n"
        "    for schedule, t, maxnreg in gluon_variants(d):\n"
        "        if schedule != 'sequential':\n"
        "            k = g.compile_for_sm90(d, g.GluonTile(*t), schedule, maxnreg)\n"
        "            out[f'D{d} {schedule} {t}'] = [k.metadata.shared, g.ptxas_warnings(k)]\n"
        "print(json.dumps(out))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                          cwd=SCRIPTS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    compiled = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(compiled) == sum(len(gluon_variants(d)) - len(GLUON_TILES) for d in (64, 128))
    for name, (shared, warnings) in compiled.items():
        assert shared <= 227 * 1024, name  # fits an H100/H200 SM's shared memory
        assert warnings == [], name  # no "wgmma serialized" (C7511/C7514), no spills


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
        q = torch.zeros(1, t, 2, d, dtype=dtype).transpose(1, 2)
    with pytest.raises(ValueError, match=message):
        gluon_attention.gluon_attention_forward(q, k, v, change.get("tile", GluonTile(64, 64, 4, 2)), "overlap")


@pytest.mark.skipif(not HOPPER, reason="the Gluon kernel runs on compute capability 9.x only")
# (B, H, Hkv, T, D): GQA, 3 key blocks of 128, and 16 of 64 (the ping-pong's turns over many iterations)
@pytest.mark.parametrize("shape", [(2, 4, 2, 256, 64), (1, 2, 1, 384, 128), (1, 3, 3, 1024, 128)])
def test_gluon_forward_matches_float64(shape):
    b, h, hkv, t, d = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, n, t, d, device="cuda", dtype=torch.bfloat16, generator=gen) for n in (h, hkv, hkv))
    want_o, want_lse = reference(q, k, v, causal=True)
    for schedule, tile, maxnreg in gluon_variants(d):
        o, lse = gluon_attention.gluon_attention_forward(q, k, v, GluonTile(*tile), schedule, maxnreg)
        assert (o.double() - want_o).abs().max().item() < 2e-2, (schedule, tile)
        assert (lse.double() - want_lse).abs().max().item() < 1e-2, (schedule, tile)


@pytest.mark.parametrize(("tile", "schedule", "maxnreg", "message"), [
    (GluonTile(64, 64, 4, 2), "interleaved", None, "schedule 'interleaved' unknown"),
    (GluonTile(64, 64, 4, 2), "ping-pong", None, "block_m must be 128"),
])
def test_gluon_forward_names_a_schedule_it_cannot_run(tile, schedule, maxnreg, message):
    q = k = v = torch.zeros(1, 1, 256, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=message):
        gluon_attention.gluon_attention_forward(q, k, v, tile, schedule, maxnreg)
