"""Where a CPU-only decode token goes: a per-part profile of the whole model on the CPU kernels.

Loads a synthetic preset GGUF through the real path (dense weights as GGUF blocks, `cpu-only`
schedule, one torch thread, as `python -m hybrimoe.generate` runs on a CPU), feeds a prompt, then
decodes greedily with forward hooks timing every part (wall clock, perf_counter):

    routed+shared experts  the native MoE job (its submit, which on a host without a GPU runs the
                           whole job, + moe_end's wait; the shared expert rides in it), split
                           afterwards by timing the same layers' jobs alone
    runtime bookkeeping    moe_begin less the job: routing copy to numpy, cache/plan, job preparation;
                           and the MoE layer's own glue around it (shared-expert gate, casts)
    router                 reference.route (scores, top-k, weights) + the shared-gate glue
    attention projections  the QuantLinear matrices of self_attn (q, kv_a, kv_b, o)
    attention math         self_attn minus its projections and norms (rope, latent cache, softmax)
    dense MLP              the dense first layer's MLP (QuantLinear gate/up/down + SiLU)
    norms                  every RMSNorm
    output head            lm_head; embedding: the token's row
    python/torch overhead  the rest of the token: decoder-layer glue (residual adds), cache
                           bookkeeping, masks, rotary tables, argmax, the hooks themselves

Rows: one per part, median_us = its time per decode token (mean over the decoded tokens), and
frac_of_token. The hooks add ~2 us each (several hundred per token): their cost lands in the
overhead row; `token_us_unhooked` is a token timed without hooks in the same run.

    python microbench/cpu_profile.py --json out.json [--quick] [--preset dsv2-lite] [--context 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, write_results  # noqa: E402

from hybrimoe import cpu, synth  # noqa: E402
from hybrimoe import layer as layer_mod  # noqa: E402
from hybrimoe.generate import generate_ids  # noqa: E402
from hybrimoe.gguf_model import GGUFModel  # noqa: E402
from hybrimoe.layer import HybridMoELayer, HybridRuntime, RuntimeConfig, hybrid_factory  # noqa: E402
from hybrimoe.models import load_gguf_model  # noqa: E402
from hybrimoe.qlinear import QuantEmbedding, QuantLinear  # noqa: E402
from hybrimoe.store import ExpertStore  # noqa: E402

PARTS = ("routed experts", "shared experts", "runtime bookkeeping", "router", "attention projections",
         "attention math", "dense MLP", "norms", "output head", "embedding", "python/torch overhead")


class Profiler:
    """Forward hooks that add each module's wall time to a part; nested parts are subtracted
    from their parent (attention math = self_attn - its projections and norms)."""

    def __init__(self, model):
        self.t = defaultdict(float)
        self.on = False
        self.handles = []
        for name, mod in model.named_modules():
            part = None
            if isinstance(mod, QuantEmbedding) or isinstance(mod, torch.nn.Embedding):
                part = "embedding"
            elif name.endswith("lm_head"):
                part = "output head"
            elif type(mod).__name__.endswith("RMSNorm"):
                part = "attn norms" if ".self_attn." in name else "norms"
            elif isinstance(mod, HybridMoELayer):
                part = "moe layer"
            elif name.endswith("self_attn"):
                part = "attention"
            elif isinstance(mod, QuantLinear) and ".self_attn." in name:
                part = "attention projections"
            elif name.endswith(".mlp"):
                part = "dense MLP"
            if part is not None:
                self._hook(mod, part)

    def _hook(self, mod, part):
        starts = []

        def pre(_m, _a):
            starts.append(time.perf_counter())

        def post(_m, _a, _o):
            dt = time.perf_counter() - starts.pop()
            if self.on:
                self.t[part] += dt

        self.handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]

    def remove(self):
        for h in self.handles:
            h.remove()


def shared_fraction(rt, model, H: int, reps: int) -> float:
    """Fraction of the fused MoE job spent on the shared expert: the same layers' jobs at one
    token timed with routed experts only, and with the shared expert added, alternated."""
    layers = [m for m in model.modules() if isinstance(m, HybridMoELayer) and m._shared_blocks is not None]
    if not layers:
        return 0.0
    g = np.random.default_rng(0)
    x = torch.randn(1, H)
    t_r, t_rs = [], []
    for _ in range(reps):
        for m in layers:
            ex = [rt.cpu_side.host_weights(m.layer, int(e)) for e in g.choice(rt.n_experts, rt.top_k, replace=False)]
            tok = [np.zeros(1, np.int64)] * len(ex)
            wts = [np.ones(1, np.float32)] * len(ex)
            for with_shared, acc in ((False, t_r), (True, t_rs)):
                e2 = ex + [m._shared_blocks] if with_shared else ex
                k = len(e2)
                t0 = time.perf_counter()
                cpu.moe_ffn(x, e2, tok[:1] * k, wts[:1] * k)
                acc.append(time.perf_counter() - t0)
    a, b = float(np.median(t_r)), float(np.median(t_rs))
    return max(0.0, (b - a) / b)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny preset, < 1 minute")
    ap.add_argument("--preset", default="dsv2-lite")
    ap.add_argument("--gguf", default=None, help="GGUF file (default: the --preset synthetic model)")
    ap.add_argument("--layers", type=int, default=None, help="total layers (default: the preset's)")
    ap.add_argument("--context", type=int, default=64, help="prompt tokens before decoding")
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="CPU kernel threads (default: physical cores)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # as generate does on a CPU device
    preset = "tiny" if args.quick else args.preset
    if args.quick:
        args.context, args.decode = 16, 4
    path = args.gguf or synth.ensure_preset(preset, n_layers=args.layers, progress=True)
    gm = GGUFModel(path)
    store = ExpertStore(gm)
    rt = HybridRuntime(store, RuntimeConfig(device="cpu", schedule="cpu-only", cpu_threads=args.threads))
    model, _, _ = load_gguf_model(gm, progress=False, store=store, moe_factory=hybrid_factory(rt), dense="quant")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, gm.config.vocab_size, (1, args.context), generator=g)
    generate_ids(model, prompt[:, :8], 4, rt)  # warm: first calls, page cache
    t_plain = []
    for _ in range(2):
        _, _, t_dec = generate_ids(model, prompt, args.decode, rt)
        t_plain.append(t_dec / max(args.decode - 1, 1))

    prof = Profiler(model)
    # router and moe_begin/moe_end, timed by wrapping the functions the layer calls
    route0, begin0, end0, submit0 = layer_mod.reference.route, rt.moe_begin, rt.moe_end, rt.cpu_side.submit
    one0 = rt.cpu_side.submit_one_token

    def timed(fn, part):
        def f(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if prof.on:
                    prof.t[part] += time.perf_counter() - t0
        return f

    layer_mod.reference.route = timed(route0, "router")
    rt.moe_begin, rt.moe_end = timed(begin0, "moe_begin"), timed(end0, "moe job")
    # the job's submit (on a host without a GPU: the whole job, run by the calling thread)
    rt.cpu_side.submit = timed(submit0, "moe submit")
    rt.cpu_side.submit_one_token = timed(one0, "moe submit")  # the one-token decode job (its own path)
    tok_t = []

    def on_token(new):
        if len(new) == 1:  # the prefill's token: start counting at the first decode step
            prof.on = True
        tok_t.append(time.perf_counter())

    try:
        new, _, t_dec = generate_ids(model, prompt, args.decode, rt, on_token=on_token)
    finally:
        layer_mod.reference.route = route0
        rt.moe_begin, rt.moe_end, rt.cpu_side.submit = begin0, end0, submit0
        rt.cpu_side.submit_one_token = one0
        prof.remove()
    n_tok = len(new) - 1
    token_s = (tok_t[-1] - tok_t[0]) / n_tok
    t = {k: v / n_tok for k, v in prof.t.items()}
    H = gm.config.hidden
    fs = shared_fraction(rt, model, H, 3 if args.quick else 10)
    moe_job = t.get("moe job", 0.0) + t.get("moe submit", 0.0)
    parts = {
        "routed experts": moe_job * (1 - fs),
        "shared experts": moe_job * fs,
        "runtime bookkeeping": t.get("moe_begin", 0.0) - t.get("moe submit", 0.0),
        "router": t.get("router", 0.0),
        "attention projections": t.get("attention projections", 0.0),
        "attention math": t.get("attention", 0.0) - t.get("attention projections", 0.0) - t.get("attn norms", 0.0),
        "dense MLP": t.get("dense MLP", 0.0),
        "norms": t.get("norms", 0.0) + t.get("attn norms", 0.0),
        "output head": t.get("output head", 0.0),
        "embedding": t.get("embedding", 0.0),
    }
    # the MoE layer's own glue (shared gate, output cast) beyond route/begin/end
    moe_glue = t.get("moe layer", 0.0) - moe_job - parts["runtime bookkeeping"] - parts["router"]
    parts["runtime bookkeeping"] += moe_glue  # the layer's own glue (shared gate, casts) beyond route/begin/end
    parts["python/torch overhead"] = token_s - sum(parts.values())
    rows = []
    shape = f"{preset} {gm.config.n_layers} layers, context {args.context}"
    for p in PARTS:
        rows.append({"name": p, "shape": shape, "tokens": 1, "context": args.context,
                     "median_us": max(parts[p], 0.0) * 1e6 or None, "frac_of_token": parts[p] / token_s,
                     "cpu_threads": cpu.num_threads(), "cpu_tier": cpu.tier()})
    rows.append({"name": "token (hooked)", "shape": shape, "tokens": 1, "context": args.context,
                 "median_us": token_s * 1e6, "frac_of_token": 1.0, "token_us_unhooked": min(t_plain) * 1e6,
                 "x_vs_hooked": token_s / min(t_plain), "moe_layer_glue_us": moe_glue * 1e6,
                 "shared_frac_of_job": fs,
                 "cpu_threads": cpu.num_threads(), "cpu_tier": cpu.tier()})
    doc = write_results("cpu_profile", rows, args.json, quick=args.quick)
    print_table(doc["rows"], ["name", "median_us", "frac_of_token"])
    print(f"# token unhooked {min(t_plain) * 1e3:.1f} ms, hooked {token_s * 1e3:.1f} ms; MoE layer glue "
          f"{moe_glue * 1e6:.0f} us/token; shared expert = {fs:.2f} of the job")
    return 0


if __name__ == "__main__":
    sys.exit(main())
