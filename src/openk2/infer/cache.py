"""MLA inference against a compressed KV cache, with weight absorption (K2_SPEC §1 "MLA inference").

Legend: L layers, B sequences, T / S query / key positions, D hidden, H heads, N = qk_nope_head_dim,
R = qk_rope_head_dim, V = v_head_dim, C = kv_lora_rank, E routed experts, I expert width.

The cache holds, per layer, slot and position, the normalised latent c_KV (C values) followed by
the rotated shared key k^R (R values): one tensor [L, slots, max_len, C + R], allocated once and
written in place. Nothing else is cached, so a token costs (C + R) · L values.

Prefill runs the network's own math (`MLAttention.project_query` / `compress_kv`, keys and values
expanded through kv_b_proj, causal SDPA) over right-padded prompts and writes c_KV and k^R into
the cache. Decoding never expands keys or values. With W_UK, W_UV the k- and v-rows of kv_b_proj:

    q_nope · k_nope_j = q_nope · (W_UK c_j) = (W_UKᵀ q_nope) · c_j     (absorbed into the query)
    Σ_j p_j v_j       = W_UV (Σ_j p_j c_j)                            (absorbed into the output)

so every head scores one [C + R] query against the cached [c_j ; k^R_j] rows (a single MQA-like
batched matmul for all heads) and mixes latents instead of values. Where it costs few extra
FLOPs (small models), W_UK is folded into the query projection and W_UV into o_proj, so the
absorbed query and output are one matmul each; for K2-sized layers they stay separate batched
matmuls. The non-obvious choice: decode uses private copies of a few weights (fused q_a/kv_a
rows, rotary rows permuted so interleaved RoPE becomes half-split RoPE, the softmax scale folded
into the query, expert matrices in torch._grouped_mm's layout, transposed copies that MKL streams
faster for a single row, oneDNN pre-packed copies that beat MKL above a few rows);
`DecodeWeights.stale` notices in-place optimizer updates and `CompressedDecoder.refresh` rebuilds
them. When a decode batch's few tokens fill at least half as many routing slots as there are
experts (2·N·K ≥ E) and the layer's experts are small, a MoE layer runs every routed and shared
expert on every token as one wide SwiGLU (two matmuls, the routing weight 0 for unchosen
experts): a sparse dispatch would read many of the expert weights anyway, in one small matmul
per expert, and its sort, gather and scatter cost more than the extra bytes.

MoE layers are run from the module's router and expert weights without calling `MoE.forward`,
so inference never adds to the load statistics (`tokens_per_expert`) that the aux-loss-free bias
update reads; attention never records max logits either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from openk2.model import linear as onednn
from openk2.model.attention import MLAttention
from openk2.model.moe import MLP, MoE
from openk2.model.rope import apply_rotary
from openk2.model.transformer import K2ForCausalLM

# Absorb W_UK / W_UV into the neighbouring projections when the fused matrix costs at most
# _FOLD_MAX_COST times the separate ones (decode streams weights, so size is time), or when it is
# small enough that saving a batched matmul matters more (at most _FOLD_SMALL elements).
_FOLD_MAX_ELEMENTS = 1 << 22
_FOLD_MAX_COST = 1.1
_FOLD_SMALL = 1 << 17
# Copy expert weights into torch._grouped_mm's layout when a layer has at most this many.
_EXPERT_COPY_MAX_ELEMENTS = 1 << 26
# Run every routed expert on every token (two packed matmuls, unselected experts weighted 0) when
# at most _DENSE_EXPERTS_MAX_TOKENS tokens fill at least _DENSE_EXPERTS_MIN_SLOTS · E routing slots
# (N·K ≥ E / 2) and the layer's experts hold at most _DENSE_EXPERTS_MAX_ELEMENTS values: then a
# sparse dispatch reads many of the expert weights anyway, in many small calls (the crossover,
# measured on tiny and small by benchmarks/dense_experts.py, is in docs/LOG.md). Large experts
# (K2's, Moonlight's) always take the sparse path.
_DENSE_EXPERTS = True
_DENSE_EXPERTS_MAX_TOKENS = 16
_DENSE_EXPERTS_MIN_SLOTS = 0.5
_DENSE_EXPERTS_MAX_ELEMENTS = 1 << 23


class MLACache:
    """Latent + rotary-key cache: `kv` [L, slots, max_len, C + R], preallocated."""

    def __init__(self, model: K2ForCausalLM, slots: int, max_len: int):
        c = model.config
        weight = model.lm_head.weight
        self.latent_dim, self.rope_dim = c.kv_lora_rank, c.qk_rope_head_dim
        self.slots, self.max_len, self.num_layers = slots, max_len, c.num_hidden_layers
        self.kv = torch.zeros(c.num_hidden_layers, slots, max_len, c.kv_lora_rank + c.qk_rope_head_dim,
                              dtype=weight.dtype, device=weight.device)

    @property
    def bytes_per_token(self) -> int:
        """(kv_lora_rank + qk_rope_head_dim) x layers x bytes per value."""
        return (self.latent_dim + self.rope_dim) * self.num_layers * self.kv.element_size()

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot src into slot dst (batch compaction)."""
        if src != dst and length > 0:
            self.kv[:, dst, :length] = self.kv[:, src, :length]


