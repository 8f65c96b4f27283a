"""LongLoRA's shifted sparse attention (S²-Attn) on transformers' attention interface.

S²-Attn ([Chen et al. 2023](https://arxiv.org/abs/2309.12307)) is a *training-time* attention: for a row of T tokens
and H query heads, with block size G = int(ratio * T),

- heads `[0, H//2)` attend causally within the blocks `i // G`,
- heads `[H//2, H)` attend causally within the blocks `(i + G//2) // G` (so the first and the last of these blocks
  are shorter), which lets information flow across the borders of the first half's blocks,

and no token ever attends outside its block. Unlike LongLoRA's non-flash code, nothing wraps around: the first G/2
tokens of the shifted heads form a short block of their own and never see the last tokens of the row (LongLoRA's
`roll` leaks future tokens into the past, LongLoRA issues #15 and #90). A row shorter than `2 / ratio` tokens (blocks
of fewer than 2 tokens) gets full causal attention. Packed rows (`position_ids` restarting at 0,
or `cu_seq_lens_q`) never attend across documents and padded keys are never attended: the blocks are intersected
with the documents and padding is dropped before the blocks are formed.

It computes less, not just masks more: each half of the heads is regrouped into its blocks, and one causal attention
call runs on the block layout, so the work per layer is O(T * G) instead of O(T^2 / 2):

- SDPA (also for an `eager` model): rows without packing or padding are reshaped `(B, T, h, D) -> (B * T/G, G, h, D)`
  (plus a call for the short first/last block); otherwise the tokens are gathered into segments (document x block,
  padding dropped), bucketed by length (powers of two up to G) and run as batches of causal SDPA calls;
- FlashAttention 2/3 (when installed): the same segments, unpadded, as one `flash_attn_varlen_func` call per half
  (LongLoRA's flash path), through transformers' `_flash_attention_forward`.

`PIModel` switches a model to the registered implementation (`pi_s2_<base>_<ratio>`) only while the model is training
with an S² adapter enabled; `eval()`, `generate()`, `disable_adapter()`, `unload()` and `merge_and_unload()` restore
the model's own implementation, so inference, generation and exports use full attention. Called outside training
anyway (an attention module in eval mode, a query chunk after a cache), the registered function itself computes full
causal attention.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, find_packed_sequence_indices, flash_attention_mask

S2_PREFIX = "pi_s2_"
"""Prefix of the attention implementations this module registers: `pi_s2_<base>_<ratio>`."""

SDPA_BASES = ("sdpa", "eager")
FLASH_BASES = ("flash_attention_2", "flash_attention_3")
WRAPPABLE = SDPA_BASES + FLASH_BASES
"""The model attention implementations S²-Attn can wrap (an `eager` model runs S² on SDPA)."""

_MIN_BUCKET = 16  # smallest padded segment length of the gathered SDPA path
_FIX = "set `s2_attn=False` (full attention in training)"


# ---- the rule ------------------------------------------------------------------------------------------------------
def s2_group_size(seq_len: int, ratio: float) -> int:
    """Block size G = int(ratio * T) of a row of `seq_len` tokens; at least 2 tokens or a `ValueError`."""
    group = int(ratio * seq_len)
    if group < 2:
        raise ValueError(
            f"`s2_group_size_ratio`={ratio} gives S²-Attn blocks of {group} token(s) for a sequence of {seq_len} "
            f"tokens; a block needs at least 2. Raise `s2_group_size_ratio` to at least {2 / seq_len:.4g}, train on "
            f"longer sequences, or {_FIX}."
        )
    return group


def s2_block_ids(seq_len: int, group_size: int, shifted: bool, device=None) -> torch.Tensor:
    """Block index of every position: `i // G`, or `(i + G // 2) // G` for the shifted half (no wrap-around)."""
    positions = torch.arange(seq_len, device=device)  # (T,)
    return (positions + (group_size // 2 if shifted else 0)) // group_size


def head_halves(num_heads: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Query heads `[0, H//2)` (blocks `i // G`) and `[H//2, H)` (shifted blocks)."""
    return (0, num_heads // 2), (num_heads // 2, num_heads)


def document_ids(
    batch: int,
    seq_len: int,
    position_ids: Optional[torch.Tensor] = None,
    cu_seq_lens: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """Document index of every token `(B, T)` of packed rows, or `None` when every row is one document.

    From `cu_seq_lens` (flattened batch of one row) when given, else from `position_ids` restarting (transformers'
    `find_packed_sequence_indices`: a new document wherever the position does not grow by exactly 1)."""
    if cu_seq_lens is not None:
        cu = cu_seq_lens.to(torch.long)
        if batch != 1 or int(cu[-1]) != seq_len:
            raise ValueError(
                f"`cu_seq_lens_q` ends at {int(cu[-1])} for a batch of {batch} row(s) of {seq_len} tokens; S²-Attn "
                "expects one flattened row (padding-free packing) that the boundaries cover exactly."
            )
        positions = torch.arange(seq_len, device=cu.device)
        docs = torch.searchsorted(cu[1:], positions, right=True)  # (T,)
        return docs[None] if int(docs[-1]) > 0 else None
    if position_ids is None:
        return None
    position_ids = position_ids.expand(batch, -1) if position_ids.shape[0] != batch else position_ids
    return find_packed_sequence_indices(position_ids[:, -seq_len:])


# ---- segments (document x block, padding dropped) -----------------------------------------------------------------
def s2_segments(
    blocks: torch.Tensor, docs: Optional[torch.Tensor], valid: Optional[torch.Tensor], batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The S² segments of one head half, in flattened token order.

    Args:
        blocks: `(T,)` block index of every position.
        docs: `(B, T)` document index of every token, or `None`.
        valid: `(B, T)` bool, False at padding, or `None`.
        batch: B.

    Returns:
        `token_index` `(N,)`: the flattened (B * T) index of every kept (non-padding) token, in order, and
        `cu_seqlens` `(S + 1,)`: where each segment starts in `token_index` (and N at the end). A segment is a maximal
        run of kept tokens with the same row, document and block; attention is causal within a segment only.
    """
    seq_len = blocks.shape[0]
    device = blocks.device
    if valid is None:
        token_index = torch.arange(batch * seq_len, device=device)  # (N,)
    else:
        token_index = valid.reshape(-1).nonzero().squeeze(1)  # (N,)
    row, pos = token_index // seq_len, token_index % seq_len
    key = [row, blocks[pos]]
    if docs is not None:
        key.append(docs.reshape(-1)[token_index])
    same = torch.ones_like(token_index, dtype=torch.bool)  # (N,) same segment as the previous kept token
    for k in key:
        same[1:] &= k[1:] == k[:-1]
    same[:1] = False
    begin = (~same).nonzero().squeeze(1)  # (S,)
    cu_seqlens = torch.cat([begin, begin.new_tensor([token_index.shape[0]])])  # (S + 1,)
    return token_index, cu_seqlens


def _kv_heads_for(h0: int, h1: int, num_kv_heads: int, n_rep: int) -> tuple[Optional[slice], Optional[torch.Tensor]]:
    """Which key/value heads serve query heads `[h0, h1)`: a slice usable with GQA, or an index of one per head."""
    if h0 % n_rep == 0 and h1 % n_rep == 0:
        return slice(h0 // n_rep, h1 // n_rep), None  # every kv head serves n_rep consecutive query heads
    if h0 // n_rep == (h1 - 1) // n_rep:
        return slice(h0 // n_rep, h0 // n_rep + 1), None  # one kv head for the whole half (MQA)
    return None, torch.arange(h0, h1) // n_rep


def _select_kv(x: torch.Tensor, h0: int, h1: int, n_rep: int) -> torch.Tensor:
    """`x` `(B, T, Hkv, D)` -> the key/value heads of query heads `[h0, h1)`, `(B, T, hk, D)` with `hk | (h1 - h0)`."""
    heads, index = _kv_heads_for(h0, h1, x.shape[2], n_rep)
    return x[:, :, heads] if heads is not None else x.index_select(2, index.to(x.device))


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float, scale) -> torch.Tensor:
    """Causal SDPA on `(N, G, h, D)` token-major blocks -> `(N, G, h, D)`."""
    gqa = k.shape[2] != q.shape[2]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),  # (N, h, G, D)
        k.transpose(1, 2),
        v.transpose(1, 2),
        dropout_p=dropout,
        is_causal=True,
        scale=scale,
        enable_gqa=gqa,
    )
    return out.transpose(1, 2)  # (N, G, h, D)


def _sdpa_regular(q, k, v, group: int, first: int, dropout: float, scale) -> torch.Tensor:
    """Fast path for rows without packing or padding: `(B, T, h, D)` -> `(B, T, h, D)` with blocks of `group`
    tokens after a first block of `first` tokens (0 for the unshifted half), by reshaping, not gathering."""
    batch, seq_len = q.shape[:2]
    n_full = (seq_len - first) // group
    sizes = [first, n_full * group, seq_len - first - n_full * group]  # short first block, full blocks, the rest
    kept = [i for i, n in enumerate(sizes) if n]
    # `split`, not slicing: its backward writes the gradients into one tensor instead of one zero-padded copy each
    parts = [[x.split(sizes, dim=1)[i] for i in kept] for x in (q, k, v)]
    pieces = []
    for i, qp, kp, vp in zip(kept, *parts):
        if i == 1:  # (B, n*G, h, D) -> (B*n, G, h, D)
            qb, kb, vb = (x.reshape(batch * n_full, group, *x.shape[2:]) for x in (qp, kp, vp))
            out = _sdpa(qb, kb, vb, dropout, scale)  # (B*n, G, h, D)
            pieces.append(out.reshape(batch, n_full * group, *out.shape[2:]))
        else:
            pieces.append(_sdpa(qp, kp, vp, dropout, scale))
    return torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]


def _sdpa_segments(q, k, v, token_index, cu_seqlens, group: int, dropout: float, scale) -> torch.Tensor:
    """General path: tokens `(B*T, h, D)` gathered into their segments, padded to power-of-two buckets (at most G),
    one causal SDPA call per bucket; returns `(N, h, D)` for the kept tokens, in `token_index` order."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]  # (S,)
    buckets = torch.clamp(
        2 ** torch.ceil(torch.log2(lengths.clamp(min=1).double())).long(), min=min(_MIN_BUCKET, group), max=group
    )
    pieces, places = [], []
    for size in torch.unique(buckets).tolist():
        segs = (buckets == size).nonzero().squeeze(1)  # (s,)
        slots = torch.arange(size, device=q.device)
        # (s, size) index into the kept tokens; slots past a segment's end point at its first token (junk queries,
        # never seen by the real ones: they come after them and attention is causal)
        local = cu_seqlens[segs][:, None] + slots[None, :]
        inside = slots[None, :] < lengths[segs][:, None]
        local = torch.where(inside, local, cu_seqlens[segs][:, None])
        source = token_index[local.reshape(-1)]  # (s*size,)
        qb, kb, vb = (x.index_select(0, source).view(segs.shape[0], size, *x.shape[1:]) for x in (q, k, v))
        ob = _sdpa(qb, kb, vb, dropout, scale)  # (s, size, h, D)
        pieces.append(ob.reshape(-1, *ob.shape[2:])[inside.reshape(-1)])
        places.append(local[inside])
    out = torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0]  # (N, h, D), in bucket order
    return out.index_select(0, torch.argsort(torch.cat(places)))  # (N, h, D), in token order


def _flash_segments(q, k, v, cu_seqlens, group: int, dropout: float, scale, base: str, module) -> torch.Tensor:
    """FlashAttention varlen on the kept tokens `(N, h, D)`, each segment one causal sequence -> `(N, h, D)`."""
    from transformers.integrations.flash_attention import get_target_dtype
    from transformers.modeling_flash_attention_utils import _flash_attention_forward, flash_attn_supports_top_left_mask

    cu = cu_seqlens.to(torch.int32)
    max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    out = _flash_attention_forward(
        q[None],  # (1, N, h, D)
        k[None],
        v[None],
        None,
        query_length=q.shape[0],
        is_causal=True,
        dropout=dropout,
        softmax_scale=scale,
        use_top_left_mask=flash_attn_supports_top_left_mask(),
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=max_len,
        max_length_k=max_len,
        target_dtype=get_target_dtype(q, module),
        attn_implementation=base,
    )
    return out.reshape(q.shape[0], q.shape[1], -1).to(q.dtype)


def s2_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    ratio: float,
    padding_mask: Optional[torch.Tensor] = None,
    docs: Optional[torch.Tensor] = None,
    dropout: float = 0.0,
    scale: Optional[float] = None,
    backend: str = "sdpa",
    module=None,
    force_segments: bool = False,
) -> torch.Tensor:
    """S²-Attn of one layer.

    Args:
        query: `(B, H, T, D)`; key, value: `(B, Hkv, T, D)` with `Hkv | H` (MHA, GQA, MQA).
        ratio: `s2_group_size_ratio`; G = int(ratio * T).
        padding_mask: `(B, T)`, True/1 for tokens, False/0 for padding (never attended), or `None`.
        docs: `(B, T)` document index of packed rows (see `document_ids`), or `None`.
        backend: `"sdpa"` or a FlashAttention implementation (`"flash_attention_2"`, `"flash_attention_3"`).
        force_segments: use the gathered path even for plain rows (tests compare it with the fast path).

    Returns:
        `(B, T, H, D)`, as transformers' attention functions return it. Outputs at padding positions are 0.
    """
    batch, num_heads, seq_len, _ = query.shape
    num_kv_heads = key.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(
            f"S²-Attn needs the key/value heads ({num_kv_heads}) to divide the query heads ({num_heads})."
        )
    n_rep = num_heads // num_kv_heads
    group = s2_group_size(seq_len, ratio)
    valid = None
    if padding_mask is not None:
        valid = padding_mask[:, -seq_len:].to(device=query.device, dtype=torch.bool)  # (B, T)
        if bool(valid.all()):
            valid = None
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, T, H*, D) token-major views
    regular = valid is None and docs is None and not force_segments and backend in SDPA_BASES
    halves = [(shifted, h0, h1) for shifted, (h0, h1) in zip((False, True), head_halves(num_heads)) if h0 < h1]
    q_parts = q.split([h1 - h0 for _, h0, h1 in halves], dim=2)  # one gradient tensor in backward, not one per half
    kv_heads = [_kv_heads_for(h0, h1, num_kv_heads, n_rep)[0] for _, h0, h1 in halves]
    if all(isinstance(sl, slice) for sl in kv_heads) and [sl.start for sl in kv_heads] == [0] + [
        sl.stop for sl in kv_heads[:-1]
    ]:  # the halves' key/value heads partition them (MHA, most GQA): split them too
        sizes = [sl.stop - sl.start for sl in kv_heads]
        k_parts, v_parts = k.split(sizes, dim=2), v.split(sizes, dim=2)
    else:  # MQA or heads shared across the halves
        k_parts = [_select_kv(k, h0, h1, n_rep) for _, h0, h1 in halves]
        v_parts = [_select_kv(v, h0, h1, n_rep) for _, h0, h1 in halves]
    outputs = []
    for (shifted, _, _), qh, kh, vh in zip(halves, q_parts, k_parts, v_parts):
        if regular:
            first = group - group // 2 if shifted else 0
            outputs.append(_sdpa_regular(qh, kh, vh, group, first, dropout, scale))  # (B, T, h, D)
            continue
        blocks = s2_block_ids(seq_len, group, shifted, device=query.device)
        token_index, cu_seqlens = s2_segments(blocks, docs, valid, batch)
        flat = [x.reshape(batch * seq_len, *x.shape[2:]) for x in (qh, kh, vh)]  # (B*T, h*, D)
        kept = [x.index_select(0, token_index) for x in flat] if backend in FLASH_BASES else flat
        if backend in FLASH_BASES:
            out = _flash_segments(*kept, cu_seqlens, group, dropout, scale, backend, module)  # (N, h, D)
        else:
            out = _sdpa_segments(*flat, token_index, cu_seqlens, group, dropout, scale)  # (N, h, D)
        if valid is not None:
            out = out.new_zeros(batch * seq_len, *out.shape[1:]).index_copy(0, token_index, out)
        outputs.append(out.reshape(batch, seq_len, *out.shape[1:]))
    return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]  # (B, T, H, D)


