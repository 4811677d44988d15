"""The engine's KV memory as a pool of fixed-size blocks, and the prefix cache that lives in it (vLLM's design).

Each running sequence holds a list of blocks (its block table: position p lies in block p // block_len), taken
from the pool as it grows; admission reserves what the sequence may need at most, so a step never runs out of
memory halfway. A block all of whose positions hold known tokens is indexed by a key chained from its tokens and
everything before them (and the LoRA adapter that computed them), so a later prompt starting with the same tokens
reads that block instead of computing it: sequences share full blocks, which nobody writes again. A finished
sequence's blocks stay indexed on the free list, least recently used first, until the memory is needed; its last,
partly filled block too, and a prompt sharing only the start of a block gets a copy of that block (copy on
write). So the next turn of a chat computes only its new tokens, a shared system prompt is computed once, and
memory holds as many conversations as fit in it, not as many as there are sequences.

Block 0 is scratch: a batch's padding positions are written there and never read.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

SCRATCH = 0


@dataclass
class Sequence:
    """One running sequence's blocks, and how many more it may take (reserved at admission)."""

    blocks: list[int] = field(default_factory=list)
    reserved: int = 0
    keys: list[bytes] = field(default_factory=list)  # the chained keys of its first full blocks, once indexed
    adapter: int = 0
    borrowed: int = 0  # its first blocks, taken from the cache rather than computed


@dataclass
class Cached:
    """What a block holds for the prefix cache: its tokens, and the key of the blocks before it."""

    parent: bytes
    tokens: tuple[int, ...]
    key: bytes | None  # its own key when full (then later blocks chain from it); None for a partly filled block
    adapter: int  # whose keys and values they are (0: the base model's)


