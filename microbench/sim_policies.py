"""Cache/prefetch/schedule policies on the shared routing traces, with the paper-A6000 cost model.

    python microbench/sim_policies.py [--traces ../shared/traces] [--json microbench/results/sim_sweep_<date>.json]
        [--quick]   (the first 120 tokens of each trace: under a minute)
        [--admission-only | --prefetch | --prompts]   (one table: admission policies; prefetch mode
        impact vs pays; prompt + decode replays with policy profiled)

No GPU: this replays traces through hybrimoe.sim (the runtime's cache, scheduler and prefetcher
objects on a cost-model clock). Rows: policy x cache 25/50/75% x prefetch 0/2 (learned predictor,
whole-expert DMA like hybrimoe.transfer), MIN and the lower bound; prefetch-2 variants with the
oracle predictor and a preemptive (chunked) link; and the five schedules at 25% cache. Written as one JSON tagged with date, commit and cost model.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORDED = ROOT / "microbench" / "traces"  # routing recorded with generate --trace-out (see its README)
sys.path.insert(0, str(ROOT))

from hybrimoe.costs import CostModel  # noqa: E402
from hybrimoe.sim import _concat, format_table, run_one, schedule_compare, sweep  # noqa: E402
from hybrimoe.traces import load_trace  # noqa: E402


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flat_rows(sets) -> list[dict]:
    """The sweep in the common microbench row shape: simulated time per token (median_us), the
    speed-up over LRU at the same cache size and prefetch (x_vs_lru) and the fraction of the lower
    bound reached (frac_of_lower_bound = LB / time)."""
    rows = []
    for s in sets:
        lru = {(r["cache_frac"], r["prefetch"]): r["ms_per_token"] for r in s["rows"] if r["policy"] == "lru"}
        for r in s["rows"]:
            t = r["ms_per_token"]
            rows.append({"name": f"{s['trace']}/{r['policy']}/cache{round(r['cache_frac'] * 100)}%/pf{r['prefetch']}",
                         "shape": f"{s['experts']} experts top-{s['top_k']} x {s['layers']} layers ({s['costs']})",
                         "tokens": s["tokens"], "median_us": 1e3 * t,
                         "x_vs_lru": lru.get((r["cache_frac"], r["prefetch"]), float("nan")) / t,
                         "frac_of_lower_bound": r["lb_ms_per_token"] / t,
                         "hit_rate": r["hit_rate"], "min_hit_rate": r["min_hit_rate"]})
    return rows


ADMISSION_VARIANTS = (  # (label, policy, cache keyword arguments, prefetch size); lfu and static: the sweep
    ("mrs", "mrs", {}, 0), ("bypass", "bypass", {}, 0), ("min", "min", {}, 0),
    ("min-keep", "min", {"gate_demand": False}, 0), ("mrs+pf2", "mrs", {}, 2), ("bypass+pf2", "bypass", {}, 2))


def admission_table(tr, costs, fractions=(0.25, 0.5, 0.75), pcies=("whole", "preemptive")) -> list[dict]:
    """Hybrid schedule, policy x cache size x link model: the admission policies (bypass, the
    min oracle and its variant that keeps every demand load) beside mrs; prefetch 2 with the
    learned predictor for mrs and bypass."""
    rows = []
    for f in fractions:
        cap = max(tr.top_k, round(f * tr.n_experts))
        for pcie in pcies:
            for label, pol, kw, pf in ADMISSION_VARIANTS:
                t0 = time.time()
                r = run_one(tr, costs, pol, cap, "hybrid", pf, "learned", pcie=pcie, **kw)
                st = r.stats
                rows.append({"cache_frac": f, "capacity": cap, "variant": label, "policy": pol, "prefetch": pf,
                             "pcie": pcie, "hit_rate": st["hit_rate"], "ms_per_token": 1e3 * r.s_per_token,
                             "fills": st["fills"], "declined": st["declined"], "evictions": st["evictions"],
                             "prefetch_used": st["prefetch_used"], "prefetch_wasted": st["prefetch_wasted"],
                             "tokens": r.n_tokens, "run_s": round(time.time() - t0, 1)})
                print(f"  {f:.0%} {pcie:>10} {label:>10}: hit {st['hit_rate']:.3f} {1e3 * r.s_per_token:8.3f} ms/token"
                      f" fills {st['fills']} declined {st['declined']}", flush=True)
    return rows


PROMPT_VARIANTS = (  # (label, policy, cache keyword arguments, prefetch size, prefetch mode)
    ("mrs", "mrs", {}, 0, "impact"), ("bypass", "bypass", {}, 0, "impact"), ("profiled", "profiled", {}, 0, "impact"),
    ("min", "min", {}, 0, "impact"), ("mrs+pf2", "mrs", {}, 2, "impact"), ("profiled+pf2", "profiled", {}, 2, "impact"),
    ("profiled+pf2 pays", "profiled", {}, 2, "pays"))
PREFETCH_VARIANTS = (  # prefetch 2, learned predictor: today's mode (impact) vs pays
    ("mrs+pf2", "mrs", "impact"), ("mrs+pf2 pays", "mrs", "pays"),
    ("bypass+pf2", "bypass", "impact"), ("bypass+pf2 pays", "bypass", "pays"))


def prefetch_table(tr, costs, fractions=(0.25, 0.5, 0.75), pcies=("whole", "preemptive")) -> list[dict]:
    """Prefetch 2 per layer (learned predictor), mode impact vs pays, for mrs and bypass, hybrid
    schedule; with mrs and bypass at pf0 for reference."""
    rows = []
    for f in fractions:
        cap = max(tr.top_k, round(f * tr.n_experts))
        for pcie in pcies:
            for label, pol, pmode in (("mrs", "mrs", ""), ("bypass", "bypass", "")) + PREFETCH_VARIANTS:
                t0 = time.time()
                pf = 2 if pmode else 0
                r = run_one(tr, costs, pol, cap, "hybrid", pf, "learned", pcie=pcie, prefetch_mode=pmode or "impact")
                st = r.stats
                rows.append({"cache_frac": f, "capacity": cap, "variant": label, "policy": pol, "prefetch": pf,
                             "prefetch_mode": pmode, "pcie": pcie, "hit_rate": st["hit_rate"],
                             "ms_per_token": 1e3 * r.s_per_token, "prefetch_used": st["prefetch_used"],
                             "prefetch_wasted": st["prefetch_wasted"], "fills": st["fills"],
                             "pred_acc_d1": r.accuracy.get(1, float("nan")), "tokens": r.n_tokens,
                             "run_s": round(time.time() - t0, 1)})
                print(f"  {f:.0%} {pcie:>10} {label:>16}: hit {st['hit_rate']:.3f} {1e3 * r.s_per_token:8.3f} ms/token"
                      f" prefetches used {st['prefetch_used']} wasted {st['prefetch_wasted']}", flush=True)
    return rows


def prompt_sets(tdir: Path) -> dict:
    """Traces replayed as prompt + decode (label -> (trace, cost model, prefill chunk)): FLAME's
    four 512-token sequences with their first 128 tokens as the prompt (teacher-forced text both
    sides); Mixtral's one logged prompt + decode (HumanEval p0, real prefill routing); Mixtral's
    four decode traces with their first 32 generated tokens replayed as the prompt; and the traces
    recorded with `generate --trace-out` on synthetic presets (microbench/traces: random weights,
    so random routing: they test the plumbing prompt -> trace -> simulator, not the policies)."""
    from hybrimoe.sim import with_prompts

    mx = tdir / "mixtral8x7b_speculative-moe"
    pd = load_trace(mx / "routing_raw_humaneval_p0_prefill_decode.jsonl")
    return {
        "flame-290m, 4 x (128 prompt + 384 decode)": (
            with_prompts(load_trace(tdir / "flame-moe-290m_dynande" / "flame290m_prefill_4x512tok_8layers_top6.npz"),
                         128), "deepseek-v2-lite", 128),
        f"mixtral-8x7b humaneval p0, real prompt ({int((pd.phase == 0).sum())} tok) + decode": (pd, "mixtral", 256),
        "mixtral-8x7b decode x 4, first 32 generated tokens as the prompt": (
            with_prompts(_concat([load_trace(mx / "humaneval_2_routing.jsonl"),
                                  load_trace(mx / "gsm8k_2_routing.jsonl")]), 32), "mixtral", 32),
        "generate --trace-out, preset dsv2-lite (2 layers: 1 MoE layer, 64 experts top-6), random routing": (
            load_trace(RECORDED / "dsv2-lite-L2_generate_96.npz"), "deepseek-v2-lite", 64),
        "generate --trace-out, preset tiny (3 MoE layers, 8 experts top-2), random routing": (
            load_trace(RECORDED / "tiny_generate_96.npz"), "mixtral", 64),
    }


def prompt_table(tr, costs, chunk, fractions=(0.25, 0.5, 0.75), variants=PROMPT_VARIANTS, pcie="whole") -> list[dict]:
    """Prompt + decode replays (hybrid schedule): per variant the decode's simulated ms/token and
    hit rate (the prompt's prefill chunks timed apart), placements and fills."""
    rows = []
    for f in fractions:
        cap = max(tr.top_k, round(f * tr.n_experts))
        for label, pol, kw, pf, pmode in variants:
            t0 = time.time()
            extra = {"prefetch_mode": pmode} if pf else {}
            r = run_one(tr, costs, pol, cap, "hybrid", pf, "learned", chunk=chunk, pcie=pcie, **extra, **kw)
            st = r.stats
            rows.append({"cache_frac": f, "capacity": cap, "variant": label, "policy": pol, "prefetch": pf,
                         "prefetch_mode": pmode if pf else "", "pcie": pcie,
                         "decode_ms_per_token": 1e3 * r.decode_s_per_token, "decode_hit_rate": r.decode_hit_rate,
                         "ms_per_token": 1e3 * r.s_per_token, "hit_rate": st["hit_rate"],
                         "decode_tokens": r.n_decode, "tokens": r.n_tokens, "placed": st["placed"],
                         "placements": len(r.placements), "fills": st["fills"], "declined": st["declined"],
                         "prefetch_used": st["prefetch_used"], "prefetch_wasted": st["prefetch_wasted"],
                         "run_s": round(time.time() - t0, 1)})
            print(f"  {f:.0%} {label:>14}: decode hit {r.decode_hit_rate:.3f} {1e3 * r.decode_s_per_token:8.3f} ms/token"
                  f" (all {1e3 * r.s_per_token:.3f}) placed {st['placed']} fills {st['fills']}", flush=True)
    mrs = {(r["cache_frac"], r["prefetch"]): r["decode_ms_per_token"] for r in rows if r["variant"] == "mrs"}
    for r in rows:
        base = mrs.get((r["cache_frac"], r["prefetch"]), mrs.get((r["cache_frac"], 0)))
        r["vs_mrs"] = r["decode_ms_per_token"] / base - 1.0
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", default=str(ROOT.parent / "shared" / "traces"))
    ap.add_argument("--json", "--out", dest="out", default=None, help="result JSON (default microbench/results/...)")
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="first 120 tokens of each trace")
    ap.add_argument("--admission-only", action="store_true",
                    help="only the admission-policy table (bypass, min oracle) per trace")
    ap.add_argument("--set", default=None, help="only the trace set whose label starts with this")
    ap.add_argument("--prefetch", action="store_true",
                    help="only the prefetch table (pf2 impact vs pays, mrs and bypass) on the decode traces")
    ap.add_argument("--prompts", action="store_true",
                    help="only the prompt + decode table (mrs, bypass, profiled, min) on the prompt replays")
    a = ap.parse_args()
    if a.quick and not a.max_tokens:
        a.max_tokens = 120
    tdir = Path(a.traces)
    sets = {
        "flame-290m (DeepSeek-V2-Lite layout), 4x512 stream tokens": (
            [tdir / "flame-moe-290m_dynande" / "flame290m_prefill_4x512tok_8layers_top6.npz"], "deepseek-v2-lite"),
        "mixtral-8x7b decode, humaneval+gsm8k (4 prompts)": (
            [tdir / "mixtral8x7b_speculative-moe" / "humaneval_2_routing.jsonl",
             tdir / "mixtral8x7b_speculative-moe" / "gsm8k_2_routing.jsonl"], "mixtral"),
    }
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": commit(), "device": "simulated (cost model paper-a6000)", "sets": []}
    if a.prompts:
        return prompt_main(a, tdir, out)
    for label, (paths, model) in sets.items():
        if a.set and not label.startswith(a.set):
            continue
        tr = _concat([load_trace(p) for p in paths])
        if a.max_tokens:
            tr = tr.subset(slice(0, a.max_tokens))
        costs = CostModel.paper_a6000(model)
        t0 = time.time()
        head = {"label": label, "trace": tr.name, "tokens": tr.n_tokens, "layers": tr.n_layers,
                "top_k": tr.top_k, "experts": tr.n_experts, "costs": costs.name}
        if a.prefetch:
            print(f"## {label}: {tr.n_tokens} tokens, prefetch modes (hybrid)", flush=True)
            out["sets"].append({**head, "prefetch": prefetch_table(tr, costs)})
            continue
        if a.admission_only:
            print(f"## {label}: {tr.n_tokens} tokens, admission policies (hybrid)", flush=True)
            out["sets"].append({**head, "admission": admission_table(tr, costs)})
            continue
        rows = sweep(tr, costs, predictor="learned")
        cap25 = max(tr.top_k, round(0.25 * tr.n_experts))
        extra = []  # prefetch 2 with the other predictor and link model (mrs, lru)
        for f in (0.25, 0.5, 0.75):
            cap = max(tr.top_k, round(f * tr.n_experts))
            for pol in ("mrs", "lru"):
                for pred, pcie in (("learned", "preemptive"), ("oracle", "whole"), ("oracle", "preemptive")):
                    r = run_one(tr, costs, pol, cap, "hybrid", 2, pred, pcie=pcie)
                    extra.append({"cache_frac": f, "capacity": cap, "policy": pol, "prefetch": 2,
                                  "predictor": pred, "pcie": pcie, "hit_rate": r.stats["hit_rate"],
                                  "ms_per_token": 1e3 * r.s_per_token,
                                  "hits_in_flight": r.stats["hits_in_flight"],
                                  "prefetch_used": r.stats["prefetch_used"],
                                  "prefetch_wasted": r.stats["prefetch_wasted"],
                                  "pred_acc_d1": r.accuracy.get(1, float("nan"))})
        sched = schedule_compare(tr, costs, cap25)
        print(f"## {label}: {tr.n_tokens} tokens x {tr.n_layers} layers, top-{tr.top_k} of {tr.n_experts}, "
              f"{costs.name} ({time.time() - t0:.0f} s)")
        print(format_table(rows))
        print("prefetch 2, other predictor / link model (hybrid):",
              *(f"{o['cache_frac']:.0%} {o['policy']:>4} {o['predictor']:>8} {o['pcie']:>10}: hit "
                f"{o['hit_rate']:.3f} ({o['hits_in_flight']} in flight) {o['ms_per_token']:.3f} ms/token"
                for o in extra), sep="\n  ")
        print("schedules at 25%, mrs, no prefetch:",
              *(f"{s['schedule']:>10} {s['ms_per_token']:8.3f} ms/token" for s in sched), sep="\n  ")
        out["sets"].append({**head, "costs_model": json.loads(costs.to_json()), "rows": rows, "prefetch_variants": extra,
                            "schedules": sched})
    out["bench"] = "sim_policies"
    if a.prefetch:
        ref = {(s["trace"], r["cache_frac"], r["pcie"], r["policy"]): r["ms_per_token"]
               for s in out["sets"] for r in s["prefetch"] if r["prefetch_mode"] == "impact"}
        out["rows"] = [{"name": f"{s['trace']}/{r['variant']}/cache{round(r['cache_frac'] * 100)}%/{r['pcie']}",
                        "shape": f"{s['experts']} experts top-{s['top_k']} x {s['layers']} layers ({s['costs']})",
                        "tokens": s["tokens"], "median_us": 1e3 * r["ms_per_token"], "hit_rate": r["hit_rate"],
                        "x_vs_impact": (ref[(s["trace"], r["cache_frac"], r["pcie"], r["policy"])] / r["ms_per_token"]
                                        if r["prefetch_mode"] else float("nan"))}
                       for s in out["sets"] for r in s["prefetch"]]
    elif a.admission_only:
        mrs = {(s["trace"], r["cache_frac"], r["pcie"], r["prefetch"]): r["ms_per_token"]
               for s in out["sets"] for r in s["admission"] if r["policy"] == "mrs"}
        out["rows"] = [{"name": f"{s['trace']}/{r['variant']}/cache{round(r['cache_frac'] * 100)}%/{r['pcie']}",
                        "shape": f"{s['experts']} experts top-{s['top_k']} x {s['layers']} layers ({s['costs']})",
                        "tokens": s["tokens"], "median_us": 1e3 * r["ms_per_token"], "hit_rate": r["hit_rate"],
                        "x_vs_mrs": mrs[(s["trace"], r["cache_frac"], r["pcie"], r["prefetch"])] / r["ms_per_token"]}
                       for s in out["sets"] for r in s["admission"]]
    else:
        out["rows"] = flat_rows(out["sets"])
    kind = "sim_prefetch" if a.prefetch else "sim_sweep"
    path = Path(a.out) if a.out else ROOT / "microbench" / "results" / f"{kind}_{datetime.date.today()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return 0


