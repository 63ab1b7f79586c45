"""CPU-only whole-model benchmark: dense layers kept as GGUF blocks vs dequantized to float32.

A CPU-only run computes everything on the host: routed experts on the CPU kernels, and the dense
part (attention, shared experts, dense first layers, output head) either as float32 torch
tensors (`dense="dequant"`, one torch thread as generate uses) or kept as GGUF blocks and run by
the same CPU kernels (`dense="quant"`, hybrimoe/qlinear.py). Both load one synthetic GGUF through
the real path and decode greedily with the KV cache.

Rows per prompt length (`context`; DeepSeek-V2's attention re-expands its latent cache every
step unless hybrimoe.mla keeps the expansion, so the GGUF model also runs once without it:
`/no-kv-memo`): prefill and decode time per token; x_vs_dense_fp32 = speed-up over the float32 dense
model; gbps = weight bytes a decode token reads (dense matrices + its activated experts; the
embedding's one row left out) / decode time per token; frac_of_copy_bw = gbps / the read
bandwidth of a plain memcpy over the kernels' thread pool measured in the same run (cold).

    python microbench/cpu_model.py --json out.json [--quick] [--preset dsv2-lite --layers 5]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, write_results  # noqa: E402

from hybrimoe import cpu, synth  # noqa: E402
from hybrimoe.generate import generate_ids  # noqa: E402
from hybrimoe.gguf_model import GGUFModel  # noqa: E402
from hybrimoe.layer import HybridRuntime, RuntimeConfig, hybrid_factory  # noqa: E402
from hybrimoe.models import load_gguf_model  # noqa: E402
from hybrimoe.mla import memoize_expand_kv, unmemoize_expand_kv  # noqa: E402
from hybrimoe.qlinear import QuantEmbedding, QuantLinear  # noqa: E402
from hybrimoe.store import ExpertStore  # noqa: E402


def dense_bytes(model) -> int:
    """Weight bytes one decode token reads outside the routed experts (embedding excluded)."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, QuantEmbedding) or isinstance(mod, torch.nn.Embedding):
            continue
        if isinstance(mod, QuantLinear):
            n += mod.qt.nbytes
        n += sum(p.numel() * p.element_size() for p in mod.parameters(recurse=False))
    return n


def load(gm, store, dense: str):
    rt = HybridRuntime(store, RuntimeConfig(device="cpu", schedule="cpu-only"))
    model, _, _ = load_gguf_model(gm, progress=False, store=store, moe_factory=hybrid_factory(rt), dense=dense)
    return model, rt


def set_kv_memo(model, on: bool) -> None:
    """hybrimoe.mla's incremental MLA expansion on (as loaded on a CPU) or off (transformers' own)."""
    (memoize_expand_kv if on else unmemoize_expand_kv)(model)


def run(model, rt, prompt, n_decode: int, reps: int):
    generate_ids(model, prompt[:, :8], 4, rt)  # warm: first calls, page cache
    best = None
    for _ in range(reps):
        new, t_pre, t_dec = generate_ids(model, prompt, n_decode, rt)
        if best is None or t_dec < best[1]:
            best = (t_pre, t_dec, len(new) - 1)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny preset, < 1 minute")
    ap.add_argument("--preset", default="dsv2-lite")
    ap.add_argument("--layers", type=int, default=5, help="total layers of the synthetic model")
    ap.add_argument("--prefill", default="64,512", help="prompt lengths (comma-separated)")
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # as generate does on a CPU device: torch's pool would fight the kernels' pool
    preset, n_layers = ("tiny", None) if args.quick else (args.preset, args.layers)
    path = synth.ensure_preset(preset, n_layers=n_layers, progress=True)
    gm = GGUFModel(path)
    store = ExpertStore(gm)
    g = torch.Generator().manual_seed(0)
    prefills = [32] if args.quick else [int(p) for p in args.prefill.split(",")]
    prompt_all = torch.randint(2, gm.config.vocab_size, (1, max(prefills)), generator=g)
    lay = store.layout(store.layers[0])
    expert_bytes = len(store.layers) * gm.config.top_k * lay.weight_bytes  # per decode token
    from cpu_kernels import copy_gbps

    threads = cpu.num_threads()
    rows, res = [], {}
    for dense in ("dequant", "quant"):
        model, rt = load(gm, store, dense)
        wbytes = dense_bytes(model) + expert_bytes
        memo_modes = (True, False) if dense == "quant" and gm.arch == "deepseek2" else (True,)
        for memo in memo_modes:
            set_kv_memo(model, memo)
            for n_pre in prefills:
                t_pre, t_dec, nd = run(model, rt, prompt_all[:, :n_pre], args.decode, args.reps)
                per_tok = t_dec / max(nd, 1)
                name = f"cpu-only/dense-{'fp32' if dense == 'dequant' else 'gguf'}{'' if memo else '/no-kv-memo'}"
                res[(name, n_pre)] = (t_pre, per_tok)
                rows.append({"name": name, "shape": f"{preset} {gm.config.n_layers} layers ({lay.describe()})",
                             "tokens": 1, "context": n_pre, "median_us": per_tok * 1e6, "prefill_tokens": n_pre,
                             "prefill_us_per_token": t_pre / n_pre * 1e6, "decode_tok_s": 1 / per_tok,
                             "weight_mb_per_token": wbytes / 1e6, "gbps": wbytes / per_tok / 1e9,
                             "cpu_threads": threads, "cpu_tier": cpu.tier()})
                print(f"# {name} context {n_pre}: {per_tok * 1e3:.1f} ms/token", flush=True)
        del model
    cbw = copy_gbps(256 << 20, threads, True, 2.0)
    for r in rows:
        base = res[("cpu-only/dense-fp32", r["context"])]
        r["copy_gbps"] = round(cbw, 3)
        r["frac_of_copy_bw"] = r["gbps"] / cbw
        r["x_vs_dense_fp32"] = base[1] * 1e6 / r["median_us"]
        r["prefill_x_vs_dense_fp32"] = base[0] / r["prefill_tokens"] * 1e6 / r["prefill_us_per_token"]
    doc = write_results("cpu_model", rows, args.json, quick=args.quick)
    print_table(doc["rows"], ["name", "context", "median_us", "decode_tok_s", "x_vs_dense_fp32", "prefill_us_per_token",
                              "prefill_x_vs_dense_fp32", "weight_mb_per_token", "gbps", "frac_of_copy_bw"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
