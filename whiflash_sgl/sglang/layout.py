"""Target-side arithmetic for serving two drafters from one target: which layers to capture, where each drafter's
features sit in the capture, and how many KV bytes per token the pool must budget. Pure Python, no SGLang.

SGLang's target models capture hidden states "before layer i" (``layers_to_capture``) in layer order, once per
layer, and concatenate them along the feature axis. Both drafters name layers the Hugging Face way ("after layer
k", i.e. before layer k + 1), except that EAGLE-3 without explicit ids defaults to before-layers
``[2, L // 2, L - 3]``. A single-drafter deployment lets each drafter's setter overwrite the capture list; serving
both, the target captures the sorted union once and each drafter reads its own columns of it.
"""

from __future__ import annotations

from dataclasses import dataclass


def eagle3_capture_layers(layer_ids, num_layers: int) -> list[int]:
    """The before-layer indices an EAGLE-3 drafter reads (its HF ids + 1, or SGLang's default triple)."""
    if layer_ids is None:
        return [2, num_layers // 2, num_layers - 3]
    return [int(i) + 1 for i in layer_ids]


def dflash_capture_layers(layer_ids) -> list[int]:
    """The before-layer indices a DFlash drafter reads (its HF target-layer ids + 1)."""
    if layer_ids is None:
        raise ValueError("a DFlash drafter needs explicit target layer ids")
    return [int(i) + 1 for i in layer_ids]


@dataclass(frozen=True)
class AuxLayout:
    """The union capture and each drafter's columns in it (column c = the c-th captured layer, width H each)."""

    capture: tuple[int, ...]  # before-layer indices, ascending, what ``model.layers_to_capture`` is set to
    eagle3_columns: tuple[int, ...]
    dflash_columns: tuple[int, ...]

    @property
    def hf_layer_ids(self) -> list[int]:
        """The union as HF layer ids: what ``set_eagle3_layers_to_capture`` takes to capture exactly ``capture``."""
        return [b - 1 for b in self.capture]

    def columns(self, paradigm: str) -> tuple[int, ...]:
        return {"eagle3": self.eagle3_columns, "dflash": self.dflash_columns}[paradigm]


def aux_layout(eagle3_capture, dflash_capture, num_layers: int) -> AuxLayout:
    """The union of both drafters' capture layers, and each one's columns in the concatenated capture.

    A drafter alone would see its own layers in ascending order, each once (the model walks its layers in order),
    so its columns are those of its sorted distinct layers; every layer must lie in ``[0, num_layers]``.
    """
    eagle = sorted({int(b) for b in eagle3_capture})
    dflash = sorted({int(b) for b in dflash_capture})
    bad = [b for b in eagle + dflash if not 0 <= b <= num_layers]
    if bad:
        raise ValueError(f"capture layers {bad} are outside the target's 0..{num_layers}")
    capture = sorted(set(eagle) | set(dflash))
    where = {b: i for i, b in enumerate(capture)}
    return AuxLayout(tuple(capture), tuple(where[b] for b in eagle), tuple(where[b] for b in dflash))


def select_columns(hidden, columns, num_captured: int):
    """The columns of a ``[N, num_captured * H]`` capture that one drafter reads, as ``[N, len(columns) * H]``."""
    rows, width = hidden.shape
    if width % num_captured:
        raise ValueError(f"capture width {width} is not a multiple of {num_captured} captured layers")
    if tuple(columns) == tuple(range(num_captured)):
        return hidden
    per_layer = hidden.view(rows, num_captured, width // num_captured)
    return per_layer[:, list(columns)].reshape(rows, -1)


def kv_bytes_per_token(num_kv_heads: int, head_dim: int, v_head_dim: int, num_layers: int, dtype_bytes: int) -> int:
    """Bytes one token costs in a KV pool: K and V rows for every layer."""
    return num_kv_heads * (head_dim + v_head_dim) * num_layers * dtype_bytes


def cell_size_with_dflash(cell_size: int, target_layers: int, dflash_layers: int,
                          dflash_bytes_per_token: int | None) -> int:
    """The target pool's per-token budget once the DFlash draft pool is counted in it.

    ``cell_size`` already holds the target's and the EAGLE-3 drafter's KV (SGLang adds the latter for any
    EAGLE-family algorithm). The DFlash draft pool lives beside them with one row per target slot, so its exact
    bytes per token are added; when they are unknown the target's per-layer cost is scaled by its layer count,
    rounding up so the budget never undercounts.
    """
    if cell_size <= 0:
        raise ValueError(f"cell size must be positive, got {cell_size}")
    if dflash_bytes_per_token:
        return cell_size + int(dflash_bytes_per_token)
    if target_layers <= 0 or dflash_layers <= 0:
        return cell_size
    return cell_size + -(-cell_size * dflash_layers // target_layers)
