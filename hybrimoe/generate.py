"""python -m hybrimoe.generate: text from a GGUF MoE model with experts on GPU cache, PCIe and CPU.

With no --gguf it writes the embedded tiny synthetic model (a real GGUF file) to the cache
directory and runs it through the same loading path. Example with a real file:

    python -m hybrimoe.generate --gguf DeepSeek-V2-Lite-Chat.Q4_K_M.gguf --cache-size 16 \
        --prefetch-size 2 --prompt "What is a mixture of experts?" --max-new-tokens 64

Errors a user can make end with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from .cache import RUNTIME_POLICIES


def _parse_bytes(s: str) -> int:
    s = s.strip().upper()
    mult = 1
    for suf, m in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3),
                   ("G", 2**30), ("M", 2**20), ("K", 2**10), ("B", 1)):
        if s.endswith(suf):
            s, mult = s[: -len(suf)], m
            break
    try:
        return int(float(s) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--gpu-budget: expected bytes like 8GiB or 500M, found {s!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hybrimoe.generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--gguf", help="GGUF MoE model (Q4_K_M); default: the embedded tiny synthetic model")
    p.add_argument("--preset", default="tiny", help="synthetic preset used when --gguf is not given")
    p.add_argument("--prompt", default="the quick brown fox", help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (0 = run the prompt only)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--cache-size", type=int, default=None, help="GPU-resident experts per MoE layer, 0..E (default E/4; 0 = no cache, "
                   "every expert is copied in when the GPU runs it)")
    g.add_argument("--gpu-budget", type=_parse_bytes, default=None, help="GPU bytes for experts, shared by layers")
    p.add_argument("--prefetch-size", type=int, default=0, help="experts prefetched per layer (0 = off)")
    p.add_argument("--prefetch-mode", choices=("impact", "pays"), default="impact",
                   help="impact: any positive predicted gain that fits the link's idle time; pays: only where the "
                        "gain (prediction hit rate measured per layer) beats the copy's cost (Python decisions)")
    p.add_argument("--policy", choices=RUNTIME_POLICIES, default="mrs",
                   help="expert cache policy (bypass: admission by windowed frequency, fills in idle link time; "
                        "profiled: bypass seeded by the prompt's routing, experts placed between prefill and decode)")
    p.add_argument("--schedule", choices=("hybrid", "kt-static", "gpu-only", "cpu-only", "seed"), default="hybrid")
    p.add_argument("--cpu-threads", type=int, default=None, help="CPU kernel threads, 0..1024 (default or 0: physical "
                   "cores; one less with CUDA, where the Python thread drives the GPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="threads of torch's own CPU ops (attention, norms), 0..1024; default (or 0) 1 on a CPU "
                        "device, where torch's OpenMP pool and the expert kernels' pool would fight for the cores")
    p.add_argument("--engine", default="auto", choices=("auto", "native", "python"),
                   help="per-layer decisions: native C++ engine, the Python policies, or auto (native when built)")
    p.add_argument("--emulate-gpu", action="store_true",
                   help="without CUDA, run the GPU side on the host (exercises cache/scheduler/prefetch)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory when the GGUF's cannot be used")
    p.add_argument("--chat", action="store_true", help="interactive chat (uses the GGUF chat template)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample among the most likely tokens of this total probability")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling, 0..2^63-1")
    p.add_argument("--dense", choices=("auto", "quant", "dequant"), default="auto",
                   help="non-expert weights: 'quant' keeps their GGUF blocks and runs them on the CPU kernels "
                        "(CPU only), 'dequant' makes float tensors on --device; auto: quant on a CPU device")
    p.add_argument("--timeline", default=None, help="write a Chrome trace (Perfetto) of CPU/GPU/PCIe lanes")
    p.add_argument("--plot", default=None, help="write a PNG of one decode step's lanes")
    p.add_argument("--costs", default=None, help="cost-model JSON, or paper-a6000 (the HybriMoE paper's testbed; datasheet numbers) (default: calibrate at start-up, cached)")
    p.add_argument("--trace-out", default=None, help="record the routing of this run (hybrimoe.traces format)")
    p.add_argument("--json", default=None, help="write the summary as JSON here")
    return p


class _Fail(Exception):
    pass


def check_args(args) -> None:
    """Range of every numeric flag (those bounded by the model are checked again once it is open);
    raises _Fail with one line naming the flag, the range and the value."""
    import math

    checks = (
        ("--max-new-tokens", args.max_new_tokens, 0, None),
        ("--cache-size", args.cache_size, 0, None),
        ("--prefetch-size", args.prefetch_size, 0, None),
        ("--cpu-threads", args.cpu_threads, 0, 1024),
        ("--torch-threads", args.torch_threads, 0, 1024),
        ("--top-k", args.top_k, 0, None),
        ("--seed", args.seed, 0, 2**63 - 1),
        ("--temperature", args.temperature, 0.0, None),
    )
    for flag, v, lo, hi in checks:
        if v is None:
            continue
        if isinstance(v, float) and not math.isfinite(v) or v < lo or (hi is not None and v > hi):
            want = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
            raise _Fail(f"{flag} must be {want}, found {v}")
    if not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
        raise _Fail(f"--top-p must be in (0, 1], found {args.top_p}")
    if args.gpu_budget is not None and args.gpu_budget <= 0:
        raise _Fail(f"--gpu-budget must be a positive number of bytes, found {args.gpu_budget}")


def load(args):
    """(model, tokenizer, runtime, gguf path) for the parsed arguments."""
    from . import synth
    from .gguf_model import GGUFModel
    from .layer import HybridRuntime, RuntimeConfig
    from .layer import hybrid_factory
    from .models import load_gguf_model
    from .store import ExpertStore
    from .tokenizer import load_tokenizer

    check_args(args)
    path = args.gguf
    if path is None:
        path = synth.ensure_preset(args.preset)
        print(f"[hybrimoe] no --gguf: using the embedded synthetic model '{args.preset}' ({path}); "
              "its weights are random, so its text is noise — the numbers below are the point")
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise _Fail("--device cuda: CUDA is not available on this machine (use --device cpu)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.torch_threads is not None or device.type == "cpu":
        # Measured on the 2-core CI box (tiny model, decode): 15 ms/token with 1 torch thread,
        # 93 ms/token with 2, because both thread pools spin on the same two cores.
        torch.set_num_threads(max(1, args.torch_threads or 1))
    gm = GGUFModel(path)
    for flag, v in (("--cache-size", args.cache_size), ("--prefetch-size", args.prefetch_size)):
        if v is not None and v > gm.config.n_experts:
            raise _Fail(f"{flag} must be in 0..{gm.config.n_experts} (the model's experts per layer), found {v}")
    # No explicit pack: the runtime packs a layer's experts into the pinned arena when it first
    # needs their spans (warm start on a GPU); a CPU-only run reads the mmap and copies nothing.
    store = ExpertStore(gm)
    cfg = RuntimeConfig(cache_size=args.cache_size, gpu_budget=args.gpu_budget, policy=args.policy,
                        schedule=args.schedule, prefetch_size=args.prefetch_size, device=str(device),
                        prefetch_mode=args.prefetch_mode,
                        emulate_gpu=args.emulate_gpu, cpu_threads=args.cpu_threads, costs=args.costs,
                        record_timeline=bool(args.timeline or args.plot), record_routing=bool(args.trace_out),
                        engine=args.engine, static_counts=None)
    if args.policy == "static":
        import numpy as np

        # static hot set without a profile: experts 0.. in index order (the warm-start rule)
        cfg = __import__("dataclasses").replace(
            cfg, static_counts=np.tile(np.arange(gm.config.n_experts)[::-1], (len(store.layers), 1)).astype(float))
    if device.type != "cuda" and not args.emulate_gpu and args.schedule != "cpu-only":
        print("[hybrimoe] no CUDA: every routed expert runs on the CPU kernels "
              "(--emulate-gpu exercises the cache/scheduler/prefetch with a host-side GPU)")
    runtime = HybridRuntime(store, cfg)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, _, _ = load_gguf_model(gm, device=device, dtype=dtype, progress=True, store=store,
                                  moe_factory=hybrid_factory(runtime), dense=args.dense)
    tok = load_tokenizer(gm, args.tokenizer)
    return model, tok, runtime, path


class KVSession:
    """One conversation's KV cache and the token ids it holds, kept across `generate_ids` calls:
    a prompt that starts with those ids (a chat's next turn) feeds only the rest. Where the new
    prompt departs from them the cache is cropped back to the common prefix."""

    def __init__(self):
        self.past = None
        self.ids: list[int] = []


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) next ids: argmax when temperature <= 0, else a sample from
    softmax(logits / temperature) restricted to the top_k most likely tokens (0 = no limit) and
    to the smallest set of most likely tokens whose probability reaches top_p (the nucleus)."""
    if temperature <= 0:
        return logits.argmax(-1)
    if not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"top_p must be in (0, 1] and top_k >= 0, found top_p={top_p}, top_k={top_k}")
    probs = torch.softmax(logits.float() / temperature, -1)
    sp, si = torch.sort(probs, dim=-1, descending=True)
    keep = torch.ones_like(sp, dtype=torch.bool)
    if top_k:
        keep[:, top_k:] = False
    if top_p < 1:
        # keep a token while the mass before it is below top_p (the most likely one always stays)
        keep &= (torch.cumsum(sp, -1) - sp) < top_p
    sp = torch.where(keep, sp, torch.zeros_like(sp))
    pick = torch.multinomial(sp / sp.sum(-1, keepdim=True), 1, generator=generator)
    return si.gather(-1, pick)[:, 0]


