"""Pure tensor functions on sparse topologies: counts, sampling, selection, invariant checks.

A layer with ``n_in`` inputs and ``n_out`` outputs has ``n_slots = n_out * n_in`` possible
connections. A connection is identified by its **key** ``row * n_in + col`` (row = output
neuron, col = input neuron), an int64. A topology is a 1-D LongTensor of keys, **sorted
ascending and unique** -- which is also CSR (row-major) order, so the i-th key belongs to the
i-th stored value on every backend.

Nothing here touches ``nn.Module`` or does I/O. Nothing here allocates an ``n_out x n_in``
tensor unless the layer is already dense enough that its connections are of that order
(documented per function), so these functions scale with the number of connections.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

__all__ = [
    "TopologyError",
    "check_topology",
    "contains",
    "er_count",
    "erk_counts",
    "keys_to_edge_index",
    "multinomial_with_replacement",
    "place_growth",
    "random_keys",
    "sample_free",
    "select_lowest",
    "top_dense_slots",
    "top_gradient_slots",
    "uniform_count",
    "unique_in_order",
]

_LONG = torch.long


class TopologyError(RuntimeError):
    """A topology broke one of its invariants (count, order, duplicates, range)."""


# --------------------------------------------------------------------------- counts


def er_count(n_in: int, n_out: int, epsilon: float) -> int:
    """Connections of an Erdős–Rényi layer (Mocanu et al. 2018): ``ε·(n_in+n_out)``, rounded,
    at least 1, at most ``n_in·n_out`` (a layer whose count reaches that is dense)."""
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
    return int(min(max(1, round(epsilon * (n_in + n_out))), n_in * n_out))


def uniform_count(n_in: int, n_out: int, density: float) -> int:
    """Connections of a layer at a given density in (0, 1], rounded, at least 1."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    return int(min(max(1, round(density * n_in * n_out)), n_in * n_out))


def erk_counts(shapes: Sequence[tuple[int, int]], density: float) -> list[int]:
    """RigL's Erdős–Rényi(-Kernel) allocation of a global density over layers.

    ``shapes`` holds ``(n_in, n_out)`` per layer. Each layer's density is proportional to
    ``(n_in + n_out) / (n_in * n_out)``, scaled so that the total number of connections is
    ``density * Σ n_in·n_out``. Layers whose density would exceed 1 become dense and the scale
    is solved again for the rest (as RigL's ``get_sparsities`` does).
    """
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    sizes = [n_in * n_out for n_in, n_out in shapes]
    raw = [(n_in + n_out) / (n_in * n_out) for n_in, n_out in shapes]
    dense: set[int] = set()
    while True:
        budget = density * sum(sizes) - sum(sizes[i] for i in dense)
        weight = sum(raw[i] * sizes[i] for i in range(len(shapes)) if i not in dense)
        scale = budget / weight if weight > 0 else 0.0
        newly_dense = {i for i in range(len(shapes)) if i not in dense and scale * raw[i] >= 1}
        if not newly_dense:
            break
        dense |= newly_dense
    return [
        sizes[i] if i in dense else int(min(max(1, round(scale * raw[i] * sizes[i])), sizes[i]))
        for i in range(len(shapes))
    ]


# --------------------------------------------------------------------------- small helpers


