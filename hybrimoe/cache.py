"""Which routed experts live in GPU slots, and which one leaves when a new one comes in.

Policies (one implementation each, shared by the runtime layer and the simulator):

    mrs     Minus Recent Score (HybriMoE sec. 4.3): per (layer, expert) a score
                S <- a * TopP(s) + (1 - a) * S
            where s is the router's softmax over all E experts and TopP keeps the p largest
            entries of s and zeroes the rest; evict the resident expert with the lowest S.
            a = 0.5 and p = 2 * top_k are the values of the released code (KScoreAwareCache(...,
            0.5, 2 * top_k) in PKU-SEC-Lab/HybriMoE modeling_deepseek.py). For T > 1 tokens the
            update uses the mean over tokens of TopP(s_t) (the released code used token 0 only).
    lru     evict the least recently used (access or admission) expert.
    lfu     evict the expert with the fewest accesses since start (counts survive eviction:
            "perfect" LFU); ties go to the least recently used.
    static  a fixed hot set (the `capacity` most-counted experts of `static_counts`, e.g. from a
            warm-up trace or a routing-counts prior); nothing is ever admitted or evicted.
    bypass  bypass-aware admission on a windowed frequency: per (layer, expert) a decayed count
                F <- d * F + [used this step],  d = 1 - 1 / window
            (about the uses in the last `window` steps of its layer); the victim is the resident
            expert with the lowest F (then the least recent), and a miss is admitted only when
            its F beats the victim's (else it bypasses the cache: computed on the CPU, the cache
            left alone). It also fills: after a layer ran, an expert it computed on the CPU may be
            copied in during the link's idle time when its F beats the victim's (hybrimoe.step.fill).
    profiled
            prompt-profiled placement: bypass's windowed frequency, admission and fills, with the
            prompt's routing as the prior. `begin_profile()` opens a profile (a new prompt; the
            runtime's `new_sequence`, the simulator at a prefill after decode or at a new sequence);
            while it is open every layer step adds its per-expert token counts (`record_profile`).
            `end_profile()` (the runtime's `begin_decode`, the simulator's first decode step) turns
            them into per-token use probabilities, blended with the running estimate F / window
            weighted as `window` tokens:
                p = (prompt counts + F) / (prompt tokens + window),   then F <- window * p
            (a long prompt decides, a one-token prompt barely moves F), and hybrimoe.step.place
            moves experts in by expected decode benefit against copy cost (its docstring has the rule).
    min     the oracle: Belady's MIN with bypass on the real future (`set_future`), for the
            simulator only. The victim is the resident expert used farthest in the future; a
            miss is admitted (demand load or fill) only when it is used again before the
            victim. Its time in the hybrid schedule is the headroom any policy could reach with
            the same link idle time.

Budget: either `capacity` experts per layer (an int, or one int per layer), each layer with its
own slots numbered 0..capacity[layer]-1 (LAYER-LOCAL slot ids), or one `byte_budget` shared by all
layers: the arena has byte_budget // max(expert_bytes) equal slots numbered 0..n-1 (GLOBAL slot
ids; one slot holds any layer's expert, so layers with smaller experts waste the difference),
and eviction picks the victim across all layers.

Warm start at construction: `warm="first"` fills each layer's slots with experts 0, 1, 2, ...
(what the released code does while loading weights: experts are loaded in index order until the
slots run out); `warm="counts"` fills with the most-counted experts of `prior_counts`; "none"
starts empty. In shared mode the fill goes round-robin over layers (rank 0 of every layer first).

Pinning: `pin(layer, experts)` protects experts the current layer is computing from eviction until
`unpin`; `admit` never evicts a pinned expert, nor one in its `protect` argument. When every
resident expert of the pool is protected, `admit` returns (None, None) ("bypass": the caller uses
a transient buffer and the expert is not cached).

Prefetch guard (`guard_prefetch=True`): a prefetched expert is not evicted by another prefetch
until its layer has been routed (`access`), so a later, nearer prediction for the same layer does
not throw out an earlier one before either could be used; a demand load may still take it when
nothing else can go. (Measured on the traces it changes little; it keeps the accounting honest.)

Statistics (`stats()`): hits / misses (counted by `access`, once per activated expert and step),
evictions, bypass, prefetch_used (a prefetched expert hit before eviction), prefetch_wasted
(a prefetched expert evicted before any hit), prefetch_pending (prefetched, not yet decided).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import math

import numpy as np

from .errors import HybrimoeError

POLICIES = ("mrs", "lru", "lfu", "static", "bypass", "profiled", "min")
# policies that gate admission (a miss may bypass the cache) and fill in idle link time
ADMISSION_POLICIES = ("bypass", "profiled", "min")
# policies whose victim and gate use the windowed frequency F
WINDOWED_POLICIES = ("bypass", "profiled")
RUNTIME_POLICIES = tuple(p for p in POLICIES if p != "min")  # min needs the future: simulator only

Key = tuple  # (layer, expert)


class CacheConfigError(HybrimoeError, ValueError):
    """Bad cache configuration: unknown policy, no budget, counts of the wrong shape."""


def top_p_mask(scores: np.ndarray, p: int) -> np.ndarray:
    """scores (T, E) -> same shape with all but the p largest entries of each row set to 0."""
    if p >= scores.shape[1]:
        return scores
    out = np.zeros_like(scores)
    idx = np.argpartition(-scores, p - 1, axis=1)[:, :p]
    np.put_along_axis(out, idx, np.take_along_axis(scores, idx, axis=1), axis=1)
    return out


def top_p_mean(scores: np.ndarray, p: int) -> np.ndarray:
    """top_p_mask(scores, p).mean(axis=0) without building the (T, E) mask: (E,) float64."""
    T, E = scores.shape
    if p >= E:
        return scores.mean(axis=0, dtype=np.float64)
    if T == 1:  # decode: plain indexing (take_along_axis costs ~10 us of index building)
        row = scores[0]
        idx = np.argpartition(-row, p - 1)[:p]
        out = np.zeros(E)
        out[idx] = row[idx]
        return out
    idx = np.argpartition(-scores, p - 1, axis=1)[:, :p]
    vals = np.take_along_axis(scores, idx, axis=1)
    return np.bincount(idx.ravel(), weights=vals.ravel(), minlength=E) / T


class ExpertCache:
    """GPU-resident routed experts of one model.

    n_layers, n_experts: MoE layers (indexed 0..n_layers-1 as the caller numbers them) and routed
    experts per layer. Give `capacity` (int or per-layer ints) or `byte_budget` + `expert_bytes`
    (int or per-layer ints). See the module docstring for policies, warm start and slots.
    """

    def __init__(self, n_layers: int, n_experts: int, *, capacity: int | Sequence[int] | None = None,
                 byte_budget: int | None = None, expert_bytes: int | Sequence[int] | None = None,
                 policy: str = "mrs", alpha: float = 0.5, top_p: int | None = None, top_k: int = 2,
                 static_counts: np.ndarray | None = None, warm: str = "first",
                 prior_counts: np.ndarray | None = None, guard_prefetch: bool = True, window: float = 16.0,
                 future: Sequence[Sequence[Iterable[int]]] | None = None, gate_demand: bool | None = None):
        if policy not in POLICIES:
            raise CacheConfigError(f"unknown cache policy {policy!r} (expected one of {POLICIES})")
        if (capacity is None) == (byte_budget is None):
            raise CacheConfigError("give exactly one of capacity (experts per layer) or byte_budget (bytes)")
        if not 0.0 < alpha <= 1.0:
            raise CacheConfigError(f"alpha must be in (0, 1], found {alpha}")
        self.n_layers, self.n_experts, self.policy = n_layers, n_experts, policy
        self.alpha = float(alpha)
        self.top_p = int(top_p) if top_p else min(n_experts, 2 * top_k)
        self.top_k = int(top_k)
        self.shared = byte_budget is not None
        if self.shared:
            if expert_bytes is None:
                raise CacheConfigError("byte_budget needs expert_bytes (per expert, int or one per layer)")
            eb = np.broadcast_to(np.asarray(expert_bytes, np.int64), (n_layers,))
            self.slot_bytes = int(eb.max())
            self.byte_budget = int(byte_budget)
            caps = [self.byte_budget // self.slot_bytes]
        else:
            caps = list(np.broadcast_to(np.asarray(capacity, np.int64), (n_layers,)))
            eb = np.broadcast_to(np.asarray(expert_bytes if expert_bytes is not None else 1, np.int64),
                                 (n_layers,))
            self.slot_bytes = None
        self.expert_bytes = tuple(int(x) for x in eb)
        if min(caps) < 0:
            raise CacheConfigError(f"capacity must be >= 0, found {caps}")
        self.capacity = tuple(int(c) for c in caps)  # per pool
        # pool state: resident {(layer, expert): slot}, free slot ids
        self._res: list[dict] = [dict() for _ in caps]
        self._free: list[list[int]] = [list(range(c - 1, -1, -1)) for c in caps]  # pop() -> lowest id
        self.scores = np.zeros((n_layers, n_experts), np.float64)  # MRS S
        self.freq = np.zeros((n_layers, n_experts), np.int64)  # LFU counts (accesses)
        self._last: dict = {}  # (layer, expert) -> tick of last access/admission (LRU)
        self._tick = 0
        self._pinned: set = set()
        self._prefetched: set = set()
        self._guard: set = set()  # prefetched, target layer not routed since: evicted only as last resort
        self.guard_prefetch = bool(guard_prefetch)
        self.hits = self.misses = self.evictions = self.bypass = 0
        self.prefetch_used = self.prefetch_wasted = 0
        # the same per target layer (a prefetch counts for the layer it was fetched for)
        self.prefetch_used_by_layer = np.zeros(n_layers, np.int64)
        self.prefetch_wasted_by_layer = np.zeros(n_layers, np.int64)
        self._hot: set | None = None
        if not window >= 1.0:
            raise CacheConfigError(f"window must be >= 1 step, found {window}")
        self.window = float(window)
        # whether the admission gate applies to the scheduler's demand loads too (a declined one
        # runs on the CPU this step) or only to fills; default: min gates both, bypass fills only
        self.gate_demand = (policy == "min") if gate_demand is None else bool(gate_demand)
        self.wfreq = np.zeros((n_layers, n_experts), np.float64)  # bypass: decayed use counts
        self._seen = np.zeros(n_layers, np.int64)  # accesses per layer so far (steps seen)
        self._uses: list[dict] | None = None  # min: per layer {expert: sorted steps of its uses}
        self.declined = self.fills = 0  # admissions the policy declined; fills admitted
        # prompt profile (policy profiled): open between begin_profile and end_profile
        self.profiling = False
        self.prof_counts = np.zeros((n_layers, n_experts), np.float64)  # tokens routed to each expert
        self.prof_tokens = np.zeros(n_layers, np.float64)  # tokens seen per layer
        self.placed = 0  # experts moved in by a placement (hybrimoe.step.place)
        if policy == "min":
            if future is None:
                raise CacheConfigError("policy 'min' (the oracle) needs future: per layer, per step, its experts")
            self.set_future(future)
            if warm in ("first", "future"):  # MIN's free warm start: the experts used soonest
                self._fill_soonest()
                warm = "none"
        if policy == "static":
            if static_counts is None:
                raise CacheConfigError("policy 'static' needs static_counts (n_layers, n_experts)")
            self._hot = set(self._ranked(self._check_counts(static_counts, "static_counts")))
            for key in self._ranked(static_counts):
                self._place(key)
        elif warm == "first":
            order = np.tile(np.arange(n_experts), (n_layers, 1)).astype(float)
            self._fill(-order)
        elif warm == "counts":
            if prior_counts is None:
                raise CacheConfigError("warm='counts' needs prior_counts (n_layers, n_experts)")
            self._fill(self._check_counts(prior_counts, "prior_counts"))
        elif warm != "none":
            raise CacheConfigError(f"unknown warm start {warm!r} (expected 'first', 'counts' or 'none')")

    # ---------------------------------------------------------------------------- helpers
    def _check_counts(self, c, name) -> np.ndarray:
        c = np.asarray(c, float)
        if c.shape != (self.n_layers, self.n_experts):
            raise CacheConfigError(f"{name}: expected shape {(self.n_layers, self.n_experts)}, found {c.shape}")
        return c

    def _pool(self, layer: int) -> int:
        return 0 if self.shared else layer

    def _ranked(self, counts) -> list:
        """Keys that a fill by `counts` (higher first, lower expert id on ties) would place."""
        counts = np.asarray(counts, float)
        out = []
        if self.shared:
            # round-robin over layers: rank r of every layer before rank r + 1 of any layer
            orders = [np.lexsort((np.arange(self.n_experts), -counts[layer])) for layer in range(self.n_layers)]
            for r in range(self.n_experts):
                out += [(layer, int(orders[layer][r])) for layer in range(self.n_layers)]
            return out[: self.capacity[0]]
        for layer in range(self.n_layers):
            order = np.lexsort((np.arange(self.n_experts), -counts[layer]))
            out += [(layer, int(e)) for e in order[: self.capacity[layer]]]
        return out

    def set_future(self, future) -> None:
        """future[layer][step]: the experts the layer will access at its step-th access (counted
        from this cache's first access). Used by policy 'min' only."""
        if len(future) != self.n_layers:
            raise CacheConfigError(f"future: expected {self.n_layers} layers, found {len(future)}")
        self._uses = []
        for layer, steps in enumerate(future):
            u: dict[int, list[int]] = {}
            for st, ex in enumerate(steps):
                for e in ex:
                    u.setdefault(int(e), []).append(st)
            self._uses.append({e: np.asarray(v, np.int64) for e, v in u.items()})

    def next_use(self, layer: int, expert: int) -> float:
        """Step (of its layer) of the expert's next access not yet made, inf when none (policy min)."""
        u = self._uses[layer].get(int(expert)) if self._uses is not None else None
        if u is None:
            return math.inf
        i = int(np.searchsorted(u, self._seen[layer]))
        return float(u[i]) if i < len(u) else math.inf

    def _fill_soonest(self) -> None:
        order = sorted(((self.next_use(layer, e), layer, e) for layer in range(self.n_layers)
                        for e in range(self.n_experts)))
        for nu, layer, e in order:
            if nu == math.inf:
                break
            if self._free[self._pool(layer)]:
                self._place((layer, e))

    def _fill(self, counts) -> None:
        for key in self._ranked(counts):
            self._place(key)

    def _place(self, key) -> int:
        pool = self._pool(key[0])
        slot = self._free[pool].pop()
        self._res[pool][key] = slot
        self._last[key] = self._tick
        return slot

    # ---------------------------------------------------------------------------- queries
    def contains(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self._res[self._pool(layer)]

    def lookup(self, layer: int, expert: int) -> int | None:
        """Slot of a resident expert, else None. Pure: changes no statistic or recency."""
        return self._res[self._pool(layer)].get((layer, expert))

    def resident(self, layer: int) -> dict[int, int]:
        """{expert: slot} of the layer's resident experts."""
        return {e: s for (lay, e), s in self._res[self._pool(layer)].items() if lay == layer}

    def n_resident(self, layer: int | None = None) -> int:
        if layer is None:
            return sum(len(r) for r in self._res)
        return len(self.resident(layer))

    def occupancy_bytes(self) -> int:
        if self.shared:
            return len(self._res[0]) * self.slot_bytes
        return sum(self.expert_bytes[lay] for r in self._res for (lay, _) in r)

    def budget_bytes(self) -> int:
        if self.shared:
            return self.byte_budget
        return sum(c * b for c, b in zip(self.capacity, self.expert_bytes))

    def can_admit(self, layer: int, expert: int, protect: Iterable[int] = (), prefetch: bool = True) -> bool:
        """Would `admit(..., prefetch=prefetch)` place this expert (already resident counts as yes)?"""
        if self.contains(layer, expert):
            return True
        if self._hot is not None:
            return False
        pool = self._pool(layer)
        if self._free[pool]:
            return True
        # is there any victim (what _victim would choose from, without ranking it)?
        prot = {(layer, int(e)) for e in protect}
        pinned, guard = self._pinned, (self._guard if prefetch else ())
        return any(k not in pinned and k not in prot and k not in guard for k in self._res[pool])

    # ---------------------------------------------------------------------------- updates
    def observe(self, layer: int, scores: np.ndarray) -> None:
        """Router probabilities of the layer's tokens, scores (T, E) float. Updates MRS scores."""
        s = np.asarray(scores)
        if s.ndim == 1:
            s = s[None]
        if s.shape[1] != self.n_experts:
            raise CacheConfigError(f"observe(layer {layer}): scores (expected (T, {self.n_experts}), found {s.shape})")
        if self.policy != "mrs" or s.shape[0] == 0:
            return
        top = top_p_mean(s, self.top_p)
        self.scores[layer] = self.alpha * top + (1.0 - self.alpha) * self.scores[layer]

    def access(self, layer: int, experts: Iterable[int]) -> list[int | None]:
        """The layer's activated experts this step (each once): count hits/misses, update
        recency/frequency, return each one's slot or None."""
        self._tick += 1
        self._seen[layer] += 1
        out = []
        pool = self._res[self._pool(layer)]
        if self.policy in WINDOWED_POLICIES:
            self.wfreq[layer] *= 1.0 - 1.0 / self.window
        if self._guard:
            self._guard = {k for k in self._guard if k[0] != layer}
        for e in experts:
            key = (layer, int(e))
            self.freq[key] += 1
            self.wfreq[key] += 1.0
            slot = pool.get(key)
            if slot is None:
                self.misses += 1
            else:
                self.hits += 1
                self._last[key] = self._tick
                if key in self._prefetched:
                    self._prefetched.discard(key)
                    self.prefetch_used += 1
                    self.prefetch_used_by_layer[layer] += 1
            out.append(slot)
        return out

    def admit(self, layer: int, expert: int, *, prefetch: bool = False, fill: bool = False,
              protect: Iterable[int] = ()) -> tuple[int | None, Key | None]:
        """Make `expert` resident: (slot, evicted (layer, expert) or None). Never evicts a pinned
        expert or one of `protect` (experts of this layer); (None, None) when nothing may go
        (bypass: the expert is computed on the CPU and not cached) or, for the admission
        policies (bypass, min), when the policy declines it: its predicted reuse does not beat
        the victim's. Demand loads and fills are gated; prefetches (already chosen by predicted
        gain) are not. fill=True: a copy of an expert this layer computed on the CPU, made in idle
        link time for later steps (counted in `fills`). Already resident: (its slot, None)."""
        key = (layer, int(expert))
        pool = self._pool(layer)
        slot = self._res[pool].get(key)
        if slot is not None:
            return slot, None
        if self._hot is not None:  # static: the hot set is fixed
            self.bypass += 1
            return None, None
        evicted = None
        if not self._free[pool]:
            evicted = self._victim(pool, {(layer, e) for e in protect}, demand=not prefetch)
            if evicted is None:
                self.bypass += 1
                return None, None
            if not prefetch and (fill or self.gate_demand) and not self._admits(key, evicted):
                self.bypass += 1
                self.declined += 1
                return None, None
            self._evict(pool, evicted)
        elif fill and not self._admits(key, None):
            self.bypass += 1
            self.declined += 1
            return None, None
        self._tick += 1
        if fill:
            self.fills += 1
        slot = self._place(key)
        if prefetch:
            self._prefetched.add(key)
            if self.guard_prefetch:
                self._guard.add(key)
        return slot, evicted

    def _victim(self, pool: int, protect: set, demand: bool = True) -> Key | None:
        cands = [k for k in self._res[pool] if k not in self._pinned and k not in protect]
        if self._guard:
            free = [k for k in cands if k not in self._guard]
            # a guarded prefetch goes only for a demand load, and only when nothing else can
            cands = free if (free or not demand) else cands
        if not cands:
            return None
        if self.policy == "lru":
            return min(cands, key=lambda k: self._last[k])
        if self.policy in WINDOWED_POLICIES:
            return min(cands, key=lambda k: (self.wfreq[k], self._last[k]))
        if self.policy == "min":  # farthest next use; ties: least recent
            return max(cands, key=lambda k: (self.next_use(*k), -self._last[k]))
        if self.policy == "lfu":
            return min(cands, key=lambda k: (self.freq[k], self._last[k]))
        return min(cands, key=lambda k: (self.scores[k], self._last[k]))  # mrs

    def victims(self, layer: int, protect: Iterable[int] = (), n: int = 1) -> list:
        """The next `n` keys prefetches into `layer`'s pool would take, in order, without changing
        anything: None for each free slot, then the policy's victims (never pinned, protected
        (experts of `layer`) or guarded ones); shorter when nothing more may go."""
        pool = self._pool(layer)
        out: list = [None] * min(n, len(self._free[pool]))
        if self._hot is not None:
            return []
        prot = {(layer, int(e)) for e in protect}
        while len(out) < n:
            v = self._victim(pool, prot, demand=False)
            if v is None:
                break
            out.append(v)
            prot.add(v)
        return out

    def use_rate(self, layer: int, expert: int) -> float:
        """Fraction of its layer's steps so far that used the expert (accesses / steps)."""
        return float(self.freq[layer, expert]) / max(1, int(self._seen[layer]))

    def reuse_score(self, layer: int, expert: int) -> float:
        """Predicted reuse the admission policies compare (higher = keep): bypass: windowed
        frequency F; min: minus the step of the next use; others: 0."""
        if self.policy in WINDOWED_POLICIES:
            return float(self.wfreq[layer, expert])
        if self.policy == "min":
            return -self.next_use(layer, expert)
        return 0.0

    def _admits(self, key: Key, victim: Key | None) -> bool:
        """Admission gate: does `key` (a miss) deserve a slot more than `victim` (None: a free
        slot)? Always for mrs/lru/lfu (every miss is kept, as before)."""
        if self.policy not in ADMISSION_POLICIES:
            return True
        if self.policy == "min":
            nk = self.next_use(*key)
            return nk < math.inf and (victim is None or nk < self.next_use(*victim))
        if victim is None:
            return True
        return self.reuse_score(*key) > self.reuse_score(*victim)

    # ---------------------------------------------------------------------------- prompt profile
    def begin_profile(self) -> None:
        """A new prompt: open a fresh profile (its routing counts are added by `record_profile`)."""
        self.profiling = True
        self.prof_counts[:] = 0.0
        self.prof_tokens[:] = 0.0

    def record_profile(self, layer: int, experts, counts) -> None:
        """While a profile is open: the layer's activated experts and their token counts this step."""
        if not self.profiling:
            return
        c = np.asarray(counts, np.float64).ravel()
        self.prof_counts[layer, np.asarray(experts, np.int64).ravel()] += c
        self.prof_tokens[layer] += c.sum() / max(1, self.top_k)

    def end_profile(self) -> np.ndarray | None:
        """Close the profile: (n_layers, n_experts) per-token use probabilities p (module docstring:
        the prompt's counts blended with the running estimate), None when no profile was open or it
        saw no token. Policy profiled: F <- window * p."""
        if not self.profiling:
            return None
        self.profiling = False
        if not self.prof_tokens.any():
            return None
        p = (self.prof_counts + self.wfreq) / (self.prof_tokens[:, None] + self.window)
        if self.policy == "profiled":
            self.wfreq[:] = self.window * p
        return p

    def place_move(self, layer: int, expert: int, victim: Key | None) -> int:
        """A placement move (hybrimoe.step.place): evict `victim` (None: take a free slot) and make
        `expert` resident; its copy is prefetch-class link traffic. Returns the slot."""
        key = (layer, int(expert))
        pool = self._pool(layer)
        if key in self._res[pool]:
            raise CacheConfigError(f"place_move: expert {expert} of layer {layer} is already resident")
        if victim is not None:
            if victim in self._pinned or victim not in self._res[pool]:
                raise CacheConfigError(f"place_move: victim {victim} is not an evictable resident of the pool")
            self._evict(pool, victim)
        elif not self._free[pool]:
            raise CacheConfigError(f"place_move: no free slot for expert {expert} of layer {layer}")
        self._tick += 1
        self.placed += 1
        return self._place(key)

    def wants_fill(self, layer: int, expert: int, protect: Iterable[int] = ()) -> bool:
        """Would a fill of this (non-resident) expert be admitted now (no state change)?"""
        if self.policy not in ADMISSION_POLICIES or self.contains(layer, expert):
            return False
        pool = self._pool(layer)
        key = (layer, int(expert))
        if self._free[pool]:
            return self._admits(key, None)
        v = self._victim(pool, {(layer, int(e)) for e in protect}, demand=True)
        return v is not None and self._admits(key, v)

    def _evict(self, pool: int, key: Key) -> None:
        slot = self._res[pool].pop(key)
        self._free[pool].append(slot)
        self.evictions += 1
        self._guard.discard(key)
        if key in self._prefetched:
            self._prefetched.discard(key)
            self.prefetch_wasted += 1
            self.prefetch_wasted_by_layer[key[0]] += 1

    def pin(self, layer: int, experts: Iterable[int]) -> None:
        """Protect resident experts of `layer` from eviction until `unpin`."""
        self._pinned.update((layer, int(e)) for e in experts)

    def unpin(self, layer: int, experts: Iterable[int] | None = None) -> None:
        """Release pins of `layer` (all of them when experts is None)."""
        if experts is None:
            self._pinned = {k for k in self._pinned if k[0] != layer}
        else:
            self._pinned.difference_update((layer, int(e)) for e in experts)

    def stats(self) -> dict:
        n = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hits / n if n else 0.0,
                "evictions": self.evictions, "bypass": self.bypass, "prefetch_used": self.prefetch_used,
                "prefetch_wasted": self.prefetch_wasted, "prefetch_pending": len(self._prefetched),
                "declined": self.declined, "fills": self.fills, "placed": self.placed}
