"""hybrimoe vs llama.cpp on the same GGUF, CPU only: prefill and decode speed, and logits agreement.

Both sides load the same file (default: the `dsv2-lite` preset hybrimoe.synth writes, 27 layers,
~10 GB; `--gguf` for another), run with the same number of threads and get the same token ids
(random ids drawn once from a fixed seed, no tokenizer involved), greedy:

    prefill tok/s   one forward over a P-token prompt (P = 64 and 512), to the last token's logits
    decode tok/s    then D one-token steps, each feeding the argmax of the last logits
    agreement       logits of the last prompt position and of 8 teacher-forced steps after it
                    (the same fixed ids on both sides): mean and min cosine, top-1 match

Sides, alternated in every repeat so a busy minute on a shared box hits both:
    llama.cpp   llama-cpp-python (`Llama(n_threads=N, n_threads_batch=N, n_batch=512)`, mmap, f16
                KV cache), as built by pip on this machine (its native CPU flags);
    hybrimoe    as `python -m hybrimoe.generate` runs on a CPU: dense weights as GGUF blocks,
                `cpu-only` schedule, CPU kernel pool of N threads, one torch thread.
Rows: one per side x phase x context, median over repeats; x_vs_llamacpp = hybrimoe tok/s /
llama.cpp tok/s; decode rows add gbps (weight bytes a decode token reads / its time) and
frac_of_read_bw against a streaming read measured in the same run (microbench/cpu_kernels.py).

llama.cpp is an optional benchmark dependency, never installed in CI (it builds from source,
~25 minutes on 2 cores):

    pip install llama-cpp-python          # builds llama.cpp with this CPU's flags (cmake, a C++ compiler)

Without it the script still runs hybrimoe's side and writes its rows, with `llamacpp` in the
document saying it was not installed and every x_vs_llamacpp empty (never a guessed figure).

    python microbench/vs_llamacpp.py --json out.json [--quick] [--threads 2] [--reps 3]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, write_results  # noqa: E402

from hybrimoe import cpu, synth  # noqa: E402
from hybrimoe.generate import generate_ids  # noqa: E402
from hybrimoe.gguf_model import GGUFModel  # noqa: E402
from hybrimoe.layer import HybridRuntime, RuntimeConfig, hybrid_factory  # noqa: E402
from hybrimoe.models import load_gguf_model  # noqa: E402
from hybrimoe.store import ExpertStore  # noqa: E402

AGREE_STEPS = 8


def llama_cpp_module():
    """(module, version) or (None, reason)."""
    try:
        import llama_cpp
    except ImportError as e:
        return None, f"not installed ({e.__class__.__name__}: {e}); pip install llama-cpp-python"
    return llama_cpp, getattr(llama_cpp, "__version__", "?")


class LlamaSide:
    name = "llama.cpp"

    def __init__(self, lc, path: str, threads: int, n_ctx: int):
        self.llm = lc.Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                            n_ubatch=512, logits_all=False, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def _logits(self) -> np.ndarray:
        ptr = self.llm._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float32).copy()

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return self._logits()

    def step(self, tok: int) -> np.ndarray:
        self.llm.eval([tok])
        return self._logits()

    def close(self):
        self.llm.close() if hasattr(self.llm, "close") else None
        self.llm = None


class HybrimoeSide:
    name = "hybrimoe"

    def __init__(self, path: str, threads: int):
        gm = GGUFModel(path)
        self.store = ExpertStore(gm)
        self.rt = HybridRuntime(self.store, RuntimeConfig(device="cpu", schedule="cpu-only", cpu_threads=threads))
        self.model, _, _ = load_gguf_model(gm, progress=False, store=self.store, moe_factory=hybrid_factory(self.rt),
                                           dense="quant")
        self.gm = gm
        self.past = None

    @torch.no_grad()
    def prefill(self, ids: list[int]) -> np.ndarray:
        out = self.model(input_ids=torch.tensor([ids]), use_cache=True)
        self.past = out.past_key_values
        return out.logits[0, -1].float().numpy().copy()

    @torch.no_grad()
    def step(self, tok: int) -> np.ndarray:
        out = self.model(input_ids=torch.tensor([[tok]]), past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[0, -1].float().numpy().copy()

    def close(self):
        self.past = None


def timed_run(side, prompt: list[int], n_decode: int):
    """(prefill s, decode s for n_decode - 1 steps, greedy ids) the way generate_ids counts them."""
    t0 = time.perf_counter()
    logits = side.prefill(prompt)
    t1 = time.perf_counter()
    new = [int(np.argmax(logits))]
    for _ in range(n_decode - 1):
        logits = side.step(new[-1])
        new.append(int(np.argmax(logits)))
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, new


def agreement(a, b, prompt: list[int], forced: list[int]) -> dict:
    """Cosine and top-1 agreement of two sides' logits at the prompt's last position and at each
    of the teacher-forced steps after it."""
    la, lb = [a.prefill(prompt)], [b.prefill(prompt)]
    for t in forced:
        la.append(a.step(t))
        lb.append(b.step(t))
    cos = [float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y))) for x, y in zip(la, lb)]
    top1 = [int(np.argmax(x) == np.argmax(y)) for x, y in zip(la, lb)]
    return {"positions": len(cos), "cos_mean": float(np.mean(cos)), "cos_min": float(np.min(cos)),
            "top1_match": float(np.mean(top1))}


def weight_bytes_per_token(side: HybrimoeSide) -> int:
    from cpu_model import dense_bytes

    lay = side.store.layout(side.store.layers[0])
    return dense_bytes(side.model) + len(side.store.layers) * side.gm.config.top_k * lay.weight_bytes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny preset, short prompts, one repeat")
    ap.add_argument("--gguf", default=None, help="GGUF file (default: the --preset synthetic model)")
    ap.add_argument("--preset", default="dsv2-lite")
    ap.add_argument("--threads", type=int, default=None, help="threads on both sides (default: physical cores)")
    ap.add_argument("--prefill", default="64,512", help="prompt lengths (comma-separated)")
    ap.add_argument("--decode", type=int, default=32, help="new tokens per run (decode time covers n - 1 steps)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-llamacpp", action="store_true", help="hybrimoe's side only")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # as generate does on a CPU device
    threads = args.threads or cpu.physical_cores()
    if args.quick:
        args.preset, args.prefill, args.decode, args.reps = "tiny", "16,64", 8, 1
    path = args.gguf or synth.ensure_preset(args.preset, progress=True)
    prefills = [int(p) for p in args.prefill.split(",")]
    lc, lc_info = (None, "skipped (--no-llamacpp)") if args.no_llamacpp else llama_cpp_module()

    hm = HybrimoeSide(path, threads)
    vocab = hm.gm.config.vocab_size
    g = np.random.default_rng(0)
    prompt_all = [int(v) for v in g.integers(2, vocab, max(prefills))]
    forced = [int(v) for v in g.integers(2, vocab, AGREE_STEPS)]
    sides = [hm]
    if lc is not None:
        try:
            sides.insert(0, LlamaSide(lc, path, threads, n_ctx=max(prefills) + args.decode + AGREE_STEPS + 16))
        except Exception as e:  # noqa: BLE001 - a file llama.cpp cannot load: say so, run our side
            lc_info = f"{lc_info}: could not load {os.path.basename(path)} ({e.__class__.__name__}: {e})"
            print(f"# llama.cpp: {lc_info}", flush=True)
    have_llama = len(sides) == 2
    print(f"# {os.path.basename(path)}; threads {threads}; llama.cpp {lc_info}; load average {os.getloadavg()}",
          flush=True)

    # warm-up: page cache, first calls, the runtime's calibration
    for s in sides:
        timed_run(s, prompt_all[:8], 4)
    times = {(s.name, p): {"prefill": [], "decode": []} for s in sides for p in prefills}
    greedy = {}
    for rep in range(args.reps):
        order = sides if rep % 2 == 0 else sides[::-1]
        for p in prefills:
            for s in order:
                t_pre, t_dec, new = timed_run(s, prompt_all[:p], args.decode)
                times[(s.name, p)]["prefill"].append(p / t_pre)
                times[(s.name, p)]["decode"].append((args.decode - 1) / t_dec)
                greedy[(s.name, p)] = new
                print(f"# rep {rep} {s.name:9s} prompt {p:4d}: prefill {p / t_pre:7.2f} tok/s, decode "
                      f"{(args.decode - 1) / t_dec:6.2f} tok/s", flush=True)
    agree = agreement(sides[0], hm, prompt_all[:min(prefills)], forced) if have_llama else None

    from cpu_kernels import read_gbps

    wbytes = weight_bytes_per_token(hm)
    rbw = read_gbps(256 << 20, threads, True, 1.0)
    rows = []
    shape = f"{os.path.basename(path)} ({hm.gm.config.n_layers} layers)"
    for p in prefills:
        for phase in ("prefill", "decode"):
            base = float(np.median(times[("llama.cpp", p)][phase])) if have_llama else None
            for s in sides:
                tps = float(np.median(times[(s.name, p)][phase]))
                row = {"name": f"{s.name}/{phase}", "shape": shape, "tokens": p if phase == "prefill" else 1,
                       "context": p, "median_us": 1e6 / tps, "tok_s": tps,
                       "tok_s_all": [round(v, 3) for v in times[(s.name, p)][phase]],
                       "x_vs_llamacpp": (tps / base) if base else None, "threads": threads}
                if phase == "decode" and s is hm:
                    row["gbps"] = wbytes * tps / 1e9
                    row["read_gbps"] = rbw
                    row["frac_of_read_bw"] = row["gbps"] / rbw
                if phase == "decode" and have_llama:
                    row["greedy_same_as_llamacpp"] = greedy[(s.name, p)] == greedy[("llama.cpp", p)]
                rows.append(row)
    extra = {"llamacpp": lc_info, "threads": threads, "cpu_tier": cpu.tier(), "reps": args.reps,
             "decode_tokens": args.decode, "weight_bytes_per_decode_token": wbytes, "agreement": agree,
             "load_average_at_end": os.getloadavg()}
    if not have_llama:
        extra["note"] = ("llama.cpp was not run: hybrimoe rows only, x_vs_llamacpp empty. "
                         "Install the optional dependency with `pip install llama-cpp-python`.")
    doc = write_results("vs_llamacpp", rows, args.json, quick=args.quick, **extra)
    print_table(doc["rows"], ["name", "context", "tok_s", "x_vs_llamacpp", "frac_of_read_bw"])
    if agree:
        print(f"# logits agreement over {agree['positions']} positions: cosine mean {agree['cos_mean']:.5f}, "
              f"min {agree['cos_min']:.5f}, top-1 {agree['top1_match']:.2f}")
    else:
        print(f"# {extra.get('note', '')}")
    for s in sides:
        s.close()
    gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
