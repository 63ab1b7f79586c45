"""End-to-end benchmark: prefill then decode through a whole model, every schedule mode.

A synthetic model with real dimensions (default dsv2-lite, all its layers; mixtral and
qwen3-30b-a3b with fewer) is loaded once through the real path (GGUF -> transformers classes ->
HybridMoELayer); then for each GPU cache size (25%, 50% of the experts) and each schedule mode
(hybrid, kt-static, gpu-only, cpu-only, seed), plus the all-experts-on-GPU bound, it prefills
`--prefill` tokens and decodes `--decode` tokens and reports prefill and decode tokens/s and the
speed-up over kt-static. Random weights route almost uniformly, which real models do not, so with
`--trace PATH` the same runs are repeated with each layer's expert choice replayed from a real
routing trace (hybrimoe.traces formats; a routing override meant for benchmarks only) while every
kernel, transfer and cache policy runs for real.

--quick (CPU, < 1 minute): the tiny preset with the GPU side emulated on the host.

    python microbench/e2e.py --json out.json [--quick] [--preset dsv2-lite] [--layers N]
        [--trace ../shared/traces/flame-moe-290m_dynande/flame290m_prefill_4x512tok_8layers_top6.npz]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, write_results  # noqa: E402

from hybrimoe import synth  # noqa: E402
from hybrimoe.generate import generate_ids  # noqa: E402
from hybrimoe.gguf_model import GGUFModel  # noqa: E402
from hybrimoe.layer import HybridMoELayer, HybridRuntime, RuntimeConfig, hybrid_factory  # noqa: E402
from hybrimoe.models import load_gguf_model  # noqa: E402
from hybrimoe.scheduler import MODES  # noqa: E402
from hybrimoe.store import ExpertStore  # noqa: E402


def rebind(model, runtime: HybridRuntime) -> None:
    """Point every HybridMoELayer of `model` at `runtime` (one model, many runtime configs)."""
    for mod in model.modules():
        if isinstance(mod, HybridMoELayer):
            mod.runtime = runtime
            runtime.register_router(mod.layer, mod.router_weight, mod.routing)


class TraceRouting:
    """route_override replaying a trace: MoE layer i takes trace layer i % L, tokens in order."""

    def __init__(self, trace, moe_layers, top_k: int, n_experts: int):
        if trace.top_k != top_k or trace.n_experts != n_experts:
            raise SystemExit(f"trace {trace.name}: top-{trace.top_k} of {trace.n_experts} experts does not fit a "
                             f"model with top-{top_k} of {n_experts}")
        self.trace, self.index = trace, {layer: i for i, layer in enumerate(moe_layers)}
        self.pos = {layer: 0 for layer in moe_layers}

    def __call__(self, layer, x):
        T = x.shape[0]
        tr = self.trace
        rows = (self.pos[layer] + np.arange(T)) % tr.n_tokens
        self.pos[layer] += T
        tl = self.index[layer] % tr.n_layers
        ids = torch.from_numpy(tr.expert_ids[rows, tl].astype(np.int64)).to(x.device)
        w = torch.from_numpy(tr.scores[rows, tl].astype(np.float32)).to(x.device)
        probs = torch.from_numpy(tr.score_matrix(rows, tl)).to(x.device)
        return ids, w, probs


def run_config(model, store, gm, cfg, prompt, n_decode, routing_src):
    rt = HybridRuntime(store, cfg)
    rebind(model, rt)
    if routing_src is not None:
        rt.route_override = TraceRouting(routing_src, rt.moe_layers, gm.config.top_k, gm.config.n_experts)
    new, t_pre, t_dec = generate_ids(model, prompt, n_decode, rt)
    s = rt.summary()
    rt.close()  # copies in flight finish before the next configuration's arenas take the memory
    return t_pre, t_dec, len(new) - 1, s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--preset", default="dsv2-lite")
    ap.add_argument("--layers", type=int, default=None, help="total layers (default: the preset's)")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--trace", action="append", default=[], help="routing trace to replay (repeatable)")
    ap.add_argument("--fracs", default="0.25,0.5")
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.quick
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda:
        torch.set_num_threads(1)  # see generate.py: torch's and the expert kernels' pools share the cores
    preset = "tiny" if args.quick else args.preset
    prefill, n_decode = (32, 8) if args.quick else (args.prefill, args.decode)
    t0 = time.perf_counter()
    path = synth.ensure_preset(preset, n_layers=args.layers, progress=True)
    gm = GGUFModel(path)
    store = ExpertStore(gm)
    store.pack()
    E = gm.config.n_experts
    fracs = [float(f) for f in args.fracs.split(",")]
    modes = args.modes.split(",")
    cfg0 = RuntimeConfig(cache_size=int(E * fracs[0]), device=str(dev), emulate_gpu=not cuda)
    rt0 = HybridRuntime(store, cfg0)
    model, _, _ = load_gguf_model(gm, device=dev, dtype=dtype, progress=False, store=store,
                                  moe_factory=hybrid_factory(rt0), dense="auto")
    print(f"# {gm} loaded in {time.perf_counter() - t0:.1f} s on {dev}", flush=True)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, gm.config.vocab_size, (1, prefill), generator=g).to(dev)
    sources = [("router", None)]
    from hybrimoe.traces import load_trace

    for tp in args.trace:
        tr = load_trace(tp)
        sources.append((os.path.basename(tp).split(".")[0], tr))
    rows = []
    shape = f"{preset} {gm.config.n_layers} layers"
    for src_name, tr in sources:
        if tr is not None and (tr.top_k != gm.config.top_k or tr.n_experts != E):
            print(f"# skip trace {src_name}: top-{tr.top_k}/{tr.n_experts} experts vs model top-{gm.config.top_k}/{E}")
            continue
        configs = [("all-gpu", 1.0, "gpu-only")] + [(m, f, m) for f in fracs for m in modes]
        res = {}
        for name, frac, mode in configs:
            cfg = RuntimeConfig(cache_size=int(E * frac), schedule=mode, device=str(dev), emulate_gpu=not cuda,
                                prefetch_size=2 if mode == "hybrid" else 0)
            t_pre, t_dec, nd, s = run_config(model, store, gm, cfg, prompt, n_decode, tr)
            res[(frac, name)] = (t_pre, t_dec)
            rows.append({"name": f"{src_name}/{name}/cache{int(frac * 100)}%", "shape": shape, "tokens": prefill,
                         "decode_tokens": nd, "median_us": t_dec / max(nd, 1) * 1e6,
                         "prefill_tok_s": prefill / t_pre, "decode_tok_s": nd / t_dec, "routing": src_name,
                         "mode": mode, "cache_frac": frac, "hit_rate": s["hit_rate"],
                         "experts_gpu": s["experts_gpu"], "experts_cpu": s["experts_cpu"],
                         "pcie_mb": s["pcie_bytes"] / 1e6, "prefetch_accuracy": s.get("prefetch_accuracy"),
                         **{f"host_{k}_us": v for k, v in s["host_us"].items()}})
            print(f"# {rows[-1]['name']}: prefill {rows[-1]['prefill_tok_s']:.1f} tok/s, decode "
                  f"{rows[-1]['decode_tok_s']:.2f} tok/s, hit rate {s['hit_rate']:.2f}", flush=True)
            # partial results survive a time limit (run_gpu.sh gives each benchmark a budget)
            write_results("e2e", rows, args.json, quick=args.quick, emulated_gpu=not cuda, partial=True)
        for r in rows:
            if r["routing"] != src_name:
                continue
            base = res.get((r["cache_frac"], "kt-static"))
            if base:
                r["x_vs_kt_static"] = base[1] / (r["median_us"] * r["decode_tokens"] / 1e6)
                r["prefill_x_vs_kt_static"] = r["prefill_tok_s"] * base[0] / prefill
            bound = res.get((1.0, "all-gpu"))
            if bound:
                r["frac_of_all_gpu"] = bound[1] / (r["median_us"] * r["decode_tokens"] / 1e6)
    doc = write_results("e2e", rows, args.json, quick=args.quick, emulated_gpu=not cuda)
    print_table(doc["rows"], ["name", "prefill_tok_s", "decode_tok_s", "x_vs_kt_static", "prefill_x_vs_kt_static",
                              "frac_of_all_gpu", "hit_rate", "pcie_mb"])
    if not cuda:
        print("# no CUDA (or --quick): GPU side emulated on the host; these times are not GPU figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
