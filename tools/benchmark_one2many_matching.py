#!/usr/bin/env python
"""Time one-to-many Hungarian matching two ways, side by side in one process.

``HungarianMatcher(outputs, targets, repeat=K)`` computes the costs once per target and tiles
them K times per image; the way it was done before (and still the reference the tests compare
with) matches against ``repeat_targets(targets, K)``, computing the K identical cost columns, for
every image's queries against the whole batch's targets. Both give the same assignment
(``tests/test_hybrid_matching.py``). Prints a markdown table: median milliseconds per call.

Cases: H-DETR's hybrid branch on the NEON-trees recipe (300 one-to-many queries, K = 4) and the
one-to-many encoder loss (``SetCriterion(enc_one2many_repeat=6)``: every token of a 416 px tile at
strides 8-64, ~3,600) with 30 and 60 crowns per image, batch 2.

    python tools/benchmark_one2many_matching.py [--threads 2] [--repeats 7]
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from d2detr.modeling.hybrid_matching import repeat_targets  # noqa: E402
from d2detr.modeling.matcher import HungarianMatcher  # noqa: E402

CASES = [  # (name, queries per image, objects per image, K)
    ("hybrid branch, 300 queries", 300, 30, 4),
    ("hybrid branch, 300 queries", 300, 60, 4),
    ("dense encoder tokens", 3598, 30, 6),
    ("dense encoder tokens", 3598, 60, 6),
]


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    matcher = HungarianMatcher(2.0, 5.0, 2.0, use_focal=True)
    g = torch.Generator().manual_seed(0)
    print(f"batch {args.batch}, {args.threads} threads, median of {args.repeats}, focal costs 2/5/2\n")
    print("| case | queries / image | objects / image | K | repeated targets (ms) | `repeat=K` (ms) | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, queries, objects, k in CASES:
        outputs = {"pred_logits": torch.randn(args.batch, queries, 1, generator=g),
                   "pred_boxes": torch.rand(args.batch, queries, 4, generator=g) * 0.5 + 0.25}
        targets = [{"labels": torch.zeros(objects, dtype=torch.long),
                    "boxes": torch.rand(objects, 4, generator=g) * 0.3 + 0.35} for _ in range(args.batch)]
        before = median_ms(lambda: matcher(outputs, repeat_targets(targets, k)), args.repeats)
        after = median_ms(lambda: matcher(outputs, targets, repeat=k), args.repeats)
        print(f"| {name} | {queries} | {objects} | {k} | {before:.1f} | {after:.1f} | {before / after:.2f}x |")


if __name__ == "__main__":
    main()
