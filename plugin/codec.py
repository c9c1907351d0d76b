"""Page codecs: map (layer tensors, block id) to one K page and one V page.

A page is one block's K (or V) for *every* layer, concatenated layer by layer, in
the engine's per-block layout.  Keeping every layout detail here lets the rest of
the plugin move opaque byte pages between the engine and the store.

Codecs run in the worker process.  They work on any torch device: on CUDA the
gather runs on the GPU and one device-to-host copy fills a pinned staging tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "BlockMajorKVCodec",
    "CpuAttnCodec",
    "PageCodec",
    "SplitLastDimCodec",
    "StackedKVCodec",
    "blocks_axis_of",
    "codec_for",
]

BlockView = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class PageGeometry:
    """Shapes a codec derives from the live tensors; recorded in fingerprints."""

    num_blocks: int
    num_layers: int
    num_kv_heads: int
    block_size: int
    head_dim: int
    dtype: torch.dtype

    @property
    def elems_per_layer(self) -> int:
        return self.num_kv_heads * self.block_size * self.head_dim

    @property
    def page_bytes(self) -> int:
        return self.num_layers * self.elems_per_layer * self.dtype.itemsize


class PageCodec:
    """Moves whole blocks between paged layer tensors and a staging tensor.

    The staging tensor has shape ``[n, 2, num_layers, elems_per_layer]``: row ``i``
    holds block ``i``'s K page (index 0) then its V page (index 1), so the pages of a
    gather are contiguous, in ``k0, v0, k1, v1, ...`` order, ready for the store.
    Subclasses provide per-layer K and V views indexed by block id first, and the
    token axis of one block's K and V (for zeroing the unused tail of a partial block).
    """

    layout: str = "abstract"
    #: KV-head axis inside one block's K / V view: a page of one head (format v4) holds that
    #: head's slice of each layer's view.
    head_axis: int = 0
    #: token axis inside one block's [heads, ...] K / V view; None = unknown, no masking.
    k_token_axis: int | None = None
    v_token_axis: int | None = None

    def __init__(self, layers: list[torch.Tensor], geometry: PageGeometry):
        self.layers = layers
        self.geometry = geometry
        self._k_views = [self.k_view(t) for t in layers]
        self._v_views = [self.v_view(t) for t in layers]
        self.device = layers[0].device

    @property
    def k_views(self) -> list[torch.Tensor]:
        """Per layer, the K of every block, indexed by block id first."""
        return self._k_views

    @property
    def v_views(self) -> list[torch.Tensor]:
        return self._v_views

    # --- layout hooks -------------------------------------------------------
    def k_view(self, layer: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def v_view(self, layer: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def k_block_shape(self) -> tuple[int, ...]:
        g = self.geometry
        return (g.num_kv_heads, g.block_size, g.head_dim)

    def v_block_shape(self) -> tuple[int, ...]:
        g = self.geometry
        return (g.num_kv_heads, g.block_size, g.head_dim)

    # --- data movement ------------------------------------------------------
    @property
    def page_bytes(self) -> int:
        return self.geometry.page_bytes

    def new_staging(self, n: int) -> torch.Tensor:
        """A host staging tensor for ``n`` blocks (pinned when the cache is on a GPU)."""
        g = self.geometry
        pin = self.device.type == "cuda"
        return torch.empty((n, 2, g.num_layers, g.elems_per_layer), dtype=g.dtype, pin_memory=pin)

    def gather(self, block_ids: list[int], out: torch.Tensor) -> torch.Tensor:
        """Copy blocks into ``out`` (a host staging tensor); returns ``out``.

        On a GPU this synchronizes; the staged page path uses ``gather_on_device`` instead.
        """
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        if self.device.type == "cpu":
            return self.gather_on_device(idx, out)
        dev = torch.empty(out.shape, dtype=out.dtype, device=self.device)
        out.copy_(self.gather_on_device(idx, dev))
        return out

    def gather_on_device(self, idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Copy blocks ``idx`` into ``out[:len(idx)]``, a staging tensor on the cache's device."""
        n = idx.numel()
        for layer, (k, v) in enumerate(zip(self._k_views, self._v_views)):
            out[:n, 0, layer].copy_(k.index_select(0, idx).reshape(n, -1))
            out[:n, 1, layer].copy_(v.index_select(0, idx).reshape(n, -1))
        return out

    def scatter(self, block_ids: list[int], src: torch.Tensor) -> None:
        """Write staged pages into the engine's blocks (synchronously on a GPU)."""
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        if self.device.type != "cpu":
            src = src.to(self.device, non_blocking=True)
        self.scatter_on_device(idx, src)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def scatter_on_device(self, idx: torch.Tensor, src: torch.Tensor) -> None:
        """Write ``src[:len(idx)]`` (staged pages on the cache's device) into blocks ``idx``."""
        n = idx.numel()
        for layer, (k, v) in enumerate(zip(self._k_views, self._v_views)):
            k.index_copy_(0, idx, src[:n, 0, layer].reshape(n, *k.shape[1:]))
            v.index_copy_(0, idx, src[:n, 1, layer].reshape(n, *v.shape[1:]))

    def mask_tail(self, row: torch.Tensor, valid_tokens: int) -> None:
        """Zero token slots ``>= valid_tokens`` of one staged block (both pages).

        Slots past a sequence's end hold whatever the block's previous owner left
        there, possibly another client's data: zeroing them keeps snapshots private
        and makes partial pages deterministic, so they deduplicate.
        """
        if self.k_token_axis is None or self.v_token_axis is None:
            return
        g = self.geometry
        k = row[0].view(g.num_layers, *self.k_block_shape())
        v = row[1].view(g.num_layers, *self.v_block_shape())
        k.narrow(self.k_token_axis + 1, valid_tokens, g.block_size - valid_tokens).zero_()
        v.narrow(self.v_token_axis + 1, valid_tokens, g.block_size - valid_tokens).zero_()


