"""Trace-driven simulator: the runtime's cache, scheduler and prefetcher objects on a cost-model clock.

    python -m hybrimoe.sim --trace PATH [--trace PATH2 ...] --cache-size 16 --policy mrs \
        --schedule hybrid --prefetch-size 2 --costs paper-a6000|FILE.json [--predictor learned] \
        [--pcie whole|preemptive]
    python -m hybrimoe.sim --trace PATH --sweep [--plot out.png] [--json out.json]

Per step (one decode token, or a `chunk` of prefill tokens) and per MoE layer L:
    GPU  dense part of L (attention, shared experts)                      costs.dense_time
    in-flight prefetches of L's activated experts become L's first transfers (demand priority)
    hybrimoe.step.decide: observe -> access -> plan -> pin -> admit, the runtime's own sequence
    (the same cache, scheduler and prefetcher objects); a load the cache refuses runs on the CPU
    and the plan is re-timed that way; lanes advance by the plan's times
    prefetcher.choose(...) with predictions for L+1..L+3; prefetches queue on the PCIe lane in the
    idle time the plan leaves (they never delay a demand load; see `simulate`'s pcie models)
    admission policies (bypass, profiled, min): hybrimoe.step.fill copies experts the layer ran on
    the CPU into the cache after the prefetches, in idle link time (`simulate`'s fill_span)
Prompts (policy profiled): a prefill step after decode (or of a new sequence) opens the cache's
profile; the first decode step after it runs hybrimoe.step.place, whose copies queue on the PCIe
lane like prefetches (`simulate`'s decode_tokens).
Layer time = dense + plan.makespan; the next layer starts when both CPU and GPU are done.

Predictors (the runtime applies later routers to the current hidden state; traces cannot):
    oracle         the true experts of the coming layers (same token)
    degraded:ACC   each true expert kept with probability ACC, else replaced by a random other one
    learned        online cross-layer co-occurrence counts C_d[L][i, j] (expert i at L, j at L+d,
                   same token) from the tokens seen so far; predicts the top-k of sum_i C_d[L][i, :]
Policies: hybrimoe.cache.POLICIES; `min` is the oracle (MIN with bypass on the trace's future,
timed in the schedule: `make_cache` hands it the future step by step).
Bounds:
    belady_hits    Belady's MIN with bypass and a free initial fill: no demand-only policy with the
                   same capacity hits more (prefetching can, by spending transfers).
    lower_bound    seconds the run needs at least, with perfect knowledge: every access is served by
                   a resident expert (at most MIN's hits), a transfer, or the CPU; see the function.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cache import POLICIES, ExpertCache
from .costs import CostModel, resolve
from .prefetch import PREFETCH_MODES, Prediction, Prefetcher, idle_budget
from .step import FillSpan, decide, fill, place, release
from .step import prefetch as prefetch_step
from .traces import DECODE, PREFILL, Trace, load_trace



# ------------------------------------------------------------------------------ predictors
class OraclePredictor:
    """True experts of layers L+1..L+horizon for the tokens of this step."""

    def __init__(self, trace: Trace):
        self.trace = trace

    def predict(self, tokens: np.ndarray, layer: int, horizon: int) -> dict[int, Prediction]:
        out = {}
        for tl in range(layer + 1, min(layer + horizon, self.trace.n_layers - 1) + 1):
            e, c = np.unique(self.trace.expert_ids[tokens, tl].ravel(), return_counts=True)
            out[tl] = Prediction(e.astype(np.int64), c.astype(np.int64), np.ones(len(e)))
        return out

    def update(self, tokens: np.ndarray) -> None:
        pass


class DegradedPredictor(OraclePredictor):
    """Oracle with each true expert kept with probability `accuracy`, else swapped for a random
    expert the token did not choose. Reports prob = 1 (it does not know which are wrong)."""

    def __init__(self, trace: Trace, accuracy: float, seed: int = 0):
        super().__init__(trace)
        self.acc, self.rng = float(accuracy), np.random.default_rng(seed)

    def predict(self, tokens, layer, horizon):
        out = {}
        E = self.trace.n_experts
        for tl in range(layer + 1, min(layer + horizon, self.trace.n_layers - 1) + 1):
            ids = self.trace.expert_ids[tokens, tl].reshape(-1, self.trace.top_k).astype(np.int64)
            pred = ids.copy()
            for r in range(ids.shape[0]):
                for j in range(ids.shape[1]):
                    if self.rng.random() >= self.acc:
                        others = np.setdiff1d(np.arange(E), np.r_[ids[r], pred[r]])
                        pred[r, j] = self.rng.choice(others)
            e, c = np.unique(pred.ravel(), return_counts=True)
            out[tl] = Prediction(e, c, np.ones(len(e)))
        return out


class LearnedPredictor:
    """Online cross-layer co-occurrence: C[d-1][L] (E, E) counts of (expert i at L, j at L+d)."""

    def __init__(self, trace: Trace, horizon: int = 3):
        self.trace, self.horizon = trace, horizon
        L, E = trace.n_layers, trace.n_experts
        self.C = np.zeros((horizon, L, E, E), np.float64)

    def predict(self, tokens, layer, horizon):
        tr, k = self.trace, self.trace.top_k
        now = tr.expert_ids[tokens, layer].reshape(-1, k).astype(np.int64)
        out = {}
        for d in range(1, min(horizon, self.horizon) + 1):
            tl = layer + d
            if tl >= tr.n_layers:
                break
            C = self.C[d - 1, layer]
            agg: dict[int, float] = {}
            cnt: dict[int, int] = {}
            for row in now:
                s = C[row].sum(axis=0)
                tot = C[row].sum()
                if tot <= 0:
                    continue
                top = np.argsort(-s, kind="stable")[:k]
                for j in top:
                    # P(j used | this token's experts) ~ k * share of co-occurrences
                    agg[int(j)] = max(agg.get(int(j), 0.0), min(1.0, k * s[j] / tot))
                    cnt[int(j)] = cnt.get(int(j), 0) + 1
            if agg:
                e = np.array(sorted(agg), np.int64)
                out[tl] = Prediction(e, np.array([cnt[x] for x in e], np.int64), np.array([agg[x] for x in e]))
        return out

    def update(self, tokens):
        ids = self.trace.expert_ids[tokens].reshape(-1, self.trace.n_layers, self.trace.top_k).astype(np.int64)
        for d in range(1, self.horizon + 1):
            for layer in range(self.trace.n_layers - d):
                a, b = ids[:, layer], ids[:, layer + d]
                np.add.at(self.C[d - 1, layer], (a[:, :, None], b[:, None, :]), 1.0)


def make_predictor(spec: str, trace: Trace, horizon: int = 3):
    if spec == "oracle":
        return OraclePredictor(trace)
    if spec == "learned":
        return LearnedPredictor(trace, horizon)
    if spec.startswith("degraded:"):
        return DegradedPredictor(trace, float(spec.split(":", 1)[1]))
    raise ValueError(f"unknown predictor {spec!r} (expected oracle, learned or degraded:ACC)")


# ------------------------------------------------------------------------------ simulator
@dataclass
class SimResult:
    n_tokens: int
    total_s: float
    stats: dict
    accuracy: dict = field(default_factory=dict)
    layer_log: list = field(default_factory=list)  # per (step, layer): dict, when log=True
    decode_s: float = 0.0  # time of the decode steps alone (trace phase DECODE)
    n_decode: int = 0
    placements: list = field(default_factory=list)  # (step index, [PlaceDecision]) of policy profiled
    decode_hits: int = 0  # hits and accesses of the decode steps alone
    decode_accesses: int = 0

    @property
    def s_per_token(self) -> float:
        return self.total_s / max(1, self.n_tokens)

    @property
    def decode_s_per_token(self) -> float:
        return self.decode_s / max(1, self.n_decode)

    @property
    def decode_hit_rate(self) -> float:
        return self.decode_hits / self.decode_accesses if self.decode_accesses else float("nan")


def _steps(trace: Trace, chunk: int, tokens: np.ndarray):
    """Steps of token indices: decode tokens one by one, prefill tokens in chunks of `chunk`."""
    i = 0
    while i < len(tokens):
        if trace.phase[tokens[i]] == 0 and chunk > 1:
            j = i
            while j < len(tokens) and j - i < chunk and trace.phase[tokens[j]] == 0 \
                    and trace.seq[tokens[j]] == trace.seq[tokens[i]]:
                j += 1
        else:
            j = i + 1
        yield tokens[i:j]
        i = j


PCIE_MODELS = ("whole", "preemptive")


def simulate(trace: Trace, cache: ExpertCache, costs: CostModel, mode: str = "hybrid",
             prefetcher: Prefetcher | None = None, predictor=None, *, chunk: int = 1,
             tokens: np.ndarray | None = None, log: bool = False, pcie: str = "whole",
             fill_span: int | None = None, decode_tokens: float | None = None) -> SimResult:
    """Replay `trace` (all tokens, or the index array `tokens`) through cache/scheduler/prefetcher.

    pcie: how a prefetch shares the link with demand loads.
      "whole"       one DMA per expert, not preemptible (hybrimoe.transfer today). Prefetches are
                    budgeted into the idle time before the NEXT layer's MoE phase, so each one ends
                    before any later demand load; a prefetch still running at a layer start would
                    block that layer's loads (logged as head_block; the budget keeps it 0).
      "preemptive"  demand loads overtake a running prefetch (chunked copies); a prefetch may span
                    layers, so the budget for layer L+d is d times this layer's idle time.
    Fills (admission policies, hybrimoe.step.fill) queue on the link like prefetches, after them
    (a prefetch is for this token, a fill for a later one), in `fill_span` times this layer's idle window less the backlog. Default: 1 plus the following
    layers that lately made no demand loads (a whole-expert copy still running when a layer
    starts delays its loads: head_block, timed like any other; with "preemptive" copies a longer
    span measured worse: fills still in flight when their expert is used again make it wait).
    decode_tokens: the expected decode length hybrimoe.step.place weighs a move with (policy
    profiled); None: the decode tokens of that sequence in the replay (what generate's
    max_new_tokens stands for when it is reached).
    """
    if pcie not in PCIE_MODELS:
        raise ValueError(f"pcie model {pcie!r} (expected one of {PCIE_MODELS})")
    tokens = np.arange(trace.n_tokens) if tokens is None else np.asarray(tokens)
    L = trace.n_layers
    t = 0.0  # clock: CPU and GPU both free
    pcie_free = 0.0  # demand transfers end
    queue: list[list] = []  # in-flight prefetches [layer, expert, remaining s, total s], FIFO
    q_time = 0.0  # time up to which the prefetch queue has been advanced
    rows = []
    n_tok = 0
    in_flight_hits = 0  # hits on prefetches whose transfer had not finished at routing time
    spans = FillSpan(L)  # fill budgets: layers ahead without recent demand loads
    profiled = getattr(cache, "policy", None) == "profiled"
    prev = None  # (phase, seq) of the previous step
    placements = []
    decode_s, n_dec, dec_hits, dec_acc = 0.0, 0, 0, 0
    n_steps = 0

    def advance(until: float):
        """Let queued prefetches use the idle link from max(q_time, pcie_free) to `until`."""
        nonlocal q_time
        start = max(q_time, pcie_free)
        avail = until - start
        while queue and avail > 0:
            step = min(avail, queue[0][2])
            queue[0][2] -= step
            avail -= step
            if queue[0][2] <= 1e-15:
                queue.pop(0)
        q_time = max(q_time, until)

    for step in _steps(trace, chunk, tokens):
        T = len(step)
        n_tok += T
        ph, sq = int(trace.phase[step[0]]), int(trace.seq[step[0]])
        t_step = t
        if profiled and ph == PREFILL and prev != (PREFILL, sq):
            cache.begin_profile()  # a new prompt: a new profile
        if profiled and ph == DECODE and cache.profiling:
            n_exp = decode_tokens
            if n_exp is None:
                rest = tokens[n_tok - T:]
                n_exp = int(np.sum((trace.seq[rest] == sq) & (trace.phase[rest] == DECODE)))
            moves = place(cache, costs, n_exp, mode)
            placements.append((n_steps, moves))
            for mv in moves:
                if mv.evicted is not None:
                    queue[:] = [j for j in queue if (j[0], j[1]) != mv.evicted]
                queue.append([mv.layer, mv.expert, mv.transfer, mv.transfer])
        prev = (ph, sq)
        n_steps += 1
        for layer in range(L):
            t += costs.dense_time(layer, T)
            advance(t)
            ids, cnt = np.unique(trace.expert_ids[step, layer].ravel(), return_counts=True)
            # in-flight prefetches of experts this layer uses go first on the link (residency is
            # what the previous layers left: observe/access below change no residency)
            in_flight_hits += sum(1 for j in queue if j[0] == layer and j[1] in ids)
            act = set(ids.tolist())
            ready, busy = {}, 0.0
            keep = []
            for job in queue:
                if job[0] == layer and job[1] in act and cache.contains(layer, job[1]):
                    busy += job[2]
                    ready[job[1]] = busy
                else:
                    keep.append(job)
            queue[:] = keep
            head_block = 0.0
            if pcie == "whole" and queue and queue[0][2] < queue[0][3]:  # a started DMA runs to its end
                head_block = queue.pop(0)[2]
                ready = {e: r + head_block for e, r in ready.items()}
                busy += head_block
            # observe -> access -> plan -> pin -> admit, the runtime's own sequence (hybrimoe.step):
            # a load the cache refuses runs on the CPU, and d.plan is timed that way
            d = decide(cache, costs, mode, layer, ids, cnt, trace.score_matrix(step, layer), prefetcher=prefetcher,
                       pcie_busy=busy, ready=ready, with_events=log)
            pl = d.plan
            for ev in d.evicted:
                queue[:] = [j for j in queue if (j[0], j[1]) != ev]
            pcie_free = t + pl.pcie_end
            q_time = max(q_time, t)
            end = t + pl.makespan
            if log:
                rows.append({"layer": layer, "start": t, "pcie_busy": busy, "promoted": sorted(ready),
                             "head_block": head_block,
                             "backlog": sum(j[2] for j in queue), "plan": pl, "decision": d, "prefetches": []})
            spans.update(d)
            if prefetcher is not None and predictor is not None:
                preds = predictor.predict(step, layer, prefetcher.horizon)
                nd = costs.dense_time(layer + 1, T) if layer + 1 < L else 0.0
                backlog = sum(j[2] for j in queue)
                idle = idle_budget(layer, pl.makespan, pl.pcie_end, nd, backlog, prefetcher.horizon, L,
                                   spans_layers=(pcie == "preemptive"))
                for pd in prefetch_step(cache, prefetcher, layer, preds, idle_before=idle):
                    o = pd.order
                    if log:
                        rows[-1]["prefetches"].append(pd)
                    if pd.evicted is not None:
                        queue[:] = [j for j in queue if (j[0], j[1]) != pd.evicted]
                    queue.append([o.layer, o.expert, o.transfer, o.transfer])  # layer, expert, left, total
            span = fill_span if fill_span is not None else spans.span(layer)
            nd = costs.dense_time(layer + 1, T) if layer + 1 < L else costs.dense_time(0, 1)
            w = max(0.0, pl.makespan - pl.pcie_end) + nd
            for fd in fill(cache, costs, d, idle_s=span * w - sum(j[2] for j in queue)):
                if log:
                    rows[-1].setdefault("fills", []).append(fd)
                if fd.evicted is not None:
                    queue[:] = [j for j in queue if (j[0], j[1]) != fd.evicted]
                queue.append([layer, fd.expert, fd.transfer, fd.transfer])
            release(cache, layer)
            advance(end)
            t = end
            if ph == DECODE:
                dec_hits += d.hits
                dec_acc += len(d.experts)
        if ph == DECODE:
            decode_s += t - t_step
            n_dec += T
        if predictor is not None:
            predictor.update(step)
    st = dict(cache.stats(), hits_in_flight=in_flight_hits)
    acc = prefetcher.accuracy() if prefetcher is not None else {}
    return SimResult(n_tok, t, st, acc, rows, decode_s, n_dec, placements, dec_hits, dec_acc)


# ------------------------------------------------------------------------------ bounds
def belady_hits(requests: list[list], capacity: int) -> tuple[int, int]:
    """Belady's MIN with bypass on a stream of steps (each a list of distinct keys).

    Initial content: the `capacity` keys used soonest (a free warm start, at least as good as
    any). Keys of one step are served in order; on a miss the resident key used farthest in the
    future is evicted unless the new key is used even later (then it bypasses the cache).
    Returns (hits, accesses).
    """
    uses: dict = {}
    for s, req in enumerate(requests):
        for k in req:
            uses.setdefault(k, []).append(s)
    ptr = {k: 0 for k in uses}  # index into uses[k] of the next use at or after the current step

    def next_use(k, s, after: bool):
        u, i = uses[k], ptr[k]
        while i < len(u) and (u[i] < s or (after and u[i] == s)):
            i += 1
        ptr[k] = i
        return u[i] if i < len(u) else math.inf

    first = sorted(uses, key=lambda k: (uses[k][0], str(k)))
    res = set(first[:capacity])
    hits = total = 0
    for s, req in enumerate(requests):
        pending = set(req)
        for k in req:
            total += 1
            pending.discard(k)
            if k in res:
                hits += 1
                continue
            if capacity == 0:
                continue
            nk = next_use(k, s, True)
            if len(res) < capacity:
                res.add(k)
                continue
            victim, vn = None, -1.0
            for r in res:
                n = s if r in pending else next_use(r, s, True)
                if n > vn:
                    victim, vn = r, n
            if nk < vn:
                res.discard(victim)
                res.add(k)
    return hits, total


def step_requests(trace: Trace, chunk: int = 1, tokens=None) -> list[list[np.ndarray]]:
    """Per step, per layer: the distinct activated experts."""
    tokens = np.arange(trace.n_tokens) if tokens is None else np.asarray(tokens)
    return [[np.unique(trace.expert_ids[st, layer]) for layer in range(trace.n_layers)]
            for st in _steps(trace, chunk, tokens)]


def min_hit_rate(trace: Trace, capacity: int, chunk: int = 1, tokens=None) -> tuple[int, int]:
    """Belady MIN (hits, accesses) summed over layers, `capacity` experts per layer."""
    reqs = step_requests(trace, chunk, tokens)
    h = n = 0
    for layer in range(trace.n_layers):
        a, b = belady_hits([r[layer].tolist() for r in reqs], capacity)
        h, n = h + a, n + b
    return h, n


def lower_bound(trace: Trace, costs: CostModel, capacity: int, chunk: int = 1, tokens=None) -> float:
    """Seconds the whole replay needs at least (perfect knowledge, any policy, any prefetch).

    D = sum of dense times (GPU, serial). Per (step, layer) the MoE phase lasts at least
    m = max(min_e min(gpu_ovh + g_e, cpu_ovh + c_e), sum_e min(g_e, c_e) / 2)       -> LB1 = D + sum m
    Every access is a hit on a resident expert (at most MIN's hits H), or needs a transfer (t each,
    serial on PCIe, at most the whole run) or the CPU (c >= cpu_time(1) each, only inside MoE
    phases). With M = accesses - H and X accesses on the CPU: T >= D + X c and T >= (M - X) t;
    minimised over X                                                                   -> LB2.
    """
    reqs_tok = list(_steps(trace, chunk, np.arange(trace.n_tokens) if tokens is None else np.asarray(tokens)))
    D = lb1 = 0.0
    for st in reqs_tok:
        T = len(st)
        for layer in range(trace.n_layers):
            lc = costs.layer(layer)
            D += lc.dense_time(T)
            _, cnt = np.unique(trace.expert_ids[st, layer], return_counts=True)
            g = np.array([lc.gpu_time(c) for c in cnt])
            c = np.array([lc.cpu_time(c) for c in cnt])
            m1 = min(np.minimum(lc.gpu_layer_overhead + g, lc.cpu_layer_overhead + c))
            lb1 += max(m1, np.minimum(g, c).sum() / 2)
    H, N = min_hit_rate(trace, capacity, chunk, tokens)
    M = N - H
    cmin = min(costs.cpu_time(layer, 1) for layer in range(trace.n_layers))
    tmin = min(costs.transfer_time(layer) for layer in range(trace.n_layers))
    x = min(max((M * tmin - D) / (cmin + tmin), 0.0), M)
    lb2 = max(D + x * cmin, (M - x) * tmin)
    return max(D + lb1, lb2)


# ------------------------------------------------------------------------------ drivers
def with_prompts(trace: Trace, prompt_tokens: int) -> Trace:
    """The trace with the first `prompt_tokens` tokens of every sequence marked PREFILL (its
    prompt) and the rest DECODE: a stream of teacher-forced text (FLAME) or of generated tokens
    replayed as prompt + decode."""
    phase = np.full(trace.n_tokens, DECODE, np.uint8)
    for sq in np.unique(trace.seq):
        idx = np.flatnonzero(trace.seq == sq)
        phase[idx[:prompt_tokens]] = PREFILL
    return Trace(trace.expert_ids, trace.scores, phase, trace.seq, trace.moe_layers, trace.n_experts,
                 f"{trace.name} (prompt {prompt_tokens})", trace.score_kind, trace.source)


def make_cache(trace: Trace, policy: str, capacity: int, static_counts=None, chunk: int = 1, tokens=None,
               **kw) -> ExpertCache:
    """Per-layer cache for a trace; `static` takes counts of the whole trace unless given
    (a hindsight-best fixed set: the most optimistic static); `min` (the oracle) is given the
    trace's future, step by step as `simulate` will replay it with this chunk and tokens."""
    if policy == "static" and static_counts is None:
        static_counts = trace.counts()
    if policy == "min":
        reqs = step_requests(trace, chunk, tokens)
        kw["future"] = [[r[layer].tolist() for r in reqs] for layer in range(trace.n_layers)]
    return ExpertCache(trace.n_layers, trace.n_experts, capacity=capacity, policy=policy,
                       top_k=trace.top_k, static_counts=static_counts, **kw)