# ---- the registered attention function ----------------------------------------------------------------------------
def check_all_heads(module: torch.nn.Module, num_heads: int) -> None:
    """S² decides shifted vs unshifted blocks by the *global* head index (heads `[H/2, H)` shifted). A query that holds
    a slice of the heads (DeepSpeed Ulysses sequence parallelism gives each of N ranks H/N heads after its
    all-to-all; tensor parallelism does the same) would put the shifted half on the wrong heads: refused."""
    config = getattr(module, "config", None)
    total = getattr(config, "num_attention_heads", None)
    if isinstance(total, int) and num_heads < total and total % num_heads == 0:
        raise ValueError(
            f"S²-Attn got {num_heads} of this model's {total} query heads (a head slice: Ulysses sequence "
            f"parallelism or tensor parallelism over {total // num_heads} ranks). S² shifts heads [{total // 2}, "
            f"{total}) by their global index, so on a slice the shifted and unshifted halves would land on the wrong "
            f"heads. Train without sequence/tensor parallelism (`sp_size=1`), or {_FIX}."
        )


def _full_attention(module, query, key, value, attention_mask, dropout, scaling, base, docs, **kwargs):
    """The model's normal (full causal) attention, for calls of an S² model outside training (e.g. `generate` while
    `model.training`): the 2D padding mask and packed documents become the 4D mask SDPA takes."""
    kwargs.pop("is_causal", None)  # causal: S² wraps decoder attention only
    if base in FLASH_BASES:
        from transformers.integrations.flash_attention import get_target_dtype
        from transformers.modeling_flash_attention_utils import (
            _flash_attention_forward,
            flash_attn_supports_top_left_mask,
        )

        out = _flash_attention_forward(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            attention_mask,
            query_length=query.shape[2],
            is_causal=True,
            dropout=dropout,
            softmax_scale=scaling,
            use_top_left_mask=flash_attn_supports_top_left_mask(),
            target_dtype=get_target_dtype(query, module),
            attn_implementation=base,
            **kwargs,
        )
        return out, None
    q_len, kv_len = query.shape[2], key.shape[2]
    mask = None
    if attention_mask is not None or docs is not None or 1 < q_len < kv_len:  # (q_len < kv_len: a cache)
        q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)
        kv_pos = torch.arange(kv_len, device=query.device)
        mask = (kv_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, q, kv) causal
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, -kv_len:].to(torch.bool)
        if docs is not None:
            mask = mask & (docs[:, None, -q_len:, None] == docs[:, None, None, :])
        mask = mask | (q_pos[:, None] == kv_pos[None, :])[None, None]  # a padding query sees itself: no NaN rows
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def s2_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    *,
    s2_base: str,
    s2_ratio: float,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function of S²-Attn (registered as `pi_s2_<base>_<ratio>`): S² while the attention
    module is training on a full sequence of at least `2 / ratio` tokens, the model's normal attention otherwise."""
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"S²-Attn received a {attention_mask.dim()}D attention mask; it supports 2D padding masks and packed rows "
            f"(`position_ids` restarting at 0, or `cu_seq_lens_q`). Pass a 2D `attention_mask`, or {_FIX}."
        )
    cu_seq_lens = kwargs.pop("cu_seq_lens_q", None)
    batch, seq_len = query.shape[0], query.shape[2]
    # a row too short for blocks of 2 tokens (T < 2 / ratio) gets full attention, as LongLoRA's rule implies (a block
    # of at most one token would be no attention at all): e.g. a short SFT example in a batch of its own
    in_training = module.training and seq_len == key.shape[2] and int(s2_ratio * seq_len) >= 2
    docs = None
    if cu_seq_lens is not None or kwargs.get("position_ids") is not None:
        docs = document_ids(batch, seq_len, kwargs.get("position_ids"), cu_seq_lens if in_training else None)
    if not in_training:
        if cu_seq_lens is not None:
            kwargs["cu_seq_lens_q"] = cu_seq_lens
        return _full_attention(module, query, key, value, attention_mask, dropout, scaling, s2_base, docs, **kwargs)

    if kwargs.get("output_attentions"):
        raise ValueError(
            "`output_attentions=True` is not available with S²-Attn in training (no attention matrix is ever built). "
            f"Drop `output_attentions`, call `model.eval()` first, or {_FIX}."
        )
    for name in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            raise ValueError(f"S²-Attn does not support attention with `{name}` (this model passes one); {_FIX}.")
    if not (kwargs.get("is_causal") if kwargs.get("is_causal") is not None else getattr(module, "is_causal", True)):
        raise ValueError(f"S²-Attn is for causal (decoder) attention; this attention is bidirectional. {_FIX}.")
    check_all_heads(module, query.shape[1])
    group = s2_group_size(seq_len, s2_ratio)
    window = kwargs.get("sliding_window")
    if window is not None and group > window:
        raise ValueError(
            f"S²-Attn blocks of {group} tokens (`s2_group_size_ratio`={s2_ratio} x {seq_len} tokens) exceed this "
            f"model's sliding window of {window} tokens. Lower `s2_group_size_ratio` to at most "
            f"{window / seq_len:.4g}, or {_FIX}."
        )
    out = s2_attention(
        query,
        key,
        value,
        s2_ratio,
        padding_mask=attention_mask,
        docs=docs,
        dropout=dropout,
        scale=scaling,
        backend="sdpa" if s2_base in SDPA_BASES else s2_base,
        module=module,
    )
    return out, None