def _sync_cuda() -> None:
    """Wait for queued GPU work before reading a clock (kernel launches return at once); a no-op
    in a process that never touched CUDA."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@torch.no_grad()
def generate_ids(model, input_ids, max_new_tokens, runtime=None, eos_id=None, temperature=0.0, on_token=None,
                 session: KVSession | None = None, top_k: int = 0, top_p: float = 1.0,
                 generator: torch.Generator | None = None):
    """Greedy (or sampled) decoding with the KV cache. Returns (new ids list, prefill s, decode s).
    session: reuse (and update) a KVSession's cache for a batch-1 prompt (see KVSession); the
    prefill time then covers only the tokens fed."""
    t0 = time.perf_counter()
    if runtime is not None:
        runtime.new_sequence()
    prompt = input_ids[0].tolist() if input_ids.shape[0] == 1 else None
    past, start = None, 0
    if session is not None and session.past is not None and prompt is not None:
        m = min(_common_prefix(session.ids, prompt), len(prompt) - 1)  # feed at least one token
        drop = len(session.ids) - m
        if m > 0 and session.past.get_seq_length() == len(session.ids):
            try:
                if drop:
                    session.past.crop(-drop)
                past, start = session.past, m
            except (RuntimeError, ValueError, NotImplementedError):  # a cache kind that cannot roll back
                past, start = None, 0
    out = model(input_ids=input_ids[:, start:], past_key_values=past, use_cache=True)
    past = out.past_key_values
    logits = out.logits[:, -1].float()
    if getattr(runtime, "begin_decode", None) is not None:  # the prompt is in: policy profiled places
        runtime.begin_decode(max(0, max_new_tokens - 1))      # from its routing (a chat: every turn)
    _sync_cuda()  # the prefill's queued kernels belong to the prefill time, not the decode's
    t1 = time.perf_counter()
    new = []
    for step in range(max_new_tokens):
        nxt = next_token(logits, temperature, top_k, top_p, generator)
        new.append(int(nxt[0]))
        if on_token:
            on_token(new)
        if eos_id is not None and new[-1] == eos_id or step == max_new_tokens - 1:
            break
        if runtime is not None:
            runtime.next_step()
        out = model(input_ids=nxt[:, None], past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[:, -1].float()
    _sync_cuda()
    t2 = time.perf_counter()
    if session is not None:  # the cache holds the prompt and every new token but the last
        session.past, session.ids = (past, prompt + new[:-1]) if prompt is not None else (None, [])
    return new, t1 - t0, t2 - t1


def _run_once(model, tok, runtime, prompt_ids, args, session: KVSession | None = None):
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    printed = [""]

    def on_token(new):
        text = tok.decode(new, skip_special_tokens=True)
        sys.stdout.write(text[len(printed[0]):])
        sys.stdout.flush()
        printed[0] = text

    gen = None
    if args.seed is not None:
        gen = torch.Generator(device=device).manual_seed(args.seed + len(prompt_ids))
    new, t_pre, t_dec = generate_ids(model, ids, args.max_new_tokens, runtime, tok.eos_token_id,
                                     args.temperature, on_token, session, args.top_k, args.top_p, gen)
    print()
    return new, t_pre, t_dec


def dense_kind(model) -> str:
    """How the model's non-expert matrices are held: GGUF blocks on the CPU kernels, or float tensors."""
    from .qlinear import QuantEmbedding, QuantLinear

    n = sum(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())
    if n:
        return f"GGUF blocks ({n} matrices on the CPU kernels)"
    return f"{next(model.parameters()).dtype} tensors".replace("torch.", "")


