"""Row operations on a HybridCache for continuous batching: join, leave, compact, snapshot, resume.

A running batch is one HybridCache whose rows are sequences that started at different times. The K/V
columns are shared (`seq_len` is one number), so rows are aligned on the right: a row holding n tokens
fills the last n columns of [0, seq_len) and its `key_mask` is False on the columns before them. That is
exactly the layout of a left-padded prompt, which the model already handles (attention masks those keys;
RoPE positions and conv/SSM states are per row), so a decode step over the batch gives every row the
numbers it would get alone.

    join      a batch-1 cache after its prefill becomes a new row; when it is longer than the batch, the
              old rows are shifted right (left padding grows) so that all rows still end at seq_len
    leave     rows are dropped by index; then `compact` removes leading columns that are padding in every
              row, so the batch does not keep attending over the history of sequences that left
    snapshot  one row cut out as a batch-1 cache of exactly its own length (the prompt-state cache)
    resume    a snapshot copied into a fresh batch-1 cache with room to continue prefilling

Everything works on the cache's public tensors:
    conv_states (L, B, C, K-1)   ssm_states (L, B, H, P, N) fp32   keys/values (J, B, nkv, Tmax, d)
    key_mask (B, Tmax) bool      positions (B,) long               seq_len int, has_padding bool
Padding columns of K/V are zero-filled: the attention mask gives them weight 0, and 0 * garbage could be NaN.
"""

from __future__ import annotations

import torch

from zamba2.cache import HybridCache

# K/V capacity is rounded up to a multiple of this, so a batch rarely reallocates while decoding.
CAPACITY_STEP = 64


