"""The grid searches (clip search, the "search" grid) run over rows in cache-sized pieces: the same scales and zero
points as over the whole tensor at once, with and without per-row column weights."""
from __future__ import annotations

import pytest
import torch

from vlmq_export.calibrators import base


@pytest.mark.parametrize("col_weight", ["none", "per_row", "per_column"])
@pytest.mark.parametrize("grid", ["half", "extreme", "search"])
def test_pieces_give_the_whole_tensors_scales(monkeypatch, grid, col_weight):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3000, 64, generator=gen) * 0.02
    w[:, 3] *= 40  # outlier columns: the searches pick clipped ranges on some rows, not on others
    w[7] = 0.0  # an all-zero row
    cw = {"none": None, "per_row": torch.rand(3000, 64, generator=gen),
          "per_column": torch.rand(64, generator=gen)}[col_weight]
    monkeypatch.setattr(base, "SEARCH_CHUNK", 1000)  # 15 rows a piece, the last one shorter
    pieces = (base.group_scales(w, 7, True, cw, grid), base.group_zero_scales(w, 15, True, cw))
    monkeypatch.setattr(base, "SEARCH_CHUNK", 1 << 40)  # whole
    whole = (base.group_scales(w, 7, True, cw, grid), base.group_zero_scales(w, 15, True, cw))
    assert torch.equal(pieces[0], whole[0])
    assert torch.equal(pieces[1][0], whole[1][0]) and torch.equal(pieces[1][1], whole[1][1])
    assert pieces[0].shape == (3000,) and (whole[0] < base.sym_scale(w, 7, grid) - 1e-9).any()  # some rows clipped