def summary_lines(s: dict) -> list[str]:
    pf = s.get("prefetch_accuracy")
    speed = [] if "prefill_s" not in s else [
        f"prefill {s['prefill_tokens']} tok in {s['prefill_s']:.3f} s = {s['prefill_tok_s']:.1f} tok/s; "
        f"decode {s['decode_tokens']} tok in {s['decode_s']:.3f} s = {s['decode_tok_s']:.2f} tok/s"]
    return speed + [
        f"device {s['device']}, schedule {s['schedule']}, policy {s['policy']}, decisions {s.get('engine', 'python')}, CPU tier {s['cpu_tier']}"
        + (f", dense weights {s['dense']}" if "dense" in s else ""),
        f"cache hit rate {s['hit_rate']:.3f} ({s['hits']} hits / {s['misses']} misses, {s['evictions']} evictions); "
        f"experts on GPU {s['experts_gpu']} / CPU {s['experts_cpu']} "
        f"(token-expert pairs {s['pairs_gpu']} / {s['pairs_cpu']})",
        f"PCIe {s['pcie_bytes'] / 1e6:.2f} MB ({s['demand_loads']} demand loads, {s['prefetch_loads']} prefetches: "
        f"{s['prefetch_used']} used, {s['prefetch_wasted']} wasted; prediction accuracy "
        f"{'n/a' if pf is None else f'{pf:.2f}'})"
        + ("" if not (s.get("fills") or s.get("placed")) else
           f"; of the prefetch-class copies {s.get('fills', 0)} fills, {s.get('placed', 0)} placed from the prompt"),
    ] + ([] if "host_us" not in s else [
        "runtime host time per MoE layer: routing copy {sync:.0f} us, planning + issuing loads {plan:.0f} us, "
        "prefetch choice {prefetch:.0f} us".format(**s["host_us"])])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import HybrimoeError

    try:
        model, tok, runtime, path = load(args)
        if args.chat:
            return _chat(model, tok, runtime, args)
        prompt_ids = tok.encode(args.prompt)
        print(f"[hybrimoe] prompt: {args.prompt!r} ({len(prompt_ids)} tokens)")
        new, t_pre, t_dec = _run_once(model, tok, runtime, prompt_ids, args)
        s = runtime.summary()
        s.update(prefill_tokens=len(prompt_ids), prefill_s=t_pre, prefill_tok_s=len(prompt_ids) / max(t_pre, 1e-9),
                 decode_tokens=max(len(new) - 1, 0), decode_s=t_dec,
                 decode_tok_s=max(len(new) - 1, 0) / max(t_dec, 1e-9), gguf=path, dense=dense_kind(model))
        print("\n".join("[hybrimoe] " + ln for ln in summary_lines(s)))
        if args.timeline:
            from .timeline import write_chrome_trace

            n = write_chrome_trace(runtime, args.timeline)
            print(f"[hybrimoe] timeline: {n} slices -> {args.timeline} (open in https://ui.perfetto.dev)")
        if args.plot:
            from .timeline import plot_step

            plot_step(runtime, args.plot)
            print(f"[hybrimoe] plot of the last decode step -> {args.plot}")
        if args.trace_out:
            from .traces import save_trace

            tr = runtime.routing_trace(os.path.basename(path))
            save_trace(tr, args.trace_out)
            print(f"[hybrimoe] routing trace: {tr.n_tokens} tokens x {tr.n_layers} MoE layers -> {args.trace_out}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(s, f, indent=1, default=str)
        return 0
    except (HybrimoeError, FileNotFoundError, IsADirectoryError, _Fail) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _chat(model, tok, runtime, args) -> int:
    history = []
    session = KVSession()  # each turn feeds only what the conversation added since the last one
    print("[hybrimoe] chat: empty line or Ctrl-D to quit")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        history.append({"role": "user", "content": line})
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        else:
            ids = tok.encode("\n".join(m["content"] for m in history))
        new, _, _ = _run_once(model, tok, runtime, list(ids), args, session)
        history.append({"role": "assistant", "content": tok.decode(new, skip_special_tokens=True)})
    print()
    print("\n".join("[hybrimoe] " + ln for ln in summary_lines(runtime.summary())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