def run_one(trace, costs, policy, capacity, mode="hybrid", prefetch_size=0, predictor="learned", chunk=1,
            horizon=3, pcie="whole", fill_span=None, decode_tokens=None, prefetch_mode="impact",
            **cache_kw) -> SimResult:
    cache = make_cache(trace, policy, capacity, chunk=chunk, **cache_kw)
    pf = Prefetcher(costs, prefetch_size, horizon, mode, prefetch_mode=prefetch_mode) if prefetch_size > 0 else None
    pr = make_predictor(predictor, trace, horizon) if pf is not None else None
    return simulate(trace, cache, costs, mode, pf, pr, chunk=chunk, pcie=pcie, fill_span=fill_span,
                    decode_tokens=decode_tokens)


def sweep(trace: Trace, costs: CostModel, fractions=(0.25, 0.5, 0.75), prefetch=(0, 2),
          policies=POLICIES, mode="hybrid", predictor="learned", chunk=1, demand_mode="gpu-only",
          pcie="whole") -> list[dict]:
    """One row per (cache fraction, policy, prefetch size): hit rate and ms/token under `mode`,
    and again under `demand_mode` (gpu-only: every miss is loaded and admitted, the setting of
    classic cache-policy hit-rate comparisons such as the paper's), with MIN and the lower bound."""
    rows = []
    for f in fractions:
        cap = max(trace.top_k, int(round(f * trace.n_experts)))
        h, n = min_hit_rate(trace, cap, chunk)
        lb = lower_bound(trace, costs, cap, chunk)
        for pol in policies:
            for p in prefetch:
                r = run_one(trace, costs, pol, cap, mode, p, predictor, chunk, pcie=pcie)
                d = run_one(trace, costs, pol, cap, demand_mode, p, predictor, chunk, pcie=pcie) if demand_mode else None
                rows.append({"trace": trace.name, "cache_frac": f, "capacity": cap, "policy": pol,
                             "prefetch": p, "schedule": mode, "predictor": predictor if p else "", "pcie": pcie,
                             "hit_rate": r.stats["hit_rate"], "min_hit_rate": h / n,
                             "ms_per_token": 1e3 * r.s_per_token, "lb_ms_per_token": 1e3 * lb / r.n_tokens,
                             "prefetch_used": r.stats["prefetch_used"],
                             "prefetch_wasted": r.stats["prefetch_wasted"],
                             "hits_in_flight": r.stats["hits_in_flight"],
                             "pred_acc_d1": r.accuracy.get(1, float("nan")), "tokens": r.n_tokens,
                             "demand_schedule": demand_mode,
                             "demand_hit_rate": d.stats["hit_rate"] if d else float("nan"),
                             "demand_ms_per_token": 1e3 * d.s_per_token if d else float("nan")})
    return rows


