"""Distinct behaviours of units from the neuron embeddings of their examples (Foote 2024, section 3), batched over units.

Two rules group one unit's n examples (embeddings e_1..e_n, similarity s_ij = cos(e_i, e_j)); both give a
partition of the examples, the unit's behaviours, and a cut below which nothing is joined:

- ``average_null`` (the default, `average_linkage` and `NullCosines`): agglomerative average linkage (UPGMA: join the
  two groups whose mean pairwise similarity is largest, while it exceeds the cut), the cut referenced to the unit's
  own null, the cosines between its embeddings on a seeded sample of ordinary scored tokens: c_u(q) = the
  q-quantile of those cosines. A mean over every cross pair must exceed the cut, so a few bridging pairs do not join
  two behaviours, and the null puts the cut where the cosines of unrelated inputs lie in the unit's own space,
  whatever its width and statistics. Each group above the cut is then read top-down along its tree and split
  where its two halves resemble each other less than ``split_ratio`` times the geometric mean of how much each
  resembles itself (both halves holding at least ``split_share`` of the examples): two features absorbed by one
  latent are each far above the null and still two behaviours.
- ``components`` (Foote's rule): an edge i - j where s_ij > tau, a fixed threshold; the connected components.

Every function here takes a chunk of U units at once: embeddings ``[U, n, d]``, a mask ``[U, n]`` of the examples
that exist, and works on ``[U, n, n]`` tensors on their device, with no loop over units.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def cosine_similarities(embeddings: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[U, n, n]`` cosine similarities in float64 (0 wherever an example is missing or its embedding is zero)."""
    unit = embeddings.to(torch.float64) * valid[..., None]
    unit.div_(unit.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny))  # in place: one [U, n, d] copy
    return unit @ unit.transpose(1, 2)


def connected_components(adjacency: torch.Tensor) -> torch.Tensor:
    """``[U, n]`` component labels of undirected graphs ``[U, n, n]`` (bool, symmetric): each node's label is the
    smallest node index of its component.

    Min-label propagation with pointer jumping: every round each node takes the smallest label among itself and its
    neighbours, then the label of the node its label names. Labels only decrease and always name a node of the same
    component, and the rounds stop when nothing changes, that is when every edge joins equal labels: each component
    then carries one label, which is its smallest node (that node's label can be no smaller)."""
    units, n, _ = adjacency.shape
    labels = torch.arange(n, device=adjacency.device).expand(units, n).contiguous()
    never = torch.tensor(n, device=adjacency.device)
    while True:
        neighbour = torch.where(adjacency, labels[:, None, :], never).amin(dim=-1)
        updated = torch.minimum(labels, neighbour)
        updated = updated.gather(1, updated)
        if torch.equal(updated, labels):
            return labels
        labels = updated


