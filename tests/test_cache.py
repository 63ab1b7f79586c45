"""ExpertCache: policy decisions against hand-computed sequences, budget and pin invariants."""

from __future__ import annotations

import numpy as np
import pytest

from hybrimoe.cache import CacheConfigError, ExpertCache, top_p_mask, top_p_mean


def test_top_p_mean_equals_the_mean_of_the_mask(rng):
    for T, E, p in ((1, 64, 12), (7, 64, 12), (300, 16, 4), (3, 8, 8)):
        s = rng.random((T, E)).astype(np.float32)
        np.testing.assert_allclose(top_p_mean(s, p), top_p_mask(s.astype(np.float64), p).mean(axis=0), rtol=1e-6)


def test_top_p_mask_keeps_p_largest_per_row():
    s = np.array([[0.1, 0.4, 0.2, 0.3], [0.7, 0.1, 0.15, 0.05]])
    np.testing.assert_array_equal(top_p_mask(s, 2), [[0, 0.4, 0, 0.3], [0.7, 0, 0.15, 0]])


def test_mrs_matches_hand_computed_sequence():
    # 1 layer, 4 experts, 2 slots, top_k=1 -> p = 2, a = 0.5; warm start "first" -> {0, 1}
    c = ExpertCache(1, 4, capacity=2, policy="mrs", top_k=1, alpha=0.5)
    assert set(c.resident(0)) == {0, 1}
    # S = 0.5 * [0.5, 0, 0.3, 0] = [0.25, 0, 0.15, 0]   (TopP keeps e0 and e2)
    c.observe(0, np.array([[0.5, 0.1, 0.3, 0.1]]))
    np.testing.assert_allclose(c.scores[0], [0.25, 0, 0.15, 0])
    assert c.admit(0, 2) == (1, (0, 1))  # e1 has the lowest S (0) among {0, 1}; its slot 1 is reused
    # S = 0.5 * [0, 0.6, 0, 0.2] + 0.5 * S = [0.125, 0.3, 0.075, 0.1]
    c.observe(0, np.array([[0.1, 0.6, 0.1, 0.2]]))
    np.testing.assert_allclose(c.scores[0], [0.125, 0.3, 0.075, 0.1])
    assert c.admit(0, 1)[1] == (0, 2)  # among {0, 2}: e2 (0.075) < e0 (0.125)
    # S = 0.5 * [0, 0.15, 0, 0.7] + 0.5 * S = [0.0625, 0.225, 0.0375, 0.4]
    c.observe(0, np.array([[0.05, 0.15, 0.1, 0.7]]))
    np.testing.assert_allclose(c.scores[0], [0.0625, 0.225, 0.0375, 0.4])
    assert c.admit(0, 3)[1] == (0, 0)  # among {0, 1}: e0 (0.0625) < e1 (0.225)
    assert set(c.resident(0)) == {1, 3}
    assert c.evictions == 3


def test_mrs_multi_token_update_uses_mean_of_top_p():
    c = ExpertCache(1, 4, capacity=2, policy="mrs", top_k=1, alpha=0.5, warm="none")
    s = np.array([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])  # token 0 keeps e0,e1; token 1 keeps e2,e3
    c.observe(0, s)
    np.testing.assert_allclose(c.scores[0], 0.5 * np.array([0.2, 0.15, 0.15, 0.2]))


def _replay(policy, steps, cap=2, E=4):
    """Demand-only replay: access, then admit every miss. Returns 'H'/'M' per access."""
    c = ExpertCache(1, E, capacity=cap, policy=policy, warm="none", top_k=1)
    out = []
    for req in steps:
        slots = c.access(0, req)
        out += ["H" if s is not None else "M" for s in slots]
        c.pin(0, [e for e, s in zip(req, slots) if s is not None])
        for e, s in zip(req, slots):
            if s is None:
                c.admit(0, e)
                c.pin(0, [e])
        c.unpin(0)
    return "".join(out), c


def test_lru_and_lfu_expected_sequences():
    steps = [[0], [1], [0], [2], [1], [0], [3], [0]]
    # LRU: 2 evicts 1, 1 evicts 0, 0 evicts 2, 3 evicts 1
    assert _replay("lru", steps)[0] == "MMHMMMMH"
    # LFU (counts survive eviction): 2 evicts 1 (f=1 < f0=2), 1 evicts 2 (f=1), 3 evicts 1 (f1=2 < f0=3)
    seq, c = _replay("lfu", steps)
    assert seq == "MMHMMHMH"
    assert set(c.resident(0)) == {0, 3}
    assert c.stats()["hits"] == 3 and c.stats()["misses"] == 5


def test_static_keeps_its_hot_set_and_bypasses():
    counts = np.array([[1, 9, 3, 7]])
    c = ExpertCache(1, 4, capacity=2, policy="static", static_counts=counts)
    assert set(c.resident(0)) == {1, 3}
    assert c.admit(0, 0) == (None, None) and c.bypass == 1
    assert c.admit(0, 3)[0] is not None  # resident: its slot
    assert not c.can_admit(0, 2)


