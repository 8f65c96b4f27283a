"""`MLAAttention`: a peft tuner layer that runs a model's attention as multi-head latent attention (MHA2MLA).

Shapes: B batch, T new tokens, S cached + new tokens, D hidden size, H query heads, G key/value heads, g = H / G,
d head_dim, r kept rotary dims per head (``rope_dims``), n = d - r no-RoPE dims, R ``kv_rank``.

Per token the layer computes

    c     = W_dkv x            (R,)        the latent: cached
    k_pe  = RoPE(W_kr x)       (G, r)      kept rotary key dims: cached (rotated, as transformers caches keys)
    k_nop = W_uk c             (G, n)      rebuilt from the latent
    v     = W_uv c             (G, d)      rebuilt from the latent

and queries split the same way (``q_pe`` rotated on the kept dims of their group, ``q_nop`` not rotated), so that
``q . k = q_pe . k_pe + q_nop . k_nop``. The initial weights come from a joint SVD of the no-RoPE rows of ``W_k``
and all of ``W_v`` (`joint_svd`): with every rotary dim kept and a full-rank latent the layer is the original one.

Decoding one token at a time uses DeepSeek's absorption instead of rebuilding keys and values of the whole cache:
``q_nop . (W_uk c) = (W_uk^T q_nop) . c`` and ``sum_s a_s W_uv c_s = W_uv (sum_s a_s c_s)``.

Models that RMS-normalise queries and keys before RoPE (``q_norm``/``k_norm``: Qwen3 per head, OLMo 2 over the whole
projection) stay exact: the query norm is applied as the model does, and the key norm ``w * k / rms(k)`` is split into
what the latent cannot give and what it can. When a token is inserted, its raw no-RoPE key ``W_uk c`` is rebuilt from
its latent, the rms is taken over the whole raw key ``[k_rope, k_nope]`` (per head, or over all heads for OLMo 2),
the kept rotary part is normalised and rotated, and the per-token, per-kv-head factor ``s = 1 / rms`` is cached next
to it; later, ``k_nop = w_nope * s * (W_uk c)``. Cost: one value per kv head and token
(``kv_rank + kv_heads * (rope_dims + 1)``).
"""

from __future__ import annotations

import sys
import warnings
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ...integrations import retry_deferred
from .cache import MLACache, check_cache_layer
from .selection import nope_dims, pair_dims

MLA_LAYER_NAMES = ("mla_kv_down", "mla_k_rope", "mla_k_up", "mla_v_up")