def prompt_main(a, tdir: Path, out: dict) -> int:
    for label, (tr, model, chunk) in prompt_sets(tdir).items():
        if a.set and not label.startswith(a.set):
            continue
        if a.max_tokens:
            tr = tr.subset(slice(0, a.max_tokens))
        costs = CostModel.paper_a6000(model)
        print(f"## {label}: {tr.n_tokens} tokens ({int((tr.phase == 1).sum())} decode), prefill chunk {chunk}",
              flush=True)
        out["sets"].append({"label": label, "trace": tr.name, "tokens": tr.n_tokens, "layers": tr.n_layers,
                            "top_k": tr.top_k, "experts": tr.n_experts, "costs": costs.name, "chunk": chunk,
                            "prompts": prompt_table(tr, costs, chunk)})
    out["bench"] = "sim_policies"
    out["rows"] = [{"name": f"{s['trace']}/{r['variant']}/cache{round(r['cache_frac'] * 100)}%",
                    "shape": f"{s['experts']} experts top-{s['top_k']} x {s['layers']} layers ({s['costs']})",
                    "tokens": r["decode_tokens"], "median_us": 1e3 * r["decode_ms_per_token"],
                    "hit_rate": r["decode_hit_rate"], "x_vs_mrs": 1.0 / (1.0 + r["vs_mrs"])}
                   for s in out["sets"] for r in s["prompts"]]
    path = Path(a.out) if a.out else ROOT / "microbench" / "results" / f"sim_prompts_{datetime.date.today()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