def _round_up(n: int, step: int = CAPACITY_STEP) -> int:
    return -(-n // step) * step


def build_cache(
    like: HybridCache,
    conv_states: torch.Tensor,
    ssm_states: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    key_mask: torch.Tensor,
    positions: torch.Tensor,
    seq_len: int,
) -> HybridCache:
    """A HybridCache around the given tensors (no copy), with `like`'s config."""
    # The constructor sets every attribute; its own (tiny) tensors are then replaced.
    cache = HybridCache(like.config, conv_states.shape[1], 1, dtype=keys.dtype, device=keys.device)
    cache.conv_states, cache.ssm_states = conv_states, ssm_states
    cache.keys, cache.values = keys, values
    cache.key_mask, cache.positions = key_mask, positions
    cache.seq_len = seq_len
    cache.has_padding = not bool(key_mask[:, :seq_len].all())
    return cache


def row_lengths(cache: HybridCache) -> list[int]:
    """Number of real (unmasked) tokens of each row."""
    return cache.key_mask[:, : cache.seq_len].sum(-1).tolist()


class StateRows:
    """Preallocated conv/SSM state rows for a server's running batch.

    A batch built on it holds the views [:, :B] of these buffers (each layer's slice stays contiguous): a row
    joins by copying its states into row B, and rows leave by moving later rows down. Neither reallocates the
    batch's states, (L, B, H, P, N) fp32, 80 MB a row at 1.2B, whose fresh allocation and first touch cost about
    as much as a decode step on a CPU, at every join.
    """

    def __init__(self, config, rows: int, dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        shape = HybridCache(config, 1, 1, dtype=dtype, device="meta")  # the per-row shapes, allocating nothing
        self.conv = torch.zeros(shape.conv_states.shape[0], rows, *shape.conv_states.shape[2:], dtype=dtype,
                                device=device)  # fmt: skip
        self.ssm = torch.zeros(shape.ssm_states.shape[0], rows, *shape.ssm_states.shape[2:], dtype=torch.float32,
                               device=device)  # fmt: skip

    @property
    def rows(self) -> int:
        return self.ssm.shape[1]

    def holds(self, cache: HybridCache) -> bool:
        """Whether `cache`'s states are the leading rows of these buffers."""
        same = cache.ssm_states.data_ptr() == self.ssm.data_ptr()
        return same and cache.conv_states.data_ptr() == self.conv.data_ptr()


def insert_rows(
    batch: HybridCache | None, rows: list[HybridCache], capacity: int = 0, pool: StateRows | None = None
) -> HybridCache:
    """A new batch: the rows of `batch` (may be None) followed by the given batch-1 caches.

    The result has seq_len = the longest row and room for at least `capacity` K/V columns. Each row keeps
    its conv/SSM state and position; its K/V are right-aligned, with key_mask False on the left. With a `pool`
    that has the rows, the states live in it (rows of `batch` already there are not copied).
    """
    if not rows:
        raise ValueError("insert_rows needs at least one row to insert")
    for r in rows:
        if r.batch_size != 1 or r.has_padding:
            raise ValueError("insert_rows takes unpadded batch-1 caches (one prefilled sequence each)")
    parts = ([batch] if batch is not None and batch.batch_size > 0 else []) + rows
    like = parts[0]
    S = max(p.seq_len for p in parts)
    cap = _round_up(max(S, capacity, 1))
    B = sum(p.batch_size for p in parts)
    J, _, nkv, _, d = like.keys.shape
    keys = like.keys.new_empty(J, B, nkv, cap, d)
    values = torch.empty_like(keys)
    keys[:, :, :, :S].zero_()
    values[:, :, :, :S].zero_()
    key_mask = torch.ones(B, cap, dtype=torch.bool, device=like.device)
    key_mask[:, :S] = False
    b = 0
    for p in parts:
        n, s = p.batch_size, p.seq_len
        # right-align: the part's columns [0, s) land on [S - s, S)
        keys[:, b : b + n, :, S - s : S] = p.keys[:, :, :, :s]
        values[:, b : b + n, :, S - s : S] = p.values[:, :, :, :s]
        key_mask[b : b + n, S - s : S] = p.key_mask[:, :s]
        b += n
    if pool is not None and B <= pool.rows:
        conv, ssm = pool.conv[:, :B], pool.ssm[:, :B]
        b = 0
        for p in parts:
            n = p.batch_size
            if not (b == 0 and pool.holds(p)):  # a batch already in the pool keeps its rows in place
                conv[:, b : b + n].copy_(p.conv_states)
                ssm[:, b : b + n].copy_(p.ssm_states)
            b += n
    else:
        conv = torch.cat([p.conv_states for p in parts], dim=1)
        ssm = torch.cat([p.ssm_states for p in parts], dim=1)
    positions = torch.cat([p.positions for p in parts])
    return build_cache(like, conv, ssm, keys, values, key_mask, positions, S)


def leading_padding(cache: HybridCache) -> int:
    """Number of leading K/V columns that are padding in every row."""
    used = cache.key_mask[:, : cache.seq_len].any(0)  # (S,)
    if not bool(used.any()):
        return cache.seq_len
    return int(used.to(torch.int8).argmax())


def drop_rows(cache: HybridCache, keep: list[int], pool: StateRows | None = None) -> HybridCache | None:
    """A new batch holding only the rows `keep` (in that order), compacted; None when nothing is kept.

    When `pool` holds the batch's states and `keep` is ascending, the kept rows move down inside the pool (row
    keep[i] to row i, in order, which never overwrites a row still to be read) instead of being copied out."""
    if not keep:
        return None
    idx = torch.tensor(keep, dtype=torch.long, device=cache.device)
    S = cache.seq_len
    used = cache.key_mask.index_select(0, idx)[:, :S].any(0)
    c = int(used.to(torch.int8).argmax()) if bool(used.any()) else S
    # one copy: row selection and the cut of the leading all-padding columns together
    keys = cache.keys[:, idx, :, c:]
    values = cache.values[:, idx, :, c:]
    key_mask = cache.key_mask[idx, c:]
    if pool is not None and pool.holds(cache) and keep == sorted(set(keep)):
        for i, src in enumerate(keep):
            if src != i:
                pool.conv[:, i].copy_(pool.conv[:, src])
                pool.ssm[:, i].copy_(pool.ssm[:, src])
        conv, ssm = pool.conv[:, : len(keep)], pool.ssm[:, : len(keep)]
    else:
        conv, ssm = cache.conv_states.index_select(1, idx), cache.ssm_states.index_select(1, idx)
    return build_cache(cache, conv, ssm, keys, values, key_mask, cache.positions.index_select(0, idx), S - c)


def compact(cache: HybridCache) -> int:
    """Remove the leading columns that are padding in every row, in place; return how many went."""
    c = leading_padding(cache)
    if c == 0:
        return 0
    cache.keys = cache.keys[:, :, :, c:].clone()
    cache.values = cache.values[:, :, :, c:].clone()
    cache.key_mask = cache.key_mask[:, c:].clone()
    cache.seq_len -= c
    cache.has_padding = not bool(cache.key_mask[:, : cache.seq_len].all())
    return c


def extract_row(cache: HybridCache, row: int) -> HybridCache:
    """Row `row` as a batch-1 cache of exactly its own length (copies; the batch is left unchanged)."""
    S = cache.seq_len
    n = int(cache.key_mask[row, :S].sum())
    if not bool(cache.key_mask[row, S - n : S].all()):
        raise ValueError(f"row {row} is not right-aligned: its real keys are not the last {n} columns")
    sl = slice(row, row + 1)
    return build_cache(
        cache, cache.conv_states[:, sl].clone(), cache.ssm_states[:, sl].clone(),
        cache.keys[:, sl, :, S - n : S].clone(), cache.values[:, sl, :, S - n : S].clone(),
        torch.ones(1, n, dtype=torch.bool, device=cache.device), cache.positions[sl].clone(), n,
    )  # fmt: skip


def trimmed(cache: HybridCache) -> HybridCache:
    """A batch-1 cache viewed down to its filled length (no copy); for storing a finished prefill."""
    S = cache.seq_len
    return build_cache(
        cache, cache.conv_states, cache.ssm_states, cache.keys[:, :, :, :S], cache.values[:, :, :, :S],
        cache.key_mask[:, :S], cache.positions, S,
    )  # fmt: skip


def resume(snapshot: HybridCache, capacity: int) -> HybridCache:
    """A private copy of a batch-1 snapshot with room for `capacity` K/V columns, ready to continue."""
    S = snapshot.seq_len
    cap = max(capacity, S)
    J, b, nkv, _, d = snapshot.keys.shape
    keys = snapshot.keys.new_empty(J, b, nkv, cap, d)
    values = torch.empty_like(keys)
    keys[:, :, :, :S] = snapshot.keys[:, :, :, :S]
    values[:, :, :, :S] = snapshot.values[:, :, :, :S]
    key_mask = torch.ones(b, cap, dtype=torch.bool, device=snapshot.device)
    key_mask[:, :S] = snapshot.key_mask[:, :S]
    return build_cache(
        snapshot, snapshot.conv_states.clone(), snapshot.ssm_states.clone(), keys, values, key_mask,
        snapshot.positions.clone(), S,
    )  # fmt: skip
