"""How predictable is a routing trace's reuse? The cap on any cache policy without look-ahead.

    python microbench/trace_predictability.py [--traces ../shared/traces] [--json out.json]

Per trace, over all layers and tokens (sequence boundaries respected): the fraction of the
experts a token uses at a layer that the same layer uses again within the next n tokens
(n = 1, 2, 4, 8, 16, 32), beside what independent draws with the trace's own per-layer expert
popularity would give (`popularity`: sum_e p_e (1 - (1 - q_e)^n), p_e = share of the layer's
picks, q_e = per-token probability) and with uniform popularity (`uniform`: 1 - (1 - k/E)^n).
Reuse above `popularity` is what recency-based policies can exploit; frequency alone only buys
the popularity line. No GPU, numpy only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "microbench"))

from hybrimoe.sim import _concat  # noqa: E402
from sim_policies import commit  # noqa: E402
from hybrimoe.traces import Trace, load_trace  # noqa: E402

NS = (1, 2, 4, 8, 16, 32)


def reuse_within(tr: Trace, ns=NS) -> dict:
    """{n: measured, popularity, uniform} reuse fractions (see the module docstring)."""
    E, k, L = tr.n_experts, tr.top_k, tr.n_layers
    used = np.zeros((tr.n_tokens, L, E), bool)
    np.put_along_axis(used, tr.expert_ids.astype(np.int64), True, axis=2)
    out = {}
    for n in ns:
        num = den = 0
        for s in np.unique(tr.seq):
            u = used[tr.seq == s]  # (Ts, L, E)
            Ts = u.shape[0]
            if Ts <= n:
                continue
            c = np.concatenate([np.zeros((1, L, E), np.int64), np.cumsum(u, 0)])  # prefix counts
            later = c[n + 1:Ts + 1] - c[1:Ts - n + 1]  # uses in tokens t+1..t+n, for t < Ts - n
            num += int((u[:Ts - n] & (later > 0)).sum())
            den += int(u[:Ts - n].sum())
        cnt = tr.counts().astype(float)  # (L, E)
        p = cnt / cnt.sum(1, keepdims=True)
        q = np.minimum(1.0, k * p)
        pop = float(np.mean((p * (1 - (1 - q) ** n)).sum(1)))
        out[n] = {"measured": num / den if den else float("nan"), "popularity": pop,
                  "uniform": 1 - (1 - k / E) ** n}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", default=str(ROOT.parent / "shared" / "traces"))
    ap.add_argument("--json", "--out", dest="json", default=None)
    ap.add_argument("--quick", action="store_true", help="first 120 tokens of each trace")
    a = ap.parse_args()
    t = Path(a.traces)
    sets = {"flame-290m": [t / "flame-moe-290m_dynande" / "flame290m_prefill_4x512tok_8layers_top6.npz"],
            "mixtral-8x7b decode": [t / "mixtral8x7b_speculative-moe" / "humaneval_2_routing.jsonl",
                                    t / "mixtral8x7b_speculative-moe" / "gsm8k_2_routing.jsonl"]}
    res = {}
    for label, paths in sets.items():
        tr = _concat([load_trace(p) for p in paths])
        if a.quick:
            tr = tr.subset(slice(0, 120))
        r = res[label] = {"tokens": tr.n_tokens, "experts": tr.n_experts, "top_k": tr.top_k,
                          "reuse": reuse_within(tr)}
        print(f"## {label}: {tr.n_tokens} tokens, top-{tr.top_k} of {tr.n_experts}")
        print(f"{'n':>4} {'measured':>9} {'popularity':>11} {'uniform':>8}")
        for n, v in r["reuse"].items():
            print(f"{n:>4} {v['measured']:>9.3f} {v['popularity']:>11.3f} {v['uniform']:>8.3f}")
    rows = [{"name": f"{label}/reuse-within-{n}", "shape": f"{r['experts']} experts top-{r['top_k']}",
             "tokens": r["tokens"], "median_us": None, "frac_of_uses_reused": v["measured"],
             "x_vs_popularity": v["measured"] / v["popularity"], "x_vs_uniform": v["measured"] / v["uniform"]}
            for label, r in res.items() for n, v in r["reuse"].items()]
    if a.json:
        Path(a.json).write_text(json.dumps({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"), "commit": commit(), "device": "none (trace statistics)",
            "bench": "trace_predictability", "sets": res, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
