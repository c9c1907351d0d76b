"""What the worker knows about its engine: layer order and the engine fingerprint."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch

from .fingerprint import Fingerprint, config_hash

if TYPE_CHECKING:
    from vllm.config import VllmConfig

    from .codec import PageCodec

__all__ = ["engine_fingerprint", "layer_order", "model_kv_heads"]

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def layer_order(kv_caches: dict[str, torch.Tensor]) -> list[str]:
    """Layer names in model order, each distinct buffer once.

    Pages concatenate layers in this order, so it must not depend on dict order.
    Layers that share one KV buffer (cross-layer KV sharing) are stored once.
    """

    def key(name: str) -> tuple[int, str]:
        match = _LAYER_INDEX.search("." + name + ".")
        return (int(match.group(1)) if match else -1, name)

    seen: set[tuple[int, tuple[int, ...]]] = set()
    names: list[str] = []
    for name in sorted(kv_caches, key=key):
        tensor = kv_caches[name]
        ident = (tensor.data_ptr(), tuple(tensor.shape))
        if ident in seen:
            continue
        seen.add(ident)
        names.append(name)
    return names


def model_kv_heads(vllm_config: VllmConfig, rank_heads: int) -> int:
    """The model's KV heads, which the fingerprint records at every TP size: pages of one KV
    head are named by the model's head index. A rank of a tensor-parallel engine holds only
    its share (or, past one rank per head, a replica of one), and a TP-1 engine holds all of
    them, so its tensors say it without asking the model config."""
    if vllm_config.parallel_config.tensor_parallel_size == 1:
        return rank_heads
    return int(vllm_config.model_config.get_total_num_kv_heads())


def engine_fingerprint(
    vllm_config: VllmConfig, codec: PageCodec, *, backend: str, isa: str | None,
    kv_groups: list[dict[str, Any]] | None = None,
) -> Fingerprint:
    """Everything that must match for this engine to load another engine's pages."""
    import vllm
    from vllm import envs

    model_config = vllm_config.model_config
    parallel = vllm_config.parallel_config
    geo = codec.geometry
    try:
        hf_dict = model_config.hf_config.to_dict()
    except (AttributeError, TypeError):  # configs without to_dict: use their attributes
        hf_dict = dict(vars(model_config.hf_config))
    on_cpu = codec.device.type == "cpu"
    return Fingerprint(
        model=model_config.served_model_name or model_config.model,
        model_config_hash=config_hash(hf_dict),
        vllm_version=vllm.__version__,
        backend=backend,
        isa=isa if on_cpu else None,
        device=codec.device.type,
        block_size=geo.block_size,
        kv_dtype=str(geo.dtype).removeprefix("torch."),
        num_layers=geo.num_layers,
        num_kv_heads=model_kv_heads(vllm_config, geo.num_kv_heads),
        head_dim=geo.head_dim,
        layout=codec.layout,
        tp_size=parallel.tensor_parallel_size,
        batch_invariant=bool(envs.VLLM_BATCH_INVARIANT),
        threads=torch.get_num_threads() if on_cpu else None,
        kv_groups=kv_groups,
    )
