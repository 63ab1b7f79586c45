"""Prompt-profiled placement (cache policy 'profiled', hybrimoe.step.place): the profile blends
the prompt's counts with the running estimate as documented, a move happens exactly when its
expected decode benefit beats its copy's link time, the runtime (GPU side emulated) makes the
simulator's decisions (placements, layer decisions, fills) over prompts and decode, and
generate's chat path opens a new profile for every turn from that turn's tokens."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import numpy as np
import pytest
from conftest import replay_trace

from hybrimoe.cache import ExpertCache, RUNTIME_POLICIES
from hybrimoe.costs import CostModel, LayerCost
from hybrimoe.layer import HybridRuntime, RuntimeConfig
from hybrimoe.sim import run_one, simulate, with_prompts
from hybrimoe.step import FillDecision, LayerDecision, PlaceDecision, decide, place, release
from hybrimoe.traces import DECODE, PREFILL, Trace, load_trace

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
FLAME = TRACES / "flame-moe-290m_dynande" / "flame290m_prefill_4x512tok_8layers_top6.npz"
MIXTRAL_PD = TRACES / "mixtral8x7b_speculative-moe" / "routing_raw_humaneval_p0_prefill_decode.jsonl"


def _costs(cpu=1e-4, gpu=2e-5, transfer=1e-4, dense=5e-5, nbytes=1000):
    pts = (1, 4, 16, 64, 256)
    lc = LayerCost(pts, tuple(cpu * n + 1e-4 for n in pts), tuple(gpu + 1e-7 * n for n in pts), transfer, nbytes,
                   tuple(dense for _ in pts))
    return CostModel((lc,), "test")


def _trace(rng, L, E, k, seqs=((12, 10), (6, 8))) -> Trace:
    """Sequences of (prompt tokens, decode tokens), routing drawn from a skewed popularity that
    changes between sequences (so a new prompt's profile matters). The first prompt (top-2) is
    laid out so that a placement must move: every token takes expert E-1, half of them E-2, the
    others one of 2..E-3 in turn; experts 0 and 1 (the warm start) are never used: a fill after
    the prompt's step brings the lowest ids of equal frequency, the profile ranks E-1 and E-2 first."""
    ids, ph, sq = [], [], []
    for s, (npre, ndec) in enumerate(seqs):
        pop = rng.dirichlet(np.full(E, 0.5), size=L)
        for t in range(npre + ndec):
            if s == 0 and t < npre and k == 2:
                pair = [E - 1, E - 2 if t % 2 else 2 + (t // 2) % (E - 4)]
                ids.append(np.array([pair] * L))
            else:
                ids.append(np.stack([rng.choice(E, k, replace=False, p=pop[j]) for j in range(L)]))
            ph.append(PREFILL if t < npre else DECODE)
            sq.append(s)
    ids = np.asarray(ids)
    sc = np.sort(rng.dirichlet(np.ones(k), size=ids.shape[:2]), -1)[..., ::-1].astype(np.float32)
    return Trace(ids.astype(np.int16), sc.copy(), np.asarray(ph, np.uint8), np.asarray(sq, np.int32),
                 np.arange(L, dtype=np.int16), E, "random prompts")


def test_profile_blends_prompt_counts_with_the_running_estimate(rng):
    E, W = 8, 16.0
    c = ExpertCache(2, E, capacity=2, policy="profiled", top_k=2, window=W)
    assert c.end_profile() is None  # nothing open
    c.wfreq[:] = rng.uniform(0, 3, size=(2, E))
    F0 = c.wfreq.copy()
    c.begin_profile()
    counts = np.zeros((2, E))
    for _ in range(5):  # five steps of 3 tokens, top-2
        for layer in range(2):
            ids = np.stack([rng.choice(E, 2, replace=False) for _ in range(3)])
            e, n = np.unique(ids, return_counts=True)
            c.record_profile(layer, e, n)
            counts[layer, e] += n
    p = c.end_profile()
    want = (counts + F0) / (15 + W)
    np.testing.assert_allclose(p, want)
    np.testing.assert_allclose(c.wfreq, W * want)
    assert not c.profiling and c.end_profile() is None
    # a one-token prompt barely moves the estimate; other policies keep F as it was
    c.begin_profile()
    c.record_profile(0, [3, 5], [1, 1])
    F1 = c.wfreq.copy()
    p1 = c.end_profile()
    assert np.abs(p1[0] - F1[0] / W).max() <= 1.0 / (1 + W) + 1e-12
    m = ExpertCache(1, E, capacity=2, policy="mrs", top_k=2)
    m.begin_profile()
    m.record_profile(0, [1], [4])
    m.end_profile()
    assert not m.wfreq.any()


@pytest.mark.parametrize("n_free", [0, 1])
def test_place_moves_exactly_when_the_benefit_beats_the_copy(rng, n_free):
    """Hand-checkable pool: the i-th best non-resident expert replaces the i-th worst resident iff
    decode_tokens * p-difference * (cpu - gpu time at one token) > transfer time; checked on both
    sides of every pair's threshold against a direct computation."""
    E, cap = 8, 3
    costs = _costs(cpu=1e-4, gpu=2e-5, transfer=3e-4)
    save = costs.cpu_time(0, 1) - costs.gpu_time(0, 1)
    for _ in range(5):
        c0 = ExpertCache(1, E, capacity=cap, policy="profiled", top_k=2, warm="none")
        res = rng.choice(E, cap - n_free, replace=False)
        for e in res:
            c0.place_move(0, int(e), None)
        c0.begin_profile()
        cnt = rng.integers(0, 20, size=E).astype(float)
        e_all = np.arange(E)
        c0.record_profile(0, e_all, cnt)
        p = (cnt + c0.wfreq[0]) / (cnt.sum() / 2 + c0.window)
        val = p * save
        cands = sorted((e for e in range(E) if e not in res and p[e] > 0), key=lambda e: (-val[e], e))
        victims = [None] * n_free + sorted(res.tolist(), key=lambda e: (val[e], e))
        diffs = [val[c] - (val[v] if v is not None else 0.0) for c, v in zip(cands, victims)]
        for i, dv in enumerate(diffs):
            if dv <= 0:
                break
            n_star = costs.transfer_time(0) / dv  # the decode length where pair i starts to pay
            for n in (n_star * 0.999, n_star * 1.001):
                # moves wanted: the pairs, in order, while each pays (differences never grow along
                # the pairs; a later pair with the same difference as pair i pays exactly when it does)
                want_moves = sum(1 for _ in itertools.takewhile(lambda dd: n * dd > costs.transfer_time(0), diffs))
                assert want_moves >= (i + 1 if n > n_star else 0)
                c = copy.deepcopy(c0)
                mv = place(c, costs, n)
                assert len(mv) == want_moves, (n, diffs, [m.key() for m in mv])
                for m, cc, vv in zip(mv, cands, victims):
                    assert (m.expert, m.evicted) == (cc, None if vv is None else (0, vv))
                    assert c.contains(0, cc) and (vv is None or not c.contains(0, vv))
                    assert m.benefit == pytest.approx(n * (val[cc] - (val[vv] if vv is not None else 0)))
                assert c.n_resident(0) <= cap and c.placed - c0.placed == len(mv)
                assert not c.profiling


def test_place_is_nothing_for_other_policies_cpu_only_or_no_decode():
    costs = _costs(transfer=1e-9)
    for pol, mode, n in (("bypass", "hybrid", 100), ("profiled", "cpu-only", 100), ("profiled", "hybrid", 0)):
        c = ExpertCache(1, 8, capacity=2, policy=pol, top_k=2)
        c.begin_profile()
        c.record_profile(0, [5, 6], [9, 9])
        assert place(c, costs, n, mode) == [] and not c.profiling
    c = ExpertCache(1, 8, capacity=2, policy="profiled", top_k=2)  # warm: 0, 1
    c.begin_profile()
    c.record_profile(0, [5, 6], [9, 9])
    mv = place(c, costs, 100)
    assert sorted(m.expert for m in mv) == [5, 6] and sorted(m.evicted for m in mv) == [(0, 0), (0, 1)]


@pytest.mark.parametrize("mode", ["hybrid", "kt-static"])
@pytest.mark.parametrize("cache", [2, "budget"])
def test_runtime_places_and_decides_as_the_simulator(tiny, tmp_path, rng, mode, cache):
    """Two prompts, each prefilled in chunks then decoded: the runtime (GPU side emulated, driven
    as generate drives it: new_sequence, then next_step per decode token) and the simulator make
    the same placements, layer decisions and fills at every step. Transfers cost ~nothing so the
    idle budgets never bind (they are computed differently: link state vs cost-model clock)."""
    m, store = tiny
    L, E, k = len(store.layers), m.config.n_experts, m.config.top_k
    tr = _trace(rng, L, E, k)
    nbytes = store.layout(store.layers[0]).nbytes
    size = dict(gpu_budget=3 * nbytes) if cache == "budget" else dict(cache_size=cache)
    rt = HybridRuntime(store, RuntimeConfig(policy="profiled", schedule=mode, emulate_gpu=True, device="cpu",
                                            costs="paper-a6000", cache_dir=str(tmp_path), record_decisions=True,
                                            profile_tokens=40, **size))
    assert rt.engine == "python"
    costs = _costs(cpu=1e-3, transfer=1e-9, nbytes=nbytes)
    rt.set_costs(costs)
    sim_cache = copy.deepcopy(rt.cache)
    for _ in replay_trace(rt, store, tr, m.config.hidden, chunk=12):
        pass
    res = simulate(tr, sim_cache, costs, mode, log=True, chunk=12, decode_tokens=40)
    sim = []
    pl = dict(res.placements)
    n_steps = len(res.layer_log) // L
    for s in range(n_steps):
        if s in pl:
            sim.append(("place", tuple(m_.key() for m_ in pl[s])))
        for r in res.layer_log[s * L:(s + 1) * L]:
            sim.append(("layer", r["decision"].key(), tuple(f.key() for f in r.get("fills", []))))
    got, places = [], []
    for _, d in rt.decisions:
        if isinstance(d, PlaceDecision):
            places.append(d.key())
            continue
        if places:
            got.append(("place", tuple(places)))
            places = []
        if isinstance(d, LayerDecision):
            got.append(["layer", d.key(), []])
        else:
            assert isinstance(d, FillDecision)
            got[-1][2].append(d.key())
    got = [tuple(g) if g[0] == "place" else (g[0], g[1], tuple(g[2])) for g in got]
    # a placement with no move leaves no record in the runtime: compare the non-empty ones
    sim = [x for x in sim if not (x[0] == "place" and not x[1])]
    assert len(got) == len(sim)
    for n, (a, b) in enumerate(zip(got, sim)):
        assert a == b, f"item {n}: runtime {a} != simulator {b}"
    if mode == "kt-static":  # no demand loads: the first prompt's placement must move experts
        assert sum(1 for x in sim if x[0] == "place") >= 1 and sim_cache.placed > 0 and sim_cache.fills > 0
    assert rt.cache.stats() == sim_cache.stats()
    for j in range(L):
        assert rt.cache.resident(j) == sim_cache.resident(j)
    assert rt.summary()["placed"] == sim_cache.placed


def test_generate_chat_turns_each_profile_their_own_prompt(tmp_path):
    """generate_ids (the chat path's call) opens a profile at the prompt and places before the
    decode, every turn; with a KVSession the second turn's profile counts only the tokens fed."""
    import torch

    from hybrimoe import generate, synth
    from hybrimoe.gguf_model import GGUFModel
    from hybrimoe.layer import hybrid_factory
    from hybrimoe.models import load_gguf_model
    from hybrimoe.store import ExpertStore

    torch.set_num_threads(1)
    gm = GGUFModel(synth.write_gguf(synth.PRESETS["tiny"], tmp_path / "tiny.gguf"))
    store = ExpertStore(gm)
    store.pack(pin=False)
    rt = HybridRuntime(store, RuntimeConfig(cache_size=2, policy="profiled", gpu="emulated", device="cpu",
                                            costs=_costs(transfer=1e-9), record_decisions=True))
    model, _, _ = load_gguf_model(gm, progress=False, moe_factory=hybrid_factory(rt))
    calls = []
    real_begin = rt.begin_decode

    def spy_begin(n=None):
        calls.append(("begin", n, rt.cache.prof_tokens.copy() if rt.cache.profiling else None))
        return real_begin(n)

    rt.begin_decode = spy_begin
    session = generate.KVSession()
    p1 = [0, 40, 41, 42, 43, 44, 45]
    new, _, _ = generate.generate_ids(model, torch.tensor([p1]), 6, rt, session=session)
    held = len(session.ids)  # the prompt and every new token but the last
    p2 = p1 + new + [50, 51, 52]
    generate.generate_ids(model, torch.tensor([p2]), 4, rt, session=session)
    assert [c[1] for c in calls] == [5, 3]  # once per turn, with that turn's decode length
    assert np.all(calls[0][2] == len(p1))  # first turn: the whole prompt, every MoE layer
    assert held == len(p1) + 5 and np.all(calls[1][2] == len(p2) - held)  # second: only the tokens fed (4)
    placed = [d for _, d in rt.decisions if isinstance(d, PlaceDecision)]
    assert rt.summary()["placed"] == len(placed)
    assert "profiled" in RUNTIME_POLICIES


@pytest.mark.skipif(not (FLAME.is_file() and MIXTRAL_PD.is_file()), reason=f"traces not found under {TRACES}")
@pytest.mark.parametrize("path,prompt,n,cap", [(FLAME, 32, 160, 16), (MIXTRAL_PD, None, None, 2)])
def test_on_real_prompts_profiled_places_and_is_not_worse_than_mrs(path, prompt, n, cap):
    tr = load_trace(path)
    if n:
        tr = with_prompts(tr.subset(slice(0, n)), prompt)
    costs = CostModel.paper_a6000("mixtral" if tr.n_experts == 8 else "deepseek-v2-lite")
    chunk = int((tr.phase == PREFILL).sum())
    mrs = run_one(tr, costs, "mrs", cap, chunk=chunk)
    prof = run_one(tr, costs, "profiled", cap, chunk=chunk)
    assert prof.stats["placed"] > 0 and len(prof.placements) == 1
    assert prof.decode_s <= 1.01 * mrs.decode_s  # the goal: never worse than MRS by more than 1%
    assert mrs.n_decode == prof.n_decode == int((tr.phase == DECODE).sum())


def test_engine_native_refuses_profiled_and_the_sim_cli_takes_prompts(tiny, tmp_path, capsys):
    import json

    from hybrimoe import engine
    from hybrimoe.errors import HybrimoeError
    from hybrimoe.sim import main

    m, store = tiny
    if engine.available():
        with pytest.raises(HybrimoeError, match="profiled"):
            HybridRuntime(store, RuntimeConfig(policy="profiled", engine="native", emulate_gpu=True, device="cpu",
                                               costs="paper-a6000", cache_dir=str(tmp_path)))
    for bad, msg in ((dict(profile_tokens=-1), "profile_tokens"), (dict(prefetch_mode="x"), "prefetch mode")):
        with pytest.raises(HybrimoeError, match=msg):
            HybridRuntime(store, RuntimeConfig(policy="profiled", emulate_gpu=True, device="cpu", costs="paper-a6000",
                                               cache_dir=str(tmp_path), **bad))
    if FLAME.is_file():
        assert main(["--trace", str(FLAME), "--policy", "profiled", "--max-tokens", "160", "--prompt-tokens", "64",
                     "--chunk", "64"]) == 0
        out = capsys.readouterr().out
        d = json.loads(out[out.index("{"):])
        assert d["decode_tokens"] == 96 and d["placed"] > 0 and d["decode_ms_per_token"] > 0
    assert main(["--trace", "x.npz", "--prompt-tokens", "-1"]) == 2
    assert "--prompt-tokens must be >= 0, found -1" in capsys.readouterr().err


RECORDED = Path(__file__).resolve().parents[1] / "microbench" / "traces"


@pytest.mark.parametrize("name,L,E,k", [("tiny_generate_96.npz", 3, 8, 2), ("dsv2-lite-L2_generate_96.npz", 1, 64, 6)])
def test_recorded_generate_traces_replay_as_prompt_and_decode(name, L, E, k):
    """The traces generate --trace-out recorded (microbench/traces) hold one prompt then decode,
    and the simulator replays them with a placement between the two."""
    tr = load_trace(RECORDED / name)
    assert (tr.n_layers, tr.n_experts, tr.top_k) == (L, E, k)
    n_pre = int((tr.phase == PREFILL).sum())
    assert n_pre > 1 and np.all(tr.phase[:n_pre] == PREFILL) and np.all(tr.phase[n_pre:] == DECODE)
    costs = CostModel.paper_a6000("mixtral" if E == 8 else "deepseek-v2-lite")
    r = run_one(tr, costs, "profiled", max(k, E // 4), chunk=n_pre)
    assert len(r.placements) == 1 and r.n_decode == tr.n_tokens - n_pre
