"""Soak: many decode steps of the tiny model with flat memory and unchanged tokens.

Three modes, each a fresh model and runtime on the embedded tiny model (CPU):
    cpu-only   every routed expert on the CPU kernels
    emu-gpu    emulated GPU (host-side slots), 2 cached experts per layer, prefetch 2, hybrid
               schedule with the paper-a6000 cost model (so loads and prefetches happen)
    chat       multi-turn chats through generate.KVSession: each turn feeds only what the chat
               added, the KV cache is cropped where the re-encoded history departs from it and
               grows again; a new chat (cache cropped to the template's start) every few turns
Conversations repeat the same prompt (or the same scripted turns), with the KV cache reset or
cropped between them, until `--steps` decode steps have run. Greedy tokens of every conversation
must equal those of a fresh model and runtime (`tokens_match_fresh`). RSS is sampled every
`--sample-every` steps; `rss_growth_pct` is the growth from the sample at 10% of the steps to the
largest later one (the issue's bar: < 1% over the last 90%; `frac_of_growth_limit` = growth / 1%).
median_us: median decode step (one token); x_vs_cpu-only: cpu-only's median over this mode's.

    python microbench/soak.py [--json PATH] [--quick] [--steps N] [--sample-every N]

--quick: 500 steps per mode, RSS every 50. Default: 10,000 steps per mode, RSS every 500.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, write_results  # noqa: E402

from hybrimoe import synth  # noqa: E402
from hybrimoe.generate import KVSession, generate_ids  # noqa: E402
from hybrimoe.gguf_model import GGUFModel  # noqa: E402
from hybrimoe.layer import HybridRuntime, RuntimeConfig, hybrid_factory  # noqa: E402
from hybrimoe.models import load_gguf_model  # noqa: E402
from hybrimoe.store import ExpertStore  # noqa: E402
from hybrimoe.tokenizer import load_tokenizer  # noqa: E402

MODES = {
    "cpu-only": dict(schedule="cpu-only"),
    "emu-gpu": dict(emulate_gpu=True, cache_size=2, prefetch_size=2, costs="paper-a6000"),
    "chat": dict(schedule="cpu-only"),
}
PROMPT = "the quick brown fox"
TURNS = ("hello world!", "what is the capital of france?", "once upon a time", "the cache keeps the hot experts")


def rss_bytes() -> int:
    """Current resident set (not the peak): /proc/self/statm, else ru_maxrss."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Meter:
    """Counts decode steps (one-token model calls), times them, samples RSS every n steps."""

    def __init__(self, every: int):
        self.every, self.steps, self.samples, self.step_s = every, 0, [], []
        self._t = None

    def tick(self):
        now = time.perf_counter()
        if self._t is not None:
            self.step_s.append(now - self._t)
        self._t = now
        self.steps += 1
        if self.steps % self.every == 0:
            self.samples.append((self.steps, rss_bytes()))

    def pause(self):
        self._t = None


def _build(gm, store, kw):
    rt = HybridRuntime(store, RuntimeConfig(device="cpu", **kw))
    model, _, _ = load_gguf_model(gm, progress=False, store=store, moe_factory=hybrid_factory(rt))
    return model, rt


