"""Fused grouped MoE over the slot arena (kernels/triton/moe.py via hybrimoe.gpu.moe_forward) against
the package's reference loop (gpu.moe_forward_ref -> reference.moe_routed on numpy-dequantized
slots). Without CUDA the kernels run in Triton's CPU interpreter at tiny shapes with large tiles
(few programs); on a GPU box the same tests run compiled and the gpu-marked ones add real shapes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of triton anywhere in the process (read at @triton.jit time).
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton", reason="Triton is not installed (pip install 'hybrimoe[gpu]')")

from hybrimoe import gpu  # noqa: E402
from hybrimoe.errors import KernelInputError  # noqa: E402
from hybrimoe.formats import Q4_K, Q5_0, Q6_K, Q8_0  # noqa: E402
from hybrimoe.layout import ExpertLayout  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Normwise relative error ||out - ref|| / ||ref||, ref in fp32 on the CPU.
# fp32 x: both sides accumulate in fp32 over <= 2048 terms (error ~ sqrt(n) * 2^-24 ~ 3e-6).
FP32_REL_TOL = 1e-5
# bf16/fp16 x: dequantized weights and the silu*up intermediate are rounded to 8 (bf16) or 11
# (fp16) significant bits before tl.dot: ~2^-9 relative per product, averaging down over the sum;
# 1e-2 is ~5x the worst seen (truncating interpreter) and 10x below a wrong scale or a lost pair.
HALF_REL_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}

# Interpreter-friendly tiles: one program covers a whole tiny matrix side.
TINY = gpu.MoeConfig(
    decode_gate_up=gpu.LaunchConfig(1, 64, 256), decode_down=gpu.LaunchConfig(1, 64, 256),
    prefill_gate_up=gpu.LaunchConfig(16, 64, 128), prefill_down=gpu.LaunchConfig(16, 64, 128),
    combine=gpu.LaunchConfig(block_n=256),
)
CONFIG = TINY if DEVICE == "cpu" else None  # compiled runs use configs.json


@pytest.fixture
def gen(rng):
    return torch.Generator(device="cpu").manual_seed(int(rng.integers(2**62)))


def rel_err(out, ref):
    return (torch.linalg.vector_norm(out.float().cpu() - ref.float().cpu())
            / torch.linalg.vector_norm(ref.float().cpu()).clamp_min(1e-30)).item()


def make_case(layout, n_exp, k, t, slot_of_expert, gen, *, dtype=torch.float32, ids=None,
              ids_dtype=torch.int64):
    """Random arena with one slot per resident expert, x (T, H), distinct top-k ids, weights."""
    slot = torch.tensor(slot_of_expert, dtype=torch.int32)
    arena = gpu.random_arena(layout, max(int(slot.max()) + 1, 1), gen)
    x = torch.randn(t, layout.hidden, generator=gen).to(dtype)
    if ids is None:
        ids = torch.stack([torch.randperm(n_exp, generator=gen)[:k] for _ in range(t)])
    wts = torch.rand(t, k, generator=gen)
    dev = DEVICE
    return (x.to(dev), ids.to(ids_dtype).to(dev), wts.to(dev), slot.to(dev), arena.to(dev))


def run_and_check(layout, case, tol=FP32_REL_TOL, path="auto", out=None):
    x, ids, wts, slot, arena = case
    got = gpu.moe_forward(x, ids, wts, slot, arena, layout, out=out, config=CONFIG, path=path)
    ref = gpu.moe_forward_ref(x, ids, wts, slot, arena, layout)
    err = rel_err(got, ref)
    assert err <= tol, f"relative error {err:.3g} > {tol:.3g} ({layout.describe()}, path {path})"
    return got, ref


# Expert shapes: 256 wide hidden; inter 256 (K-quant down) or 160 (5 blocks of 32: Q5_0/Q8_0 down,
# not a multiple of the 256 tile -> masked columns, like DeepSeek-V2-Lite's 1408).
LAYOUTS = {
    "q4k_q4k_q6k": ExpertLayout(256, 256, Q4_K, Q4_K, Q6_K),   # Q4_K_M's usual mix
    "q4k_q4k_q8_0": ExpertLayout(256, 160, Q4_K, Q4_K, Q8_0),
    "q6k_q6k_q5_0": ExpertLayout(256, 160, Q6_K, Q6_K, Q5_0),
    "q5_0_q8_0_q4k": ExpertLayout(256, 256, Q5_0, Q8_0, Q4_K),  # every part a different type
    "q8_0_q5_0_q6k": ExpertLayout(256, 256, Q8_0, Q5_0, Q6_K),
}
# 8 experts, 5 resident (slots in scrambled order), 3 on the CPU (-1): skipped pairs in most tokens.
SLOTS = [3, -1, 0, 4, -1, 1, 2, -1]


@pytest.mark.parametrize("name", LAYOUTS)
def test_decode_one_token(name, gen):
    # 1 token: the GEMV path (BM = 1, fp32 broadcast-multiply); one program per (pair, row tile).
    layout = LAYOUTS[name]
    run_and_check(layout, make_case(layout, 8, 3, 1, SLOTS, gen))


@pytest.mark.parametrize("name", ["q4k_q4k_q8_0", "q5_0_q8_0_q4k"])
def test_decode_several_tokens(name, gen):
    # 5 tokens (not a multiple of any tile): decode path with tl.dot (BM = 16, 11 masked rows),
    # no sort; experts shared by several tokens are read once.
    layout = LAYOUTS[name]
    run_and_check(layout, make_case(layout, 8, 3, 5, SLOTS, gen))


@pytest.mark.parametrize("name", ["q4k_q4k_q6k", "q6k_q6k_q5_0", "q8_0_q5_0_q6k"])
def test_prefill_tokens_not_multiple_of_tile(name, gen):
    # 21 tokens > 16: prefill path; per-expert pair counts are not multiples of BM = 16, some
    # experts have no tokens at all, and the grid has surplus m-blocks that must exit cleanly.
    layout = LAYOUTS[name]
    run_and_check(layout, make_case(layout, 8, 2, 21, SLOTS, gen))


@pytest.mark.parametrize("t,path", [(6, "decode"), (37, "prefill")])
def test_all_tokens_on_one_expert(t, path, gen):
    # Every token picks expert 2 first: decode groups all 6 into one program's rows; prefill splits
    # 37 pairs of one expert over three m-blocks (16 + 16 + 5).
    layout = LAYOUTS["q4k_q4k_q8_0"]
    others = torch.tensor([0, 1, 3, 4, 5, 6, 7])
    ids = torch.stack([torch.cat([torch.tensor([2]), others[torch.randperm(7, generator=gen)[:1]]])
                       for _ in range(t)])
    run_and_check(layout, make_case(layout, 8, 2, t, SLOTS, gen, ids=ids), path=path)


@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_no_resident_expert_gives_zeros(path, gen):
    # Every routed expert is on the CPU: nothing runs, and out must still be written (zeros).
    layout = LAYOUTS["q4k_q4k_q6k"]
    x, ids, wts, _, arena = make_case(layout, 8, 2, 4, SLOTS, gen)
    slot = torch.full((8,), -1, dtype=torch.int32, device=DEVICE)
    out = torch.full((4, 256), float("nan"), device=DEVICE)
    got = gpu.moe_forward(x, ids, wts, slot, arena, layout, out=out, config=CONFIG, path=path)
    assert got is out and torch.equal(out.cpu(), torch.zeros(4, 256))


def test_gpu_and_cpu_shares_add_up_to_the_whole_layer(gen):
    # Invariant: each (token, expert) pair is computed exactly once. Splitting the experts between
    # "GPU" (resident) and "CPU" (the complement) must give the all-resident result.
    layout = LAYOUTS["q4k_q4k_q8_0"]
    full = list(range(8))                               # all 8 experts resident, slot = expert
    x, ids, wts, slot_full, arena = make_case(layout, 8, 3, 3, full, gen)
    gpu_only = torch.tensor([e if e % 3 else -1 for e in full], dtype=torch.int32, device=DEVICE)
    cpu_only = torch.tensor([-1 if e % 3 else e for e in full], dtype=torch.int32, device=DEVICE)
    whole = gpu.moe_forward(x, ids, wts, slot_full, arena, layout, config=CONFIG)
    part = gpu.moe_forward(x, ids, wts, gpu_only, arena, layout, config=CONFIG)
    rest = gpu.moe_forward_ref(x, ids, wts, cpu_only, arena, layout)
    assert rel_err(part + rest, whole) <= FP32_REL_TOL
    # the same sum with the GPU share added into the CPU share in place (accumulate=True)
    summed = gpu.moe_forward(x, ids, wts, gpu_only, arena, layout, out=rest.clone(),
                             accumulate=True, config=CONFIG)
    assert rel_err(summed, whole) <= FP32_REL_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t", [1, 3])
def test_half_inputs_and_outputs(dtype, t, gen):
    # bf16/fp16 activations: 1 token (GEMV reads x in its dtype, fp32 math) and 3 (dot inputs and the
    # intermediate in x's dtype); int32 ids; `out` given in x's dtype.
    layout = LAYOUTS["q4k_q4k_q6k"]
    case = make_case(layout, 8, 2, t, SLOTS, gen, dtype=dtype, ids_dtype=torch.int32)
    out = torch.empty(t, 256, dtype=dtype, device=DEVICE)
    got, _ = run_and_check(layout, case, tol=HALF_REL_TOL[dtype], out=out)
    assert got is out and got.dtype == dtype


def test_align_pairs_covers_each_resident_pair_once(rng):
    # The prefill grouping (torch only): every resident pair in exactly one m-block of its expert,
    # at most block_m rows per block, CPU pairs in none.
    t, k, n_exp, bm = 45, 4, 16, 8
    slot = torch.tensor(rng.permutation(np.r_[np.arange(10), -np.ones(6)]).astype(np.int32))
    ids = torch.stack([torch.from_numpy(rng.permutation(n_exp)[:k]) for _ in range(t)])
    pairs, blk_e, start, end = gpu.align_pairs(ids, slot, bm)
    seen = []
    for b in range(blk_e.numel()):
        e = int(blk_e[b])
        if e < 0:
            continue
        rows = pairs[int(start[b]):min(int(start[b]) + bm, int(end[b]))].long()
        assert 0 < rows.numel() <= bm
        assert bool((ids.reshape(-1)[rows] == e).all()) and slot[e] >= 0
        seen += rows.tolist()
    resident = (slot.long()[ids.reshape(-1)] >= 0).nonzero().reshape(-1).tolist()
    assert sorted(seen) == resident


def test_rejects_bad_inputs(gen):
    layout = LAYOUTS["q4k_q4k_q6k"]
    x, ids, wts, slot, arena = make_case(layout, 8, 2, 2, SLOTS, gen)
    with pytest.raises(KernelInputError, match="x"):
        gpu.moe_forward(x[:, :128], ids, wts, slot, arena, layout)
    with pytest.raises(KernelInputError, match="topk_weights"):
        gpu.moe_forward(x, ids, wts.double(), slot, arena, layout)
    with pytest.raises(KernelInputError, match="slot_of_expert"):
        gpu.moe_forward(x, ids, wts, slot.long(), arena, layout)
    with pytest.raises(KernelInputError, match="arena"):
        gpu.moe_forward(x, ids, wts, slot, arena.reshape(-1)[:-1], layout)


# ----------------------------------------------------------------------------- real shapes, GPU
REAL = {
    # DeepSeek-V2-Lite: 64 experts, top-6, 2048 -> 1408; down in Q8_0 (1408 is not a multiple of 256)
    "dsv2_lite": (ExpertLayout(2048, 1408, Q4_K, Q4_K, Q8_0), 64, 6),
    "dsv2_lite_q5_0": (ExpertLayout(2048, 1408, Q4_K, Q4_K, Q5_0), 64, 6),
    # Mixtral: one expert resident of 8, top-2, 4096 -> 14336, Q6_K down
    "mixtral": (ExpertLayout(4096, 14336, Q4_K, Q4_K, Q6_K), 8, 2),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", REAL)
@pytest.mark.parametrize("t", [1, 7, 16, 100])
def test_real_shapes_gpu(name, t):
    layout, n_exp, k = REAL[name]
    seed = int(np.random.SeedSequence().entropy % 2**62)
    print(f"seed {seed}")
    g = torch.Generator(device="cuda").manual_seed(seed)
    if name == "mixtral":
        slots = [-1] * n_exp
        slots[5] = 0
    else:  # 3 of 4 experts resident, slots scrambled
        perm = torch.randperm(n_exp, generator=torch.Generator().manual_seed(seed)).tolist()
        slots = [perm[e] if e % 4 else -1 for e in range(n_exp)]
    n_slots = max(slots) + 1
    arena = torch.empty(n_slots, layout.nbytes, dtype=torch.uint8, device="cuda")
    for s in range(n_slots):
        arena[s] = gpu.random_arena(layout, 1, g, device="cuda")[0]
    slot = torch.tensor(slots, dtype=torch.int32, device="cuda")
    x = torch.randn(t, layout.hidden, device="cuda", generator=g, dtype=torch.bfloat16)
    logits = torch.randn(t, n_exp, device="cuda", generator=g)
    if name == "mixtral":
        logits[:, 5] += 2.0  # most tokens use the resident expert
    wts, ids = torch.topk(torch.softmax(logits, -1), k)
    got = gpu.moe_forward(x, ids, wts, slot, arena, layout)
    again = gpu.moe_forward(x, ids, wts, slot, arena, layout)
    assert torch.equal(got, again), "moe_forward is not deterministic"
    ref = gpu.moe_forward_ref(x, ids, wts, slot, arena, layout, dequant=gpu.dequantize)
    err = rel_err(got, ref)
    assert err <= HALF_REL_TOL[torch.bfloat16], f"{name} T={t}: relative error {err:.3g}"


def test_decode_layer_is_three_launches(gen, monkeypatch):
    # Decode (T <= 16): gate_up + down + combine, no grouping step (align_pairs is never called).
    from hybrimoe.triton_kernels import moe as mk

    launches = []

    class Counting:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launches.append(self.name)
            return self.kernel[grid]

    for name in ("gate_up_kernel", "down_kernel", "combine_kernel"):
        monkeypatch.setattr(mk, name, Counting(name, getattr(mk, name)))
    monkeypatch.setattr(gpu, "align_pairs", lambda *a, **k: pytest.fail("decode must not sort"))
    layout = LAYOUTS["q4k_q4k_q6k"]
    x, ids, wts, slot, arena = make_case(layout, 8, 2, 4, SLOTS, gen)
    gpu.moe_forward(x, ids, wts, slot, arena, layout, config=CONFIG)
    assert launches == ["gate_up_kernel", "down_kernel", "combine_kernel"]


def test_kernels_compile_for_hopper():
    # The interpreter checks semantics, not lowering: compile every path (decode GEMV, decode dot,
    # prefill, combine, dequantize; mixed types; bf16/fp16/fp32) for sm_90 with Triton's own CUDA
    # backend and bundled ptxas, in a subprocess without TRITON_INTERPRET. Needs no GPU.
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia", reason="Triton was built without its CUDA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "hybrimoe.triton_kernels.aot_check", "--arch", "90"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, f"sm_90 compile failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"


def test_launch_config_lookup_and_errors(monkeypatch):
    # configs.json precedence: default < devices[name].default < devices[name]["HxI"], per field.
    table = {
        "default": {"decode_gate_up": {"block_n": 16, "num_warps": 4}, "decode_max_tokens": 8},
        "devices": {"GPU X": {"default": {"decode_gate_up": {"block_n": 32}},
                              "2048x1408": {"decode_gate_up": {"num_warps": 8}, "_measured": {}}}},
    }
    monkeypatch.setattr(gpu, "_config_table", lambda: table)
    other = gpu.load_config("GPU Y", 2048, 1408).decode_gate_up
    assert (other.block_n, other.num_warps) == (16, 4)
    shaped = gpu.load_config("GPU X", 2048, 1408)
    assert (shaped.decode_gate_up.block_n, shaped.decode_gate_up.num_warps) == (32, 8)
    assert shaped.decode_max_tokens == 8
    table["default"]["decode_gate_up"]["blok_n"] = 1
    with pytest.raises(KernelInputError, match="blok_n"):
        gpu.load_config(None, 1, 1)


def test_shipped_configs_are_valid():
    # Every entry of kernels/triton/configs.json parses, for the default and each listed device.
    table = gpu._config_table()
    for name in [None, *table.get("devices", {})]:
        cfg = gpu.load_config(name, 2048, 1408)
        assert cfg.prefill_gate_up.block_m >= 16 and cfg.decode_gate_up.block_k % 256 == 0