def schedule_compare(trace, costs, capacity, policy="mrs", chunk=1) -> list[dict]:
    out = []
    for mode in ("hybrid", "kt-static", "gpu-only", "cpu-only", "seed"):
        r = run_one(trace, costs, policy, capacity, mode, 0, chunk=chunk)
        out.append({"trace": trace.name, "schedule": mode, "capacity": capacity, "policy": policy,
                    "ms_per_token": 1e3 * r.s_per_token, "hit_rate": r.stats["hit_rate"]})
    return out


def format_table(rows: list[dict]) -> str:
    lines = [f"{'cache':>6}{'cap':>4}{'policy':>7}{'pf':>3} |{'hit':>6}{'ms/tok':>8} |{'hitD':>6}{'ms/tokD':>8} |"
             f"{'MIN':>6}{'LB ms':>7} |{'pf used/wasted':>15}{'acc1':>6}",
             "(hit, ms/tok: schedule hybrid; hitD, ms/tokD: gpu-only, every miss loaded and admitted)"]
    for r in rows:
        lines.append(f"{r['cache_frac']:>6.0%}{r['capacity']:>4}{r['policy']:>7}{r['prefetch']:>3} |"
                     f"{r['hit_rate']:>6.3f}{r['ms_per_token']:>8.3f} |{r['demand_hit_rate']:>6.3f}"
                     f"{r['demand_ms_per_token']:>8.3f} |{r['min_hit_rate']:>6.3f}{r['lb_ms_per_token']:>7.3f} |"
                     f"{r['prefetch_used']:>7}/{r['prefetch_wasted']:<7}{r['pred_acc_d1']:>6.2f}")
    return "\n".join(lines)