def keys_to_edge_index(keys: torch.Tensor, n_in: int) -> torch.Tensor:
    """``LongTensor[nnz]`` of keys -> ``LongTensor[2, nnz]`` (row 0: output, row 1: input)."""
    return torch.stack([keys // n_in, keys % n_in])


def contains(sorted_keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Boolean mask, ``queries[i] in sorted_keys``; ``sorted_keys`` must be sorted. O(q log n)."""
    if sorted_keys.numel() == 0 or queries.numel() == 0:
        return torch.zeros(queries.shape, dtype=torch.bool, device=queries.device)
    pos = torch.searchsorted(sorted_keys, queries).clamp_(max=sorted_keys.numel() - 1)
    return sorted_keys[pos] == queries


def unique_in_order(values: torch.Tensor) -> torch.Tensor:
    """Distinct elements of a 1-D tensor, in order of first occurrence.

    Keeping draw order (rather than sorting) is what makes "the first g distinct draws" a
    uniform sample without replacement, and keeps growth deterministic for a given generator.
    """
    if values.numel() == 0:
        return values
    uniq, inverse = torch.unique(values, return_inverse=True)
    position = torch.arange(values.numel(), device=values.device)
    first = torch.full((uniq.numel(),), values.numel(), dtype=_LONG, device=values.device)
    first.scatter_reduce_(0, inverse, position, "amin")
    return values[first[inverse] == position]  # a mask keeps draw order without another sort


def select_lowest(scores: torch.Tensor, k: int, protected: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of the ``k`` lowest scores, never a ``protected`` one (``[n]`` bool); ties go
    to the lower position (stable)."""
    candidates = torch.arange(scores.numel()) if protected is None else (~protected).nonzero().squeeze(1)
    if not 0 <= k <= candidates.numel():
        raise ValueError(f"cannot select {k} of {candidates.numel()} unprotected scores")
    if k == 0:
        return candidates[:0]
    values = scores[candidates]
    # O(n) instead of a full sort: everything below the k-th smallest value, then the first
    # positions among those equal to it (the same result as a stable sort's first k).
    threshold = values.kthvalue(k).values
    below = (values < threshold).nonzero().squeeze(1)
    equal = (values == threshold).nonzero().squeeze(1)[: k - below.numel()]
    chosen = torch.cat([below, equal])
    return candidates[chosen[torch.sort(values[chosen], stable=True).indices]]


# --------------------------------------------------------------------------- sampling


def multinomial_with_replacement(weights: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``torch.multinomial(weights, n, replacement=True, generator=generator)``, the same draws
    and the same generator state afterwards, ~1.5x faster on CPU for thousands of draws.

    PyTorch's CPU kernel forms the cumulative distribution as sequential float sums, divides it
    by the total, sets its last entry to 1, and binary-searches one double-precision uniform per
    draw. This does the same with NumPy's sequential ``cumsum`` (same dtype, same order of
    additions), one ``torch.rand`` call (the same uniforms: both take 53 bits of one 64-bit draw
    each) and ``searchsorted``. A property test checks the identity draw for draw; one draw
    (PyTorch's own fast path), other dtypes and non-CPU weights go to ``torch.multinomial``.
    """
    ours = n > 1 and weights.dtype == torch.float32 and weights.device.type == "cpu" and weights.dim() == 1
    if not ours or not (bool((weights >= 0).all()) and bool(weights.isfinite().all()) and float(weights.sum()) > 0):
        return torch.multinomial(weights, n, replacement=True, generator=generator)  # with its own errors
    cumulative = np.cumsum(weights.numpy(), dtype=np.float32)
    cumulative /= cumulative[-1]
    cumulative[-1] = 1
    uniforms = torch.rand(n, dtype=torch.float64, generator=generator)
    return torch.searchsorted(torch.from_numpy(cumulative).double(), uniforms)


def sample_free(
    existing: torch.Tensor, n_slots: int, count: int, generator: torch.Generator
) -> torch.Tensor:
    """``count`` distinct keys drawn uniformly from the slots not in ``existing`` (sorted).

    Returns keys in draw order (unsorted). While at least half the slots are free and at most
    half of the free ones are drawn, this is rejection sampling with O(count) expected work and
    memory. Otherwise it enumerates the free slots, which costs O(n_slots) -- of the same order
    as the layer's connections or the draw. (Rejection sampling for nearly every free slot, e.g.
    a layer created full for gradual pruning from dense, is a coupon collector: its last keys
    took tens of minutes on a 784 x 1000 layer.)
    """
    n_free = n_slots - existing.numel()
    if not 0 <= count <= n_free:
        raise ValueError(f"cannot place {count} connections in {n_free} free slots")
    if count == 0:
        return torch.empty(0, dtype=_LONG)
    if 2 * n_free < n_slots or 2 * count > n_free:
        free = torch.ones(n_slots, dtype=torch.bool)
        free[existing] = False
        free_keys = free.nonzero().squeeze(1)
        return free_keys[torch.randperm(free_keys.numel(), generator=generator)[:count]]
    chosen = torch.empty(0, dtype=_LONG)
    while chosen.numel() < count:
        need = count - chosen.numel()
        # Expected acceptance is >= 1/2; draw with margin so one round nearly always suffices.
        draws = torch.randint(0, n_slots, (2 * need + 16,), generator=generator, dtype=_LONG)
        draws = draws[~contains(existing, draws)]
        chosen = unique_in_order(torch.cat([chosen, draws]))[:count]
    return chosen


def random_keys(n_slots: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random topology: ``count`` distinct keys in ``[0, n_slots)``, sorted.

    Exact count, sampled without replacement (SET's reference code samples with replacement
    and silently loses the duplicates; we don't).
    """
    return sample_free(torch.empty(0, dtype=_LONG), n_slots, count, generator).sort().values


Proposer = Callable[[int, torch.Generator], torch.Tensor]


def place_growth(
    existing: torch.Tensor,
    n_slots: int,
    count: int,
    propose: Proposer,
    generator: torch.Generator,
    max_rounds: int = 8,
) -> tuple[torch.Tensor, int]:
    """The one place where new connections are chosen.

    ``propose(n, generator)`` returns about ``n`` candidate keys in order of preference (they
    may repeat or hit existing connections). Candidates are taken in order, skipping existing
    connections and repeats, until ``count`` are placed; after ``max_rounds`` proposal rounds
    the remainder is drawn uniformly from the free slots and counted as fallbacks.

    Args:
        existing: sorted keys of the connections that stay (after pruning).
    Returns:
        ``(new_keys, fallbacks)``: ``count`` distinct keys not in ``existing`` (unsorted), and
        how many of them came from the uniform fallback.
    """
    if count > n_slots - existing.numel():
        raise ValueError(f"cannot grow {count} connections: only {n_slots - existing.numel()} free")
    chosen = torch.empty(0, dtype=_LONG)
    for round_ in range(max_rounds):
        need = count - chosen.numel()
        if need == 0:
            break
        # Ask for more each round: a later round means candidates keep colliding.
        proposals = propose(need * 2 ** (round_ + 1) + 8, generator).to(torch.device("cpu"), _LONG)
        if proposals.numel() and (int(proposals.min()) < 0 or int(proposals.max()) >= n_slots):
            raise TopologyError("grow strategy proposed a key outside the layer")
        candidates = unique_in_order(torch.cat([chosen, proposals]))
        chosen = candidates[~contains(existing, candidates)][:count]
    fallbacks = count - chosen.numel()
    if fallbacks:
        taken = torch.cat([existing, chosen]).sort().values
        chosen = torch.cat([chosen, sample_free(taken, n_slots, fallbacks, generator)])
    return chosen, fallbacks


def top_gradient_slots(
    inputs: torch.Tensor,
    grad_outputs: torch.Tensor,
    existing: torch.Tensor,
    count: int,
    max_chunk_elements: int = 1 << 22,
) -> torch.Tensor:
    """Keys of the ``count`` free slots with the largest ``|∂L/∂w|`` (RigL), best first.

    The dense gradient ``grad_outputs.T @ inputs`` (``[n_out, n_in]``) is computed in blocks of
    output rows of at most ``max_chunk_elements`` entries, so memory stays bounded by the chunk
    plus ``count`` candidates whatever the layer's size.

    Args:
        inputs: ``[batch, n_in]`` inputs of the layer.
        grad_outputs: ``[batch, n_out]`` gradient of the loss w.r.t. the layer's outputs.
        existing: sorted keys of existing connections (CPU); they are never returned.
    """
    n_in, n_out = inputs.shape[1], grad_outputs.shape[1]
    if count <= 0:
        return torch.empty(0, dtype=_LONG)
    existing_dev = existing.to(inputs.device)
    rows_per_chunk = max(1, max_chunk_elements // max(1, n_in))
    best_scores = torch.empty(0, device=inputs.device, dtype=inputs.dtype)
    best_keys = torch.empty(0, dtype=_LONG, device=inputs.device)
    for r0 in range(0, n_out, rows_per_chunk):
        r1 = min(n_out, r0 + rows_per_chunk)
        scores = (grad_outputs[:, r0:r1].t() @ inputs).abs_().reshape(-1)
        lo, hi = torch.searchsorted(existing_dev, torch.tensor([r0 * n_in, r1 * n_in], device=inputs.device))
        scores[existing_dev[lo:hi] - r0 * n_in] = -1.0  # |grad| >= 0, so existing slots lose
        if best_scores.numel() == count:
            # Only entries beating the current count-th best can enter: filter before top-k,
            # which keeps later chunks cheap when count is large.
            top_indices = (scores > best_scores.min()).nonzero().squeeze(1)
            top_values = scores[top_indices]
        else:
            top_values, top_indices = torch.topk(scores, min(count, scores.numel()))
        best_scores = torch.cat([best_scores, top_values])
        best_keys = torch.cat([best_keys, top_indices + r0 * n_in])
        if best_scores.numel() > count:
            keep = torch.topk(best_scores, count).indices
            best_scores, best_keys = best_scores[keep], best_keys[keep]
    order = torch.sort(best_scores, descending=True, stable=True).indices
    best_keys, best_scores = best_keys[order], best_scores[order]
    return best_keys[best_scores >= 0].cpu()


def top_dense_slots(gradient: torch.Tensor, existing: torch.Tensor, count: int) -> torch.Tensor:
    """Keys of the ``count`` free slots with the largest ``|gradient|`` (``[n_out, n_in]``,
    formed whole: for layers small enough to hold it, such as convolutions), best first."""
    if count <= 0:
        return torch.empty(0, dtype=_LONG)
    scores = gradient.detach().abs().reshape(-1).float().cpu()
    scores[existing] = -1.0  # |grad| >= 0, so existing slots lose
    values, keys = torch.topk(scores, min(count, scores.numel()))
    order = torch.sort(values, descending=True, stable=True).indices
    keys, values = keys[order], values[order]
    return keys[values >= 0]


# --------------------------------------------------------------------------- invariants


def check_topology(
    keys: torch.Tensor, n_out: int, n_in: int, expected_count: int | None = None
) -> None:
    """Raise :class:`TopologyError` unless ``keys`` is a valid topology of an ``n_out x n_in``
    layer: 1-D int64, strictly increasing (sorted, no duplicates), in range, and -- when given --
    exactly ``expected_count`` long."""
    if keys.dim() != 1 or keys.dtype != _LONG:
        raise TopologyError(f"keys must be a 1-D int64 tensor, got {keys.dtype} of shape {tuple(keys.shape)}")
    if expected_count is not None and keys.numel() != expected_count:
        raise TopologyError(f"expected {expected_count} connections, found {keys.numel()}")
    if keys.numel() == 0:
        return
    if int(keys[0]) < 0 or int(keys[-1]) >= n_out * n_in:
        raise TopologyError(f"connection index out of range for a {n_out}x{n_in} layer")
    if keys.numel() > 1 and not bool((keys[1:] > keys[:-1]).all()):
        raise TopologyError("connections are not sorted or contain duplicates")


def zscore(values: torch.Tensor) -> torch.Tensor:
    """``(v - mean) / std`` (population std); all zeros when the std is 0."""
    std = values.std(unbiased=False) if values.numel() > 1 else values.new_tensor(0.0)
    if not float(std) > 0:
        return torch.zeros_like(values)
    return (values - values.mean()) / std


def normal_cdf(z: torch.Tensor) -> torch.Tensor:
    """Standard normal CDF Φ(z)."""
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