def test_warm_start_rules():
    c = ExpertCache(2, 8, capacity=3, policy="lru")
    assert [sorted(c.resident(layer)) for layer in range(2)] == [[0, 1, 2], [0, 1, 2]]
    prior = np.array([[0, 5, 0, 4, 0, 0, 9, 0], [1, 0, 0, 0, 0, 0, 0, 2]])
    c = ExpertCache(2, 8, capacity=2, policy="mrs", warm="counts", prior_counts=prior)
    assert [sorted(c.resident(layer)) for layer in range(2)] == [[1, 6], [0, 7]]
    # shared budget: round-robin over layers, rank 0 of both layers first
    c = ExpertCache(2, 8, byte_budget=3 * 100, expert_bytes=100, policy="lru")
    assert sorted(c.resident(0)) == [0, 1] and sorted(c.resident(1)) == [0]


def test_pinned_experts_are_never_evicted():
    c = ExpertCache(1, 6, capacity=2, policy="lru")  # {0, 1}
    c.pin(0, [0, 1])
    assert c.admit(0, 4) == (None, None)
    c.unpin(0, [1])
    slot, ev = c.admit(0, 4)
    assert ev == (0, 1) and slot is not None
    assert c.admit(0, 5, protect=[4]) == (None, None)  # 0 pinned, 4 protected


def test_prefetch_used_and_wasted():
    c = ExpertCache(1, 6, capacity=2, policy="lru", warm="none")
    c.admit(0, 3, prefetch=True)
    c.admit(0, 4, prefetch=True)
    c.access(0, [3])  # used
    c.admit(0, 5)  # evicts 4 (older than 3's access): wasted
    s = c.stats()
    assert (s["prefetch_used"], s["prefetch_wasted"], s["prefetch_pending"]) == (1, 1, 0)


@pytest.mark.parametrize("policy", ["mrs", "lru", "lfu"])
@pytest.mark.parametrize("shared", [False, True])
def test_occupancy_never_exceeds_budget_random_ops(policy, shared, rng):
    L, E = 3, 10
    if shared:
        eb = [300, 200, 300]  # slot = 300 B; budget fits 7 slots
        c = ExpertCache(L, E, byte_budget=2200, expert_bytes=eb, policy=policy, top_k=2)
        caps = None
    else:
        caps = [int(x) for x in rng.integers(1, E, L)]
        c = ExpertCache(L, E, capacity=caps, policy=policy, top_k=2, warm=str(rng.choice(["first", "none"])))
    for _ in range(400):
        layer = int(rng.integers(L))
        op = rng.integers(5)
        if op == 0:
            c.observe(layer, rng.dirichlet(np.ones(E), size=int(rng.integers(1, 4))))
        elif op == 1:
            c.access(layer, rng.choice(E, size=2, replace=False))
        elif op == 2:
            pinned_before = {k for k in c._pinned}
            slot, ev = c.admit(layer, int(rng.integers(E)), prefetch=bool(rng.integers(2)))
            assert ev is None or ev not in pinned_before
        elif op == 3:
            c.pin(layer, rng.choice(E, size=2, replace=False))
        else:
            c.unpin(layer)
        assert c.occupancy_bytes() <= c.budget_bytes()
        if shared:
            slots = [s for layer_ in range(L) for s in c.resident(layer_).values()]
            assert len(slots) <= 7 and len(set(slots)) == len(slots) and all(0 <= s < 7 for s in slots)
        else:
            for layer_ in range(L):
                slots = list(c.resident(layer_).values())
                assert len(slots) <= caps[layer_] and len(set(slots)) == len(slots)
                assert all(0 <= s < caps[layer_] for s in slots)


def test_config_errors_name_the_problem():
    with pytest.raises(CacheConfigError, match="unknown cache policy"):
        ExpertCache(1, 4, capacity=2, policy="fifo")
    with pytest.raises(CacheConfigError, match="exactly one"):
        ExpertCache(1, 4, policy="lru")
    with pytest.raises(CacheConfigError, match="static_counts"):
        ExpertCache(1, 4, capacity=2, policy="static")


def test_prefetch_guard_until_target_layer_is_routed():
    # LRU would evict the older prefetch (3) for the newer one (5); the guard keeps it until
    # layer 0 has been routed, except for a demand load with nothing else to evict
    c = ExpertCache(1, 6, capacity=2, policy="lru", warm="none")
    c.admit(0, 3, prefetch=True)
    c.admit(0, 4, prefetch=True)
    assert c.admit(0, 5, prefetch=True) == (None, None)
    assert not c.can_admit(0, 5) and c.can_admit(0, 5, prefetch=False)
    c.access(0, [4])  # layer 0 routed: guard released
    assert c.admit(0, 5, prefetch=True)[1] == (0, 3)
    d = ExpertCache(1, 6, capacity=2, policy="lru", warm="none", guard_prefetch=False)
    d.admit(0, 3, prefetch=True)
    d.admit(0, 4, prefetch=True)
    assert d.admit(0, 5, prefetch=True)[1] == (0, 3)
