"""The Llama 2 network in one file.

References: Meta's `llama/model.py` (the spec), HF `transformers.models.llama.modeling_llama` (parameter
names, rotate-half RoPE layout, RoPE scaling), gpt-fast's `model.py` (a preallocated KV cache written at
explicit positions). Parameter names equal `LlamaForCausalLM`'s, so HF state dicts and PEFT adapters
load without renaming.

Positions are explicit per row (`input_pos`, shape (B, T)): every row of a batch has its own cache
timeline starting at 0, so prompts of different lengths share one batch without left padding. Without a
cache, positions that restart at 0 mark packed training examples: each attends only to its own tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llamaforge.config import ModelArgs


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Root-mean-square norm over the last dimension, computed in float32 as Meta and HF do."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class RMSNorm(nn.Module):
    # Loading a bfloat16 CPU model puts the compiled kernel here instead (quantize.use_bf16_kernel), per module.
    normalize = staticmethod(rms_norm)

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotate-half RoPE, with HF's `linear` and `dynamic` (NTK) scaling."""

    def __init__(self, config: ModelArgs) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        self.max_seq_len = config.max_seq_len
        scaling = config.rope_scaling or {}
        self.scaling_type = scaling.get("type")
        self.factor = scaling.get("factor", 1.0)

    def inv_freq(self, seq_len: int, device: torch.device) -> torch.Tensor:
        base = self.theta
        if self.scaling_type == "dynamic" and seq_len > self.max_seq_len:
            # NTK-aware: grow the base with the sequence so low frequencies stretch, high ones stay.
            ratio = self.factor * seq_len / self.max_seq_len - (self.factor - 1)
            base = base * ratio ** (self.head_dim / (self.head_dim - 2))
        exponents = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.int64).float() / self.head_dim
        inv_freq = 1.0 / (base**exponents)  # (D/2,)
        if self.scaling_type == "linear":
            inv_freq = inv_freq / self.factor
        return inv_freq

    def forward(self, input_pos: torch.Tensor, seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        inv_freq = self.inv_freq(seq_len, input_pos.device)
        freqs = input_pos[..., None].float() * inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) queries or keys by per-row positions; cos/sin are (B, T, D)."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