class _Matrix:
    """A decode-time weight [out, in], with the copies that make its products fast on CPU.

    y = x Wᵀ for x [M, in]. MKL's fastest orientation depends on M: for one row an [in, out]
    copy streams the weight about 2-4x faster than F.linear, and for up to a hundred rows or
    so W @ xᵀ (a tall-skinny product) beats F.linear. oneDNN's linear on a pre-packed copy (the
    kernel torch.compile's CPU weight freezing uses) beats both from a few dozen rows on, and
    from two rows on for a large weight (1.5-4x at 2-16 rows): MKL repacks the weight on every
    call, which costs more than a few-row product (docs/LOG.md)."""

    __slots__ = ("w", "wt", "packed", "few_rows_packed", "bias")

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None = None, transpose: bool = True):
        w = w.contiguous()
        n = w.numel()
        self.packed = _pack(w) if _PACK_MIN_ELEMENTS <= n <= _PACK_MAX_ELEMENTS else None
        self.few_rows_packed = self.packed is not None and n >= _PACK_FEW_ROWS_MIN_ELEMENTS
        one_row_packed = self.packed is not None and n >= _PACK_ONE_ROW_MIN_ELEMENTS
        small = n <= _TRANSPOSE_MAX_ELEMENTS
        self.wt = (w.t().contiguous()
                   if transpose and small and _TRANSPOSE_COPIES and not one_row_packed else None)
        # From _PACK_FEW_ROWS_MIN_ELEMENTS on the packed copy serves every row count (one row
        # through the transposed copy where there is one), so the plain weight is not held.
        self.w = None if self.few_rows_packed else w
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        if m == 1 and self.wt is not None:
            y = torch.mm(x, self.wt)
        elif self.packed is not None and (m > _PACK_FEW_ROWS or self.few_rows_packed):
            return onednn.linear(x, self.packed, self.bias)
        elif 1 < m <= _TALL_SKINNY_MAX_ROWS:
            y = torch.mm(self.w, x.t()).t()
        else:
            y = torch.mm(x, self.w.t())
        return y if self.bias is None else y + self.bias


