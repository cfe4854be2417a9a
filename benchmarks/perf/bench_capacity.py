"""Time and peak memory of the capacity family's `compute` on a large decoder (issue 11: "the capacity of a
1M x 2304 decoder"): `saebench_poly.metrics.capacity.capacity` on random unit directions, every unit live, as an
SAE entry's `compute` runs it (the decoder stored in ``--dtype``, the Gram matrix's upper triangle formed tile by
tile in float64, the interference blocks merged as the tiles come).

Prints the width, the tiles done with the elapsed seconds every ``--report-every`` of them (so that a run stopped
early still gives a rate), then the total seconds, the peak memory (GPU: `torch.cuda.max_memory_allocated`; CPU:
the process's peak RSS) and two checks: sum_i C_i <= D, and the number of blocks.

    python benchmarks/perf/bench_capacity.py [--device cuda] [--width 1048576] [--d-in 2304] [--dtype float32]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from saebench_poly.metrics.capacity import capacity, tile_shape


def tile_count(width: int, d_in: int, max_tile_elements: int) -> int:
    """How many tiles `capacity` forms: for each block of rows, the column tiles from its first row on."""
    rows, cols = tile_shape(width, d_in, max_tile_elements)
    return sum(math.ceil((width - start) / cols) for start in range(0, width, rows))


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmHWM"].split()[0]) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=int, default=1 << 20, help="decoder rows (latents)")
    parser.add_argument("--d-in", type=int, default=2304)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--max-tile-elements", type=int, default=2**24, help="the family's option of that name")
    parser.add_argument("--block-threshold", type=float, default=0.1)
    parser.add_argument("--report-every", type=int, default=2000, help="tiles between progress lines")
    args = parser.parse_args()

    device = torch.device(args.device)
    generator = torch.Generator(device=device).manual_seed(0)
    directions = torch.empty(args.width, args.d_in, dtype=getattr(torch, args.dtype), device=device)
    for start in range(0, args.width, 65_536):  # in slices: no float32 copy of a bfloat16 decoder
        rows = directions[start : start + 65_536]
        rows.copy_(torch.randn(rows.shape, generator=generator, device=device))
    live = torch.ones(args.width, dtype=torch.bool, device=device)
    total = tile_count(args.width, args.d_in, args.max_tile_elements)
    print(f"capacity of a {args.width:,} x {args.d_in:,} {args.dtype} decoder on {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{torch.get_num_threads()} CPU thread(s); {total:,} tiles of at most {args.max_tile_elements:,} entries",
          flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    done = 0
    start = time.perf_counter()

    def observe(_shape: tuple[int, int]) -> None:
        nonlocal done
        done += 1
        if done % args.report_every == 0:
            print(f"  {done:,} / {total:,} tiles, {time.perf_counter() - start:.1f} s", flush=True)

    result = capacity(directions, live, args.block_threshold, args.max_tile_elements, observe_tile=observe)
    capacity_sum = float(result.capacity.sum())
    seconds = time.perf_counter() - start
    print(f"capacity: {seconds:.1f} s, peak memory {peak_memory_gib(device):.2f} GiB "
          f"(the decoder alone {directions.numel() * directions.element_size() / 2**30:.2f} GiB); "
          f"sum C_i = {capacity_sum:.1f} <= D = {args.d_in}; {len(result.block_sizes):,} blocks, largest "
          f"{int(result.block_sizes.max()):,}", flush=True)
    assert capacity_sum <= args.d_in * (1 + 1e-9)


if __name__ == "__main__":
    main()
