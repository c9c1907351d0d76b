"""How far apart two cold prefills of the same prompts are at two tensor-parallel sizes.

    VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=0 \\
        .venv/bin/python bench/tp_cold_diff.py run 1 .models/tiny .bench/tp1.json
    VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND="0|1" \\
        .venv/bin/python bench/tp_cold_diff.py run 2 .models/tiny .bench/tp2.json
    .venv/bin/python bench/tp_cold_diff.py compare .bench/tp1.json .bench/tp2.json

A restore across TP sizes loads K/V computed with another reduction order (the all-reduces of
the attention output and the MLP add the ranks' partial sums), so it cannot be bit-identical
with a cold prefill at the loading engine's size; this is the size of that difference between
two cold prefills, without the plugin: greedy tokens, and max |logprob difference| over the
prompt (vLLM's prompt logprobs) and the output. One engine per run (vLLM's offline LLM, fp32,
eager, no prefix caching); the runs go one after the other, so a 2-core machine runs one engine
at a time.
"""

from __future__ import annotations

import json
import random
import sys


def run(tp: int, model: str, out: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    extra = {"distributed_executor_backend": "mp"} if tp > 1 else {}
    llm = LLM(model=model, dtype="float32", tensor_parallel_size=tp, enforce_eager=True,
              max_model_len=2048, enable_prefix_caching=False, **extra)
    rng = random.Random(7)
    prompts = [[rng.randrange(5, 1000) for _ in range(n)] for n in (300, 700)]
    params = SamplingParams(temperature=0, max_tokens=32, logprobs=0, prompt_logprobs=0)
    data = []
    for r in llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params):
        toks = list(r.outputs[0].token_ids)
        data.append({
            "tokens": toks,
            "logprobs": [d[t].logprob for d, t in zip(r.outputs[0].logprobs, toks)],
            "prompt_logprobs": [None if d is None else d[t].logprob
                                for d, t in zip(r.prompt_logprobs, r.prompt_token_ids)],
        })
    with open(out, "w") as f:
        json.dump(data, f)


def compare(a_path: str, b_path: str) -> None:
    with open(a_path) as fa, open(b_path) as fb:
        a, b = json.load(fa), json.load(fb)
    for i, (x, y) in enumerate(zip(a, b)):
        pairs = [(p, q) for p, q in zip(x["prompt_logprobs"], y["prompt_logprobs"])
                 if p is not None]
        out = max(abs(p - q) for p, q in zip(x["logprobs"], y["logprobs"]))
        prompt = max(abs(p - q) for p, q in pairs)
        equal = sum(p == q for p, q in pairs)
        print(f"prompt {i} ({len(x['prompt_logprobs'])} tokens): greedy tokens equal "
              f"{x['tokens'] == y['tokens']}, max |dlogprob| prompt {prompt:.3g}, output "
              f"{out:.3g}; prompt logprobs bit-equal {equal} of {len(pairs)}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"]:
        run(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    elif sys.argv[1:2] == ["compare"]:
        compare(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