_TRANSPOSE_COPIES = True
_TRANSPOSE_MAX_ELEMENTS = 1 << 26
_TALL_SKINNY_MAX_ROWS = 128
# Pre-pack weights of _PACK_MIN_ELEMENTS to _PACK_MAX_ELEMENTS elements. The packed copy serves
# more than _PACK_FEW_ROWS rows always, 2 to _PACK_FEW_ROWS rows from _PACK_FEW_ROWS_MIN_ELEMENTS
# on (below it oneDNN's ~15 us per call loses to MKL), and one row from
# _PACK_ONE_ROW_MIN_ELEMENTS on (there it beats the transposed copy, which is then not kept).
_PACK_MIN_ELEMENTS = 1 << 14
_PACK_MAX_ELEMENTS = 1 << 26
_PACK_FEW_ROWS = 16
_PACK_FEW_ROWS_MIN_ELEMENTS = 1 << 17
_PACK_ONE_ROW_MIN_ELEMENTS = 1 << 19
_PACKED_LINEAR = onednn.AVAILABLE


def _pack(w: torch.Tensor) -> torch.Tensor | None:
    return onednn.pack(w) if _PACKED_LINEAR else None


@dataclass
class _AttentionWeights:
    w_in: _Matrix                      # [C + R + Q, D]: kv_a rows, then q_a (or q_proj) rows
    q_norm: torch.Tensor | None        # q_a_layernorm weight (None without q_lora)
    w_q: _Matrix | None                # [H * (C + R) or H * (N + R), q_lora]
    w_uk: torch.Tensor | None          # [H, N, C] when not folded into w_q
    w_o: _Matrix                       # [D, H * C] (folded) or o_proj.weight [D, H * V]
    w_uv_t: torch.Tensor | None        # [H, C, V] when not folded into w_o
    kv_norm: torch.Tensor
    q_folded: bool


@dataclass
class _FFNWeights:
    """Dense MLP (or a MoE's shared expert): w1 [2I, D] (gate rows, then up rows), w2 [D, I].
    Routed experts laid out for torch._grouped_mm: gate_up [E, D, 2I], down [E, I, D]; and, for
    a few tokens, every expert as one SwiGLU of width (E + S) I (S shared-expert slices last):
    all_up [2 (E + S) I, D] (all gate rows, then all up rows), all_down [D, (E + S) I]."""

    w1: _Matrix | None = None
    w2: _Matrix | None = None
    gate_up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    all_up: _Matrix | None = None
    all_down: _Matrix | None = None
    shared_slices: int = 0


class DecodeWeights:
    """Per-layer weight views and fused copies for the absorbed decode path."""

    @torch.no_grad()
    def __init__(self, model: K2ForCausalLM):
        self.model = model
        self.signature = self._signature()
        self.attention = [_attention_weights(layer.self_attn) for layer in model.model.layers]
        self.ffn = [_ffn_weights(layer.mlp) for layer in model.model.layers]
        self.lm_head = _Matrix(model.lm_head.weight)

    def _signature(self) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in self.model.parameters())

    @property
    def stale(self) -> bool:
        return self._signature() != self.signature


def _rope_permutation(rope_dim: int, interleave: bool) -> torch.Tensor:
    """Row order that makes a projection emit the rotary part as [evens, odds], so half-split
    RoPE on it equals interleaved RoPE with the de-interleaved output layout of `apply_rotary`."""
    if not interleave:
        return torch.arange(rope_dim)
    return torch.cat((torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)))


def _fold_cost(folded: int, separate: int) -> bool:
    return folded <= _FOLD_MAX_ELEMENTS and (folded <= _FOLD_MAX_COST * separate or folded <= _FOLD_SMALL)


