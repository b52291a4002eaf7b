"""A bounded KV cache for `generate`: each layer keeps at most `memory_size` tokens per kv head (+ a buffer).

One cache class, several eviction scores, so every policy is compared at the same budget by the same code:
    gates      TRIM-KV: (t + 1 - pos) * log beta, the log of the token's decayed retention (docs/methods.md s.4)
    streaming  StreamingLLM: the first `sink_tokens` tokens, then the most recent
    h2o        H2O: attention received so far, plus the most recent `recent_size` tokens
    snapkv     SnapKV: attention from the last `window` queries of the latest prompt chunk (pooled), + that window
    knorm      the tokens with the smallest key norm
    random     uniform random scores (seeded)
Keys are stored after RoPE with their absolute positions, in temporal order; padding is evicted first.
`get_seq_length` reports the tokens seen, not the physical length, so positions and RoPE stay right.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer

POLICIES = ("gates", "streaming", "h2o", "snapkv", "knorm", "random")
ATTENTIONS = ("plain", "decayed")  # how the gates' cache attends to what it kept (see RetentionLayer)
DEFAULT_BUFFER = 128  # tokens added between evictions, unless a recipe, an export or the caller says otherwise


def check_memory_size(memory_size: int | None, none_means: str | None = None) -> None:
    """ValueError unless memory_size is >= 1 (or None where `none_means` says what None stands for)."""
    if memory_size is None and none_means is not None:
        return
    if memory_size is None or memory_size < 1:
        alternative = f" (or None for {none_means})" if none_means else ""
        raise ValueError(f"memory_size must be >= 1{alternative}, got {memory_size}")


def cache_bytes(cache) -> int:
    """Bytes held by the keys and values of any transformers Cache (every layer, padding included)."""
    return sum(tensor.numel() * tensor.element_size() for layer in cache.layers
               for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None))
               if isinstance(tensor, torch.Tensor))


def cache_sizes(config: dict, memory_size: int | None, buffer_size: int | None) -> tuple[int | None, int]:
    """(memory, buffer) for a cache: those given, else the ones a gates export recorded (gates.json), else no
    limit and the default buffer."""
    memory = memory_size if memory_size is not None else config.get("memory_size")
    buffer = buffer_size if buffer_size is not None else config.get("buffer_size", DEFAULT_BUFFER)
    return memory, buffer


def cache_attention(config: dict, attention: str | None, policy: str) -> bool:
    """Whether a cache attends with the decay bias (`decayed_attention`): `attention` if given, else the one a gates
    export recorded (gates.json "attention"), else plain. ValueError for an unknown name or decayed without gates."""
    attention = attention if attention is not None else config.get("attention", "plain")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    if attention == "decayed" and policy != "gates":
        raise ValueError(f"attention 'decayed' needs the gates' log beta (policy 'gates'), got policy {policy!r}")
    return attention == "decayed"


def budget_sizes(fraction: float, length: float) -> tuple[int, int]:
    """(M, buffer) of a budget given as a share of a prompt length in tokens: M = share x length, buffer = M / 4."""
    memory = max(1, round(fraction * length))
    return memory, max(1, memory // 4)


NEEDS_ATTENTION = ("h2o", "snapkv")  # policies that read attention probabilities (eager attention)


class RetentionLayer(DynamicLayer):
    """One layer's cache: K, V [B, H, L, d], and per token log beta, position, validity and attention score."""

    is_croppable = False

    def __init__(self, memory_size: int | None, buffer_size: int = DEFAULT_BUFFER, policy: str = "gates", sink_tokens: int = 4,
                 recent_size: int | None = None, window: int = 32, seed: int = 0, decayed_attention: bool = False):
        super().__init__()
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if decayed_attention and policy != "gates":
            raise ValueError(f"decayed_attention needs the gates' log beta (policy 'gates'), got policy {policy!r}")
        check_memory_size(memory_size, none_means="no limit")
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        self.memory_size, self.buffer_size, self.policy = memory_size, buffer_size, policy
        self.sink_tokens, self.window = sink_tokens, window
        # Attend to each kept token with the training bias (t - pos) log beta, as the soft-trained gates were taught
        # (not in the paper, whose inference attention is plain).
        self.decayed_attention = decayed_attention
        self.recent_size = recent_size if recent_size is not None else (memory_size or 0) // 2
        self.generator = torch.Generator().manual_seed(seed)
        self.seen = 0
        self.evictions = 0
        self.padded = False  # whether a padding token ever entered the cache (decoding then needs a mask)
        self.pending_log_beta: torch.Tensor | None = None  # log beta of the next `update`'s tokens, if known
        self.pending_gate = None  # or (gate, its input [B, q, D]) for the next `update`: log beta computed lazily
        self._deferred: list = []  # (gate, input) of the newest tokens, whose log beta nobody needed yet
        self._deferred_tokens = 0
        # The newest `_tail` tokens have K and V but no position/valid/score entries yet: those are known (positions
        # seen - tail .. seen - 1, valid, score 0, log beta 0 unless a gate gives it) and written on first read, so a
        # decode step appends K and V only.
        self._tail = 0

    @property
    def needs_attention(self) -> bool:
        return self.policy in NEEDS_ATTENTION

    @property
    def _fields(self) -> tuple[str, ...]:
        """The per-token tensors, all [B, H, L] but K and V; validity once padding was seen, attention scores only
        for the policies that read them."""
        fields = ("keys", "values", "log_beta", "positions")
        fields += ("valid",) if self._valid is not None else ()
        return fields + ("scores_seen",) if self.needs_attention else fields

    def physical_length(self) -> int:
        return 0 if not self.is_initialized or self.keys.dim() < 4 else self.keys.shape[-2]

    def kept_before(self, incoming: int) -> int:
        """How many cached tokens stay when `incoming` new ones are added: all while the total fits M + buffer;
        otherwise the cache is cut back to M (fewer when the chunk is longer than the buffer), so it never holds
        more than M + buffer. A chunk longer than M + buffer on its own cannot fit: the cache keeps M before it
        and is cut back at the next update."""
        physical = self.physical_length()
        if self.memory_size is None:
            return physical
        limit = self.memory_size + self.buffer_size
        if physical + incoming <= limit:
            return physical
        return min(physical, self.memory_size if incoming > limit else min(self.memory_size, limit - incoming))

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            batch, heads = key_states.shape[:2]
            device = key_states.device
            self._log_beta = torch.zeros(batch, heads, 0, device=device)
            self._positions = torch.zeros(batch, heads, 0, dtype=torch.long, device=device)
            self._valid = None  # every token is real until padding shows up (then a [B, H, L] mask)
            self._scores_seen = torch.zeros(batch, heads, 0, device=device)
        length = key_states.shape[2]
        keep = self.kept_before(length)
        if keep < self.physical_length():
            self.evict(keep)
        deferred, log_beta = self.pending_gate, self.pending_log_beta
        self.pending_gate = self.pending_log_beta = None
        if self.policy == "gates" and deferred is not None and log_beta is None:
            self._deferred.append(deferred)  # the gate runs at the next eviction, once for all tokens added until then
            self._deferred_tokens += length
            if self._deferred_tokens >= self.buffer_size:
                self._run_deferred_gate()  # so even a cache that never evicts holds at most a buffer of gate inputs
        elif self.policy == "gates":  # log beta given, or no gate ran (gates off): after the deferred tokens' own
            self._run_deferred_gate()
            if log_beta is None:
                log_beta = torch.zeros(*key_states.shape[:2], length, device=key_states.device)
            self._log_beta = torch.cat([self._log_beta, log_beta.float().to(self._log_beta.device)], dim=-1)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.seen += length
        self._tail += length
        return self.keys, self.values

    def mark_real(self, real: torch.Tensor) -> None:
        """Record which of the newest tokens are real ([B, q] bool; False: padding). Until padding is first seen
        nothing is stored (every token is real); from then on validity is kept per token."""
        if self.padded or not bool(real.all()):
            self.padded = True  # first, so that `valid` keeps what is written next
            self.valid[:, :, -real.shape[1]:] = real[:, None, :]

    def _materialize(self) -> None:
        """Write the position, validity, score (and for other policies zero log beta) of the newest `_tail` tokens."""
        if not self._tail:
            return
        length, self._tail = self._tail, 0
        batch, heads = self.keys.shape[:2]
        device = self.keys.device
        positions = torch.arange(self.seen - length, self.seen, device=device).expand(batch, heads, length)
        self._positions = torch.cat([self._positions, positions], dim=-1)
        if self._valid is not None:
            self._valid = torch.cat([self._valid, torch.ones(batch, heads, length, dtype=torch.bool, device=device)], -1)
        if self.needs_attention:
            self._scores_seen = torch.cat([self._scores_seen, torch.zeros(batch, heads, length, device=device)], -1)
        if self.policy != "gates":  # log beta only matters to the gates; theirs comes from the gate or `update`
            self._log_beta = torch.cat([self._log_beta, torch.zeros(batch, heads, length, device=device)], dim=-1)

    positions = property(lambda self: self._materialized("_positions"), lambda self, v: setattr(self, "_positions", v),
                         doc="absolute position of every cached token [B, H, L]")
    valid = property(lambda self: self._valid_mask(), lambda self, v: setattr(self, "_valid", v),
                     doc="whether each cached token is real (False: padding) [B, H, L]")
    scores_seen = property(lambda self: self._materialized("_scores_seen"),
                           lambda self, v: setattr(self, "_scores_seen", v),
                           doc="attention received so far (H2O) or at the prompt's window (SnapKV) [B, H, L]")

    def _materialized(self, name: str) -> torch.Tensor:
        self._materialize()
        return getattr(self, name)

    def _valid_mask(self) -> torch.Tensor:
        """Validity is stored once padding was seen; until then every cached token is real."""
        self._materialize()
        if self._valid is not None:
            return self._valid
        mask = torch.ones(self.keys.shape[:3], dtype=torch.bool, device=self.keys.device)
        if self.padded:  # the first padding: kept (and written to) from now on
            self._valid = mask
        return mask

    def _run_deferred_gate(self) -> None:
        if self._deferred:
            gate = self._deferred[0][0]
            with torch.no_grad():
                computed = gate(torch.cat([hidden for _, hidden in self._deferred], dim=1))
            self._deferred, self._deferred_tokens = [], 0
            self._log_beta = torch.cat([self._log_beta, computed.float().to(self._log_beta.device)], dim=-1)

    @property
    def log_beta(self) -> torch.Tensor:
        """log beta of every cached token [B, H, L]; deferred gate inputs are run through their gate first."""
        self._flush()
        return self._log_beta

    @log_beta.setter
    def log_beta(self, value: torch.Tensor) -> None:
        if self._deferred:
            raise RuntimeError("log beta of deferred tokens would be overwritten")
        self._log_beta = value

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The mask is built before `update` runs: announce the length after a pending eviction. The offset maps the
        # new tokens' columns onto their indices in the 2D attention mask (the cached columns are masked by `valid`).
        physical = self.kept_before(query_length)
        return physical + query_length, self.seen - physical

    def get_max_length(self) -> int:
        return -1

    def scores(self) -> torch.Tensor:
        """The eviction score of every cached token [B, H, L]: the highest `memory_size` stay."""
        if self.policy == "gates":
            score = (self.seen - self.positions) * self.log_beta  # (t + 1 - pos) log beta, t = seen - 1
        elif self.policy == "streaming":
            rank = self.valid.long().cumsum(dim=-1)  # 1-based rank among real tokens, in temporal order
            score = self.positions.float().masked_fill(self.valid & (rank <= self.sink_tokens), math.inf)
        elif self.policy == "h2o":
            score = self.scores_seen.masked_fill(self.positions >= self.seen - max(self.recent_size, 1), math.inf)
        elif self.policy == "snapkv":
            score = self.scores_seen.masked_fill(self.positions >= self.seen - self.window, math.inf)
        elif self.policy == "knorm":
            score = -self.keys.float().norm(dim=-1)
        else:
            score = torch.rand(self.positions.shape, generator=self.generator).to(self.positions.device)
        return score.masked_fill(~self.valid, -math.inf) if self.padded else score

    def evict(self, keep: int) -> None:
        """Keep the `keep` highest-scoring tokens per (batch, kv head), in temporal order."""
        if self.physical_length() <= keep:
            return
        self._flush()
        index = self.scores().topk(keep, dim=-1).indices.sort(dim=-1).values  # [B, H, keep]
        expanded = index[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        self.keys = self.keys.gather(2, expanded)
        self.values = self.values.gather(2, expanded)
        for name in self._fields[2:]:
            setattr(self, name, getattr(self, name).gather(2, index))
        self.evictions += 1

    def observe(self, probs: torch.Tensor, groups: int) -> None:
        """Attention probabilities of this step [B, H_q, q, L] feed the H2O and SnapKV scores."""
        self._materialize()  # the scores of every cached token, the newest included, are written below
        batch, heads, q, length = probs.shape
        per_kv = probs.float().view(batch, heads // groups, groups, q, length).sum(dim=2)  # [B, H_kv, q, L]
        if self.policy == "h2o":
            self.scores_seen = self.scores_seen + per_kv.sum(dim=2)
        elif self.policy == "snapkv" and q > 1:
            window = per_kv[:, :, -min(self.window, q):].sum(dim=2)
            self.scores_seen = F.avg_pool1d(window, kernel_size=7, stride=1, padding=3, count_include_pad=False)

    def _flush(self) -> None:
        """Run deferred gates and write the tail's rows, so every per-token field has L entries."""
        self._run_deferred_gate()
        self._materialize()

    def _select_batch(self, index) -> None:
        self._flush()
        for name in self._fields:
            setattr(self, name, getattr(self, name)[index])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._select_batch(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._select_batch(beam_idx.to(self.keys.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._flush()
            for name in self._fields:
                setattr(self, name, getattr(self, name).repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        super().reset()
        self._deferred, self._deferred_tokens = [], 0
        self._tail = 0
        self.seen = 0
        self.evictions = 0
        self.padded = False

    def nbytes(self) -> int:
        """Bytes held by the cached keys and values."""
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


class RetentionCache(Cache):
    """A transformers Cache of RetentionLayers, for `model.generate(..., cache=cache)` (`past_key_values=` before
    transformers 5.24; `tokensieve.upstream.with_cache` picks the keyword).

    memory_size: tokens kept per (layer, kv head) after an eviction (None: never evict, a full cache);
    buffer_size: tokens added before the next eviction, so the physical length stays <= memory_size + buffer_size.
    """

    def __init__(self, num_layers: int, memory_size: int | None = 512, buffer_size: int = DEFAULT_BUFFER, policy: str = "gates",
                 **policy_options):
        super().__init__(layers=[RetentionLayer(memory_size, buffer_size, policy, seed=i, **policy_options)
                                 for i in range(num_layers)])
        self.memory_size, self.buffer_size, self.policy = memory_size, buffer_size, policy

    @classmethod
    def for_model(cls, model, memory_size: int | None = 512, buffer_size: int = DEFAULT_BUFFER, policy: str = "gates",
                  **policy_options) -> "RetentionCache":
        config = model.config.get_text_config(decoder=True)
        return cls(config.num_hidden_layers, memory_size, buffer_size, policy, **policy_options)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