class BlockTable:
    """Which blocks of a paged cache's pool hold each row's positions: row b's position p lies in block
    `blocks[b, p // block_len]` at offset p % block_len. Shared by every layer's view of one step (their pools have
    one layout), so the element offsets the kernels read are computed once a step."""

    def __init__(self, blocks: torch.Tensor, block_len: int) -> None:
        self.blocks = blocks  # (B, blocks per row) int64
        self.block_len = block_len
        self.offsets_for: tuple[tuple[int, ...], torch.Tensor] | None = None
        self.rows_for: tuple[tuple[int, ...], int, torch.Tensor] | None = None

    def offsets(self, pool: torch.Tensor) -> torch.Tensor:
        """(B, blocks per row x block_len) int64: where each row's positions start in `pool` (blocks, Hkv, block_len,
        D), in elements (key-value head 0; head h is h * pool.stride(1) further)."""
        if self.offsets_for is None or self.offsets_for[0] != pool.stride():
            within = torch.arange(self.block_len, device=self.blocks.device) * pool.stride(2)  # (block_len,)
            starts = self.blocks * pool.stride(0)  # (B, n)
            self.offsets_for = (pool.stride(), (starts[:, :, None] + within).flatten(1))
        return self.offsets_for[1]

    def rows(self, pool: torch.Tensor, kv_len: int) -> torch.Tensor:
        """(B x Hkv x kv_len,) int64: which rows of the contiguous `pool` viewed as (-1, D) hold each row's first
        kv_len positions, head by head: an index_select by it gathers the step's keys (or values) in one copy."""
        if self.rows_for is None or self.rows_for[:2] != (pool.stride(), kv_len):
            heads = torch.arange(pool.shape[1], device=self.blocks.device) * pool.stride(1)  # (Hkv,)
            starts = self.offsets(pool)[:, None, :kv_len] + heads[:, None]  # (B, Hkv, kv_len)
            self.rows_for = (pool.stride(), kv_len, starts.flatten() // pool.stride(2))
        return self.rows_for[2]


class KVCache:
    """One layer's keys and values, written at explicit positions.

    Contiguous (`allocate`, no table): buffers (B, n_kv_heads, max_len, head_dim), row b's positions in k[b]. Paged
    (`pool`, then `paged` for a step): buffers (blocks, n_kv_heads, block_len, head_dim) that rows share through a
    `BlockTable`, as in vLLM, so memory goes to the tokens sequences hold, and rows whose prompts start alike can read
    the same blocks. Row b's entry at position p is valid once a forward has passed p in `input_pos[b]`; the
    attention mask hides everything later than the query.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, table: BlockTable | None = None) -> None:
        self.k, self.v = k, v
        self.table = table
        self.row_offsets: torch.Tensor | None = None  # a contiguous cache's `offsets`, once asked for

    @classmethod
    def allocate(cls, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str) -> KVCache:
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @classmethod
    def pool(cls, blocks: int, block_len: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
             device: torch.device | str) -> KVCache:
        """A paged cache's memory: `blocks` blocks of `block_len` positions, read through `paged` views."""
        return cls.allocate(blocks, block_len, n_kv_heads, head_dim, dtype, device)

    def paged(self, table: BlockTable) -> KVCache:
        """This pool's blocks as rows, as `table` says (a step's view; the memory is shared)."""
        return KVCache(self.k, self.v, table)

    @property
    def rows_count(self) -> int:
        """How many rows (sequences) the cache holds."""
        return self.k.shape[0] if self.table is None else self.table.blocks.shape[0]

    @property
    def capacity(self) -> int:
        """Positions each row can hold."""
        return self.k.shape[2] if self.table is None else self.table.blocks.shape[1] * self.table.block_len

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows start..stop-1 of a contiguous cache as a cache of their own, sharing memory."""
        return KVCache(self.k[start:stop], self.v[start:stop])

    def offsets(self) -> torch.Tensor:
        """(rows, capacity) int64: where each row's positions start in k (and v: same layout), in elements, for
        key-value head 0 (head h is h * k.stride(1) further). What the C kernels read the cache through."""
        if self.table is not None:
            return self.table.offsets(self.k)
        if self.row_offsets is None:
            self.row_offsets = BlockTable(torch.arange(self.k.shape[0], device=self.k.device)[:, None],
                                          self.k.shape[2]).offsets(self.k)
        return self.row_offsets

    def write(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v (B, Hkv, T, D) at input_pos (B, T)."""
        # Advanced indices on dims 0 and 2 address a (B, T) grid, so the written block is (B, T, Hkv, D).
        if self.table is None:
            rows, places = torch.arange(k.shape[0], device=k.device)[:, None], input_pos
        else:
            rows = self.table.blocks.gather(1, input_pos // self.table.block_len)
            places = input_pos % self.table.block_len
        self.k[rows, :, places] = k.transpose(1, 2)
        self.v[rows, :, places] = v.transpose(1, 2)

    def read(self, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's first kv_len positions, keys and values (B, Hkv, kv_len, D): views of a contiguous cache,
        gathered from a paged one's blocks."""
        if self.table is None:
            return self.k[:, :, :kv_len], self.v[:, :, :kv_len]
        rows = self.table.rows(self.k, kv_len)
        shape = (self.rows_count, self.k.shape[1], kv_len, self.k.shape[3])
        return (self.k.view(-1, shape[3]).index_select(0, rows).view(shape),
                self.v.view(-1, shape[3]).index_select(0, rows).view(shape))

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, D) at input_pos (B, T); return the first kv_len positions of the cache."""
        self.write(input_pos, k, v)
        return self.read(kv_len)


# Up to this many new tokens per row, CPU attention over the cache runs as two batched matmuls (decode_attention):
# torch's CPU SDPA kernel measured 4-18x slower for one bfloat16 query (0.3 ms vs 0.1 ms at 160 cached tokens, 7 ms
# vs 0.4 ms at 4096; TinyLlama's heads, 2 threads).
DECODE_QUERIES = 16


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of a few queries (B, H, T, D) over cached keys and values (B, Hkv, L, D) with a boolean mask
    (B, 1, T, L); each group of H / Hkv query heads shares one key-value head, as in HF's repeat_kv."""
    B, H, T, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    grouped = q.reshape(B, Hkv, H // Hkv * T, D)  # (B, Hkv, G * T, D): heads kv * G .. kv * G + G - 1
    scores = (grouped @ k.transpose(-1, -2)).float() * D**-0.5  # (B, Hkv, G * T, L)
    scores = scores.view(B, Hkv, H // Hkv, T, L).masked_fill(~mask[:, :, None], float("-inf"))
    weights = scores.softmax(dim=-1).to(v.dtype).view(B, Hkv, H // Hkv * T, L)
    return (weights @ v).view(B, H, T, D)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of queries (B, H, T, D) over a CPU cache's keys and values (B, Hkv, L, D) with a boolean mask
    (B, 1, T, L): `decode_attention` for a few queries a row, torch's SDPA for a prompt's chunk."""
    if q.shape[2] <= DECODE_QUERIES:
        return decode_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


def attend_cache(q: torch.Tensor, cache: KVCache, mask: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Attention of queries (B, H, T, D) over a CPU cache's first kv_len positions with a boolean mask (B, 1, T,
    kv_len), by `cached_attention`."""
    return cached_attention(q, *cache.read(kv_len), mask)


def project(x: torch.Tensor, *linears: nn.Module) -> list[torch.Tensor]:
    """Each of `linears` applied to x. Layers whose class has `forward_many(x, layers)` (the int8 / int4 layers)
    may compute them together: one kernel call for q, k and v reads x once and keeps every core busy."""
    forward_many = getattr(type(linears[0]), "forward_many", None)
    return forward_many(x, linears) if forward_many is not None else [linear(x) for linear in linears]


class Attention(nn.Module):
    # Attention over the cache on the CPU (`attend_cache`); loading a bfloat16 model puts the compiled kernel
    # here instead (quantize.use_bf16_kernel), per module: it computes each query alike whatever the number of
    # queries, so a prompt's numbers do not depend on how it is split into chunks, cached or decoded, and it reads
    # a paged cache's blocks where they are.
    attend_cache = staticmethod(attend_cache)

    def __init__(self, config: ModelArgs) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                input_pos: torch.Tensor, kv_cache: KVCache | None, kv_len: int) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None and x.device.type == "cpu":
            kv_cache.write(input_pos, k, v)
            y = self.attend_cache(q, kv_cache, mask, kv_len)
        else:
            if kv_cache is not None:
                k, v = kv_cache.update(input_pos, k, v, kv_len)  # (B, Hkv, kv_len, D)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_kv_heads != self.n_heads
            )  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gating: silu(gate) * up."""
    return F.silu(gate) * up


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    # Loading a bfloat16 CPU model puts the compiled kernel here instead (quantize.use_bf16_kernel), per module.
    activation = staticmethod(swiglu)

    def __init__(self, config: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.down_proj = nn.Linear(config.hidden_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, self.gate_proj, self.up_proj)
        return self.down_proj(self.activation(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelArgs) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                input_pos: torch.Tensor, kv_cache: KVCache | None, kv_len: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos, kv_cache, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and the final norm (HF's `LlamaForCausalLM.model`)."""

    def __init__(self, config: ModelArgs) -> None:
        super().__init__()
        # nn.Embedding's default init (normal_) on the meta device, where checkpoints are loaded, imports
        # torch._dynamo: a second and 70 MB per process. So initialise by hand, and only real tensors.
        embedding = torch.empty(config.vocab_size, config.dim)
        if not embedding.is_meta:
            nn.init.normal_(embedding)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim, _weight=embedding)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


def packed_causal_mask(input_pos: torch.Tensor) -> torch.Tensor:
    """Causal mask (B, 1, T, T) that keeps packed examples apart: a new example starts where a position is 0."""
    segment = (input_pos == 0).cumsum(dim=1)  # (B, T): which example of the row each token belongs to
    same_segment = segment[:, :, None] == segment[:, None, :]
    T = input_pos.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=input_pos.device).tril()
    return (same_segment & causal)[:, None]


class Llama(nn.Module):
    """Llama 2 for causal language modelling, with `LlamaForCausalLM`'s parameter names."""

    def __init__(self, config: ModelArgs) -> None:
        super().__init__()
        self.config = config
        # Recompute each layer's activations in backward instead of keeping them (training only).
        self.gradient_checkpointing = False
        self.loss_chunk = 2048  # rows of logits alive at once when forward computes the loss
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        """Where the weights are (the embedding's device: every layer shares it)."""
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the embedding's: linear layers may be stored quantized)."""
        return self.model.embed_tokens.weight.dtype

    def compile_layers(self, **options) -> Llama:
        """torch.compile each decoder layer in place (one graph reused by all layers: they share code and shapes).

        Fuses the elementwise work around the matmuls (norms, RoPE, SwiGLU, LoRA scaling, residuals), which
        dominates memory traffic in training.
        """
        for layer in self.model.layers:
            layer.compile(**options)
        return self

    def new_kv_cache(self, batch_size: int, max_len: int) -> list[KVCache]:
        """Allocate one cache per layer on the model's device and dtype."""
        return [
            KVCache.allocate(batch_size, max_len, self.config.n_kv_heads, self.config.head_dim, self.dtype,
                             self.device)
            for _ in self.model.layers
        ]

    def new_kv_pool(self, blocks: int, block_len: int) -> list[KVCache]:
        """Allocate one paged cache's pool per layer (`blocks` blocks of `block_len` positions), on the model's
        device and dtype."""
        return [
            KVCache.pool(blocks, block_len, self.config.n_kv_heads, self.config.head_dim, self.dtype, self.device)
            for _ in self.model.layers
        ]

    def forward(self, input_ids: torch.Tensor, input_pos: torch.Tensor | None = None,
                kv_cache: list[KVCache] | None = None, logits_at: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, kv_len: int | None = None) -> torch.Tensor:
        """Logits (B, T, V) for input_ids (B, T); or only where `logits_at` says: one index per row (B,) gives
        (B, V), a boolean mask (B, T) gives (N, V) for its N true places (training skips unlabelled tokens).
        With `targets` (N,) for such a mask, the summed cross-entropy instead (see `chunked_loss_sum`).

        Without `input_pos` the rows are whole sequences starting at position 0 (training, scoring).
        With a cache, `input_pos` (B, T) says where each token sits in its row's timeline, and attention reads
        the cache's first `kv_len` positions: by default up to the largest position (a host sync); callers that
        know it pass it (generate and the engine count positions on the host; a compiled step rounds it up to a
        bucket, so shapes change rarely). Without a cache, `input_pos` marks
        packed examples: positions restart at 0 where an example starts.
        """
        B, T = input_ids.shape
        if kv_cache is None:
            # No cache: keys are exactly this call's tokens; packed rows also hide the other examples.
            kv_len = T
            mask = None if input_pos is None else packed_causal_mask(input_pos)
            if input_pos is None:
                input_pos = torch.arange(T, device=input_ids.device).expand(B, T)
        else:
            # Query at position p sees cache entries 0..p of its own row: anything later is either
            # the future or stale padding from a shorter prompt, and must stay hidden.
            kv_len = kv_len or int(input_pos.max()) + 1
            cache_pos = torch.arange(kv_len, device=input_ids.device)
            mask = (cache_pos[None, None, :] <= input_pos[:, :, None])[:, None]  # (B, 1, T, kv_len)
        x = self.model.embed_tokens(input_ids)  # (B, T, dim)
        cos, sin = self.model.rotary_emb(input_pos, kv_len, x.dtype)
        for i, layer in enumerate(self.model.layers):
            layer_cache = kv_cache[i] if kv_cache is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, input_pos, layer_cache, kv_len, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, input_pos, layer_cache, kv_len)
        if logits_at is not None and logits_at.dtype == torch.bool:
            x = x[logits_at]  # (N, dim)
        elif logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at]  # (B, dim)
        if targets is not None:
            return self.chunked_loss_sum(self.model.norm(x), targets, self.loss_chunk)
        return self.lm_head(self.model.norm(x))

    def chunked_loss_sum(self, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
        """Summed cross-entropy of normed hidden states (N, dim) against targets (N,), `chunk` rows at a time.

        Each chunk's logits are recomputed in backward rather than kept, so the float32 (N, V) logits and
        their gradient (2.6 GB for 8192 tokens of Llama 2's vocabulary) never exist at once.
        """
        def chunk_loss(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self.lm_head(h).float(), t, reduction="sum")

        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            total = total + (checkpoint(chunk_loss, h, t, use_reentrant=False) if torch.is_grad_enabled()
                             else chunk_loss(h, t))
        return total


def init_weights(model: Llama, seed: int = 0, std: float = 0.02) -> Llama:
    """Fill a model with the usual small-normal random initialisation (norms at 1), reproducibly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(_random_value(name, param.shape, generator, std, model.config.n_layers))
    return model


def random_weights(config: ModelArgs, seed: int = 0, std: float = 0.02) -> Iterator[tuple[str, torch.Tensor]]:
    """init_weights' values for a model of `config`, one float32 tensor at a time (build_model casts each as it
    arrives, so a 7B model is made in bfloat16 without a float32 copy of it)."""
    with torch.device("meta"):
        shapes = [(name, param.shape) for name, param in Llama(config).named_parameters()]
    generator = torch.Generator().manual_seed(seed)
    for name, shape in shapes:
        yield name, _random_value(name, shape, generator, std, config.n_layers)


def _random_value(name: str, shape: torch.Size, generator: torch.Generator, std: float,
                  n_layers: int) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    # Scale residual projections down so deep random models stay numerically tame.
    scale = std / math.sqrt(2 * n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
    return torch.randn(shape, generator=generator) * scale