def conversation(mode, model, rt, tok, per_conv: int, meter: _Meter | None, budget: int) -> list[list[int]]:
    """One conversation: the prompt and `per_conv` new tokens (a chat: the scripted turns, each
    answered with per_conv // len(TURNS) tokens, through one KVSession). Returns the greedy ids
    of each reply. Stops early when `budget` decode steps are used."""
    def on_token(new):
        if meter is not None and len(new) > 1:  # the first new token comes from the prefill
            meter.tick()

    replies = []
    if mode != "chat":
        ids = torch.tensor([tok.encode(PROMPT)])
        new, _, _ = generate_ids(model, ids, min(per_conv, budget + 1), rt, None, on_token=on_token)
        if meter is not None:
            meter.pause()
        return [new]
    session, history = KVSession(), []
    per_turn = max(2, per_conv // len(TURNS))
    for turn in TURNS:
        if budget <= 0:
            break
        history.append({"role": "user", "content": turn})
        ids = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        n = min(per_turn, budget + 1)
        new, _, _ = generate_ids(model, torch.tensor([list(ids)]), n, rt, None, on_token=on_token, session=session)
        budget -= len(new) - 1
        if meter is not None:
            meter.pause()
        replies.append(new)
        # the reply re-encoded from text need not give the same ids: the next turn crops there
        history.append({"role": "assistant", "content": tok.decode(new, skip_special_tokens=True)})
    return replies


def soak(mode: str, gm, store, tok, steps: int, per_conv: int, every: int) -> dict:
    torch.manual_seed(0)
    model, rt = _build(gm, store, MODES[mode])
    meter = _Meter(every)
    convs = []
    t0 = time.perf_counter()
    while meter.steps < steps:
        convs.append(conversation(mode, model, rt, tok, per_conv, meter, steps - meter.steps))
    wall = time.perf_counter() - t0
    stats = rt.summary()
    rt.close()
    del model, rt
    # a fresh model and runtime: the same conversation, greedy
    model, rt = _build(gm, store, MODES[mode])
    fresh = conversation(mode, model, rt, tok, per_conv, None, per_conv * 2)
    rt.close()
    full = [c for c in convs if sum(len(r) for r in c) == sum(len(r) for r in fresh)]
    match = bool(full) and all(c == fresh for c in full)
    s = meter.samples
    ref_at = max(1, steps // 10)
    ref = next((r for n, r in s if n >= ref_at), s[0][1] if s else rss_bytes())
    later = [r for n, r in s if n > ref_at] or [ref]
    growth = 100.0 * (max(later) - ref) / ref
    med = float(np.median(meter.step_s)) if meter.step_s else float("nan")
    return {"name": mode, "shape": f"tiny ({gm.config.n_layers} layers, {gm.config.n_experts} experts top-"
                                   f"{gm.config.top_k})", "tokens": 1, "steps": meter.steps,
            "conversations": len(convs), "compared": len(full), "tokens_match_fresh": match,
            "median_us": med * 1e6, "p90_us": float(np.percentile(meter.step_s, 90)) * 1e6,
            "wall_s": wall, "rss_mb_at_10pct": ref / 2**20, "rss_mb_max_after": max(later) / 2**20,
            "rss_growth_pct": growth, "frac_of_growth_limit": growth / 1.0,
            "rss_samples_mb": [round(r / 2**20, 2) for _, r in s],
            "hit_rate": stats.get("hit_rate"), "demand_loads": stats.get("demand_loads"),
            "prefetch_loads": stats.get("prefetch_loads")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None, help="decode steps per mode (default 10000, quick 500)")
    ap.add_argument("--sample-every", type=int, default=None, help="RSS sample period in steps (500, quick 50)")
    ap.add_argument("--per-conv", type=int, default=200, help="new tokens per conversation (a chat: over its turns)")
    ap.add_argument("--modes", default=",".join(MODES))
    a = ap.parse_args(argv)
    steps = a.steps or (500 if a.quick else 10_000)
    every = a.sample_every or (50 if a.quick else 500)
    for flag, v in (("--steps", steps), ("--sample-every", every), ("--per-conv", a.per_conv)):
        if v < 1:
            print(f"error: {flag} must be >= 1, found {v}", file=sys.stderr)
            return 2
    torch.set_num_threads(1)  # as generate does on a CPU device
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = synth.write_gguf(synth.PRESETS["tiny"], os.path.join(tmp, "tiny.gguf"))
        gm = GGUFModel(path)
        store = ExpertStore(gm)
        tok = load_tokenizer(gm)
        for mode in a.modes.split(","):
            rows.append(soak(mode, gm, store, tok, steps, a.per_conv, every))
            r = rows[-1]
            print(f"# {mode}: {r['steps']} steps, RSS growth {r['rss_growth_pct']:.2f}% after 10%, "
                  f"tokens match fresh: {r['tokens_match_fresh']}", flush=True)
    base = next((r["median_us"] for r in rows if r["name"] == "cpu-only"), rows[0]["median_us"])
    for r in rows:
        r["x_vs_cpu-only"] = base / r["median_us"]
    print_table(rows, ["name", "steps", "conversations", "median_us", "p90_us", "rss_mb_at_10pct", "rss_mb_max_after",
                       "rss_growth_pct", "tokens_match_fresh", "x_vs_cpu-only"])
    write_results("soak", rows, a.json, quick=a.quick)
    bad = [r["name"] for r in rows if not r["tokens_match_fresh"]]
    if bad:
        print(f"error: tokens differ from a fresh run in {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
