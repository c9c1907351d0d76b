"""Serving on a CUDA GPU: what the connector costs when nobody snapshots, and what vLLM's hybrid
KV-cache manager is worth on a sliding-window model.

    python3 bench/gpu_serve_bench.py                     # both models
    python3 bench/gpu_serve_bench.py --model llama       # Llama-3-8B shape only
    python3 bench/gpu_serve_bench.py --model swa         # the sliding-window model only
    python3 bench/gpu_serve_bench.py --model swa --rounds 12 --minutes 8   # as many as fit
    python3 bench/gpu_serve_bench.py --quick             # smoke run (tiny model; CPU works)
    python3 bench/gpu_serve_bench.py --model llama --cuda-graphs   # vLLM's default mode on CUDA
    python3 bench/gpu_serve_bench.py --model llama --cuda-graphs --paced 4   # and TTFT unqueued

For each model, two servers up side by side on the same GPU, each with the same share of its
memory (``--gpu-memory-utilization``): ``pf serve`` (our connector, auto-restore on, an empty
store: every lookup misses) and the same launcher plan without ``--kv-transfer-config``. Both
bf16, vLLM's default block size, ``--enforce-eager`` (as the other GPU benchmarks; with
``--cuda-graphs``, vLLM's default instead: ``torch.compile`` and CUDA graphs, what a server runs
when its user adds nothing, and where a step's host work is no longer hidden behind eager
kernel launches), prefix caching on, random weights (``--load-format dummy``, config and
tokenizer built locally).

Load: ``vllm bench serve`` (vLLM's own CLI) with its ``random`` dataset, all requests sent at
once under a fixed concurrency, fixed output length (``--ignore-eos``). Each round runs both
servers back to back (the order alternates between rounds), each from an empty prefix cache and
with the same prompts (same seed); ``--minutes`` bounds the rounds by time. Reported per measure
(request and output-token throughput, median TTFT and TPOT): the median of the rounds' paired
ratios ours / none with its distribution-free 95% interval, which cancels what drifts between
rounds; the ratio of the two servers' medians beside it; and the KV-cache size each engine
reports at start.

With ``--paced RATE``, each round also runs both servers at RATE requests per second (Poisson
arrivals from a fixed seed, the same for both), well below what they sustain: a request then
rarely waits for another's prefill, so its TTFT is its own prefill and the connector's work
around it. Sent all at once, TTFT is set by where a request lands in the queue and moves by
±15% between runs of one server; paced, it measures what a user waits for.

Models:
- ``llama``: Llama-3-8B's shape (32 layers, 8 KV heads of 128), one KV-cache group;
- ``swa``: a Gemma-3-12B-shaped model (48 layers, 8 KV heads of 256; five sliding-window layers
  of 1,024 tokens to every full-attention layer). With the hybrid manager on, vLLM keeps only the
  window's blocks for the sliding layers, so the same memory holds several times the tokens; a
  connector that does not declare ``SupportsHMA`` makes vLLM turn that manager off (its log says
  so), and the comparison shows what that costs.
Raw numbers: ``$PF_BENCH_DIR`` (default ``.bench/gpu``), ``serve.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Server, console, median, median_interval, vllm_bench_serve

from processfork_dev.model_builder import CONFIG_ONLY, PRESETS, build_model

REPO = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("PF_BENCH_DIR", REPO / ".bench" / "gpu"))
WORK = Path(os.environ.get("PF_BENCH_WORK", "/tmp/pf-gpu-bench"))

#: Per model: vLLM bench serve's random dataset and how hard it is driven.
WORKLOADS = {
    "llama": {"input_len": 1024, "output_len": 128, "num_prompts": 256, "concurrency": 64},
    "swa": {"input_len": 4096, "output_len": 64, "num_prompts": 96, "concurrency": 48},
    "quick": {"input_len": 256, "output_len": 16, "num_prompts": 24, "concurrency": 8},
}
KEYS = ("request_throughput", "output_throughput", "median_ttft_ms", "median_tpot_ms")
HYBRID_OFF = "Turning off hybrid kv cache manager"


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def gemma3_like(path: Path, tokenizer_from: Path) -> Path:
    """A Gemma-3-12B-shaped config (random weights at load) beside a copy of our tokenizer."""
    if path.exists():
        shutil.rmtree(path)
    shutil.copytree(tokenizer_from, path)
    layers = 48
    config = {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": layers,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
        "query_pre_attn_scalar": 256, "sliding_window": 1024,
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                        for i in range(layers)],
        "attention_bias": False, "attention_dropout": 0.0, "final_logit_softcapping": None,
        "attn_logit_softcapping": None, "vocab_size": 262208, "pad_token_id": 0,
        "bos_token_id": 2, "eos_token_id": 1, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "use_cache": True,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in ("model.safetensors", "model.safetensors.index.json", "generation_config.json"):
        (path / name).unlink(missing_ok=True)
    return path


def models(which: str, quick: bool) -> dict[str, tuple[Path, list[str]]]:
    """Name -> (model folder, extra server arguments)."""
    if quick:
        spec = PRESETS["tiny"]
        path = build_model(WORK / "models" / "tiny", spec)
        return {"quick": (path, ["--dtype", spec.dtype, "--max-model-len", "1024"])}
    spec = PRESETS["llama3-8b"]
    llama = build_model(WORK / "models" / "llama3-8b-bfloat16", spec,
                        weights="llama3-8b" not in CONFIG_ONLY)
    out: dict[str, tuple[Path, list[str]]] = {}
    if which in ("llama", "both"):
        out["llama"] = (llama, ["--dtype", "bfloat16", "--load-format", "dummy",
                                "--max-model-len", "8192"])
    if which in ("swa", "both"):
        out["swa"] = (gemma3_like(WORK / "models" / "gemma3-12b-like", llama),
                      ["--dtype", "bfloat16", "--load-format", "dummy",
                       "--max-model-len", "8192"])
    return out


class GpuServer(Server):
    """A harness server whose worker has no OpenMP threads to report on a GPU."""

    def threads(self) -> int:
        return super().threads() if not _cuda() else 0


def start_pair(name: str, model: Path, args: list[str], cuda: bool,
               eager: bool = True) -> dict[str, Server]:
    """Our connector and no connector, same plan otherwise.

    The KV cache gets the same number of bytes in both (``--kv-cache-memory-bytes``), so the
    tokens each engine says it can hold compare layouts, not memory profiles, and two engines
    can start on one GPU at once.
    """
    common = [*args, "--max-num-seqs", "256"]
    if cuda:
        common += [*(["--enforce-eager"] if eager else []), "--gpu-memory-utilization", "0.45",
                   "--kv-cache-memory-bytes", "24G"]
    else:
        common += ["--kv-cache-memory-bytes", "512M"]
    root = WORK / "serve" / name
    shutil.rmtree(root, ignore_errors=True)
    servers = {
        "ours": GpuServer(f"{name}-ours", model, "pf", root / "store", common, served_name=name),
        "none": GpuServer(f"{name}-none", model, "plain", root / "unused", common, served_name=name),
    }
    if not cuda:  # two engines at once would share the CPU's cores: one at a time there
        for srv in servers.values():
            srv.start(900)
        return servers
    errors: list[BaseException] = []
    threads = [threading.Thread(target=_start, args=(srv, errors)) for srv in servers.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        for srv in servers.values():
            srv.stop()
        raise errors[0]
    return servers


def _start(srv: Server, errors: list[BaseException]) -> None:
    try:
        srv.start(900)
    except BaseException as exc:  # noqa: BLE001 - re-raised by the caller
        errors.append(exc)


def engine_facts(srv: Server) -> dict[str, Any]:
    """What the engine's log says about its KV cache."""
    assert srv.process is not None
    text = Path(srv.process.log_path).read_text(errors="replace")
    sizes = re.findall(r"KV cache size: ([\d,]+) tokens", text)
    conc = re.findall(r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x", text)
    return {
        "kv_cache_tokens": int(sizes[-1].replace(",", "")) if sizes else None,
        "max_concurrency": float(conc[-1][1]) if conc else None,
        "hybrid_manager_off": HYBRID_OFF in text,
    }


def bench_serve(srv: Server, model: Path, workload: dict[str, int], out: Path,
                seed: int, request_rate: float | None = None) -> dict[str, Any]:
    result = vllm_bench_serve(srv, model, [
        "--dataset-name", "random", "--random-input-len", str(workload["input_len"]),
        "--random-output-len", str(workload["output_len"]),
    ], num_prompts=workload["num_prompts"], concurrency=workload["concurrency"], seed=seed,
        out=out, metrics="ttft,tpot,e2el", request_rate=request_rate)
    return {k: result[k] for k in KEYS}


def paced_workload(workload: dict[str, int], rate: float) -> dict[str, int]:
    """A paced run's requests: about 16 seconds of arrivals, at least 32 requests."""
    return {**workload, "num_prompts": max(32, round(16 * rate))}


def run_model(name: str, model: Path, args: list[str], rounds: int, cuda: bool,
              deadline: float, save: Callable[[dict[str, Any]], None],
              eager: bool = True, paced: float | None = None) -> dict[str, Any]:
    """Warm-up, then rounds of one run per server back to back (order alternating), until
    ``rounds`` are done or the next one would start after ``deadline`` (``time.monotonic``).
    With ``paced``, each round then runs both servers at that request rate too.
    ``save`` gets the result so far after every round, so a run cut short keeps its rounds."""
    workload = WORKLOADS[name]
    servers = start_pair(name, model, args, cuda, eager)
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "none": []}
    result: dict[str, Any] = {"workload": workload, "args": args, "runs": runs,
                              "mode": "eager" if eager or not cuda else "cuda-graphs"}
    if paced is not None:
        result["paced"] = {"rate": paced, "workload": paced_workload(workload, paced),
                           "runs": {"ours": [], "none": []}}
    try:
        result["facts"] = {k: engine_facts(s) for k, s in servers.items()}
        console.log(f"{name}: {json.dumps(result['facts'])}")
        res_dir = WORK / "serve" / name / "results"
        res_dir.mkdir(parents=True, exist_ok=True)
        for k, srv in servers.items():  # warm-up, discarded
            srv.reset_prefix_cache()
            bench_serve(srv, model, {**workload, "num_prompts": workload["concurrency"]},
                        res_dir / f"warmup-{k}.json", 1)
        started = time.monotonic()
        for r in range(rounds):
            if r and time.monotonic() + (time.monotonic() - started) / r > deadline:
                console.log(f"{name}: {r} rounds fit the time given")
                break
            for k in (("ours", "none") if r % 2 == 0 else ("none", "ours")):
                servers[k].reset_prefix_cache()
                out = bench_serve(servers[k], model, workload, res_dir / f"{k}-{r}.json", 0)
                runs[k].append(out)
                console.log(f"{name} {k} run {r}: {out['request_throughput']:.2f} req/s, "
                            f"{out['output_throughput']:.0f} tok/s out, median TTFT "
                            f"{out['median_ttft_ms']:.1f} ms")
            if paced is not None:
                for k in (("ours", "none") if r % 2 == 0 else ("none", "ours")):
                    servers[k].reset_prefix_cache()
                    out = bench_serve(servers[k], model, result["paced"]["workload"],
                                      res_dir / f"paced-{k}-{r}.json", 2, request_rate=paced)
                    result["paced"]["runs"][k].append(out)
                    console.log(f"{name} {k} paced run {r} ({paced} req/s): median TTFT "
                                f"{out['median_ttft_ms']:.1f} ms, TPOT "
                                f"{out['median_tpot_ms']:.2f} ms")
            save(summarize(result))
    finally:
        for srv in servers.values():
            srv.stop()
    return summarize(result)


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Medians per server, and per measure the round-by-round ratios ours / none with the
    median's distribution-free 95% interval: each round's two runs ran back to back, so the
    ratio of a round cancels what drifts between rounds. Paced runs, if any, the same way."""
    for part in (result, result.get("paced")):
        if not part or not part["runs"]["ours"]:
            continue
        runs = part["runs"]
        part["median"] = {k: {key: median(r[key] for r in v) for key in KEYS}
                          for k, v in runs.items()}
        paired = {}
        for key in KEYS:
            ratios = [o[key] / n[key] for o, n in zip(runs["ours"], runs["none"])]
            low, high = median_interval(ratios)
            paired[key] = {"ratios": ratios, "median": median(ratios), "low": low, "high": high}
        part["paired"] = paired
    return result


def report(results: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="Serving on one GPU: ours / no connector")
    for col in ("model", "measure", "ours (median)", "none (median)", "ratio of medians",
                "paired ratios: median (95% interval)", "rounds"):
        table.add_column(col, justify="left" if col in ("model", "measure") else "right")
    for key_name, res in results.items():
        name = f"{key_name} ({res.get('mode', 'eager')})"
        paced = res.get("paced") or {}
        parts = [("", res)] + ([(f"paced {paced['rate']}/s: ", paced)] if "median" in paced
                               else [])
        for label, part in parts:
            ours, none = part["median"]["ours"], part["median"]["none"]
            for key in KEYS:
                pair = part.get("paired", {}).get(key)
                table.add_row(name, label + key, f"{ours[key]:,.2f}", f"{none[key]:,.2f}",
                              f"{ours[key] / none[key]:.3f}",
                              f"{pair['median']:.3f} ({pair['low']:.3f}-{pair['high']:.3f})"
                              if pair else "-", str(len(pair["ratios"])) if pair else "-")
        fo, fn = res["facts"]["ours"], res["facts"]["none"]
        table.add_row(name, "KV cache tokens at start", f"{fo['kv_cache_tokens']:,}",
                      f"{fn['kv_cache_tokens']:,}",
                      f"{fo['kv_cache_tokens'] / fn['kv_cache_tokens']:.3f}"
                      if fo["kv_cache_tokens"] and fn["kv_cache_tokens"] else "-", "", "")
        table.add_row(name, "hybrid manager turned off", str(fo["hybrid_manager_off"]),
                      str(fn["hybrid_manager_off"]), "", "", "")
    console.print(table)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("llama", "swa", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=3, help="rounds: one run per server each")
    parser.add_argument("--minutes", type=float, default=None,
                        help="start no round that would end after this many minutes from now "
                             "(the rounds done are reported)")
    parser.add_argument("--prompts", type=int, default=None,
                        help="requests per run (default: the model's workload)")
    parser.add_argument("--quick", action="store_true", help="tiny model, few requests")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="vLLM's default torch.compile and CUDA graphs, not --enforce-eager")
    parser.add_argument("--paced", type=float, default=None, metavar="RATE",
                        help="each round also runs both servers at RATE requests/s (TTFT "
                             "without queueing)")
    opts = parser.parse_args()
    if opts.prompts:
        for workload in WORKLOADS.values():
            workload["num_prompts"] = opts.prompts
    cuda = _cuda()
    deadline = time.monotonic() + (opts.minutes * 60 if opts.minutes else float("inf"))
    results: dict[str, Any] = {}
    path = OUT / "serve.json"
    if path.exists():
        results = json.loads(path.read_text()).get("results", {})

    def save(name: str, result: dict[str, Any]) -> None:
        results[name] = result
        OUT.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"machine": _machine(), "results": results}, indent=2) + "\n")

    for name, (model, args) in models(opts.model, opts.quick).items():
        t = time.perf_counter()
        # Results of both modes are kept side by side in serve.json.
        key = f"{name}-graphs" if opts.cuda_graphs and cuda else name
        save(key, run_model(name, model, args, 1 if opts.quick else opts.rounds, cuda, deadline,
                            lambda result, key=key: save(key, result),
                            eager=not opts.cuda_graphs, paced=opts.paced))
        console.log(f"{name}: done in {time.perf_counter() - t:.0f} s")
    report(results)
    return 0


def _machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        import torch
        import vllm

        info.update(vllm=vllm.__version__, torch=torch.__version__)
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


if __name__ == "__main__":
    sys.exit(main())
