"""Build tiny random-weight Llama checkpoints for tests, demos and benchmarks.

There is no model hub on the machines this project is tested on, and a real checkpoint would make
every test slow. A random Llama exercises exactly the code paths a real one does: vLLM loads it,
pages its KV cache, and caches its prefixes. Weights come from one seeded generator in a fixed
tensor order, so the same arguments give the same bytes with any ``transformers`` version; the
tokenizer is a byte-level BPE trained on a small built-in English text, so any text tokenizes
(into many tokens, which is what long-context tests need).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

__all__ = [
    "PRESETS",
    "ModelBuildError",
    "TinyLlamaSpec",
    "build_model",
    "build_tiny_llama",
    "content_digest",
    "main",
]

# Bump when the output for the same spec changes, so stale builds are rebuilt.
BUILDER_VERSION = 1
STAMP_NAME = ".processfork-model.json"

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
PAD, BOS, EOS = 0, 1, 2

# A plain role-tagged template: enough for chat requests to work, and every role marker is one
# special token so the prompt length of a conversation is easy to reason about in tests.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}\n{% endif %}"
)

CORPUS = """\
The river ran slowly past the old mill, and the children who lived in the village
spent their summer afternoons on its banks. They built small boats out of bark and
leaves, set them on the water, and followed them downstream until the current carried
them out of sight. In the evening their parents called them home for supper, and the
lamps in the windows came on one after another along the narrow street.

A library is a quiet place where people come to read, to study and to think. The
shelves hold books about history, science, music, cooking, travel and law. Some
readers arrive early in the morning and stay until the doors close at night; others
borrow a novel, return it a week later and take another one. The librarian knows
most of them by name and remembers which authors they like.

Computers follow instructions written by programmers. A program reads its input,
keeps some state in memory, and writes its results to a screen, a file or a network
connection. When two programs share data they must agree on a format: the order of
the fields, the size of each number, and what happens when a value is missing. Good
formats are simple, documented and versioned, so that old files remain readable.

The weather changed quickly that spring. Warm days with clear skies were followed by
cold rain and strong wind from the north. Farmers watched the clouds and waited for
the soil to dry before they planted wheat, barley, beans and potatoes. By June the
fields were green, the orchards were full of blossom, and the markets sold fresh
strawberries, cherries, lettuce and peas.

Cooking a good meal requires patience. First you chop the onions, garlic and carrots,
then you warm a little oil in a heavy pan and let the vegetables soften over a low
flame. Add the tomatoes, a pinch of salt, some pepper and a few leaves of basil, and
let the sauce simmer for half an hour while you boil water for the pasta. Taste it
often and adjust the seasoning before you serve it to your friends.

Mathematics studies numbers, shapes, patterns and change. A proof is an argument that
shows a statement must be true, step by step, from definitions and earlier results.
Students learn to add and multiply, then to solve equations, draw graphs, compute
areas and volumes, and finally to reason about infinite sequences, probability,
matrices and functions of several variables.

The train left the station at seven o'clock and travelled east across the plain.
Passengers read newspapers, drank coffee, looked out at the farms and forests, or
slept with their heads against the window. At noon the train crossed a wide bridge
over a river, climbed into the hills and stopped at a small town where a brass band
was playing in the square to welcome visitors to the autumn festival.

Good questions are the beginning of every discovery. Why does the moon change its
shape during the month? How do birds find their way south in winter? What makes
bread rise, iron rust, and milk turn sour? Scientists answer such questions by
observing carefully, proposing explanations, making predictions, and testing them
with experiments that anyone can repeat. When the results disagree with the theory,
the theory must change.

Music can be loud or soft, fast or slow, simple or complex. A melody is a sequence of
notes; harmony is what we hear when several notes sound together; rhythm is the
pattern of long and short sounds in time. Every culture has its own songs, dances and
instruments, from drums and flutes to violins, pianos and electric guitars.