def maximum_spanning_weights(similarity: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[U, n - 1]``: the edge weights of a maximum spanning tree of each unit's complete graph on its valid examples
    (Prim's algorithm, all units at once; -inf beyond the count - 1 edges a tree has).

    Two examples are connected in the graph with the edges where similarity > tau exactly when the tree path between
    them has all its weights > tau (a maximum spanning tree holds a best bottleneck path between every pair), so
    that graph has K(tau) = count - #{tree weights > tau} components: one tree gives K at every tau of a sweep."""
    units, n = valid.shape
    similarity = similarity.masked_fill(~(valid[:, :, None] & valid[:, None, :]), -torch.inf)
    rows = torch.arange(units, device=valid.device)
    start = valid.to(torch.int8).argmax(dim=1)
    in_tree = torch.zeros_like(valid)
    in_tree[rows, start] = valid.any(dim=1)
    best = similarity[rows, start]
    weights = []
    for _ in range(n - 1):
        candidates = best.masked_fill(in_tree | ~valid, -torch.inf)
        weight, joining = candidates.max(dim=1)
        weights.append(weight)
        joins = weight > -torch.inf
        in_tree[rows, joining] |= joins
        best = torch.where(joins[:, None], torch.maximum(best, similarity[rows, joining]), best)
    if not weights:
        return torch.empty((units, 0), dtype=similarity.dtype, device=valid.device)
    return torch.stack(weights, dim=1)


# Units whose null cosines (`NullCosines`) are formed at once: 512 x 8,128 pairs of 128 null tokens, 33 MB each.
NULL_SLAB = 512


class NullCosines:
    """The cut c_u(q) of any units from the null tokens that they share: the q-quantile of the cosines between the
    unit's embeddings of distinct null tokens, e_a = D_a ⊙ w_u for the tokens' deviations D ``[m, d]`` (over the
    m (m - 1) / 2 pairs, linear interpolation): a join must beat all but a share 1 - q of the similarities of
    unrelated inputs seen through the unit's own weights.

    cos_u(a, b) = sum_k D_ak D_bk w_uk^2 / (||D_a ⊙ w_u|| ||D_b ⊙ w_u||) (0 where either embedding is zero), so for
    a slab of units it is two matrix products of their squared weights, with the squared deviations ``[m, d]`` and
    with the pairs' elementwise products D_a ⊙ D_b ``[m (m - 1) / 2, d]`` (formed once: 100 MB of float64 at
    m = 128, d = 1,536): the ``[U, m, d]`` embeddings are never built."""

    def __init__(self, deviations: torch.Tensor) -> None:
        deviations = deviations.to(torch.float64)
        m = deviations.shape[0]
        self.first, self.second = torch.triu_indices(m, m, offset=1, device=deviations.device)
        # pairs (a, b > a) in the order of triu_indices, row by row: slices, not a gather
        self.products = torch.cat([deviations[a] * deviations[a + 1 :] for a in range(m - 1)])
        self.squares = deviations.square()

    def cut(self, weight: torch.Tensor, quantiles: Sequence[float]) -> torch.Tensor:
        """``[U, len(quantiles)]``: c_u(q) of the units whose input weights are ``weight`` ``[U, d]``, in slabs of
        `NULL_SLAB` units."""
        return torch.cat([self._cut(slab, quantiles) for slab in weight.split(NULL_SLAB)])

    def _cut(self, weight: torch.Tensor, quantiles: Sequence[float]) -> torch.Tensor:
        squared = weight.to(torch.float64).square()
        norms = (squared @ self.squares.T).sqrt()
        denominator = norms[:, self.first] * norms[:, self.second]
        dots = squared @ self.products.T
        cosines = torch.where(denominator > 0, dots / denominator.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
        return row_quantiles(cosines, quantiles)


def row_quantiles(values: torch.Tensor, quantiles: Sequence[float]) -> torch.Tensor:
    """``[U, len(quantiles)]``: each row's quantiles of ``values`` ``[U, P]``, as ``values.quantile(q, dim=1).T``
    computes them (linear interpolation between the order statistics at q (P - 1); NaN for a row holding a NaN),
    with the rows sorted by numpy on CPU (about 10x faster there than torch's sort)."""
    wanted = torch.tensor(list(quantiles), dtype=torch.float64, device=values.device)
    if values.device.type == "cpu":
        ordered = torch.from_numpy(np.sort(values.numpy(), axis=1))
    else:
        ordered = values.sort(dim=1).values
    rank = wanted * (values.shape[1] - 1)
    below, above = rank.floor().long(), rank.ceil().long()
    result = torch.lerp(ordered[:, below], ordered[:, above], (rank - below).expand(len(values), -1))
    return result.masked_fill(values.isnan().any(dim=1, keepdim=True), torch.nan)


def average_linkage(similarity: torch.Tensor, valid: torch.Tensor, cuts: torch.Tensor, split_ratio: float = 0.0,
                    split_size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Average linkage (UPGMA) of every unit's valid examples, all units at once, and its partition at each cut of
    ``cuts`` ``[U, C]``: ``(labels [U, n], n_groups [U, C])``, the labels at ``cuts[:, 0]`` (each example's group,
    named by its smallest example, as `connected_components`) and the number of groups at every cut.

    Each step joins, in every unit, the two groups A and B with the largest mean similarity between their members,
    h(A, B) (a reducible method: the heights never increase, so the joins above a cut c are the first ones). At c,
    the groups are read top-down from that tree: a group formed above c is one behaviour if its own join is
    *coherent*, else it is split into A and B, each read the same way. A join is coherent when

        h(A, B) >= ``split_ratio`` * sqrt(w(A) w(B))     or     min(|A|, |B|) < ``split_size`` (per unit),

    w(G) the mean similarity between distinct members of G (clamped at 0): two halves that resemble each other less
    than each resembles itself are two behaviours, as two features absorbed by one SAE latent are (within 0.5,
    between 0.3 on the synthetic ground truth, where unrelated inputs give 0.14). ``split_ratio`` = 0 keeps every
    join above the cut: plain average linkage cut at c."""
    units, n = valid.shape
    device = valid.device
    pair = valid[:, :, None] & valid[:, None, :]
    eye = torch.eye(n, dtype=torch.bool, device=device)
    link = similarity.to(torch.float64).masked_fill(~pair | eye, -torch.inf)
    size = valid.to(torch.float64)
    within = torch.zeros((units, n), dtype=torch.float64, device=device)  # sum over ordered member pairs i != j
    formed = torch.full((units, n), -1, dtype=torch.int64, device=device)  # the step that made each group
    steps = max(n - 1, 0)
    heights = torch.full((units, steps), -torch.inf, dtype=torch.float64, device=device)
    coherent = torch.ones((units, steps), dtype=torch.bool, device=device)
    parent = torch.full((units, steps + 1), steps, dtype=torch.int64, device=device)  # column `steps`: no parent
    joined_low = torch.zeros((units, steps), dtype=torch.int64, device=device)
    joined_high = torch.zeros((units, steps), dtype=torch.int64, device=device)
    rows = torch.arange(units, device=device)
    minimum = torch.zeros(units, dtype=torch.float64, device=device) if split_size is None else split_size.to(torch.float64)
    for step in range(steps):
        height, where = link.view(units, -1).max(dim=1)
        joins = height > -torch.inf
        if not bool(joins.any()):
            break
        heights[:, step] = height
        r, height = rows[joins], height[joins]
        i, j = where[joins] // n, where[joins] % n
        low, high = torch.minimum(i, j), torch.maximum(i, j)
        joined_low[r, step], joined_high[r, step] = low, high
        s_low, s_high = size[r, low], size[r, high]
        if split_ratio > 0:
            own = [(within[r, g] / (s * (s - 1)).clamp_min(1)).clamp_min(0) for g, s in ((low, s_low), (high, s_high))]
            coherent[r, step] = (height >= split_ratio * (own[0] * own[1]).sqrt()) | (
                torch.minimum(s_low, s_high) < minimum[r])
        for child in (formed[r, low], formed[r, high]):
            parent[r, torch.where(child >= 0, child, steps)] = step
        merged = (s_low[:, None] * link[r, low] + s_high[:, None] * link[r, high]) / (s_low + s_high)[:, None]
        merged[torch.arange(len(r), device=device), low] = -torch.inf
        link[r, low], link[r, :, low] = merged, merged
        link[r, high], link[r, :, high] = -torch.inf, -torch.inf
        within[r, low] += within[r, high] + 2 * height * s_low * s_high
        size[r, low], size[r, high] = s_low + s_high, 0
        formed[r, low] = step
    parent = parent[:, :steps]
    # the joins above each cut: a prefix of the steps (a running minimum, so that float rounding cannot let a later
    # join rise above the cut again)
    above = heights.cummin(dim=1).values[:, None, :] > cuts.to(torch.float64)[:, :, None]  # [U, C, steps]
    kept = torch.zeros((units, cuts.shape[1], steps + 1), dtype=torch.bool, device=device)  # column `steps`: False
    for step in reversed(range(steps)):  # a join is kept if it is coherent or lies inside a kept group
        inside = kept.gather(2, parent[:, None, step : step + 1].expand(-1, cuts.shape[1], 1))[:, :, 0]
        kept[:, :, step] = above[:, :, step] & (coherent[:, None, step] | inside)
    kept = kept[:, :, :steps]
    labels = torch.arange(n, device=device).expand(units, n).contiguous()
    for step in range(steps):  # the kept joins at the first cut, in order (a kept join's groups are kept whole)
        join = kept[:, 0, step]
        labels = torch.where(join[:, None] & (labels == joined_high[:, step, None]), joined_low[:, step, None], labels)
    return labels, valid.sum(dim=1)[:, None] - kept.sum(dim=2)


@dataclass
class Behaviours:
    """Per unit of a chunk (``count`` examples each; values for units without examples are NaN or 0):

    - ``n_behaviours`` ``[U, 1 + sweep]``: the number of behaviours K at the rule's cut, then at each cut of its sweep;
    - ``cut`` ``[U]``: the similarity cut in the unit's own space (tau itself for ``components``, c_u(q) for
      ``average_null``);
    - ``effective`` ``[U]``: exp(H(p)), p the behaviour sizes over ``count``;
    - ``largest_share`` ``[U]``: the largest behaviour's size over ``count``;
    - ``mean_cosine`` ``[U]``: mean cos(e_i, e_j) over pairs i != j (NaN with fewer than two examples);
    - ``sizes`` ``[U, n]``: behaviour sizes, largest first (ties: the behaviour holding the earlier example first), 0
      beyond K;
    - ``central`` ``[U, n]``: in the same order, the index of each behaviour's central example (the member with the
      largest summed cosine similarity to the members of its behaviour; ties: the earlier example), -1 beyond K;
    - ``members`` ``[U, n]``: each example's behaviour, as its index in ``sizes`` (-1 for a missing example).
    """

    n_behaviours: torch.Tensor
    cut: torch.Tensor
    effective: torch.Tensor
    largest_share: torch.Tensor
    mean_cosine: torch.Tensor
    sizes: torch.Tensor
    central: torch.Tensor
    members: torch.Tensor


COMPONENTS, AVERAGE_NULL = "components", "average_null"


def unit_behaviours(embeddings: torch.Tensor, valid: torch.Tensor, rule: str, cuts: Sequence[float],
                    null_cut: torch.Tensor | None = None, split_ratio: float = 0.0, split_share: float = 0.0) -> Behaviours:
    """The behaviours of a chunk of units from their examples' embeddings ``[U, n, d]`` (``valid`` ``[U, n]``) by
    ``rule`` (module docstring) at ``cuts[0]``, with K at every cut: taus for ``components``, null quantiles for
    ``average_null``, which also takes each unit's cut at each of them, ``[U, len(cuts)]`` (`NullCosines.cut`)."""
    units, n = valid.shape
    similarity = cosine_similarities(embeddings, valid)
    pair = valid[:, :, None] & valid[:, None, :]
    count = valid.sum(dim=1)
    index = torch.arange(n, device=valid.device)
    if rule == COMPONENTS:
        cut = torch.full((units, len(cuts)), 0.0, dtype=torch.float64, device=valid.device) + torch.tensor(
            list(cuts), dtype=torch.float64, device=valid.device)
        heights = maximum_spanning_weights(similarity, valid)
        labels = connected_components((similarity > cut[:, :1, None]) & pair)
        n_behaviours = count[:, None] - (heights[:, None, :] > cut[:, :, None]).sum(dim=2)
    elif rule == AVERAGE_NULL:
        if null_cut is None:
            raise ValueError("the average_null rule needs the units' null cuts")
        cut = null_cut.to(torch.float64)
        split_size = (split_share * count.to(torch.float64)).ceil().clamp_min(2)
        labels, n_behaviours = average_linkage(similarity, valid, cut, split_ratio, split_size)
    else:
        raise ValueError(f"unknown behaviour rule {rule!r}: use {AVERAGE_NULL!r} or {COMPONENTS!r}")
    roots = torch.zeros((units, n), dtype=torch.int64, device=valid.device).scatter_add(1, labels, valid.to(torch.int64))
    share = roots.to(torch.float64) / count.clamp_min(1)[:, None]
    entropy = -torch.where(share > 0, share * share.clamp_min(1e-300).log(), 0.0).sum(dim=1)
    defined = count > 0
    nan = torch.tensor(torch.nan, dtype=torch.float64, device=valid.device)
    off_diagonal = pair & ~torch.eye(n, dtype=torch.bool, device=valid.device)
    pairs = count * (count - 1)
    mean_cosine = torch.where(pairs > 0, (similarity * off_diagonal).sum(dim=(1, 2)) / pairs.clamp_min(1), nan)

    same = (labels[:, :, None] == labels[:, None, :]) & pair
    score = torch.where(valid, (similarity * same).sum(dim=-1), -torch.inf)
    best = torch.full((units, n), -torch.inf, dtype=torch.float64, device=valid.device).scatter_reduce(1, labels, score, "amax")
    is_best = valid & (score == best.gather(1, labels))
    central = torch.full((units, n), n, dtype=torch.int64, device=valid.device)
    central = central.scatter_reduce(1, labels, torch.where(is_best, index, n), "amin")
    # Behaviours by size (descending), then by their smallest example: sort on size * (n + 1) + (n - root).
    order = torch.sort(roots * (n + 1) + (n - index), dim=1, descending=True, stable=True).indices
    sizes = roots.gather(1, order)
    central = torch.where(sizes > 0, central.gather(1, order), -1)
    place = torch.empty_like(order).scatter_(1, order, index.expand(units, n).contiguous())
    members = torch.where(valid, place.gather(1, labels), -1)
    return Behaviours(
        n_behaviours=n_behaviours,
        cut=cut[:, 0],
        effective=torch.where(defined, entropy.exp(), nan),
        largest_share=torch.where(defined, share.amax(dim=1), nan),
        mean_cosine=mean_cosine,
        sizes=sizes,
        central=central,
        members=members,
    )
