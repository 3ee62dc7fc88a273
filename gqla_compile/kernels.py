"""The decode core's matmuls on CPU through oneDNN, where its inner product reads the cache as it lies.

torch.matmul on CPU runs MKL, which on this project's AMD CPU (AVX-512) takes its AVX2 code path: about
100 GFLOP/s on one core, where oneDNN's AVX-512 inner product runs 225. oneDNN's inner product computes
``x @ w.T`` with ``x`` dense rows and ``w`` dense either way, which fits the cache: scores keys-major
(cached rows @ q^T) or query-major (q @ cached rows^T), and values (probabilities @ cached rows, the rows
read as a transposed weight). It is wrapped in a custom op, so Inductor calls it as it is (its own lowering
of ``mkldnn._linear_pointwise`` wants constant weights).

Which library runs what was measured on that CPU (one thread, 8k cached rows of 64, 96 and 288 floats,
several hundred MB streamed from memory; GB/s of cache read): the values product streams 1.3-2.3x faster
on oneDNN at every query row count (288 floats, 16 rows: 16.0 against MKL's 8.1; 96 floats, 4 rows: 23.5
against 14.5). Scores: MKL's keys-major product is faster at 2-4 rows (96 floats, 4 rows: 13.4 against
11.1), oneDNN from 8 rows on (288 floats, 16 rows: 10.5 against 6.7), where the FLOP rate starts to count.
"""

from __future__ import annotations

import math

import torch

#: Query rows per cached row from which the scores run on oneDNN (see the module docstring).
SCORE_ROWS_ONEDNN = 8
#: A value read as a leading slice of wider cached rows (the absorbed latent inside [c ; k_R]) is read whole
#: and the extra columns dropped, up to this much extra work; beyond it torch.matmul reads the slice.
MAX_EXTRA_COLUMNS = 0.25
DTYPES = (torch.float32, torch.bfloat16)
#: Read once: torch.compile does not trace torch.backends.mkldnn.is_available (a graph break per call).
AVAILABLE = torch.backends.mkldnn.is_available()


def inner_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` on oneDNN's inner product: x [M, K] dense rows, weight [N, K] dense either way."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@torch.library.custom_op("gqla_compile::onednn_matmul", mutates_args=())
def onednn_matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x [N, M, K] @ y [N, K, P], one oneDNN inner product per leading index. ``x`` has dense rows; ``y``
    dense rows (a row stride above P: a leading column slice of wider rows, read whole) or dense columns."""
    out = x.new_empty(x.shape[0], x.shape[1], y.shape[2])
    width = y.shape[2]
    for i in range(x.shape[0]):
        rows = y[i]
        if rows.stride(1) == 1 and rows.stride(0) > width:  # a column slice of wider rows
            if not _storage_holds_rows(rows):  # its last row ends the storage: the slice as torch reads it
                out[i] = torch.matmul(x[i], rows)
                continue
            rows = rows.as_strided((rows.shape[0], rows.stride(0)), rows.stride())
        out[i] = inner_product(x[i], rows.t())[:, :width]
    return out


@onednn_matmul.register_fake
def _(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], x.shape[1], y.shape[2])


def score_matmul(x: torch.Tensor, y: torch.Tensor, rows_per_cached_row: int) -> torch.Tensor:
    """``x @ y`` over the head dims (query rows against cached rows, either way round): on oneDNN from
    SCORE_ROWS_ONEDNN query rows per cached row where the operands allow (:func:`_onednn_reads`)."""
    return _cache_matmul(x, y, onednn=rows_per_cached_row >= SCORE_ROWS_ONEDNN)


def value_matmul(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``probs @ values`` over the cached tokens: on oneDNN where the operands allow (:func:`_onednn_reads`)."""
    return _cache_matmul(probs, values, onednn=True)


def _cache_matmul(x: torch.Tensor, y: torch.Tensor, *, onednn: bool) -> torch.Tensor:
    if not (onednn and _onednn_reads(x, y)):
        return torch.matmul(x, y)
    lead = x.shape[:-2]
    out = onednn_matmul(x.reshape(-1, *x.shape[-2:]), y.reshape(-1, *y.shape[-2:]))
    return out.view(*lead, x.shape[-2], y.shape[-1])


def _onednn_reads(x: torch.Tensor, y: torch.Tensor) -> bool:
    """CPU, float32 or bfloat16, same leading dims (no broadcasting), no gradient, ``x`` contiguous and ``y``
    contiguous either way round, or (values) a leading column slice of contiguous rows at most
    MAX_EXTRA_COLUMNS wider. Strides are read only for that slice: under automatic dynamic shapes Dynamo
    failed reading an operand's strides (the cost-model benchmark's grid), where it reads contiguity."""
    if (x.device.type != "cpu" or x.dtype not in DTYPES or y.dtype != x.dtype or x.dim() != y.dim()
            or x.dim() < 2 or x.shape[:-2] != y.shape[:-2] or not AVAILABLE):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
        return False
    if not x.is_contiguous():
        return False
    return y.is_contiguous() or y.transpose(-1, -2).is_contiguous() or _column_slice_of_rows(y)


def _column_slice_of_rows(y: torch.Tensor) -> bool:
    """Whether ``y`` is the first columns of dense rows at most MAX_EXTRA_COLUMNS wider, its leading dims
    flattening into one without a copy."""
    width = y.shape[-1]
    strides = y.stride()
    if strides[-1] != 1 or not width <= strides[-2] <= math.floor(width * (1 + MAX_EXTRA_COLUMNS)):
        return False
    for i in range(y.dim() - 3):
        if y.shape[i + 1] != 1 and strides[i] != strides[i + 1] * y.shape[i + 1]:
            return False
    return True


def _storage_holds_rows(rows: torch.Tensor) -> bool:
    """Whether a column slice's last row can be read whole (its storage goes on past the slice)."""
    end = rows.storage_offset() + rows.shape[0] * rows.stride(0)
    return end * rows.element_size() <= rows.untyped_storage().nbytes()