@torch.no_grad()
def _attention_weights(attn: MLAttention) -> _AttentionWeights:
    c = attn.config
    H, N, R, V, C = attn.num_heads, attn.nope_dim, attn.rope_dim, attn.v_dim, attn.kv_lora_rank
    perm = _rope_permutation(R, c.rope_interleave)
    kv_a = attn.kv_a_proj_with_mqa.weight
    kv_a = torch.cat((kv_a[:C], kv_a[C:][perm]))
    kv_a_bias = attn.kv_a_proj_with_mqa.bias
    if kv_a_bias is not None:
        kv_a_bias = torch.cat((kv_a_bias[:C], kv_a_bias[C:][perm]))
    # Query rows per head: nope rows then rope rows (permuted), scaled by the softmax scale.
    q_weight = attn.query_proj.weight.view(H, N + R, -1)
    q_weight = torch.cat((q_weight[:, :N], q_weight[:, N:][:, perm]), dim=1) * attn.softmax_scale
    q_in = q_weight.shape[-1]
    kv_b = attn.kv_b_proj.weight.view(H, N + V, C)
    w_uk, w_uv = kv_b[:, :N], kv_b[:, N:]  # [H, N, C], [H, V, C]
    q_folded = _fold_cost(H * (C + R) * q_in, H * (N + R) * q_in + H * N * C)
    if q_folded:  # per head: [W_UKᵀ W_q_nope ; W_q_rope]
        w_q = torch.cat((torch.einsum("hnc,hni->hci", w_uk, q_weight[:, :N]), q_weight[:, N:]), dim=1)
        w_q = w_q.reshape(H * (C + R), q_in)
        w_uk_sep = None
    else:
        w_q = q_weight.reshape(H * (N + R), q_in)
        w_uk_sep = w_uk.contiguous()
    D = attn.o_proj.weight.shape[0]
    o_folded = _fold_cost(D * H * C, H * C * V + D * H * V)
    if o_folded:  # W_o_abs[d, h, c] = Σ_v W_o[d, h, v] W_UV[h, v, c]
        w_o = torch.einsum("dhv,hvc->dhc", attn.o_proj.weight.view(D, H, V), w_uv).reshape(D, H * C)
        w_uv_t = None
    else:
        w_o, w_uv_t = attn.o_proj.weight, w_uv.transpose(1, 2).contiguous()
    if c.q_lora_rank is None:
        w_in, b_in, q_norm, w_q_sep = torch.cat((kv_a, w_q)), kv_a_bias, None, None
    else:
        w_in = torch.cat((kv_a, attn.q_a_proj.weight))
        b_in = None if kv_a_bias is None else torch.cat((kv_a_bias, attn.q_a_proj.bias))
        q_norm, w_q_sep = attn.q_a_layernorm.weight, w_q
    return _AttentionWeights(
        w_in=_Matrix(w_in, b_in), q_norm=q_norm, w_q=None if w_q_sep is None else _Matrix(w_q_sep),
        w_uk=w_uk_sep, w_o=_Matrix(w_o, attn.o_proj.bias), w_uv_t=w_uv_t, kv_norm=attn.kv_a_layernorm.weight,
        q_folded=q_folded,
    )


@torch.no_grad()
def _ffn_weights(mlp: MLP | MoE) -> _FFNWeights:
    if isinstance(mlp, MLP):
        return _FFNWeights(w1=_Matrix(torch.cat((mlp.gate_proj.weight, mlp.up_proj.weight))),
                           w2=_Matrix(mlp.down_proj.weight))
    experts, shared = mlp.experts, mlp.shared_experts
    E, I, D = experts.gate_proj.shape
    out = _FFNWeights()
    if shared is not None:
        out.w1 = _Matrix(torch.cat((shared.gate_proj.weight, shared.up_proj.weight)))
        out.w2 = _Matrix(shared.down_proj.weight)
    size = experts.gate_proj.element_size()
    aligned = (I * size) % 16 == 0 and (D * size) % 16 == 0  # torch._grouped_mm needs 16-byte strides
    on_cpu = experts.gate_proj.device.type == "cpu"
    if _GROUPED_MM and aligned and on_cpu and 3 * E * I * D <= _EXPERT_COPY_MAX_ELEMENTS:
        out.gate_up = torch.cat((experts.gate_proj, experts.up_proj), dim=1).transpose(1, 2).contiguous()
        out.down = experts.down_proj.transpose(1, 2).contiguous()
    S, rest = (0, 0) if shared is None else divmod(shared.gate_proj.weight.shape[0], I)  # width S * I
    if (_DENSE_EXPERTS and _PACKED_LINEAR and on_cpu and not rest
            and 3 * (E + S) * I * D <= _DENSE_EXPERTS_MAX_ELEMENTS):
        gates = [experts.gate_proj.reshape(E * I, D)]
        ups = [experts.up_proj.reshape(E * I, D)]
        downs = [experts.down_proj.permute(1, 0, 2).reshape(D, E * I)]
        if S:  # a SwiGLU of width S * I is the sum of S SwiGLUs of width I
            gates.append(shared.gate_proj.weight)
            ups.append(shared.up_proj.weight)
            downs.append(shared.down_proj.weight)
        all_up = _Matrix(torch.cat(gates + ups), transpose=False)
        all_down = _Matrix(torch.cat(downs, dim=1), transpose=False)
        if all_up.packed is not None and all_down.packed is not None:  # on MKL it would not pay
            out.all_up, out.all_down, out.shared_slices = all_up, all_down, S
    return out