class CpuAttnCodec(PageCodec):
    """vLLM's CPU attention backend (``CPU_ATTN``).

    Each layer is ``[num_blocks, num_kv_heads, block_size, 2 * head_dim]``; inside a
    (block, head) row the first ``block_size * head_dim`` values are K and the next
    ones are V, each in the kernel's ISA-specific arrangement.  For the ``vec`` ISA,
    K is stored transposed (``[head_dim, block_size]``) and V as ``[block_size,
    head_dim]``; for other ISAs the token axis is not relied on and tails stay as is.
    """

    layout = "cpu_attn/BHN2D"

    def __init__(self, layers: list[torch.Tensor], geometry: PageGeometry, isa: str):
        self.isa = isa
        if isa == "vec":
            self.k_token_axis, self.v_token_axis = 2, 1
        super().__init__(layers, geometry)

    def _halves(self, layer: torch.Tensor) -> torch.Tensor:
        b, h, n, c = layer.shape
        return layer.view(b, h, 2, n * (c // 2))

    def k_view(self, layer: torch.Tensor) -> torch.Tensor:
        return self._halves(layer)[:, :, 0]

    def v_view(self, layer: torch.Tensor) -> torch.Tensor:
        return self._halves(layer)[:, :, 1]

    def k_block_shape(self) -> tuple[int, ...]:
        g = self.geometry
        if self.k_token_axis == 2:
            return (g.num_kv_heads, g.head_dim, g.block_size)
        return (g.num_kv_heads, g.block_size * g.head_dim)

    def v_block_shape(self) -> tuple[int, ...]:
        g = self.geometry
        if self.v_token_axis == 1:
            return (g.num_kv_heads, g.block_size, g.head_dim)
        return (g.num_kv_heads, g.block_size * g.head_dim)


class SplitLastDimCodec(PageCodec):
    """Backends whose layer tensor is logically ``[B, H, N, 2*D]`` with K = ``[..., :D]``.

    vLLM 0.32's FlashAttention (and Triton, FlashInfer) backends use this logical
    shape under any physical stride order (e.g. ``LBNHC``).  Pages are stored in the
    logical ``[H, N, D]`` order, so they do not depend on the stride order.
    """

    layout = "split_last/BHN2D"
    k_token_axis = 1
    v_token_axis = 1

    def k_view(self, layer: torch.Tensor) -> torch.Tensor:
        return layer[..., : self.geometry.head_dim]

    def v_view(self, layer: torch.Tensor) -> torch.Tensor:
        return layer[..., self.geometry.head_dim :]


class StackedKVCodec(PageCodec):
    """Older FlashAttention layout: ``[2, num_blocks, block_size, num_kv_heads, head_dim]``.

    Pages are stored as ``[N, H, D]`` per layer, the tensor's own order.
    """

    layout = "stacked_kv/2BNHD"
    head_axis = 1
    k_token_axis = 0
    v_token_axis = 0

    def k_view(self, layer: torch.Tensor) -> torch.Tensor:
        return layer[0]

    def v_view(self, layer: torch.Tensor) -> torch.Tensor:
        return layer[1]

    def k_block_shape(self) -> tuple[int, ...]:
        g = self.geometry
        return (g.block_size, g.num_kv_heads, g.head_dim)

    v_block_shape = k_block_shape


class BlockMajorKVCodec(StackedKVCodec):
    """Triton and FlashInfer: ``[num_blocks, 2, block_size, num_kv_heads, head_dim]``.

    The same pages as ``StackedKVCodec`` (``[N, H, D]`` per layer), with K and V interleaved per
    block instead of stacked per layer. FlashInfer's ``HND`` stride order permutes the physical
    layout, not this logical shape, which is what vLLM hands to connectors.
    """

    layout = "block_kv/B2NHD"

    def k_view(self, layer: torch.Tensor) -> torch.Tensor:
        return layer[:, 0]

    def v_view(self, layer: torch.Tensor) -> torch.Tensor:
        return layer[:, 1]


#: A block count no real cache dimension equals, to find where a backend puts the blocks.
_PROBE_BLOCKS = 1009


def blocks_axis_of(backend_cls: object, block_size: int, num_kv_heads: int,
                   head_dim: int) -> int | None:
    """Where the attention backend's own ``get_kv_cache_shape`` puts the block axis.

    Asking the backend the worker registered, rather than reading the tensor's shape alone,
    tells ``[2, B, ...]`` from ``[B, 2, ...]`` even when a dimension happens to be 2. None when
    the backend does not say.
    """
    get_shape = getattr(backend_cls, "get_kv_cache_shape", None)
    if get_shape is None:
        return None
    try:
        shape = tuple(get_shape(_PROBE_BLOCKS, block_size, num_kv_heads, head_dim))
    except (TypeError, ValueError, NotImplementedError):  # it validates differently: use shapes
        return None
    return shape.index(_PROBE_BLOCKS) if shape.count(_PROBE_BLOCKS) == 1 else None


def codec_for(
    backend: str, layers: list[torch.Tensor], *, head_dim: int, isa: str | None = None,
    blocks_axis: int | None = None,
) -> PageCodec:
    """Pick the codec for an attention backend and the layer tensors it allocated.

    ``blocks_axis``: where the backend's declared KV-cache shape has the block axis (see
    ``blocks_axis_of``); without it, a 5-D tensor's layout is read from where its 2 is.
    """
    first = layers[0]
    if first.dim() == 5:
        if blocks_axis is None:
            blocks_axis = 1 if first.shape[0] == 2 else 0 if first.shape[1] == 2 else None
        if blocks_axis == 1 and first.shape[0] == 2:
            _, b, n, h, d = first.shape
            return StackedKVCodec(layers, PageGeometry(b, len(layers), h, n, d, first.dtype))
        if blocks_axis == 0 and first.shape[1] == 2:
            b, _, n, h, d = first.shape
            return BlockMajorKVCodec(layers, PageGeometry(b, len(layers), h, n, d, first.dtype))
        raise ValueError(f"unsupported KV cache tensor shape {tuple(first.shape)} for {backend}")
    if first.dim() != 4:
        raise ValueError(f"unsupported KV cache tensor shape {tuple(first.shape)} for {backend}")
    b, h, n, c = first.shape
    if c != 2 * head_dim:
        raise ValueError(
            f"unsupported KV cache tensor shape {tuple(first.shape)} for {backend}: "
            f"last dim {c} is not 2 * head_dim ({head_dim})"
        )
    geo = PageGeometry(b, len(layers), h, n, head_dim, first.dtype)
    if backend.upper().startswith("CPU"):
        return CpuAttnCodec(layers, geo, isa or "unknown")
    return SplitLastDimCodec(layers, geo)