# ---- registration --------------------------------------------------------------------------------------------------
def s2_implementation_name(base: Optional[str], ratio: float) -> str:
    """Register (once) and return the attention implementation `pi_s2_<base>_<ratio>` wrapping `base`.

    Registered in transformers' `AttentionInterface` (the attention) and `AttentionMaskInterface` (transformers'
    FlashAttention mask: the 2D padding mask or `None`, never a (T x T) mask)."""
    base = "sdpa" if base is None else base
    if base not in WRAPPABLE:
        raise ValueError(
            f"`s2_attn=True` cannot wrap the model's attention implementation {base!r}; S²-Attn wraps "
            f"{list(WRAPPABLE)}. Load the model with `attn_implementation='sdpa'` (or 'flash_attention_2'), or set "
            "`s2_attn=False`."
        )
    if not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise ValueError(f"`s2_group_size_ratio` must be in (0, 1], got {ratio!r}.")
    name = f"{S2_PREFIX}{base}_{float(ratio)!r}"
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, functools.partial(s2_attention_forward, s2_base=base, s2_ratio=float(ratio)))
        AttentionMaskInterface.register(name, flash_attention_mask)
    return name


def is_s2_implementation(name: Optional[str]) -> bool:
    return isinstance(name, str) and name.startswith(S2_PREFIX)


def set_s2_attention(model, original: Optional[str], ratio: Optional[float]) -> None:
    """Switch `model` to S²-Attn wrapping `original` (with block ratio `ratio`), or back to `original` (`ratio=None`),
    through transformers' `set_attn_implementation`. No-op when it already has that implementation."""
    wanted = original if ratio is None else s2_implementation_name(original, ratio)
    if model.config._attn_implementation != wanted:
        model.set_attn_implementation(wanted)


def s2_ratio_of(configs) -> Optional[float]:
    """The S² block ratio of the adapter configs with `s2_attn=True` (`None` when there is none); adapters active
    together must agree."""
    ratios = {c.s2_group_size_ratio for c in configs if getattr(c, "s2_attn", False)}
    if len(ratios) > 1:
        raise ValueError(
            f"Active adapters train with different `s2_group_size_ratio`s {sorted(ratios)}; a model has one attention "
            "at a time, so activate them one at a time or give them the same ratio."
        )
    return ratios.pop() if ratios else None
