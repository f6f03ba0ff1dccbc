"""NumPy's row-wise argmax and top-k give exactly PyTorch's indices and values."""

import pytest
import torch

from whiflash_sgl.rowwise import argmax_rows, topk_rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_argmax_and_topk_equal_torch_on_logits(dtype):
    logits = torch.randn(6, 4096, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert torch.equal(argmax_rows(logits), logits.argmax(-1))
    assert torch.equal(argmax_rows(logits[2]), logits[2].argmax(-1))  # one row, no batch dimension
    for k in (1, 2, 4):
        values, indices = topk_rows(logits, k)
        expected = logits.topk(k, dim=-1)
        assert torch.equal(indices, expected.indices) and torch.equal(values, expected.values)
    values, indices = topk_rows(logits[3], 3)
    assert torch.equal(indices, logits[3].topk(3).indices) and torch.equal(values, logits[3].topk(3).values)


def test_equal_maxima_go_in_index_order_and_short_rows_stay_distinct():
    tied = torch.tensor([[1.0, 3.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    assert argmax_rows(tied).tolist() == [1, 0]
    assert topk_rows(tied, 3)[1].tolist() == [[1, 2, 3], [0, 1, 2]]
    masked = torch.full((2, 6), -torch.inf)
    masked[0, 4], masked[1, 1], masked[1, 5] = 0.5, 2.0, 1.0
    values, indices = topk_rows(masked, 3)  # fewer finite values than k: still k distinct indices
    assert torch.equal(values, masked.topk(3, dim=-1).values)
    assert indices[0, 0] == 4 and indices[1, :2].tolist() == [1, 5]
    assert all(len(set(row)) == 3 for row in indices.tolist())
