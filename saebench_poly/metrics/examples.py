"""Characteristic examples of every unit, selected exactly during the one activation pass (Foote 2024's rule).

Definition. For unit u and scored context c, m_u(c) = max_t z_u(c, t) and t*_u(c) is the lowest position attaining it
(z: the activity the selector is fed, the code or, for signed units, its magnitude);
M_u = max_c m_u(c), the unit's maximum over all scored tokens. The characteristic contexts of u are

    Q_u = {c : m_u(c) > 0 and m_u(c) >= f M_u}          (f = ``fraction``, Foote's 0.75)

with one example (c, t*_u(c)) each. The sample is the min(S, |Q_u|) contexts of Q_u with the smallest keys
k_u(c) = hash(seed, u, c) (S = ``max_examples``; equal keys, which need a 62-bit collision, go to the lower context).
The keys are independent uniform draws, so this is a seeded uniform sample without replacement (bottom-k sampling),
and it is a function of the data and the seed alone: not of the batch size, nor of the order of the batches.

Streaming. Each batch raises the running maxima, then offers its pairs (u, c) with m_u(c) >= f M_u(so far) to a
per-unit candidate store which, whenever it has doubled in size since it was last pruned, drops every candidate c
that can no longer be sampled:

1. m_u(c) < f M_u(so far): M_u only grows, so c never qualifies;
2. at least S other contexts d have k_u(d) < k_u(c) and m_u(d) >= m_u(c): if c qualified, so would every such d,
   and S of them would come before it. The store applies this rule at levels: with its candidates ranked by m
   (descending), for r = S, 2S, 4S, ..., kappa_r = the S-th smallest key among the top r, and every candidate with
   m <= (the m of rank r) and key > kappa_r is dropped.

Neither rule drops a context of the final sample, so after the pass the sample is the S smallest-key candidates that
qualify under the final M_u: exact. A candidate is (context, position, m), nothing more (20 bytes: its key is a
function of the unit and the context, recomputed when the store is pruned or read); with keys independent of m a unit
keeps about S (1 + log2(n / S)) candidates for n contexts that qualified so far.

Every context must lie within a single batch (as `saebench_poly.activations.score` feeds them). Selectors fed
disjoint sets of contexts merge exactly (`ExampleSelector.merge`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD_KEY = 2**63 - 1
# Candidates (units x store columns) that one chunk of a pruning handles at once: its sorts and masks take a few
# times this many int64 values, however large the store.
PRUNE_CHUNK = 1 << 20
_NO_POSITION = 2**62
# The candidate store's arrays and their padding.
_STORE = {"context": -1, "position": 0, "activation": -torch.inf}


def _as_signed(value: int) -> int:
    value &= 2**64 - 1
    return value - 2**64 if value >= 2**63 else value


_GOLDEN, _MIX1, _MIX2 = (_as_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 tensors read as unsigned 64-bit integers."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 (Steele et al. 2014) on int64 tensors as unsigned 64-bit integers (products wrap modulo 2^64)."""
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def example_keys(seed: int, units: torch.Tensor, contexts: torch.Tensor) -> torch.Tensor:
    """k_u(c) = splitmix64(splitmix64(splitmix64(seed) + u) + c) >> 2: uniform in [0, 2^62), int64, on any device."""
    base = _mix64(torch.tensor(_as_signed(seed), dtype=torch.int64, device=units.device))
    return _shift_right(_mix64(_mix64(base + units.to(torch.int64)) + contexts.to(torch.int64)), 2)


def _padded(values: torch.Tensor, columns: int, pad: float | int) -> torch.Tensor:
    """``values`` ``[rows, c <= columns]`` padded on the right with ``pad`` to ``columns`` (exact for int64 pads,
    which `torch.nn.functional.pad` passes through a float)."""
    if values.shape[1] == columns:
        return values
    fill = torch.full((values.shape[0], columns - values.shape[1]), pad, dtype=values.dtype, device=values.device)
    return torch.cat([values, fill], dim=1)


@dataclass
class Examples:
    """Each unit's sample, in key order: ``context``, ``position`` (int64) and ``activation`` (float64, m_u(c)) are
    ``[width, max_examples]``, padded with context -1 beyond ``count[u]``; ``maximum`` is M_u (-inf for a unit that
    saw no token)."""

    context: torch.Tensor
    position: torch.Tensor
    activation: torch.Tensor
    count: torch.Tensor
    maximum: torch.Tensor