Writing a letter by hand takes longer than sending a message, but many people still
enjoy it. They choose good paper, a pen that does not smudge, and take time to think
about each sentence. The letter travels for days before it arrives, and the person who
receives it can keep it in a drawer for years and read it again whenever they wish.
Numbers such as 1, 2, 3, 10, 42, 100, 2024 and 65536 appear in text too, along with
punctuation: commas, periods, colons; quotes "like this" and (parentheses) [brackets]!
"""


class ModelBuildError(Exception):
    """A model folder cannot be built or reused (for example, it holds something else)."""


@dataclass(frozen=True)
class TinyLlamaSpec:
    """Everything that determines the bytes of a built model; its JSON is the build stamp."""

    num_layers: int = 2
    hidden: int = 256
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    intermediate: int = 512
    vocab: int = 1024
    max_pos: int = 8192
    seed: int = 0
    dtype: str = "float32"
    init_std: float = 0.02
    rope_theta: float = 10000.0
    #: Sliding-window layers (vLLM's Llama reads ``layer_types``): each layer is
    #: ``sliding_attention`` or ``full_attention``; None is a plain Llama.
    layer_types: tuple[str, ...] | None = None
    sliding_window: int | None = None
    #: Mamba2 layers (``mamba`` in ``layer_types``) make the model a Granite-4-H style
    #: ``GraniteMoeHybridForCausalLM``: state-space layers beside attention ones, each with
    #: ``mamba_heads`` heads of ``2 * hidden / mamba_heads`` dims and a ``mamba_d_state`` state.
    mamba_heads: int | None = None
    mamba_d_state: int | None = None
    mamba_chunk: int | None = None

    @property
    def hybrid(self) -> bool:
        """Whether the model has Mamba2 layers (and so a per-sequence state in vLLM)."""
        return self.layer_types is not None and MAMBA in self.layer_types

    def validate(self) -> None:
        """Reject shapes the CPU attention backend or Llama cannot run."""
        if self.head_dim < 32 or self.head_dim % 32:
            raise ModelBuildError(f"head_dim must be a multiple of 32, got {self.head_dim}")
        if self.heads % self.kv_heads:
            raise ModelBuildError(f"heads ({self.heads}) must be a multiple of kv_heads")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ModelBuildError(f"unsupported dtype {self.dtype!r}")
        if self.vocab < 256 + len(SPECIAL_TOKENS):
            raise ModelBuildError("vocab must hold the 256 byte tokens and the special tokens")
        if self.hybrid:
            self._validate_hybrid()
            return
        if (self.layer_types is None) != (self.sliding_window is None):
            raise ModelBuildError("layer_types and sliding_window go together")
        if self.layer_types is not None:
            kinds = set(self.layer_types)
            if len(self.layer_types) != self.num_layers or not kinds <= {
                "sliding_attention", "full_attention"
            }:
                raise ModelBuildError(
                    f"layer_types must name sliding_attention or full_attention for each of "
                    f"the {self.num_layers} layers, got {self.layer_types!r}"
                )
            if self.sliding_window is None or self.sliding_window < 1:
                raise ModelBuildError(f"sliding_window must be positive, got {self.sliding_window}")

    def _validate_hybrid(self) -> None:
        assert self.layer_types is not None
        if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= {
            MAMBA, "full_attention"
        }:
            raise ModelBuildError(
                f"a hybrid model's layer_types name mamba or full_attention for each of the "
                f"{self.num_layers} layers, got {self.layer_types!r}"
            )
        if self.sliding_window is not None:
            raise ModelBuildError("a hybrid model has no sliding window")
        if not (self.mamba_heads and self.mamba_d_state and self.mamba_chunk):
            raise ModelBuildError("a hybrid model needs mamba_heads, mamba_d_state, mamba_chunk")
        if (2 * self.hidden) % self.mamba_heads:
            raise ModelBuildError(f"mamba_heads ({self.mamba_heads}) must divide 2 * hidden")

    def kv_bytes_per_token(self) -> int:
        """K and V bytes one token occupies across all layers (what a snapshot page stores)."""
        itemsize = 4 if self.dtype == "float32" else 2
        return 2 * self.num_layers * self.kv_heads * self.head_dim * itemsize


# `sliding`: the tiny model with sliding-window layers (a window of 64 tokens) interleaved with
# full-attention layers, like Gemma-2 or Mistral-style hybrids: vLLM's hybrid KV cache manager gives
# it one KV-cache group per kind.
SLIDING = TinyLlamaSpec(
    num_layers=4, intermediate=512,
    layer_types=("sliding_attention", "full_attention", "sliding_attention", "full_attention"),
    sliding_window=64,
)

MAMBA = "mamba"

# `hybrid`: Mamba2 layers interleaved with full-attention layers, like IBM's Granite 4 (H)
# models: vLLM gives it a per-sequence state group (MambaSpec) beside the attention group. Its
# Mamba2 state per layer is a (3, 576) convolution window and an (8, 64, 32) SSM state.
HYBRID = TinyLlamaSpec(
    num_layers=4, intermediate=512, max_pos=4096,
    layer_types=(MAMBA, "full_attention", MAMBA, "full_attention"),
    mamba_heads=8, mamba_d_state=32, mamba_chunk=64,
)

# `bench`: 12 layers, 4 KV heads of 64 dims in fp32 give 24 KiB of KV per token, so a 16K-token
# context is 384 MiB: large enough for bandwidth numbers to mean something on a laptop.
PRESETS: dict[str, TinyLlamaSpec] = {
    "tiny": TinyLlamaSpec(),
    "sliding": SLIDING,
    "hybrid": HYBRID,
    "bench": TinyLlamaSpec(
        num_layers=12, hidden=1024, heads=16, kv_heads=4, head_dim=64, intermediate=2816,
        vocab=1024, max_pos=32768,
    ),
    # The bench shape with Gemma 3's pattern: five sliding-window layers (a window of 256 tokens)
    # to each full-attention layer; what serving a sliding-window model costs on a CPU.
    "bench-sliding": TinyLlamaSpec(
        num_layers=12, hidden=1024, heads=16, kv_heads=4, head_dim=64, intermediate=2816,
        vocab=1024, max_pos=32768,
        layer_types=(("sliding_attention",) * 5 + ("full_attention",)) * 2, sliding_window=256,
    ),
    # Llama-3-8B's shape (32 layers, 8 KV heads of 128 dims: 128 KiB of bf16 KV per token) with
    # this builder's small vocabulary; built without weights, for `--load-format dummy` on a GPU.
    "llama3-8b": TinyLlamaSpec(
        num_layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336,
        vocab=1024, max_pos=131072 + 1024, dtype="bfloat16", rope_theta=500000.0,
    ),
}
#: Presets built as config and tokenizer only (serve them with ``--load-format dummy``).
CONFIG_ONLY = frozenset({"llama3-8b"})


def build_tiny_llama(
    path: str | os.PathLike[str],
    *,
    num_layers: int = 2,
    hidden: int = 256,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 1024,
    max_pos: int = 8192,
    seed: int = 0,
    dtype: str = "float32",
    head_dim: int = 64,
    intermediate: int | None = None,
) -> Path:
    """Build (or reuse) a random Llama in ``path`` and return the absolute folder path."""
    spec = TinyLlamaSpec(
        num_layers=num_layers, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        intermediate=intermediate if intermediate is not None else 2 * hidden,
        vocab=vocab, max_pos=max_pos, seed=seed, dtype=dtype,
    )
    return build_model(path, spec)


def build_model(
    path: str | os.PathLike[str], spec: TinyLlamaSpec, *, weights: bool = True
) -> Path:
    """Build ``spec`` into ``path`` unless an identical build is already there.

    The folder is written under a temporary name and renamed into place, so a crash or a
    concurrent build never leaves a half-written model that looks complete.
    """
    spec.validate()
    target = Path(path).expanduser().resolve()
    stamp = _stamp(spec)
    if not weights:
        stamp["weights"] = False
    if _read_stamp(target) == stamp:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Two test sessions may build the same folder at once; the lock makes the second one reuse
    # the first one's result instead of replacing a folder a server may already be reading.
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _read_stamp(target) == stamp:
            return target
        _build_into(target, spec, stamp)
    return target


def _build_into(target: Path, spec: TinyLlamaSpec, stamp: dict[str, object]) -> None:
    if target.exists() and any(target.iterdir()) and _read_stamp(target) is None:
        raise ModelBuildError(f"{target} exists and is not a model built by processfork")
    staging = target.parent / f".{target.name}.building-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        _write_model(staging, spec, stamp)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _stamp(spec: TinyLlamaSpec) -> dict[str, object]:
    fields = asdict(spec)
    for name in ("layer_types", "sliding_window", "mamba_heads", "mamba_d_state", "mamba_chunk"):
        # unset: the stamp of builds before them
        if fields[name] is None:
            del fields[name]
        elif name == "layer_types":
            fields[name] = list(fields[name])
    return {"builder_version": BUILDER_VERSION, "spec": fields}


def _read_stamp(folder: Path) -> dict[str, object] | None:
    try:
        return json.loads((folder / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def _write_model(folder: Path, spec: TinyLlamaSpec, stamp: dict[str, object]) -> None:
    tokenizer = _train_tokenizer(spec.vocab)
    vocab = spec.vocab
    tokenizer.save(str(folder / "tokenizer.json"))
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "add_bos_token": False,
        "model_max_length": spec.max_pos,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    })
    _write_json(folder / "special_tokens_map.json", {
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
    })
    if not spec.hybrid:
        _write_json(folder / "config.json", _hf_config(spec, vocab))
    # Only token ids here: sampling defaults in generation_config.json would silently change
    # what vLLM does for requests that do not set them.
    _write_json(folder / "generation_config.json", {
        "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD,
    })
    if spec.hybrid:
        _write_hybrid(folder, spec, vocab, weights=bool(stamp.get("weights", True)))
    elif stamp.get("weights", True):
        _write_weights(folder / "model.safetensors", spec, vocab)
    _write_json(folder / STAMP_NAME, stamp)


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _train_tokenizer(vocab_size: int):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise ModelBuildError(
            f"the built-in corpus yields {tokenizer.get_vocab_size()} tokens, "
            f"fewer than the vocab of {vocab_size} asked for"
        )
    for token_id, token in enumerate(SPECIAL_TOKENS[:3]):
        if tokenizer.token_to_id(token) != token_id:
            raise ModelBuildError(f"special token {token!r} did not get id {token_id}")
    return tokenizer


def _hf_config(spec: TinyLlamaSpec, vocab: int) -> dict[str, object]:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_pos,
        rms_norm_eps=1e-5,
        rope_theta=spec.rope_theta,
        initializer_range=spec.init_std,
        tie_word_embeddings=False,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        torch_dtype=spec.dtype,
    )
    data = config.to_dict()
    if spec.layer_types is not None:
        data["layer_types"] = list(spec.layer_types)
        data["sliding_window"] = spec.sliding_window
    data["architectures"] = ["LlamaForCausalLM"]
    data["torch_dtype"] = spec.dtype
    data["dtype"] = spec.dtype
    return data


def _hybrid_config(spec: TinyLlamaSpec, vocab: int):  # -> GraniteMoeHybridConfig
    """Granite-4-H's layout at this size: a dense shared MLP (no experts), RoPE attention."""
    from transformers import GraniteMoeHybridConfig

    assert spec.layer_types is not None and spec.mamba_heads is not None
    config = GraniteMoeHybridConfig(
        vocab_size=vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        shared_intermediate_size=spec.intermediate,
        num_local_experts=0,
        num_experts_per_tok=0,
        num_hidden_layers=spec.num_layers,
        layer_types=["linear_attention" if t == MAMBA else t for t in spec.layer_types],
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_pos,
        position_embedding_type="rope",
        rope_theta=spec.rope_theta,
        mamba_n_heads=spec.mamba_heads,
        mamba_d_head=2 * spec.hidden // spec.mamba_heads,
        mamba_expand=2,
        mamba_d_state=spec.mamba_d_state,
        mamba_n_groups=1,
        mamba_d_conv=4,
        mamba_chunk_size=spec.mamba_chunk,
        mamba_conv_bias=True,
        mamba_proj_bias=False,
        rms_norm_eps=1e-5,
        initializer_range=spec.init_std,
        embedding_multiplier=1.0,
        residual_multiplier=1.0,
        attention_multiplier=1.0 / math.sqrt(spec.head_dim),
        logits_scaling=1.0,
        tie_word_embeddings=False,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )
    config.architectures = ["GraniteMoeHybridForCausalLM"]
    return config


