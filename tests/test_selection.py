"""largest_k_masks: the k largest magnitudes over several tensors at once (one global
threshold, e.g. AC/DC's compression), against a stable descending sort written here."""

import pytest
import torch

from sparsekernels.formats import kept_count, magnitude_mask
from sparsekernels.formats.masks import largest_k_masks


def sorted_definition(tensors, k):
    """The first k of a stable sort over the concatenation: |t| descending, NaN on top."""
    flat = [abs(float(v)) for t in tensors for v in t.double().reshape(-1).tolist()]
    rank = sorted(range(len(flat)), key=lambda i: (0 if flat[i] != flat[i] else 1, -flat[i] if flat[i] == flat[i] else 0, i))
    keep = set(rank[:k])
    out, start = [], 0
    for t in tensors:
        out.append(torch.tensor([start + i in keep for i in range(t.numel())], dtype=torch.bool).view(t.shape))
        start += t.numel()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_largest_k_masks_match_a_stable_sort(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    for trial in range(60):
        tensors = []
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            n = int(torch.randint(0, 30, (1,), generator=g))
            t = torch.randn(n, generator=g)
            if trial % 2:
                t = t.round()  # many ties
            if trial % 3 == 0 and n:
                t[torch.randint(0, n, (2,), generator=g)] = float("nan")
            if trial % 5 == 0 and n:
                t[-1] = -float("inf")
            tensors.append(t.to(dtype).reshape(n, 1) if trial % 4 == 0 else t.to(dtype))
        total = sum(t.numel() for t in tensors)
        k = int(torch.randint(0, total + 1, (1,), generator=g))
        got = largest_k_masks(tensors, k)
        expected = sorted_definition(tensors, k)
        assert all(torch.equal(a, e) for a, e in zip(got, expected)), (trial, tensors, k)
        assert [tuple(m.shape) for m in got] == [tuple(t.shape) for t in tensors]


def test_one_tensor_equals_magnitude_mask(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(37, 29, generator=g).round(decimals=1)
    for s in (0.0, 0.3, 0.9, 0.99):
        k = kept_count(w.numel(), s)
        assert torch.equal(largest_k_masks([w], k)[0], magnitude_mask(w, s))


def test_large_values_span_both_radix_levels(seed):
    """Magnitudes that share their upper 16 bits (the cut-off bin holds many entries)."""
    g = torch.Generator().manual_seed(seed)
    t = 1.0 + torch.rand(5000, generator=g) * 1e-3  # one upper-16-bit bin, distinct lower bits
    k = 1234
    got = largest_k_masks([t[:2000], t[2000:]], k)
    assert torch.equal(torch.cat(got), sorted_definition([t], k)[0])


def test_bad_k():
    with pytest.raises(ValueError, match="k must be a non-negative int"):
        largest_k_masks([torch.ones(3)], -1)
    with pytest.raises(ValueError, match="exceeds"):
        largest_k_masks([torch.ones(3)], 4)