class ExampleSelector:
    """The streaming selection of the module docstring, batched over units on the device of the codes it is fed."""

    def __init__(self, width: int, fraction: float, max_examples: int, seed: int) -> None:
        self.width, self.fraction, self.max_examples, self.seed = width, fraction, max_examples, seed
        self.maximum: torch.Tensor | None = None
        # The store is pruned when it has grown to twice its size after the last pruning: dropping a candidate later
        # changes nothing (the rules only drop candidates that can never be sampled), and sorting less often is cheaper.
        self._pruned_capacity = max_examples
        # The candidate store: [width, capacity] contexts (int64), positions (int32) and activations (float64),
        # padded with context -1, position 0, activation -inf; candidates lie in its first `used` columns, and it
        # grows by half its capacity at a time (a batch writes in place instead of copying the whole store).
        self.context = self.position = self.activation = None
        self.used = 0

    def _threshold(self) -> torch.Tensor:
        return self.fraction * self.maximum

    def update(self, z: torch.Tensor, context: torch.Tensor, position: torch.Tensor,
               active: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Fold in one batch: codes ``z`` ``[N, width]`` of N scored tokens, their contexts' global indices and their
        positions ``[N]``; ``active``: the ``(rows, units)`` of ``z``'s non-zero entries in ``z.nonzero`` order, when
        the caller has them (`EntryBatch.active_entries` of a sparse batch), so that only those are compared."""
        if self.maximum is None:
            self._allocate(z.device)
        if z.shape[0] == 0:
            return
        z = z.detach()
        self.maximum = torch.maximum(self.maximum, z.amax(dim=0).to(torch.float64))
        threshold = self._threshold()
        self._insert(*self._offers(z, context.to(z.device), position.to(z.device), threshold, active))
        if self.used > 2 * self._pruned_capacity:
            self._prune(threshold)
            self._pruned_capacity = max(self.max_examples, self.used)

    def merge(self, other: ExampleSelector) -> None:
        """Fold in a selector fed other contexts (numbered globally): the candidates of both, pruned under the
        joint maxima. Neither side dropped a context of the joint sample (a rule that drops c on one side holds on
        the union), so the result is exactly that of one selector fed every batch."""
        if other.maximum is None:
            return
        if self.maximum is None:
            self._allocate(other.maximum.device)
        self.maximum = torch.maximum(self.maximum, other.maximum)
        for name in _STORE:
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)], dim=1))
        self._prune(self._threshold())
        self._pruned_capacity = max(self.max_examples, self.used)

    def _allocate(self, device: torch.device) -> None:
        self.maximum = torch.full((self.width,), -torch.inf, dtype=torch.float64, device=device)
        self.context = torch.full((self.width, 0), -1, dtype=torch.int64, device=device)
        self.position = torch.zeros((self.width, 0), dtype=torch.int32, device=device)
        self.activation = torch.full((self.width, 0), -torch.inf, dtype=torch.float64, device=device)
        self.used = 0

    def _offers(self, z: torch.Tensor, context: torch.Tensor, position: torch.Tensor, threshold: torch.Tensor,
                active: tuple[torch.Tensor, torch.Tensor] | None = None):
        """The batch's pairs (u, c) with m_u(c) > 0 and m_u(c) >= threshold_u: unit, context, t*, m, sorted by unit."""
        work = z if z.dtype == torch.float64 else z.to(torch.float32)
        if active is None:
            # A threshold in the codes' precision, rounded down, so that the comparison keeps a superset of the
            # tokens at or above the float64 threshold; the exact test follows on those. At least the smallest
            # positive value: one comparison also asks for m > 0.
            low = threshold.to(work.dtype)
            low = torch.where(low.to(torch.float64) > threshold, torch.nextafter(low, torch.full_like(low, -torch.inf)), low)
            zero = torch.zeros((), dtype=work.dtype, device=work.device)
            low = torch.maximum(low, torch.nextafter(zero, torch.ones_like(zero)))
            rows, units = (work >= low).nonzero(as_tuple=True)
        else:
            rows, units = active
        values = work[rows, units].to(torch.float64)
        exact = (values >= threshold[units]) & (values > 0)
        rows, units, values = rows[exact], units[exact], values[exact]
        contexts_here, local = torch.unique(context, return_inverse=True)
        group, inverse = torch.unique(units * len(contexts_here) + local[rows], return_inverse=True)
        best = torch.full(group.shape, -torch.inf, dtype=torch.float64, device=z.device)
        best = best.scatter_reduce(0, inverse, values, "amax")
        at_best = torch.where(values == best[inverse], position[rows], _NO_POSITION)
        first = torch.full(group.shape, _NO_POSITION, dtype=torch.int64, device=z.device)
        first = first.scatter_reduce(0, inverse, at_best.to(torch.int64), "amin")
        return group // len(contexts_here), contexts_here[group % len(contexts_here)], first, best

    def _insert(self, units: torch.Tensor, contexts: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> None:
        if units.numel() == 0:
            return
        counts = torch.bincount(units, minlength=self.width)
        slot = torch.arange(units.numel(), device=units.device) - (torch.cumsum(counts, 0) - counts)[units]
        needed = self.used + int(counts.max())
        capacity = self.context.shape[1]
        column = self.used + slot
        for (name, pad), new in zip(_STORE.items(), (contexts, positions, values), strict=True):
            store = getattr(self, name)
            if needed > capacity:
                store = _padded(store, max(needed, capacity + capacity // 2), pad)
                setattr(self, name, store)
            store[units, column] = new.to(store.dtype)
        self.used = needed

    def _prune(self, threshold: torch.Tensor) -> None:
        """Rules 1 and 2 of the module docstring, then the kept candidates are packed to the left; in chunks of
        units (`PRUNE_CHUNK` candidates at a time), so that its sorts and masks never span the whole store."""
        rows = max(1, PRUNE_CHUNK // max(self.context.shape[1], 1))
        parts = [self._prune_units(start, min(start + rows, self.width), threshold) for start in range(0, self.width, rows)]
        kept = max((part[0].shape[1] for part in parts), default=0)
        self.used = kept
        for index, (name, pad) in enumerate(_STORE.items()):
            setattr(self, name, torch.cat([_padded(part[index], kept, pad) for part in parts]))
            for part in parts:  # each chunk's copy goes once it is in the new store
                part[index] = None

    def _prune_units(self, start: int, stop: int, threshold: torch.Tensor) -> list[torch.Tensor]:
        """Units [start, stop) pruned: their kept (context, position, activation), packed to the left."""
        context, position, activation = (getattr(self, name)[start:stop] for name in _STORE)
        valid = activation >= threshold[start:stop, None]
        activation_valid = torch.where(valid, activation, -torch.inf)
        key_valid = torch.where(valid, self._keys(start, context), PAD_KEY)
        by_activation = torch.sort(activation_valid, dim=1, descending=True, stable=True).indices
        ranked_activation, ranked_key = activation_valid.gather(1, by_activation), key_valid.gather(1, by_activation)
        drop = ~valid
        most = int(valid.sum(dim=1).max()) if valid.numel() else 0
        rank = self.max_examples
        while rank <= most:
            kappa = ranked_key[:, :rank].kthvalue(self.max_examples, dim=1).values
            drop |= (activation_valid <= ranked_activation[:, rank - 1 : rank]) & (key_valid > kappa[:, None])
            rank *= 2
        keep = ~drop
        kept = int(keep.sum(dim=1).max()) if keep.numel() else 0
        order = torch.sort(drop.to(torch.int8), dim=1, stable=True).indices[:, :kept]
        keep = keep.gather(1, order)
        return [torch.where(keep, context.gather(1, order), -1),
                torch.where(keep, position.gather(1, order), 0), torch.where(keep, activation.gather(1, order), -torch.inf)]

    def release(self) -> None:
        """Free the candidate store once the sample has been read (`result`): it grows with the log of the tokens
        and is dead weight after the pass. The selector can then be fed and read no more."""
        self.context = self.position = self.activation = None

    def _keys(self, start: int, context: torch.Tensor) -> torch.Tensor:
        """k_u(c) of the candidates ``context`` ``[rows, columns]`` of units start, start + 1, ... (PAD_KEY where
        there is none)."""
        units = torch.arange(start, start + context.shape[0], device=context.device)[:, None]
        return torch.where(context >= 0, example_keys(self.seed, units, context), PAD_KEY)

    def result(self, device: torch.device | None = None) -> Examples:
        """The exact sample (module docstring), once every batch has been fed."""
        if self.maximum is not None and self.context is None:  # fed, then released (a fed store always has one)
            raise RuntimeError("the selector's candidates were released: read its result before release()")
        if self.maximum is None:
            self._allocate(device or torch.device("cpu"))
        sample = self.max_examples
        valid = (self.context >= 0) & (self.activation >= self._threshold()[:, None])
        key = torch.where(valid, self._keys(0, self.context), PAD_KEY)
        context = torch.where(valid, self.context, PAD_KEY)
        by_context = torch.sort(context, dim=1, stable=True).indices
        order = by_context.gather(1, torch.sort(key.gather(1, by_context), dim=1, stable=True).indices)[:, :sample]
        chosen = valid.gather(1, order)

        def take(values: torch.Tensor, fill: float | int) -> torch.Tensor:
            return _padded(torch.where(chosen, values.gather(1, order), fill), sample, fill)

        return Examples(context=take(self.context, -1), position=take(self.position, 0).to(torch.int64),
                        activation=take(self.activation, -torch.inf), count=chosen.sum(dim=1), maximum=self.maximum)