def _write_hybrid(folder: Path, spec: TinyLlamaSpec, vocab: int, *, weights: bool) -> None:
    """The hybrid model through transformers: its Mamba2 weights (A_log, D, dt_bias, conv) need
    the model's own initialization, which a plain normal draw would not match. Seeded, so a
    build is reproducible; the LM head is redrawn wider, as for the Llama (_write_weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = _hybrid_config(spec, vocab)
    config_data = config.to_dict()
    config_data["dtype"] = spec.dtype
    if weights:
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            model.get_output_embeddings().weight.normal_(0.0, 2.0 / math.sqrt(spec.hidden))
        model.to(getattr(torch, spec.dtype)).save_pretrained(folder, safe_serialization=True)
    _write_json(folder / "config.json", config_data)
    # save_pretrained writes generation defaults of its own; keep the token ids only.
    _write_json(folder / "generation_config.json", {
        "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD,
    })


def _weight_shapes(spec: TinyLlamaSpec, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    h, q, kv, inter = spec.hidden, spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim, \
        spec.intermediate
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    return shapes


def _write_weights(path: Path, spec: TinyLlamaSpec, vocab: int) -> None:
    """Draw every tensor from one seeded generator, in a fixed order.

    Linear and embedding weights use the usual N(0, init_std). The LM head is drawn wider, so
    that logits spread over a few units and greedy decoding has a clear winner at each step:
    with HF's 0.02 the top two logits are often within float noise of each other, which would
    make token-level comparisons in tests depend on rounding.
    """
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(spec.seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in _weight_shapes(spec, vocab):
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape)
        else:
            std = 2.0 / math.sqrt(spec.hidden) if name == "lm_head.weight" else spec.init_std
            tensor = torch.empty(shape).normal_(0.0, std, generator=generator)
        tensors[name] = tensor.to(getattr(torch, spec.dtype)).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})


def content_digest(folder: str | os.PathLike[str]) -> str:
    """sha256 over the files that define the model, to check that builds are reproducible."""
    digest = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        digest.update(name.encode())
        digest.update((Path(folder) / name).read_bytes())
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m processfork_dev.model_builder",
        description="Build a random-weight model (for tests, demos and benchmarks) into PATH: a "
                    "Llama, or with --preset hybrid a Granite-4-style model with Mamba2 layers.",
    )
    parser.add_argument("path", help="output folder (reused when already built identically)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=None, help="weight seed (default 0)")
    args = parser.parse_args(argv)
    spec = PRESETS[args.preset]
    if args.seed is not None:
        spec = replace(spec, seed=args.seed)
    try:
        folder = build_model(args.path, spec)
    except ModelBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