class BlockPool:
    """`n_blocks` blocks of `block_len` positions; `copy(source, target, length)` copies a block's first positions
    (every layer's keys and values), for copy on write."""

    def __init__(self, n_blocks: int, block_len: int, copy: Callable[[int, int, int], None]) -> None:
        if n_blocks < 2:
            raise ValueError(f"a KV pool needs at least 2 blocks (one is scratch), got {n_blocks}")
        self.n_blocks, self.block_len, self.copy = n_blocks, block_len, copy
        self.refs = [0] * n_blocks
        # Blocks nobody holds, the next to be taken first: plain ones, then cached ones least recently used first.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, n_blocks))
        self.reserved = 0  # blocks promised to running sequences and not yet taken
        self.cached: dict[int, Cached] = {}
        self.free_cached_tokens = 0  # tokens of the cached blocks on the free list (read by other threads: a count)
        self.by_key: dict[bytes, int] = {}
        self.children: dict[bytes, set[int]] = {}  # parent key -> cached blocks that follow it

    # --- accounting ------------------------------------------------------------------------------------------

    def blocks_for(self, positions: int) -> int:
        """Blocks that hold `positions` positions."""
        return -(-positions // self.block_len)

    @property
    def usable(self) -> int:
        """Blocks a sequence can ever hold (all but scratch)."""
        return self.n_blocks - 1

    @property
    def used(self) -> int:
        """Blocks held by running sequences."""
        return self.usable - len(self.free)

    @property
    def cached_tokens(self) -> int:
        """Tokens the free blocks keep for later prompts."""
        return self.free_cached_tokens

    # --- a sequence's life -----------------------------------------------------------------------------------

    def admit(self, tokens: list[int], positions: int, adapter: int, reuse: bool) -> tuple[Sequence, int] | None:
        """A new sequence for a prompt that may reach `positions` positions, holding whatever the cache has of the
        prompt's start (when `reuse`), and how many of its positions that covers; None while the pool cannot
        promise the rest (the caller waits for sequences to finish)."""
        held, found = self._lookup(tokens, adapter) if reuse else ([], 0)
        total = self.blocks_for(positions)
        if total - len(held) > len(self.free) - sum(self.refs[b] == 0 for b in held) - self.reserved:
            return None
        sequence = Sequence(adapter=adapter)
        return sequence, self._attach(sequence, tokens, held, found, total)

    def reattach(self, sequence: Sequence, tokens: list[int], fed: int, positions: int) -> int:
        """Before a prompt's first forward: if the cache now holds more of its start than the `fed` positions the
        sequence has (blocks other sequences computed since it was admitted), take that instead; the positions it
        has. It always fits: the cache's blocks for the positions it had are the ones it holds (blocks in use are
        never evicted), and it gives back the rest of what it was promised."""
        held, found = self._lookup(tokens, sequence.adapter)
        if found <= fed:
            return fed
        self.reserved -= sequence.reserved
        for block in reversed(sequence.blocks):
            self._drop(block, keep=True)
        return self._attach(sequence, tokens, held, found, self.blocks_for(positions))

    def _attach(self, sequence: Sequence, tokens: list[int], held: list[int], found: int, total: int) -> int:
        """Give the sequence the cached blocks `held` and, past them, a copy of the cached start of a block up to
        position `found`; promise it the rest of `total` blocks. The positions it now has."""
        for block in held:
            self._hold(block)
        sequence.blocks, sequence.borrowed = list(held), len(held)
        sequence.keys = [self.cached[b].key for b in held]
        sequence.reserved = total - len(held)
        self.reserved += sequence.reserved
        if found > len(held) * self.block_len:
            return self._copy_partial(sequence, tokens, found)
        return found

    def grow(self, sequence: Sequence, positions: int) -> None:
        """Give the sequence blocks for its first `positions` positions (within what it reserved)."""
        while len(sequence.blocks) < self.blocks_for(positions) and sequence.reserved:
            sequence.blocks.append(self._take())
            self._promised(sequence, 1)

    def index(self, sequence: Sequence, tokens: list[int]) -> None:
        """Index the sequence's full blocks whose tokens (its first len(tokens) positions) are now known."""
        while len(sequence.keys) < min(len(tokens) // self.block_len, len(sequence.blocks)):
            i = len(sequence.keys)
            block = sequence.blocks[i]
            parent = sequence.keys[-1] if sequence.keys else root_key(sequence.adapter)
            chunk = tuple(tokens[i * self.block_len:(i + 1) * self.block_len])
            key = chain_key(parent, chunk)
            if key not in self.by_key and block not in self.cached:
                self.by_key[key] = block
                self.cached[block] = Cached(parent, chunk, key, sequence.adapter)
                self.children.setdefault(parent, set()).add(block)
            sequence.keys.append(key)

    def release(self, sequence: Sequence, tokens: list[int] | None) -> None:
        """The sequence ended: its blocks go back to the pool. With its `tokens` (those its positions hold) they stay
        in the prefix cache, its partly filled last block too; without (a failure), the blocks it computed are
        forgotten (those it read from the cache stay)."""
        if tokens is not None:
            self.index(sequence, tokens)
            tail = len(sequence.keys)
            rest = tuple(tokens[tail * self.block_len:(tail + 1) * self.block_len])
            if rest and tail < len(sequence.blocks) and sequence.blocks[tail] not in self.cached:
                parent = sequence.keys[-1] if sequence.keys else root_key(sequence.adapter)
                self.cached[sequence.blocks[tail]] = Cached(parent, rest, None, sequence.adapter)
                self.children.setdefault(parent, set()).add(sequence.blocks[tail])
        # The last blocks first, so they are evicted before the blocks they follow.
        for i in reversed(range(len(sequence.blocks))):
            self._drop(sequence.blocks[i], keep=tokens is not None or i < sequence.borrowed)
        self.reserved -= sequence.reserved
        sequence.blocks, sequence.keys, sequence.reserved, sequence.borrowed = [], [], 0, 0

    def forget(self, adapter: int) -> None:
        """Drop what the cache keeps of one adapter's sequences (its slot may serve another adapter next)."""
        for block in [b for b in self.free if b in self.cached]:
            if self.cached[block].adapter == adapter:
                self._uncache(block)
                self.free.move_to_end(block, last=False)

    # --- inside ----------------------------------------------------------------------------------------------

    def _lookup(self, tokens: list[int], adapter: int) -> tuple[list[int], int]:
        """The cached full blocks that start the prompt and how many positions of it the cache holds, the last
        token's excepted (its forward gives the first logits): full blocks, then maybe the start of another."""
        limit = len(tokens) - 1
        key, held = root_key(adapter), []
        while (len(held) + 1) * self.block_len <= limit:
            start = len(held) * self.block_len
            block = self.by_key.get(chain_key(key, tuple(tokens[start:start + self.block_len])))
            if block is None:
                break
            held.append(block)
            key = self.cached[block].key
        start = len(held) * self.block_len
        rest = tokens[start:limit]
        best = max((shared_prefix(self.cached[b].tokens, rest) for b in self.children.get(key, ())), default=0)
        return held, start + best

    def _copy_partial(self, sequence: Sequence, tokens: list[int], found: int) -> int:
        """Copy the start of the cached block that holds tokens up to `found` into a block of the sequence's own;
        the positions the sequence then has (only its full blocks' when the last free block is that source)."""
        parent = sequence.keys[-1] if sequence.keys else root_key(sequence.adapter)
        start = len(sequence.blocks) * self.block_len
        rest = tokens[start:found]
        source = next(b for b in self.children[parent] if shared_prefix(self.cached[b].tokens, rest) == len(rest))
        pinned = self.refs[source] == 0
        if pinned and len(self.free) == 1:
            return start
        if pinned:
            self._hold(source)  # not to be taken for the copy itself
        self.grow(sequence, start + 1)
        self.copy(source, sequence.blocks[-1], len(rest))
        if pinned:
            self._drop(source, keep=True)
        return found

    def _hold(self, block: int) -> None:
        self.refs[block] += 1
        if self.free.pop(block, False) is None and block in self.cached:
            self.free_cached_tokens -= len(self.cached[block].tokens)

    def _promised(self, sequence: Sequence, blocks: int) -> None:
        taken = min(blocks, sequence.reserved)
        sequence.reserved -= taken
        self.reserved -= taken

    def _take(self) -> int:
        """A free block for new positions: a plain one, else the least recently used cached one (evicted)."""
        block = next(iter(self.free))
        if block in self.cached:
            self._uncache(block)
        del self.free[block]
        self.refs[block] = 1
        return block

    def _drop(self, block: int, keep: bool) -> None:
        self.refs[block] -= 1
        if self.refs[block]:
            return
        if not keep and block in self.cached:
            self._uncache(block)
        self.free[block] = None  # most recently used
        if block in self.cached:
            self.free_cached_tokens += len(self.cached[block].tokens)
        else:
            self.free.move_to_end(block, last=False)  # plain blocks are taken first

    def _uncache(self, block: int) -> None:
        entry = self.cached.pop(block)
        if block in self.free:
            self.free_cached_tokens -= len(entry.tokens)
        if entry.key is not None:
            del self.by_key[entry.key]
        children = self.children[entry.parent]
        children.discard(block)
        if not children:
            del self.children[entry.parent]


def root_key(adapter: int) -> bytes:
    """The key every chain of an adapter's blocks starts from (0: the base model)."""
    return hashlib.blake2b(f"llamaforge-kv:{adapter}".encode(), digest_size=16).digest()


def chain_key(parent: bytes, tokens: tuple[int, ...]) -> bytes:
    """A block's key: a hash of the key before it and its tokens (collision-resistant: a prompt cannot be made to
    read another's keys and values)."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


def shared_prefix(a: list[int] | tuple[int, ...], b: list[int] | tuple[int, ...]) -> int:
    """How many tokens the two sequences share from their start."""
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):  # the common case (a whole earlier turn) in one comparison
        return n
    return next(i for i in range(n) if a[i] != b[i])
