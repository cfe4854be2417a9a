"""Distinct behaviours of units from the neuron embeddings of their examples (Foote 2024, section 3), batched over units.

For one unit with n examples and embeddings e_1..e_n, the behaviour graph has an edge i - j when
cos(e_i, e_j) > tau; its connected components are the unit's behaviours. Every function here takes a chunk of U units
at once: embeddings ``[U, n, d]``, a mask ``[U, n]`` of the examples that exist, and works on ``[U, n, n]`` tensors on
their device, with no loop over units.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def cosine_similarities(embeddings: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[U, n, n]`` cosine similarities in float64 (0 wherever an example is missing or its embedding is zero)."""
    embeddings = embeddings.to(torch.float64) * valid[..., None]
    norms = embeddings.norm(dim=-1, keepdim=True)
    unit = embeddings / norms.clamp_min(torch.finfo(torch.float64).tiny)
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


@dataclass
class Behaviours:
    """Per unit of a chunk (``count`` examples each; values for units without examples are NaN or 0):

    - ``n_behaviours`` ``[U, len(taus)]``: the number of components K(tau) for each tau;
    - ``effective`` ``[U]``: exp(H(p)), p the component sizes over ``count``, at ``taus[0]``;
    - ``largest_share`` ``[U]``: the largest component's size over ``count``, at ``taus[0]``;
    - ``mean_cosine`` ``[U]``: mean cos(e_i, e_j) over pairs i != j (NaN with fewer than two examples);
    - ``sizes`` ``[U, n]``: component sizes at ``taus[0]``, largest first (ties: the component holding the earlier
      example first), 0 beyond K;
    - ``central`` ``[U, n]``: in the same order, the index of each component's central example (the member with the
      largest summed cosine similarity to the members of its component; ties: the earlier example), -1 beyond K;
    - ``members`` ``[U, n]``: each example's component, as its index in ``sizes`` (-1 for a missing example).
    """

    n_behaviours: torch.Tensor
    effective: torch.Tensor
    largest_share: torch.Tensor
    mean_cosine: torch.Tensor
    sizes: torch.Tensor
    central: torch.Tensor
    members: torch.Tensor


def unit_behaviours(embeddings: torch.Tensor, valid: torch.Tensor, taus: Sequence[float]) -> Behaviours:
    """The behaviours of a chunk of units from their examples' embeddings ``[U, n, d]`` (``valid`` ``[U, n]``)."""
    units, n = valid.shape
    similarity = cosine_similarities(embeddings, valid)
    pair = valid[:, :, None] & valid[:, None, :]
    count = valid.sum(dim=1)
    index = torch.arange(n, device=valid.device)
    tree = maximum_spanning_weights(similarity, valid)
    n_behaviours = [count - (tree > tau).sum(dim=1) for tau in taus]
    labels = connected_components((similarity > taus[0]) & pair)
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
    # Components by size (descending), then by their smallest example: sort on size * (n + 1) + (n - root).
    order = torch.sort(roots * (n + 1) + (n - index), dim=1, descending=True, stable=True).indices
    sizes = roots.gather(1, order)
    central = torch.where(sizes > 0, central.gather(1, order), -1)
    place = torch.empty_like(order).scatter_(1, order, index.expand(units, n).contiguous())
    members = torch.where(valid, place.gather(1, labels), -1)
    return Behaviours(
        n_behaviours=torch.stack(n_behaviours, dim=1),
        effective=torch.where(defined, entropy.exp(), nan),
        largest_share=torch.where(defined, share.amax(dim=1), nan),
        mean_cosine=mean_cosine,
        sizes=sizes,
        central=central,
        members=members,
    )