def _concat(traces: list[Trace]) -> Trace:
    if len(traces) == 1:
        return traces[0]
    t0 = traces[0]
    seq_off, seqs = 0, []
    for t in traces:
        seqs.append(t.seq + seq_off)
        seq_off = seqs[-1].max() + 1
    return Trace(np.concatenate([t.expert_ids for t in traces]), np.concatenate([t.scores for t in traces]),
                 np.concatenate([t.phase for t in traces]), np.concatenate(seqs), t0.moe_layers, t0.n_experts,
                 "+".join(t.name for t in traces), t0.score_kind, ";".join(t.source for t in traces))


def plot_sweep(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = sorted({r["trace"] for r in rows})
    fig, axes = plt.subplots(2, len(traces), figsize=(6 * len(traces), 8), squeeze=False)
    for j, tn in enumerate(traces):
        rs = [r for r in rows if r["trace"] == tn]
        for pol in POLICIES:
            for p, ls in ((0, "-"), (2, "--")):
                sel = [r for r in rs if r["policy"] == pol and r["prefetch"] == p]
                if sel:
                    x = [r["cache_frac"] for r in sel]
                    axes[0, j].plot(x, [r["hit_rate"] for r in sel], ls, marker="o", label=f"{pol} pf{p}")
                    axes[1, j].plot(x, [r["ms_per_token"] for r in sel], ls, marker="o", label=f"{pol} pf{p}")
        mins = sorted({(r["cache_frac"], r["min_hit_rate"], r["lb_ms_per_token"]) for r in rs})
        axes[0, j].plot([m[0] for m in mins], [m[1] for m in mins], "k:", label="MIN")
        axes[1, j].plot([m[0] for m in mins], [m[2] for m in mins], "k:", label="lower bound")
        axes[0, j].set_title(tn)
        axes[0, j].set_ylabel("hit rate")
        axes[1, j].set_ylabel("ms / token")
        axes[1, j].set_xlabel("cache fraction of experts per layer")
        axes[0, j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _check_flags(a, n_experts: int | None = None) -> str | None:
    """One line naming the first numeric flag out of its range (E-bounded ones once E is known)."""
    hi = n_experts if n_experts is not None else None
    for flag, v, lo, top in (("--cache-size", a.cache_size, 0, hi), ("--prefetch-size", a.prefetch_size, 0, hi),
                             ("--chunk", a.chunk, 1, None), ("--max-tokens", a.max_tokens, 0, None),
                             ("--prompt-tokens", a.prompt_tokens, 0, None)):
        if v is not None and (v < lo or (top is not None and v > top)):
            want = f"in {lo}..{top} (the trace's experts per layer)" if top is not None else f">= {lo}"
            return f"{flag} must be {want}, found {v}"
    if a.predictor.startswith("degraded:"):
        try:
            acc = float(a.predictor.split(":", 1)[1])
        except ValueError:
            acc = float("nan")
        if not 0.0 <= acc <= 1.0:
            return f"--predictor degraded:ACC needs ACC in 0..1, found {a.predictor.split(':', 1)[1]!r}"
    elif a.predictor not in ("oracle", "learned"):
        return f"--predictor must be oracle, learned or degraded:ACC, found {a.predictor!r}"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hybrimoe.sim", description=__doc__.split("\n")[0])
    ap.add_argument("--trace", action="append", required=True,
                    help="trace file (.npz or Mixtral .jsonl); repeat to concatenate (same model)")
    ap.add_argument("--cache-size", type=int, default=None, help="experts per layer, 0..E (default 25%% of E; "
                    "0 = no cache)")
    ap.add_argument("--policy", default="mrs", choices=POLICIES)
    ap.add_argument("--schedule", default="hybrid", choices=("hybrid", "kt-static", "gpu-only", "cpu-only", "seed"))
    ap.add_argument("--prefetch-size", type=int, default=0, help="experts prefetched per layer, 0..E (0 = off)")
    ap.add_argument("--predictor", default="learned", help="oracle | learned | degraded:ACC")
    ap.add_argument("--prefetch-mode", default="impact", choices=PREFETCH_MODES,
                    help="impact: any positive gain that fits the idle window; pays: only where the gain (with "
                         "the per-layer measured prediction hit rate) beats the copy's cost (hybrimoe.prefetch)")
    ap.add_argument("--costs", default="paper-a6000",
                    help="paper-a6000 (shape guessed from E), paper-a6000:mixtral, or a cost JSON")
    ap.add_argument("--pcie", default="whole", choices=PCIE_MODELS,
                    help="whole: one non-preemptible DMA per expert (the runtime); preemptive: chunked")
    ap.add_argument("--chunk", type=int, default=1, help="prefill tokens per step, >= 1 (decode is always 1)")
    ap.add_argument("--max-tokens", type=int, default=None, help="use the first N tokens of the trace (0 or unset = all)")
    ap.add_argument("--prompt-tokens", type=int, default=None,
                    help="replay the first N tokens of every sequence as its prompt (prefill), the rest as decode")
    ap.add_argument("--sweep", action="store_true", help="policies x cache 25/50/75%% x prefetch 0/2")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--json", default=None, help="write rows as JSON here")
    a = ap.parse_args(argv)
    bad = _check_flags(a)
    if bad:
        print(f"error: {bad}", file=sys.stderr)
        return 2
    tr = _concat([load_trace(p) for p in a.trace])
    bad = _check_flags(a, tr.n_experts)
    if bad:
        print(f"error: {bad}", file=sys.stderr)
        return 2
    if a.max_tokens:
        tr = tr.subset(slice(0, a.max_tokens))
    if a.prompt_tokens is not None:
        tr = with_prompts(tr, a.prompt_tokens)
    costs = resolve(a.costs, "mixtral" if tr.n_experts == 8 else "deepseek-v2-lite")
    print(f"# {tr.name}: {tr.n_tokens} tokens x {tr.n_layers} layers, top-{tr.top_k} of {tr.n_experts}; "
          f"costs {costs.name}", flush=True)
    if a.sweep:
        rows = sweep(tr, costs, predictor=a.predictor, chunk=a.chunk, pcie=a.pcie)
        print(format_table(rows))
        cmp_rows = schedule_compare(tr, costs, max(tr.top_k, tr.n_experts // 4), chunk=a.chunk)
        print("\n# schedules at 25% cache, mrs, no prefetch")
        for r in cmp_rows:
            print(f"{r['schedule']:>10}  {r['ms_per_token']:8.3f} ms/token  hit {r['hit_rate']:.3f}")
        if a.plot:
            plot_sweep(rows, a.plot)
        if a.json:
            Path(a.json).write_text(json.dumps({"date": datetime.date.today().isoformat(), "costs": costs.name,
                                                "rows": rows, "schedules": cmp_rows}, indent=1))
        return 0
    cap = a.cache_size if a.cache_size is not None else max(tr.top_k, tr.n_experts // 4)
    r = run_one(tr, costs, a.policy, cap, a.schedule, a.prefetch_size, a.predictor, a.chunk, pcie=a.pcie,
                prefetch_mode=a.prefetch_mode)
    h, n = min_hit_rate(tr, cap, a.chunk)
    lb = lower_bound(tr, costs, cap, a.chunk)
    print(json.dumps({"capacity": cap, "policy": a.policy, "schedule": a.schedule, "prefetch": a.prefetch_size,
                      "pcie": a.pcie, "prefetch_mode": a.prefetch_mode,
                      **r.stats, "min_hit_rate": h / n, "ms_per_token": 1e3 * r.s_per_token,
                      "decode_tokens": r.n_decode, "decode_ms_per_token": 1e3 * r.decode_s_per_token,
                      "decode_hit_rate": r.decode_hit_rate,
                      "lb_ms_per_token": 1e3 * lb / r.n_tokens, "pred_accuracy": r.accuracy}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