def _probe_grouped_mm() -> bool:
    try:
        a, b = torch.ones(3, 16), torch.ones(2, 16, 8)
        out = torch._grouped_mm(a, b, offs=torch.tensor([1, 3], dtype=torch.int32))
        return out.shape == (3, 8) and bool((out == 16).all())
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


_GROUPED_MM = _probe_grouped_mm()


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as the model computes it (float32 statistics), in fewer kernels than F.rms_norm."""
    if x.dtype == torch.float32:
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True).add_(eps)) * weight
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(eps))).to(x.dtype)


class CompressedDecoder:
    """Runs a `K2ForCausalLM` against an `MLACache`: batched prefill and absorbed decode."""

    def __init__(self, model: K2ForCausalLM, cache: MLACache):
        self.model, self.cache, self.config = model, cache, model.config
        c = self.config
        self.eps = c.rms_norm_eps
        self.hidden = c.hidden_size
        self.heads, self.latent, self.rope = c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim
        self.weights = DecodeWeights(model)
        self._tables()

    def _tables(self) -> None:
        """cos / sin for every cache position in half-split form: out = x·cos + roll(x)·sin."""
        device, dtype = self.cache.kv.device, self.cache.kv.dtype
        positions = torch.arange(self.cache.max_len, device=device)
        cos, sin = self.model.model.rotary_emb(positions)  # [max_len, R/2]
        self.cos = torch.cat((cos, cos), -1).to(dtype)
        self.sin = torch.cat((-sin, sin), -1).to(dtype)
        self.rows = torch.arange(self.cache.slots, device=device)
        self.key_positions = torch.arange(self.cache.max_len, device=device)

    def refresh(self, force: bool = False) -> bool:
        """Rebuild the decode weights if the model's parameters changed (optimizer step, load)."""
        if force or self.weights.stale:
            self.weights = DecodeWeights(self.model)
            self._tables()
            return True
        return False

    # ---- prefill -------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], first_slot: int, all_logits: bool = False) -> torch.Tensor:
        """Run prompts (right-padded into one batch) into slots first_slot.., caching every
        position. Returns logits of each prompt's last token [B, V] (or [B, T, V] if all_logits)."""
        model, cache = self.model, self.cache
        device = cache.kv.device
        B, lengths = len(prompts), [len(p) for p in prompts]
        T = max(lengths)
        if min(lengths) < 1 or first_slot + B > cache.slots or T > cache.max_len:
            raise ValueError(f"prefill of {B} prompts (lengths {min(lengths)}..{T}) into slot {first_slot} "
                             f"does not fit a cache of {cache.slots} slots x {cache.max_len} positions")
        ids = torch.zeros(B, T, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = torch.as_tensor(p, dtype=torch.long)
        ids = ids.to(device)
        valid = None
        if min(lengths) < T:  # run the feed-forward blocks on real tokens only
            real = torch.arange(T)[None] < torch.tensor(lengths)[:, None]  # [B, T]
            valid = real.flatten().nonzero().squeeze(1).to(device)
        cos, sin = model.model.rotary_emb(torch.arange(T, device=device)[None])  # [1, T, R/2]
        interleave = self.config.rope_interleave
        x = model.model.embed_tokens(ids)
        slots = slice(first_slot, first_slot + B)
        for index, layer in enumerate(model.model.layers):
            attn: MLAttention = layer.self_attn
            H, N, V, C = attn.num_heads, attn.nope_dim, attn.v_dim, attn.kv_lora_rank
            h = layer.input_layernorm(x)
            q_nope, q_rope = attn.project_query(h)  # [B, H, T, N], [B, H, T, R]
            latent, k_rope = attn.compress_kv(h)  # [B, T, C], [B, T, R]
            q_rope = apply_rotary(q_rope, cos[:, None], sin[:, None], interleave)
            k_rope = apply_rotary(k_rope, cos, sin, interleave)
            cache.kv[index, slots, :T, :C] = latent
            cache.kv[index, slots, :T, C:] = k_rope
            kv = attn.kv_b_proj(latent).view(B, T, H, N + V).transpose(1, 2)
            k_nope, v = kv.split([N, V], dim=-1)
            q = torch.cat((q_nope, q_rope), dim=-1)
            k = torch.cat((k_nope, k_rope[:, None].expand(B, H, T, -1)), dim=-1)
            pad = q.shape[-1] - V  # equal head sizes keep CPU SDPA on its fused (flash) kernel
            if pad > 0:
                v = F.pad(v, (0, pad))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.softmax_scale)[..., :V]
            x = x + attn.o_proj(out.transpose(1, 2).reshape(B, T, H * V))
            h = layer.post_attention_layernorm(x).view(B * T, -1)
            if valid is None:
                x = x + self._ffn(index, h).reshape(B, T, -1)
            else:
                x = x.view(B * T, -1).index_add(0, valid, self._ffn(index, h[valid])).view(B, T, -1)
        x = model.model.norm(x)
        if all_logits:
            return model.lm_head(x)
        last = x[torch.arange(B, device=device), torch.tensor(lengths, device=device) - 1]
        return self.weights.lm_head(last).contiguous()

    # ---- decode --------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor,
               max_position: int | None = None) -> torch.Tensor:
        """One token for each of slots 0..B-1: tokens [B] at positions [B] (the number of tokens
        each slot has cached). Writes their c_KV and k^R and returns logits [B, V]."""
        w = self.weights
        model, kv_all = self.model, self.cache.kv
        B = tokens.shape[0]
        S = (int(positions.max()) if max_position is None else max_position) + 1
        H, C, eps = self.heads, self.latent, self.eps
        # additive mask over key positions: slot b sees positions <= positions[b]
        mask = torch.zeros(B, 1, S, dtype=kv_all.dtype, device=kv_all.device)
        mask.masked_fill_(self.key_positions[None, None, :S] > positions[:, None, None], float("-inf"))
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [B, 1, R]
        rows = self.rows[:B]
        x = F.embedding(tokens, model.model.embed_tokens.weight)  # [B, D]
        for index, layer in enumerate(model.model.layers):
            a = w.attention[index]
            h = _rms_norm(x, layer.input_layernorm.weight, eps)
            proj = a.w_in(h)
            latent = _rms_norm(proj[:, :C], a.kv_norm, eps)
            k_rope = proj[:, C : C + self.rope]
            q_src = proj[:, C + self.rope :]
            if a.q_norm is not None:
                q_src = a.w_q(_rms_norm(q_src, a.q_norm, eps))
            # [B, H, C + R]. Contiguous: _Matrix leaves few-row outputs transposed, and CPU bmm
            # on that layout falls back to one matmul per sequence (docs/LOG.md).
            q = q_src.reshape(B, H, -1).contiguous()
            if not a.q_folded:  # q_nope · W_UK per head: [H, B, N] @ [H, N, C]
                nope = q.shape[-1] - self.rope
                q_latent = torch.bmm(q[..., :nope].transpose(0, 1), a.w_uk).transpose(0, 1)
                q = torch.cat((q_latent, q[..., nope:]), dim=-1)
            rot = torch.cat((q[..., C:], k_rope[:, None]), dim=1)  # [B, H + 1, R]
            rot = torch.addcmul(rot * cos, rot.roll(self.rope // 2, -1), sin)
            q[..., C:] = rot[:, :H]
            kv = kv_all[index]
            kv[rows, positions] = torch.cat((latent, rot[:, H]), dim=-1)
            keys = kv[:B, :S]  # [B, S, C + R], a view of the cache
            scores = torch.bmm(q, keys.transpose(1, 2)).add_(mask)  # [B, H, S] (baddbmm loops over B on CPU)
            out = torch.bmm(scores.softmax(-1), keys[..., :C])  # [B, H, C]
            if a.w_uv_t is None:
                out = out.reshape(B, H * C)
            else:
                out = torch.bmm(out.transpose(0, 1), a.w_uv_t).transpose(0, 1).reshape(B, -1)
            x = x + a.w_o(out)
            h = _rms_norm(x, layer.post_attention_layernorm.weight, eps)
            x = x + self._ffn(index, h)
        x = _rms_norm(x, model.model.norm.weight, eps)
        return w.lm_head(x).contiguous()

    # ---- feed-forward --------------------------------------------------------------------
    def _ffn(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """x [N, D] -> [N, D] for layer `index` (dense SwiGLU or MoE, without load statistics)."""
        mlp = self.model.model.layers[index].mlp
        w = self.weights.ffn[index]
        if isinstance(mlp, MLP):
            gate, up = w.w1(x).chunk(2, dim=-1)
            return w.w2(F.silu(gate) * up)
        weights, experts, _ = mlp.gate(x)  # [N, K] routing weights (float32) and expert ids
        E, K = mlp.experts.num_experts, experts.shape[1]
        N = x.shape[0]
        if w.all_up is not None and N <= _DENSE_EXPERTS_MAX_TOKENS and N * K >= _DENSE_EXPERTS_MIN_SLOTS * E:
            gate, up = w.all_up(x).chunk(2, dim=-1)  # [N, (E + S) I] each
            g = x.new_zeros(N, E).scatter_(1, experts, weights.to(x.dtype))  # 0 where not chosen
            if w.shared_slices:
                g = torch.cat((g, g.new_ones(N, w.shared_slices)), dim=1)
            h = (F.silu(gate) * up).view(N, g.shape[1], -1).mul_(g[..., None])
            return w.all_down(h.view(N, -1))
        flat = experts.flatten()
        order = flat.argsort(stable=True)  # (token, expert) pairs sorted by expert
        token = order // K
        xs = x.index_select(0, token)
        gate_weight = weights.flatten()[order, None].to(x.dtype)
        counts = torch.bincount(flat, minlength=E)
        if w.gate_up is not None:
            offsets = counts.cumsum(0).to(torch.int32)
            gate, up = torch._grouped_mm(xs, w.gate_up, offs=offsets).chunk(2, dim=-1)
            y = torch._grouped_mm(F.silu(gate) * up * gate_weight, w.down, offs=offsets)
        else:
            experts_mod, outputs, start = mlp.experts, [], 0
            for e, count in enumerate(counts.tolist()):
                if count:
                    chunk = xs[start : start + count]
                    gate = F.linear(chunk, experts_mod.gate_proj[e])
                    h = F.silu(gate) * F.linear(chunk, experts_mod.up_proj[e])
                    outputs.append(F.linear(h * gate_weight[start : start + count], experts_mod.down_proj[e]))
                    start += count
            y = torch.cat(outputs)
        out = torch.zeros_like(x).index_add_(0, token, y)
        if w.w1 is not None:
            gate, up = w.w1(x).chunk(2, dim=-1)
            out = out + w.w2(F.silu(gate) * up)
        return out
