"""Packing SFT samples into fixed-length rows: best-fit decreasing, and the packed rows written
to one Arrow file with each sample kept apart (segment ids; positions restart per sample),
so attention never crosses samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pack_best_fit(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing: longest first, each into the fullest row it still fits.

    Rows are bucketed by remaining space, and the spaces that have rows are kept in a sorted
    list, so the best fit is one bisection instead of a scan. Returns rows of sample indices.
    """
    import bisect

    order = np.argsort(-np.asarray(lengths), kind="stable")
    bins: list[list[int]] = []
    by_space: dict[int, list[int]] = {}
    spaces: list[int] = []  # sorted remaining spaces that hold at least one row
    for i in order.tolist():
        n = int(lengths[i])
        k = bisect.bisect_left(spaces, n)
        if k < len(spaces):
            space = spaces[k]
            bucket = by_space[space]
            row = bucket.pop()
            if not bucket:
                spaces.pop(k)
        else:
            row, space = len(bins), capacity
            bins.append([])
        bins[row].append(i)
        left = space - n
        bucket = by_space.setdefault(left, [])
        if not bucket:
            bisect.insort(spaces, left)
        bucket.append(row)
    return bins


def _packed_table(tokenized, bins: list[list[int]]):
    """Packed rows built with Arrow kernels: one `take` of the rows' samples in order, then the
    flat token arrays are re-cut at row boundaries (no per-sample Python work)."""
    import pyarrow as pa

    order = np.fromiter((i for row in bins for i in sorted(row)), dtype=np.int64)
    table = tokenized.data.table if hasattr(tokenized.data, "table") else tokenized.data
    if tokenized._indices is not None:  # a selected view: map row positions to table rows
        order = np.asarray(tokenized._indices.column(0).to_numpy())[order]
    ids = table.column("input_ids").take(pa.array(order)).combine_chunks()
    mask = table.column("loss_mask").take(pa.array(order)).combine_chunks()
    lengths = np.asarray(ids.value_lengths(), dtype=np.int64)
    n_per_row = np.fromiter((len(r) for r in bins), dtype=np.int64)
    row_ends = np.cumsum(n_per_row)
    sample_starts = np.concatenate([[0], np.cumsum(lengths)])
    row_offsets = np.concatenate([[0], sample_starts[row_ends]]).astype(np.int64)
    first_of_row = np.repeat(row_ends - n_per_row, n_per_row)
    seg = np.repeat(np.arange(len(order)) - first_of_row, lengths)
    pos = np.arange(int(lengths.sum())) - np.repeat(sample_starts[:-1], lengths)
    offsets = pa.array(row_offsets, type=pa.int64())

    def cut(values, typ):
        return pa.LargeListArray.from_arrays(offsets, pa.array(values).cast(typ))

    return pa.table({
        "input_ids": cut(ids.flatten(), pa.int32()),
        "loss_mask": cut(mask.flatten(), pa.int8()),
        "segment_ids": cut(seg, pa.int32()),
        "position_ids": cut(pos, pa.int32()),
    })


def write_packed(tokenized, bins: list[list[int]], path: Path, rows_per_chunk: int = 2048):
    """Write packed rows to one Arrow file chunk by chunk (memory stays at one chunk's worth
    whatever the dataset size) and return it memory-mapped as a datasets.Dataset."""
    import datasets
    import pyarrow as pa

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = None
    with pa.OSFile(str(path), "wb") as sink:
        for start in range(0, len(bins), rows_per_chunk):
            table = _packed_table(tokenized, bins[start:start + rows_per_chunk])
            if writer is None:
                writer = pa.ipc.new_stream(sink, table.schema)
            writer.write_table(table)
        if writer is not None:
            writer.close()
    return datasets.Dataset.from_file(str(path))
