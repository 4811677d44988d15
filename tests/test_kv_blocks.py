"""The paged KV pool on its own: sharing full blocks, copying part of one, promises, LRU eviction, failures."""

from __future__ import annotations

import pytest

from llamaforge.kv_blocks import SCRATCH, BlockPool


class Copies(list):
    """The pool's copy callback: records (source, target, length)."""

    def __call__(self, source: int, target: int, length: int) -> None:
        self.append((source, target, length))


def finish(pool: BlockPool, sequence, tokens: list[int]) -> None:
    """Run a sequence to hold `tokens` (grow, index), then release it into the cache."""
    pool.grow(sequence, len(tokens))
    pool.index(sequence, tokens)
    pool.release(sequence, tokens)


def test_a_prompt_shares_full_blocks_and_copies_the_start_of_a_partly_shared_one() -> None:
    copies = Copies()
    pool = BlockPool(9, 4, copies)
    first = list(range(1, 11))  # 10 tokens: two full blocks and half of a third
    sequence, found = pool.admit(first, 14, adapter=0, reuse=True)
    assert found == 0 and sequence.blocks == [] and sequence.reserved == 4
    finish(pool, sequence, first)
    a_blocks = list(pool.cached)
    assert len(a_blocks) == 3 and pool.cached_tokens == 10 and pool.used == 0 and pool.reserved == 0

    second = first + [99, 98]
    sequence, found = pool.admit(second, 16, adapter=0, reuse=True)
    # Full blocks read in place; the third block's two shared tokens copied into a block of its own; the last
    # prompt token (98) is never taken from the cache, its forward gives the first logits.
    assert found == 10
    assert sequence.blocks[:2] == [pool.by_key[key] for key in sequence.keys]
    assert sequence.blocks[2] not in a_blocks and copies == [(a_blocks[2], sequence.blocks[2], 2)]
    assert pool.refs[sequence.blocks[0]] == 1 and sequence.reserved == 1
    # Another adapter's keys and values are not the base's: nothing shared.
    other, found = pool.admit(second, 16, adapter=1, reuse=True)
    assert found == 0 and other.blocks == []
    assert SCRATCH not in sequence.blocks + list(pool.free)


def test_admission_waits_for_blocks_it_cannot_be_promised() -> None:
    pool = BlockPool(5, 4, Copies())  # 4 usable blocks
    big, _ = pool.admit([1, 2, 3], 12, adapter=0, reuse=True)  # 3 blocks promised, none taken yet
    assert pool.admit([4, 5], 8, adapter=0, reuse=True) is None  # 2 more do not fit
    small, _ = pool.admit([4, 5], 4, adapter=0, reuse=True)
    assert pool.reserved == 4 and pool.used == 0
    pool.grow(big, 12)
    pool.grow(big, 100)  # never past its promise
    assert len(big.blocks) == 3 and big.reserved == 0 and pool.reserved == 1 and pool.used == 3
    pool.release(big, None)
    pool.release(small, None)
    assert pool.reserved == 0 and pool.used == 0 and not pool.cached
    assert pool.admit([4, 5], 16, adapter=0, reuse=True) is not None


def test_the_least_recently_released_blocks_are_taken_first_their_last_block_before_the_others() -> None:
    pool = BlockPool(7, 2, Copies())  # 6 usable blocks of 2
    a, b = [1, 2, 3, 4, 5, 6], [7, 8, 9, 10]
    for tokens in (a, b):
        sequence, _ = pool.admit(tokens, len(tokens), adapter=0, reuse=True)
        finish(pool, sequence, tokens)
    assert pool.cached_tokens == 10 and len(pool.free) == 6  # one plain block, A's three, B's two
    c, _ = pool.admit([11, 12], 4, adapter=0, reuse=True)
    pool.grow(c, 4)  # the plain block, then A's last block
    assert pool.admit(a + [0], 8, adapter=0, reuse=True)[1] == 4  # A's first two blocks are still cached
    assert pool.cached_tokens == 4  # B's four tokens; A's first two blocks are held now, not free
    assert [pool.cached[k].tokens for k in pool.free if k in pool.cached] == [(9, 10), (7, 8)]  # next taken first


def test_a_failed_sequence_forgets_its_own_blocks_but_not_those_it_shares() -> None:
    pool = BlockPool(9, 2, Copies())
    prompt = [1, 2, 3, 4, 5]
    first, _ = pool.admit(prompt, 8, adapter=0, reuse=True)
    finish(pool, first, prompt + [6])  # blocks (1 2) (3 4) (5 6) cached
    second, found = pool.admit(prompt + [7, 8, 9], 10, adapter=0, reuse=True)
    assert found == 5  # (1 2) (3 4) shared, (5) copied
    pool.grow(second, 9)
    pool.index(second, prompt + [7, 8, 9, 10])
    pool.release(second, None)
    assert sorted(entry.tokens for entry in pool.cached.values()) == [(1, 2), (3, 4), (5, 6)]
    assert pool.used == 0 and pool.reserved == 0


def test_a_sequence_admitted_before_its_prefix_was_computed_takes_it_before_its_first_forward() -> None:
    pool = BlockPool(9, 2, Copies())
    prompt = [1, 2, 3, 4, 5, 6, 7]
    first, _ = pool.admit(prompt, 8, adapter=0, reuse=True)
    second, found = pool.admit(prompt, 8, adapter=0, reuse=True)
    assert found == 0
    pool.grow(first, 7)
    pool.index(first, prompt)  # its prefill: three full blocks
    assert pool.reattach(second, prompt, 0, 8) == 6
    assert second.blocks == first.blocks[:3] and second.reserved == 1 and pool.reserved == 1
    pool.release(first, prompt)
    pool.release(second, prompt)
    assert pool.used == 0 and pool.reserved == 0


def test_forgetting_an_adapter_drops_only_its_blocks() -> None:
    pool = BlockPool(9, 2, Copies())
    for adapter in (0, 1, 2):
        sequence, _ = pool.admit([1, 2, 3], 4, adapter=adapter, reuse=True)
        finish(pool, sequence, [1, 2, 3, 4])
    pool.forget(1)
    assert sorted(entry.adapter for entry in pool.cached.values()) == [0, 0, 2, 2]
    assert pool.admit([1, 2, 3, 4, 5], 6, adapter=1, reuse=True)[1] == 0
    assert pool.admit([1, 2, 3, 4, 5], 6, adapter=2, reuse=True)[1] == 4


def test_a_pool_needs_a_block_besides_scratch() -> None:
    with pytest.raises(ValueError, match="at least 2 blocks"):
        BlockPool(1, 16, Copies())