def joint_svd(k_nope: torch.Tensor, v: torch.Tensor, kv_rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``kv_rank`` factorisation of the stacked ``[W_k_nope; W_v]`` (fp32), singular values split evenly.

    ``k_nope (Gn, D)``, ``v (Gd, D)`` -> ``down (R, D)``, ``k_up (Gn, R)``, ``v_up (Gd, R)`` with
    ``[k_up; v_up] @ down`` the best rank-R approximation of the stack (exact when R = its rank).
    """
    stacked = torch.cat([k_nope, v], dim=0).float()  # (Gn + Gd, D)
    u, s, vh = torch.linalg.svd(stacked, full_matrices=False)  # (rows, m), (m,), (m, D); m = min(rows, D)
    root = s[:kv_rank].sqrt()  # (R,)
    down = root[:, None] * vh[:kv_rank]  # (R, D)
    up = u[:, :kv_rank] * root[None, :]  # (rows, R)
    return down, up[: k_nope.shape[0]], up[k_nope.shape[0] :]


def max_kv_rank(hidden_size: int, kv_heads: int, head_dim: int, rope_dims: int) -> int:
    """The largest useful ``kv_rank``: the rank the stacked ``[W_k_nope; W_v]`` can have."""
    return min(hidden_size, kv_heads * (head_dim - rope_dims) + kv_heads * head_dim)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """transformers' RoPE helper on the last dim: ``(a, b) -> (-b, a)``."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _gather_dims(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per-head selection of head dims: ``x (B, heads, T, d)``, ``index (heads, k) -> (B, heads, T, k)``."""
    b, heads, t, _ = x.shape
    return x.gather(-1, index[None, :, None, :].expand(b, heads, t, index.shape[-1]))


def _per_head_table(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """cos/sin ``(B, T, d)`` at each head's dims ``index (heads, k)`` -> ``(B, heads, T, k)``."""
    return table[:, :, index].permute(0, 2, 1, 3)


def norm_epsilon(norm: nn.Module) -> float:
    """The epsilon of an RMSNorm module (transformers names it ``variance_epsilon`` or ``eps``)."""
    for name in ("variance_epsilon", "eps"):
        value = getattr(norm, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    raise ValueError(f"{type(norm).__name__} has no `variance_epsilon`/`eps`: it is not an RMSNorm MLA can split.")


def rms_scale(sum_sq: torch.Tensor, count: int, eps: float) -> torch.Tensor:
    """RMSNorm's factor ``1 / sqrt(mean(x^2) + eps)`` from a sum of squares over ``count`` values (fp32)."""
    return torch.rsqrt(sum_sq.float() / count + eps)


def apply_key_scale(x: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight * (x * scale)`` as transformers' RMSNorm computes it: ``x (B, G, S, k)``, ``scale (B, G, S, 1)``,
    ``weight (G, k)`` -> ``(B, G, S, k)`` (product in fp32, rounded to ``x``'s dtype, then the weight)."""
    return weight[None, :, None, :] * (x.float() * scale.float()).to(x.dtype)


def check_rms_norm(norm: nn.Module, width: int, where: str) -> None:
    """Refuse a key norm that is not ``weight * x * rsqrt(mean(x^2) + eps)`` over ``width`` values (on a probe)."""
    weight = getattr(norm, "weight", None)
    fix = (
        "MLA keeps only a latent and the kept rotary keys, so it can split an RMSNorm (Qwen3, OLMo 2) exactly but "
        "no other key normalisation; use a model with RMSNorm key norms or without key norms (Llama, Mistral, Qwen2)."
    )
    if not isinstance(weight, torch.Tensor) or weight.shape != (width,):
        shape = None if not isinstance(weight, torch.Tensor) else tuple(weight.shape)
        raise ValueError(f"{where} ({type(norm).__name__}) has weight shape {shape}, expected ({width},). {fix}")
    eps = norm_epsilon(norm)
    probe = torch.randn(3, width, generator=torch.Generator().manual_seed(0)).to(weight.device)
    with torch.no_grad():
        got = norm(probe.to(weight.dtype)).float()
        want = weight.float() * probe * rms_scale(probe.square().sum(-1, keepdim=True), width, eps)
    if not torch.allclose(got, want, atol=1e-2 if weight.dtype != torch.float32 else 1e-5, rtol=1e-2):
        raise ValueError(
            f"{where} ({type(norm).__name__}) is not weight * x / rms(x) (e.g. Gemma's 1 + weight). {fix}"
        )


class MLAAttention(nn.Module, BaseTunerLayer):
    """Wraps one attention module (``base_layer``: Llama/Mistral/Qwen2-style, separate q/k/v projections) and runs it
    as MLA while its adapter is active; disabled, it is the original attention. ``q_proj``/``o_proj`` stay inside
    ``base_layer`` (LoRA may wrap them); ``k_proj``/``v_proj`` are not used while MLA is active.
    """

    adapter_layer_names = MLA_LAYER_NAMES
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str, kv_rank: int, rope_dims: int):
        super().__init__()
        self.base_layer = base_layer
        self._active_adapter = adapter_name
        self._disable_adapters = False
        self.merged_adapters = []
        self.absorb = True  # absorbed decoding of single tokens; False rebuilds keys/values (tests compare both)

        config = base_layer.config
        self.head_dim = base_layer.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.kv_rank, self.rope_dims = kv_rank, rope_dims
        self.nope_dims = self.head_dim - rope_dims
        # q_norm/k_norm (before RoPE): "head" normalises each head (Qwen3), "all" the whole projection (OLMo 2)
        self.q_norm_kind = self._norm_kind(getattr(base_layer, "q_norm", None), self.num_heads)
        self.k_norm_kind = self._norm_kind(getattr(base_layer, "k_norm", None), self.num_kv_heads)
        self.scale_dims = 1 if self.k_norm_kind else 0  # cached per kv head and token next to the rope keys
        hidden = base_layer.q_proj.in_features
        k_proj, v_proj = base_layer.k_proj, base_layer.v_proj
        dtype = k_proj.weight.dtype
        if not dtype.is_floating_point:  # 4-bit base: the MLA weights live in the compute dtype
            dtype = getattr(k_proj, "compute_dtype", None) or torch.float32
        factory = {"device": k_proj.weight.device, "dtype": dtype}
        kv, bias = self.num_kv_heads, k_proj.bias is not None
        with warnings.catch_warnings():  # every rotary dim kept: no-RoPE projection of zero width
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            self._make_layers(adapter_name, hidden, kv_rank, rope_dims, kv, bias, v_proj.bias is not None, factory)
        self.ready = False  # True once the kept pairs are known and the weights initialised (or loaded)

    def _norm_kind(self, norm: Optional[nn.Module], heads: int) -> Optional[str]:
        if norm is None:
            return None
        width = getattr(norm, "weight", torch.empty(0)).numel()
        if width == self.head_dim:
            return "head"
        if width == heads * self.head_dim:
            return "all"
        raise ValueError(
            f"{type(norm).__name__} of layer {self.base_layer.layer_idx} normalises {width} values, neither head_dim="
            f"{self.head_dim} nor heads x head_dim={heads * self.head_dim}; MLA cannot split this query/key norm."
        )

    def _make_layers(self, adapter_name, hidden, kv_rank, rope_dims, kv, bias, v_bias, factory) -> None:
        self.mla_kv_down = nn.ModuleDict({adapter_name: nn.Linear(hidden, kv_rank, bias=False, **factory)})
        self.mla_k_rope = nn.ModuleDict({adapter_name: nn.Linear(hidden, kv * rope_dims, bias=bias, **factory)})
        self.mla_k_up = nn.ModuleDict({adapter_name: nn.Linear(kv_rank, kv * self.nope_dims, bias=bias, **factory)})
        self.mla_v_up = nn.ModuleDict({adapter_name: nn.Linear(kv_rank, kv * self.head_dim, bias=v_bias, **factory)})

    # ---- conversion ------------------------------------------------------------------------------------------------
    @property
    def adapter_name(self) -> str:
        return next(iter(self.mla_kv_down))

    def set_pairs(self, pairs: torch.Tensor) -> None:
        """Record the kept frequency pairs ``(G, r/2)``; derive per-head dim indices (not saved: the config is)."""
        d, group = self.head_dim, self.num_heads // self.num_kv_heads
        device = self.base_layer.q_proj.weight.device
        k_rope, k_nope = pair_dims(pairs, d), nope_dims(pairs, d)  # (G, r), (G, n)
        for name, index in (("k_rope_idx", k_rope), ("k_nope_idx", k_nope)):
            self.register_buffer(name, index.to(device), persistent=False)
            # query head h attends with kv head h // group, so it keeps that head's pairs
            self.register_buffer(
                name.replace("k_", "q_"), index.repeat_interleave(group, 0).to(device), persistent=False
            )

    @torch.no_grad()
    def init_from_base(self, pairs: torch.Tensor) -> None:
        """Set the kept pairs and initialise the MLA weights from ``k_proj``/``v_proj`` by the joint SVD."""
        self.set_pairs(pairs)
        name, attn = self.adapter_name, self.base_layer
        g, d, hidden = self.num_kv_heads, self.head_dim, attn.q_proj.in_features
        w_k = _linear_weight(attn.k_proj).float().view(g, d, hidden)
        w_v = _linear_weight(attn.v_proj).float()
        rope_rows = w_k.gather(1, self.k_rope_idx[:, :, None].expand(-1, -1, hidden)).reshape(-1, hidden)
        nope_rows = w_k.gather(1, self.k_nope_idx[:, :, None].expand(-1, -1, hidden)).reshape(-1, hidden)
        down, k_up, v_up = joint_svd(nope_rows, w_v, self.kv_rank)
        self.mla_kv_down[name].weight.copy_(down)
        self.mla_k_rope[name].weight.copy_(rope_rows)
        self.mla_k_up[name].weight.copy_(k_up)
        self.mla_v_up[name].weight.copy_(v_up)
        if attn.k_proj.bias is not None:
            b_k = attn.k_proj.bias.float().view(g, d)
            self.mla_k_rope[name].bias.copy_(b_k.gather(1, self.k_rope_idx).flatten())
            self.mla_k_up[name].bias.copy_(b_k.gather(1, self.k_nope_idx).flatten())
        if attn.v_proj.bias is not None:
            self.mla_v_up[name].bias.copy_(attn.v_proj.bias)
        self.ready = True

    # ---- peft ------------------------------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(
            "An MLA adapter cannot be merged into the base model: partial RoPE (no rotation on the no-RoPE dims) and "
            "the latent cache have no equivalent in a standard attention layer. Keep it as an adapter, or call "
            "`unload()` to get the original model back."
        )

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names: Optional[list[str]]):
        if merge:
            self.merge(safe_merge, adapter_names)
        for parent in list(self.base_layer.modules()):  # LoRA layers inside the wrapped attention
            for child_name, child in list(parent.named_children()):
                if isinstance(child, BaseTunerLayer):
                    setattr(parent, child_name, child.get_base_layer())
        return self.base_layer

    # ---- forward ---------------------------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        name = self.adapter_name
        if self.disable_adapters or name not in self.active_adapters:
            return self.base_layer(hidden_states, *args, **kwargs)
        if not self.ready:
            raise RuntimeError(
                "This MLA adapter uses rope_selection='2-norm' and has not seen calibration data yet: call "
                "`pi_peft.tuners.mla.initialize_mla_weights(model, batches)` after `get_peft_model` (or pick 'high', "
                "'low' or 'uniform')."
            )
        if args:
            raise TypeError(
                "MLAAttention takes the attention inputs as keyword arguments, as transformers passes them."
            )
        attn = self.base_layer
        position_embeddings = kwargs.pop("position_embeddings")
        attention_mask = kwargs.pop("attention_mask", None)
        cache = kwargs.pop("cache", None)
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        kwargs.pop("use_cache", None)
        kwargs.pop("cache_position", None)

        b, t, _ = hidden_states.shape
        h, g, d, r, n = self.num_heads, self.num_kv_heads, self.head_dim, self.rope_dims, self.nope_dims
        q = self._queries(attn, hidden_states)  # (B, H, T, d), q_norm applied
        q_pe, q_nope = _gather_dims(q, self.q_rope_idx), _gather_dims(q, self.q_nope_idx)  # (B,H,T,r), (B,H,T,n)
        latent = _project(self.mla_kv_down[name], hidden_states)  # (B, T, R)
        k_pe = _project(self.mla_k_rope[name], hidden_states).view(b, t, g, r).transpose(1, 2)  # (B, G, T, r)
        if self.k_norm_kind:  # normalise the rope keys now, with the rms of the whole raw key; cache 1/rms
            k_nope_new = _project(self.mla_k_up[name], latent).view(b, t, g, n).transpose(1, 2)  # (B, G, T, n) raw
            scale = self._key_scale(k_pe, k_nope_new).to(k_pe.dtype)  # (B, G, T, 1)
            w_rope, _ = self._key_norm_weights()
            k_pe = apply_key_scale(k_pe, scale, w_rope)  # (B, G, T, r)

        cos, sin = position_embeddings  # (B, T, d) each, half-split layout
        cos_q, sin_q = _per_head_table(cos, self.q_rope_idx), _per_head_table(sin, self.q_rope_idx)  # (B, H, T, r)
        cos_k, sin_k = _per_head_table(cos, self.k_rope_idx), _per_head_table(sin, self.k_rope_idx)  # (B, G, T, r)
        # rotated in the tables' dtype (OLMo 2 keeps them in fp32), back to the model's dtype as transformers does
        q_pe = (q_pe * cos_q + rotate_half(q_pe) * sin_q).to(q_pe.dtype)
        k_pe = (k_pe * cos_k + rotate_half(k_pe) * sin_k).to(k_pe.dtype)
        rope_slot = torch.cat([k_pe, scale], dim=-1) if self.k_norm_kind else k_pe  # (B, G, T, r + scale_dims)

        if cache is not None:
            check_cache_layer(cache, attn.layer_idx)
            if isinstance(cache, MLACache):
                cache.rope_dims[attn.layer_idx] = r
            latent_all, rope_all = cache.update(latent[:, None], rope_slot, attn.layer_idx)  # (B,1,S,R), (B,G,S,.)
            latent_all = latent_all[:, 0]  # (B, S, R)
        else:
            latent_all, rope_all = latent, rope_slot
        k_pe_all = rope_all[..., :r]  # (B, G, S, r)
        scale_all = rope_all[..., r:] if self.k_norm_kind else None  # (B, G, S, 1) or None

        recorder = _attentions_recorder(kwargs)
        if self.absorb and t == 1 and cache is not None and not torch.is_grad_enabled() and recorder is None:
            out = self._absorbed_attention(q_pe, q_nope, latent_all, k_pe_all, scale_all, attention_mask)
            return attn.o_proj(out), None  # out (B, T, H*d)

        s = latent_all.shape[1]
        k_nope = _project(self.mla_k_up[name], latent_all).view(b, s, g, n).transpose(1, 2)  # (B, G, S, n)
        if self.k_norm_kind:
            k_nope = apply_key_scale(k_nope, scale_all, self._key_norm_weights()[1])  # (B, G, S, n)
        value = _project(self.mla_v_up[name], latent_all).view(b, s, g, d).transpose(1, 2)  # (B, G, S, d)
        query = torch.cat([q_pe, q_nope], dim=-1)  # (B, H, T, d): dims reordered, dot products unchanged
        key = torch.cat([k_pe_all, k_nope], dim=-1)  # (B, G, S, d)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, _eager_of(attn))
        sliding_window = getattr(attn, "sliding_window", getattr(attn.config, "sliding_window", None))
        if sliding_window is not None:
            kwargs["sliding_window"] = sliding_window
        out, weights = interface(
            attn,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else attn.attention_dropout,
            scaling=attn.scaling,
            **kwargs,
        )  # out (B, T, H, d)
        if recorder is not None and weights is not None:  # (B, H, T, S): eager attention's probabilities
            recorder.append(weights)
        return attn.o_proj(out.reshape(b, t, h * d).contiguous()), weights

    def _queries(self, attn: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """``q_proj`` (and the model's own ``q_norm``, as it applies it): ``(B, T, D) -> (B, H, T, d)``."""
        b, t, _ = hidden_states.shape
        q = attn.q_proj(hidden_states)  # (B, T, H*d)
        if self.q_norm_kind == "all":
            q = attn.q_norm(q)
        q = q.view(b, t, self.num_heads, self.head_dim)  # (B, T, H, d)
        if self.q_norm_kind == "head":
            q = attn.q_norm(q)
        return q.transpose(1, 2)

    def _key_scale(self, k_rope: torch.Tensor, k_nope: torch.Tensor) -> torch.Tensor:
        """``1 / rms`` of the raw keys ``[k_rope (B, G, T, r), k_nope (B, G, T, n)]`` as ``k_norm`` takes it, per kv
        head (``"head"``) or over all heads (``"all"``, repeated per head): ``-> (B, G, T, 1)`` fp32."""
        sum_sq = k_rope.float().square().sum(-1, keepdim=True) + k_nope.float().square().sum(-1, keepdim=True)
        count = self.head_dim  # (B, G, T, 1) sums over one head
        if self.k_norm_kind == "all":
            sum_sq = sum_sq.sum(1, keepdim=True).expand_as(sum_sq)  # (B, G, T, 1): one rms over all kv heads
            count = self.num_kv_heads * self.head_dim
        return rms_scale(sum_sq, count, norm_epsilon(self.base_layer.k_norm))

    def _key_norm_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``k_norm``'s weight at each kv head's kept rotary dims ``(G, r)`` and no-RoPE dims ``(G, n)``."""
        weight = self.base_layer.k_norm.weight.view(-1, self.head_dim)  # (1 or G, d)
        weight = weight.expand(self.num_kv_heads, self.head_dim)  # (G, d)
        return weight.gather(1, self.k_rope_idx), weight.gather(1, self.k_nope_idx)

    def _absorbed_attention(self, q_pe, q_nope, latent, k_pe, key_scale, attention_mask) -> torch.Tensor:
        """Attention straight on the cache, without rebuilding keys/values: ``-> (B, T, H*d)``.

        ``q_pe (B, H, T, r)``, ``q_nope (B, H, T, n)``, ``latent (B, S, R)``, ``k_pe (B, G, S, r)``,
        ``key_scale (B, G, S, 1)`` (k_norm models; else ``None``)."""
        name, attn = self.adapter_name, self.base_layer
        b, h, t, _ = q_pe.shape
        g, d, n = self.num_kv_heads, self.head_dim, self.nope_dims
        grp = h // g
        dtype = latent.dtype  # the model's; peft may keep the MLA weights in fp32 (autocast_adapter_dtype)
        w_uk = self.mla_k_up[name].weight.to(dtype).view(g, n, self.kv_rank)  # (G, n, R)
        w_uv = self.mla_v_up[name].weight.to(dtype).view(g, d, self.kv_rank)  # (G, d, R)
        q_nope = q_nope.view(b, g, grp, t, n)  # (B, G, g, T, n)
        if key_scale is not None:  # k_nop = w * s * (W_uk c + b): fold w into the query, s per key below
            q_nope = q_nope * self._key_norm_weights()[1][None, :, None, None, :]
        q_lat = torch.einsum("bgktn,gnr->bgktr", q_nope, w_uk)  # (B, G, g, T, R)
        scores = torch.einsum("bgktr,bsr->bgkts", q_lat, latent)  # (B, G, g, T, S)
        if key_scale is not None:
            bias = self.mla_k_up[name].bias
            if bias is not None:  # the key bias is scaled per key now, so it no longer cancels in softmax
                scores = scores + torch.einsum("bgktn,gn->bgkt", q_nope, bias.to(dtype).view(g, n))[..., None]
            scores = scores * key_scale[:, :, None, None, :, 0]  # (B, G, 1, 1, S)
        # without a key norm the key bias adds the same constant to every score of a query and cancels in softmax
        scores = scores + torch.einsum("bgktr,bgsr->bgkts", q_pe.view(b, g, grp, t, -1), k_pe)
        scores = scores.float() * attn.scaling
        if attention_mask is not None:
            mask = attention_mask[:, :, None, :, : latent.shape[1]]  # (B, 1, 1, T, S)
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        probs = scores.softmax(dim=-1).to(latent.dtype)  # (B, G, g, T, S)
        ctx = torch.einsum("bgkts,bsr->bgktr", probs, latent)  # (B, G, g, T, R)
        out = torch.einsum("bgktr,gdr->bgktd", ctx, w_uv)  # (B, G, g, T, d)
        if self.mla_v_up[name].bias is not None:  # attention weights sum to 1, so the value bias passes through
            out = out + self.mla_v_up[name].bias.to(dtype).view(1, g, 1, 1, d)
        return out.reshape(b, h, t, d).transpose(1, 2).reshape(b, t, h * d)


def _attentions_recorder(kwargs: dict) -> Optional[list]:
    """The list transformers collects `output_attentions` in for the running forward, or `None` when none is asked.

    transformers (5.x) records attention weights with a forward hook on the model's own attention class
    (`OutputRecorder(LlamaAttention, index=1)`); an `MLAAttention` replaces that module and runs the attention
    itself, so it appends its weights to the same collector, and `outputs.attentions` has one entry per layer (eager
    attention; SDPA computes none, as for the base model)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # another transformers: refuse rather than return an empty tuple
        _active_collector = None
    collected = _active_collector.get() if _active_collector is not None else None
    if collected is not None and "attentions" in collected:
        return collected["attentions"]
    if kwargs.get("output_attentions"):
        raise ValueError(
            "`output_attentions=True`: this transformers version gives an MLA layer no way to report its attention "
            "weights (it replaces the model's attention module). Drop `output_attentions`, or use "
            "`with model.disable_adapter():` for the base model's attentions."
        )
    return None


def _project(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """An MLA projection in its weights' dtype (peft keeps adapter weights of a bf16/fp16 model in fp32 by default,
    `autocast_adapter_dtype`), returned in the model's dtype, as peft's LoRA layers do; the cache stays in it too."""
    return linear(x.to(linear.weight.dtype)).to(x.dtype)


def _linear_weight(module: nn.Module) -> torch.Tensor:
    """The (dequantised, for a bitsandbytes base) weight ``(out, in)`` of a linear layer, LoRA-wrapped or not."""
    from peft.utils.integrations import dequantize_module_weight

    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    # never bitsandbytes' CPU-repacked layout, which its dequantiser does not read: the tuner's `inject_adapter`
    # unpacks it (`fix_bnb_cpu_repack`) before the MLA layers are built, and no forward repacks it afterwards
    return dequantize_module_weight(base)


def _eager_of(attn: nn.Module):
    """The eager attention function of the attention module's own modeling file."""
    fn = getattr(sys.modules.get(type(attn).__module__), "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    return fn


retry_deferred()  # registration deferred by a first `import peft` from this module runs now
