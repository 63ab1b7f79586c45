"""Impact-driven prefetch (HybriMoE sec. 4.4): fetch the experts whose presence most shortens a
coming layer, as the scheduler itself would see it.

After layer L is planned, the runtime predicts the experts of layers L+1..L+horizon (by applying
those layers' routers to L's hidden state; the simulator uses its predictors). For each predicted
expert that is not resident, the prefetcher plans that layer with the same scheduler and cost
model twice, without and with the expert resident; gain = prob * (makespan_without - makespan_with).
It picks greedily by gain (recomputing the marginal gain of the rest after each pick, since two
experts of one layer do not add up), keeps only positive gains, at most `prefetch_size` per call
(0 = off), and only as much transfer time as fits the PCIe idle time before the target layer
(`idle_before`, see `idle_budget`).

Demand first: prefetches are only issued into the link's idle time as the plan computes it. With
whole-expert copies (hybrimoe.transfer) the budget is the window before the next layer's MoE
phase, so every prefetch ends before the next demand load can be issued; with preemptible
(chunked) copies a demand load overtakes a running prefetch and the budget may span layers.
Either way a prefetch never delays a demand load. A prefetch still in flight when its layer is routed and used becomes that layer's
first transfer (its remaining time shows up as `pcie_busy`/`ready` in that layer's plan).

Prefetch modes (`Prefetcher(..., prefetch_mode=)`, PREFETCH_MODES):
    impact  the above: any positive prob-weighted gain whose transfer fits the idle window.
    pays    prefetch only where the predicted gain exceeds the transfer's cost:
                net = p * saved - victim loss - late cost > 0,  picked greedily by net
            p: the prediction's probability fed back by the measured per-layer hit rate of the
               look-ahead: per (target layer, distance), decayed counts (decay `acc_decay` per
               prediction scored) of predicted experts that were used (h) and of the probability
               the predictions claimed (c): p = min(1, prob * (h + 1) / (c + 1)) (the claim is
               trusted until measured; `layer_accuracy()` reports h / predictions);
            saved: the makespan the expert saves its layer, as in impact;
            victim loss: what the admission would evict (cache.victims, in order; a free slot
               costs nothing): its layer's use rate of it so far (cache.freq / steps of the
               layer) times cpu_time(1) - gpu_time(1) of its layer, i.e. the expected time a
               hit on it would have saved at its next step;
            late cost: the part of the transfer past the target's idle window, over, times
               (p + r): the layer waits for a used expert still in flight, and the next layer's
               demand loads wait with r = its recent rate of steps with demand loads
               (`note_loads`, an EMA fed by hybrimoe.step.decide). A copy must start inside
               the window (used < idle_before[target]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from .costs import CostModel
from .scheduler import makespan


@dataclass(frozen=True)
class Prediction:
    """Predicted activated experts of one layer: experts (n,) int, counts (n,) predicted tokens
    per expert, prob (n,) in [0, 1] confidence that the expert will be used."""

    experts: np.ndarray
    counts: np.ndarray
    prob: np.ndarray

    @classmethod
    def certain(cls, experts, counts=None) -> "Prediction":
        e = np.asarray(experts, np.int64)
        c = np.ones_like(e) if counts is None else np.asarray(counts, np.int64)
        return cls(e, c, np.ones(len(e)))


@dataclass(frozen=True)
class PrefetchOrder:
    layer: int
    expert: int
    gain: float  # expected seconds saved in `layer` (prob-weighted)
    transfer: float  # seconds of PCIe time it needs


def idle_budget(layer: int, moe_makespan: float, pcie_end: float, next_dense: float, backlog: float,
                horizon: int, n_layers: int, spans_layers: bool = False) -> dict[int, float]:
    """PCIe idle seconds a prefetch issued now may use, per target layer layer+1..layer+horizon.

    This layer leaves w = (makespan - pcie_end) + next_dense idle before the next layer's demand
    loads can start; `backlog` = prefetch transfer time already queued. With whole-expert,
    non-preemptible copies (spans_layers=False) every prefetch must end inside this window:
    w - backlog for every target. With preemptible (chunked) copies a prefetch for layer+d may
    also use the idle time of the layers in between, assumed equal to w: d * w - backlog.
    """
    w = max(0.0, moe_makespan - pcie_end) + next_dense
    return {layer + d: (d if spans_layers else 1) * w - backlog
            for d in range(1, horizon + 1) if layer + d < n_layers}


PREFETCH_MODES = ("impact", "pays")


class PrefetchConfigError(ValueError):
    """Unknown prefetch mode."""


class Prefetcher:
    """Chooses prefetches with the scheduler's own cost model. One per model; stateful for
    statistics (prediction accuracy per look-ahead distance and per target layer) and, in mode
    'pays', the fed-back probabilities and demand-load rates (module docstring)."""

    def __init__(self, costs: CostModel, prefetch_size: int = 2, horizon: int = 3, mode: str = "hybrid",
                 min_gain: float = 0.0, prefetch_mode: str = "impact", acc_decay: float = 0.98,
                 load_decay: float = 0.9):
        if prefetch_mode not in PREFETCH_MODES:
            raise PrefetchConfigError(f"unknown prefetch mode {prefetch_mode!r} (expected one of {PREFETCH_MODES})")
        self.costs, self.prefetch_size, self.horizon, self.mode = costs, int(prefetch_size), int(horizon), mode
        self.min_gain = float(min_gain)
        self.prefetch_mode = prefetch_mode
        self.acc_decay, self.load_decay = float(acc_decay), float(load_decay)
        self._last_pred: dict[tuple[int, int], dict] = {}  # (target layer, distance) -> {expert: claimed prob}
        # per (target layer, distance): decayed [used predictions, claimed probability, predictions]
        self._acc: dict[tuple[int, int], list] = {}
        self._load_rate: dict[int, float] = {}  # layer -> EMA of [its step made demand loads]
        self.pred_hits = np.zeros(horizon + 1, np.int64)  # per distance d: predicted & used
        self.pred_total = np.zeros(horizon + 1, np.int64)  # per distance d: actually used
        self.issued = 0
        self._memo: dict[tuple, float] = {}  # (layer or 0, resident counts, other counts) -> makespan
        self._memo_costs, self._memo_mode = None, None  # what the memo was filled under

    @staticmethod
    def _split(layer: int, predictions: dict, cache, prob) -> tuple[dict, dict, dict]:
        """Per target layer tl of `predictions`: the token counts of its predicted experts that are
        resident (hits) and not (rest), and its candidates (tl, expert, prob(tl, tl - layer, p), count)
        for the not-resident ones whose probability is > 0, in prediction order."""
        hits: dict[int, list[int]] = {}
        rest: dict[int, list[int]] = {}
        cands: dict[int, list] = {}
        for tl, p in predictions.items():
            h, r, c = hits[tl], rest[tl], cands[tl] = [], [], []
            for e, pr, n in zip(np.asarray(p.experts).tolist(), np.asarray(p.prob).tolist(),
                                np.asarray(p.counts).tolist()):
                if cache.contains(tl, e):
                    h.append(n)
                else:
                    r.append(n)
                    q = prob(tl, tl - layer, pr)
                    if q > 0:
                        c.append((tl, e, q, n))
        return hits, rest, cands

    def _saved(self, tl: int, n: int, hits: dict, rest: dict, base: dict, saved: dict) -> float:
        """Time layer tl saves when one of its not-resident experts with n tokens becomes resident
        (makespan before - after), memoised per (layer, count) in `saved`, the layer's current
        makespan in `base` (both reset by the caller when the layer gets a pick)."""
        d = saved.get((tl, n))
        if d is None:
            if tl not in base:
                base[tl] = self._makespan(tl, hits[tl], rest[tl])
            r = list(rest[tl])
            r.remove(n)
            d = saved[(tl, n)] = base[tl] - self._makespan(tl, hits[tl] + [n], r)
        return d

    def _makespan(self, layer: int, resident: list[int], other: list[int]) -> float:
        """scheduler.makespan, memoised: at decode every count is 1, so the same few (resident,
        other) splits recur at every layer and step."""
        if self._memo_costs is not self.costs or self._memo_mode != self.mode:
            self._memo.clear()
            self._memo_costs, self._memo_mode = self.costs, self.mode
        key = (layer if len(self.costs.layers) > 1 else 0, tuple(sorted(resident)), tuple(sorted(other)))
        t = self._memo.get(key)
        if t is None:
            if len(self._memo) >= 4096:
                self._memo.clear()
            t = self._memo[key] = makespan(layer, resident, other, self.costs, self.mode)
        return t

    def choose(self, layer: int, predictions: Mapping[int, Prediction], cache, *,
               idle_before: Mapping[int, float]) -> list[PrefetchOrder]:
        """Prefetches to issue now, best first. predictions: {target layer: Prediction} for
        layer+1..layer+horizon; idle_before: {target layer: PCIe idle seconds before it}."""
        for tl, p in predictions.items():
            d = tl - layer
            if 1 <= d <= self.horizon:
                self._last_pred[(tl, d)] = dict(zip(np.asarray(p.experts).tolist(), np.asarray(p.prob).tolist()))
        if self.prefetch_size <= 0:
            return []
        if self.prefetch_mode == "pays":
            return self._choose_pays(layer, predictions, cache, idle_before)
        used = 0.0
        # per target layer: token counts of its predicted experts that are resident / not, and the
        # candidates (predicted, not resident, admissible) as (layer, expert, prob, count)
        cands = []
        fits = {tl: p for tl, p in predictions.items()  # those a prefetch fits in the link's idle time for
                if 1 <= tl - layer <= self.horizon and idle_before.get(tl, 0.0) >= self.costs.transfer_time(tl)}
        hits, rest, per_layer = self._split(layer, fits, cache, lambda tl, d, pr: pr)
        for tl, layer_cands in per_layer.items():
            # admit() would place any of them iff the pool has a free slot or an evictable expert;
            # the protected set (this layer's predicted experts) is the same for all
            if layer_cands and cache.can_admit(tl, layer_cands[0][1], protect=fits[tl].experts):
                cands += layer_cands
        out: list[PrefetchOrder] = []
        base: dict[int, float] = {}  # target layer -> makespan with the experts chosen so far
        # (layer, token count) -> seconds saved by making one more expert with that count resident.
        # A plan's makespan depends on the experts only through their token counts and residency
        # (scheduler.makespan), so candidates of one layer with equal counts save the same time:
        # one pair of evaluations per distinct count, redone only when the layer gets a pick.
        saved: dict[tuple[int, int], float] = {}
        while cands and len(out) < self.prefetch_size:
            # a candidate whose transfer no longer fits before its layer never will (`used` only grows)
            cands = [c for c in cands if used + self.costs.transfer_time(c[0]) <= idle_before.get(c[0], 0.0)]
            best = None
            for tl, e, pr, n in cands:
                d = self._saved(tl, n, hits, rest, base, saved)
                g = pr * d
                if best is None or g > best[0]:
                    best = (g, tl, e, pr, n)
            if best is None:
                break
            g, tl, e, pr, n = best
            if g <= self.min_gain:
                break
            tr = self.costs.transfer_time(tl)
            cands.remove((tl, e, pr, n))
            used += tr  # the link is FIFO: every earlier pick goes before this one
            hits[tl].append(n)
            rest[tl].remove(n)
            base.pop(tl, None)  # this layer's other gains change with the pick; other layers' do not
            saved = {k: v for k, v in saved.items() if k[0] != tl}
            out.append(PrefetchOrder(tl, e, g, tr))
        self.issued += len(out)
        return out

    def record(self, layer: int, actual: np.ndarray) -> None:
        """The layer's actual activated experts: scores the prediction made for it."""
        act = {int(e) for e in np.asarray(actual).ravel()}
        for d in range(1, self.horizon + 1):
            pred = self._last_pred.pop((layer, d), None)
            if pred is not None:
                h = len(act & pred.keys())
                self.pred_hits[d] += h
                self.pred_total[d] += len(act)
                a = self._acc.setdefault((layer, d), [0.0, 0.0, 0.0])
                k = self.acc_decay ** len(pred)
                a[0] = k * a[0] + h
                a[1] = k * a[1] + sum(pred.values())
                a[2] = k * a[2] + len(pred)

    def note_loads(self, layer: int, n_loads: int) -> None:
        """The layer's decision made `n_loads` demand loads this step (hybrimoe.step.decide)."""
        r = self._load_rate.get(layer, 0.0)
        self._load_rate[layer] = self.load_decay * r + (1.0 - self.load_decay) * (n_loads > 0)

    def calibrated(self, layer: int, distance: int, prob: float) -> float:
        """A prediction's claimed probability fed back by the measured hit rate of the predictions
        for that layer at that distance (module docstring)."""
        a = self._acc.get((layer, distance))
        if a is None:
            return min(1.0, prob)
        return min(1.0, prob * (a[0] + 1.0) / (a[1] + 1.0))

    def layer_accuracy(self) -> dict[tuple[int, int], float]:
        """{(target layer, distance): decayed fraction of predicted experts that were used}."""
        return {k: a[0] / a[2] for k, a in sorted(self._acc.items()) if a[2] > 0}

    def _choose_pays(self, layer: int, predictions: Mapping[int, Prediction], cache, idle_before) -> list[PrefetchOrder]:
        """Mode 'pays' (module docstring): greedy by net gain, each pick only when net > 0."""
        used = 0.0
        fits = {tl: p for tl, p in predictions.items()
                if 1 <= tl - layer <= self.horizon and idle_before.get(tl, 0.0) > 0.0}
        hits, rest, per_layer = self._split(layer, fits, cache, self.calibrated)
        cands = [c for lc in per_layer.values() for c in lc]  # (layer, expert, calibrated prob, count)
        protect: dict[int, np.ndarray] = {tl: p.experts for tl, p in fits.items()}
        if not cands:
            return []
        nxt = layer + 1
        r_next = self._load_rate.get(nxt, 0.0)
        victims: dict[int, list] = {}  # pool -> losses of its next evictions, in order
        taken: dict[int, int] = {}  # pool -> picks so far

        def victim_loss(tl: int) -> float | None:
            pool = cache._pool(tl)
            if pool not in victims:
                vs = cache.victims(tl, protect=protect[tl], n=self.prefetch_size)
                victims[pool] = [0.0 if v is None else cache.use_rate(*v) * self._save(v[0]) for v in vs]
            j = taken.get(pool, 0)
            return victims[pool][j] if j < len(victims[pool]) else None

        out: list[PrefetchOrder] = []
        base: dict[int, float] = {}
        saved: dict[tuple[int, int], float] = {}
        while cands and len(out) < self.prefetch_size:
            cands = [c for c in cands if used < idle_before.get(c[0], 0.0)]
            best = None
            for tl, e, pr, n in cands:
                loss = victim_loss(tl)
                if loss is None:  # nothing the admission may evict
                    continue
                sv = self._saved(tl, n, hits, rest, base, saved)
                tr = self.costs.transfer_time(tl)
                over = max(0.0, used + tr - idle_before[tl])
                net = pr * sv - loss - over * (pr + r_next)
                if best is None or net > best[0]:
                    best = (net, tl, e, pr, n, tr)
            if best is None or best[0] <= max(0.0, self.min_gain):
                break
            net, tl, e, pr, n, tr = best
            cands.remove((tl, e, pr, n))
            used += tr
            hits[tl].append(n)
            rest[tl].remove(n)
            taken[cache._pool(tl)] = taken.get(cache._pool(tl), 0) + 1
            base.pop(tl, None)
            saved = {k: v for k, v in saved.items() if k[0] != tl}
            out.append(PrefetchOrder(tl, e, net, tr))
        self.issued += len(out)
        return out

    def _save(self, layer: int) -> float:
        return max(0.0, self.costs.cpu_time(layer, 1) - self.costs.gpu_time(layer, 1))

    def accuracy(self) -> dict[int, float]:
        """{distance d: fraction of actually activated experts that were predicted d layers ahead}."""
        return {d: float(self.pred_hits[d] / self.pred_total[d]) for d in range(1, self.horizon + 1)
                if self.pred_total[d]}
