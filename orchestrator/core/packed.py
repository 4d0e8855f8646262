"""The core's linear layers with their weights packed once for oneDNN (CPU inference).

A decoding pass multiplies a few rows (one token per turn in a batch, a jump of ~10, a prompt of
~40) by every weight matrix. PyTorch's default CPU path (MKL ``sgemm``) is fine for one row (a
matrix-vector product) and for hundreds, but for 2–64 rows it repacks the weight on every call: on the
2-core machine the 30-layer SmolLM2 core's linear layers took 47 ms for 2 rows against 29 ms for one,
so a batched pass of two turns cost nearly two passes. oneDNN with the weight reordered once at load
(``torch.ops.mkldnn._reorder_linear_weight``, what ``torch.compile``'s CPU backend does when it freezes
a model) reads the packed weight as it is: 22 ms for 1 row, 25 for 2, 31 for 8, 43 for 16 (the
tied output layer 3.7 vs 9.9 ms for one row). From a few hundred rows on (a batch of 16 prompts) MKL
is ~10 % faster, so long inputs go through in chunks of :data:`CHUNK` rows, which costs the same.

Each output row depends only on its own input row (the same packed kernel whatever the number of
rows; tests/orchestrator/core/test_packed.py checks it), so a turn decodes to the same tokens alone or
in a batch. Against MKL the sums come in another order (differences ~1e-4 in the logits).

:func:`pack_linears` swaps the modules in place; the packed weights are plain attributes, not
parameters (an inference-only, CPU-only layout: the model cannot be trained or moved afterwards).
"""

from __future__ import annotations

from typing import Any

#: rows per oneDNN call for long inputs (oneDNN's packed kernel is faster than MKL up to a few hundred)
CHUNK = 160


def available() -> bool:
    """Whether this PyTorch build has oneDNN's packed linear kernels."""
    import torch

    ops = getattr(torch.ops, "mkldnn", None)
    return bool(torch.backends.mkldnn.is_available() and ops is not None
                and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))


def _module_class() -> type:
    import torch

    class PackedLinear(torch.nn.Module):
        """``nn.Linear`` for inference with its weight reordered once for oneDNN (see the module doc)."""

        def __init__(self, linear: torch.nn.Linear) -> None:
            super().__init__()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            with torch.no_grad():
                self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().contiguous())
                self.packed_bias = None if linear.bias is None else linear.bias.detach().clone()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            lead = x.shape[:-1]
            rows = x.reshape(-1, self.in_features).contiguous()
            if rows.shape[0] <= CHUNK:
                out = self._rows(rows)
            else:
                out = torch.cat([self._rows(part) for part in rows.split(CHUNK)])
            return out.reshape(*lead, self.out_features)

        def _rows(self, rows: torch.Tensor) -> torch.Tensor:
            return torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.packed_bias, "none", [], "")

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN packed"

    return PackedLinear


#: modules left as they are: the image side runs once per image, and its weights are read elsewhere
#: (``orchestrator.runtime.sees_pixels`` checks whether the projector's last layer is still zero)
EXCLUDE = ("vision_tower", "multi_modal_projector")


def pack_linears(model: Any, exclude: tuple[str, ...] = EXCLUDE) -> int:
    """Replace every float32 ``nn.Linear`` of ``model`` (on the CPU) by a packed one, in place, except
    those inside a module named in ``exclude``; the output layer too (tied to the input embeddings, it
    gets a packed copy). Returns how many were packed (0 where oneDNN is unavailable or the model is
    not a float32 CPU model)."""
    import torch

    if not available():
        return 0
    packed_class = _module_class()
    targets = [(name, mod) for name, mod in model.named_modules()
               if type(mod) is torch.nn.Linear and mod.weight.device.type == "cpu"
               and mod.weight.dtype == torch.float32 and not set(name.split(".")) & set(exclude)]
    for name, mod in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, packed_class(mod))
    return len(targets)
