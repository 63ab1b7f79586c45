"""Compile the Triton kernels for a GPU target without a GPU (ahead-of-time check).

    python -m hybrimoe.triton_kernels.aot_check [--arch 90] [--ptxas]

Triton's CPU interpreter runs the kernels' semantics but not the compiler: a kernel can pass every
interpreter test and still fail to lower (layouts, dtypes, tl.dot shapes). This compiles
representative variants for sm_<arch> through Triton's own CUDA backend (its bundled ptxas; no
driver or device needed) and, with --ptxas, prints registers and spills per kernel.
Must run in a process where TRITON_INTERPRET is unset (tests spawn it as a subprocess).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

Q5_0, Q8_0, Q4_K, Q6_K = 6, 8, 12, 14

_GATE_UP_SIG = {
    "x_ptr": "*{x}", "stride_x": "i32", "ids_ptr": "*i64", "slot_ptr": "*i32", "arena_ptr": "*u8",
    "slot_bytes": "i64", "sorted_ptr": "*i32", "blk_expert_ptr": "*i32", "blk_start_ptr": "*i32",
    "blk_end_ptr": "*i32", "h_ptr": "*{h}", "T": "i32", "gate_off": "i32", "up_off": "i32",
    "gate_row_bytes": "i32", "up_row_bytes": "i32",
}
_DOWN_SIG = {
    "h_ptr": "*{h}", "wts_ptr": "*fp32", "ids_ptr": "*i64", "slot_ptr": "*i32", "arena_ptr": "*u8",
    "slot_bytes": "i64", "sorted_ptr": "*i32", "blk_expert_ptr": "*i32", "blk_start_ptr": "*i32",
    "blk_end_ptr": "*i32", "y_ptr": "*fp32", "T": "i32", "down_off": "i32", "down_row_bytes": "i32",
}
_COMBINE_SIG = {"y_ptr": "*fp32", "ids_ptr": "*i64", "slot_ptr": "*i32", "out_ptr": "*fp32",
                "stride_out": "i32"}
_DEQUANT_SIG = {"src_ptr": "*u8", "out_ptr": "*bf16", "N": "i32", "K": "i32", "row_bytes": "i32",
                "stride_out": "i32"}

# (label, x dtype, hidden, inter, gate, up, down, BM, BN, BK, num_warps): the paths moe_forward takes
VARIANTS = [
    ("decode T=1 dsv2-lite Q4_K/Q4_K/Q8_0", "bf16", 2048, 1408, Q4_K, Q4_K, Q8_0, 1, 16, 256, 4),
    ("decode T=1 Q6_K/Q5_0/Q6_K", "fp16", 2048, 1536, Q6_K, Q5_0, Q6_K, 1, 16, 256, 4),
    ("decode T<=16 Q4_K/Q4_K/Q5_0", "bf16", 2048, 1408, Q4_K, Q4_K, Q5_0, 16, 16, 256, 4),
    ("prefill Q4_K/Q4_K/Q6_K", "bf16", 4096, 14336, Q4_K, Q4_K, Q6_K, 64, 64, 32, 8),
    ("prefill fp32 Q8_0/Q6_K/Q4_K", "fp32", 2048, 768, Q8_0, Q6_K, Q4_K, 64, 64, 32, 8),
]


def _compile(fn, sig, consts, arch, num_warps):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(sig)
    for k in consts:
        sig[k] = "constexpr"
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=2))


def _ptxas_report(ptx: str, arch: int) -> str:
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return "ptxas not bundled"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        res = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True, timeout=120)
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spill = re.search(r"(\d+) bytes spill stores", res.stderr)
    return f"{regs.group(1) if regs else '?'} regs, {spill.group(1) if spill else '?'} B spilled"


def check(arch: int = 90, ptxas: bool = False, log=print) -> list[tuple[str, bool, str]]:
    """Compile every variant; returns (label, ok, detail) per kernel."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("aot_check needs TRITON_INTERPRET unset (the interpreter replaces the compiler)")
    import triton.language as tl

    from . import dequant, moe

    dots = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}
    jobs = []
    for label, xd, hid, inter, gt, ut, dt, bm, bn, bk, nw in VARIANTS:
        hd = xd
        common = dict(K=6, H=hid, I=inter, GROUPED=bm > 16, BM=bm, BN=bn, BK=bk, KP=8, DOT_DTYPE=dots[xd])
        jobs.append((f"gate_up {label}", moe.gate_up_kernel,
                     {k: v.format(x=xd, h=hd) for k, v in _GATE_UP_SIG.items()},
                     dict(common, GATE_T=gt, UP_T=ut), nw))
        jobs.append((f"down {label}", moe.down_kernel,
                     {k: v.format(h=hd) for k, v in _DOWN_SIG.items()}, dict(common, DOWN_T=dt), nw))
    for acc in (False, True):
        jobs.append((f"combine accumulate={acc}", moe.combine_kernel, _COMBINE_SIG,
                     dict(K=6, H=2048, KP=8, BH=1024, ACCUMULATE=acc), 4))
    for qt in (Q4_K, Q6_K, Q5_0, Q8_0):
        jobs.append((f"dequantize type {qt}", dequant.dequantize_kernel, _DEQUANT_SIG,
                     dict(QTYPE=qt, BN=16, BK=256), 4))
    out = []
    for label, fn, sig, consts, nw in jobs:
        t0 = time.time()
        try:
            kern = _compile(fn, sig, consts, arch, nw)
        except Exception as exc:  # noqa: BLE001 - report every failing variant, not just the first
            out.append((label, False, f"{type(exc).__name__}: {exc}"[:2000]))
            log(f"FAIL {label}: {out[-1][2]}")
            continue
        detail = f"{time.time() - t0:.1f}s"
        if ptxas:
            detail += ", " + _ptxas_report(kern.asm["ptx"], arch)
        out.append((label, True, detail))
        log(f"ok   {label} ({detail})")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="compile the Triton kernels for sm_<arch> without a GPU")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--ptxas", action="store_true", help="also report registers and spills")
    args = ap.parse_args(argv)
    results = check(args.arch, args.ptxas)
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
