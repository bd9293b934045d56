"""ProxyV for LLaVA models in transformers ("Streamline Without Sacrifice", arXiv 2505.15816).

From decoder layer S on, each image's vision tokens are represented by a few proxy tokens (the token grid
downsampled by a factor r per side). In every layer l >= S:
  - queries are the proxies and the text tokens; keys/values are the full vision tokens, the proxies and the text;
  - a proxy sees earlier proxies and the text before its image, never full vision tokens (its queries are computed
    over those keys alone, so their cost does not grow with the vision tokens);
  - a text token sees the full vision tokens and earlier text, never proxies;
  - the full vision tokens get no query and no FFN: they contribute keys/values (from their current state, with
    the layer's own norm, projections and RoPE at their real positions) and are then updated by a light
    per-layer VisionMLP from their own state and their proxy's new state.
Proxies take compact positions s, s+1, ... where s is the position of their image's first token; they are dropped
after the last layer. The KV cache holds the full vision tokens and the text, never proxies, so decoding is the
ordinary path.

Between layers S..L-1 the hidden states carry the proxies appended after the sequence: (B, T + P, H).

This file is self-contained (standard library, torch, transformers): it is copied into every converted checkpoint
and loaded with `trust_remote_code=True`.
"""

import contextlib
import dataclasses
import functools
import inspect
import math
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    DynamicCache,
    GenerationMixin,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaNextForConditionalGeneration,
    LlavaNextModel,
    PreTrainedModel,
)
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llava.modeling_llava import LlavaPreTrainedModel
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextPreTrainedModel,
    get_anyres_image_grid_shape,
    unpad_image,
)
from transformers.models.llava_next_video.modeling_llava_next_video import (
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoModel,
    LlavaNextVideoPreTrainedModel,
)
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionModel,
    LlavaOnevisionPreTrainedModel,
)

from .configuration_proxyv import (
    ProxyVLlavaConfig,
    ProxyVLlavaNextConfig,
    ProxyVLlavaNextVideoConfig,
    ProxyVLlavaOnevisionConfig,
    vision_grid,
)

# The additive attention bias of a masked key: what torch itself turns a boolean mask into for cuDNN attention (where
# -inf can give NaNs); finite in float16 and bfloat16, and far enough below any score that the softmax gives exactly 0.
MASKED_BIAS = -65504.0
TEXT, VISION, PROXY, NEWLINE = 0, 1, 2, 3  # NEWLINE: an image token outside every grid, computed like text


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (B, L, D), index: (B, K) -> (B, K, D)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def to_device(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """CPU tensors -> the same tensors on `device`, with one host-to-device copy per dtype (from pinned memory on
    CUDA, so the copy does not wait for the host)."""
    if device.type == "cpu":
        return tensors
    out = {}
    for dtype in dict.fromkeys(t.dtype for t in tensors.values()):
        names = [name for name, t in tensors.items() if t.dtype == dtype]
        packed = torch.cat([tensors[name].reshape(-1) for name in names])
        if device.type == "cuda":
            packed = packed.pin_memory()
        packed = packed.to(device, non_blocking=device.type == "cuda")
        for name, part in zip(names, packed.split([tensors[name].numel() for name in names]), strict=True):
            out[name] = part.view(tensors[name].shape)
    return out


def select_rows(x: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
    """Rows of x (B, L, D) at flat indices from `flat_rows` -> (B, K, D): one contiguous row copy per index."""
    return x.reshape(-1, x.shape[-1]).index_select(0, flat_index).view(x.shape[0], -1, x.shape[-1])


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Llama's rotary embedding, x * cos + rotate_half(x) * sin, in three operations: x: (B, heads, L, d); cos and
    signed_sin (sin with its first half negated, see `ProxyVPlan.layer_tables`): (B, 1, L, d). rotate_half(x) * sin is
    swap_halves(x) * signed_sin, added half by half to x * cos: five tensor-sized reads and writes, where a swapped
    copy of x would take seven (same roundings, the same result)."""
    out = x * cos
    halves, x_halves, sin_halves = (t.unflatten(-1, (2, -1)) for t in (out, x, signed_sin))
    halves[..., 0, :].addcmul_(x_halves[..., 1, :], sin_halves[..., 0, :])
    halves[..., 1, :].addcmul_(x_halves[..., 0, :], sin_halves[..., 1, :])
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm as one fused kernel on CUDA (the written-out form is seven): float32 statistics, the weight
    applied before the result is rounded to the input dtype. The same values as Llama's in float32; in bfloat16 or
    float16, where Llama rounds before applying the weight, the two can differ in the last bit."""
    if weight.dtype != x.dtype:
        return weight * F.rms_norm(x, x.shape[-1:], eps=eps)
    return F.rms_norm(x, x.shape[-1:], weight, eps)


_LLAMA_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")  # all compute rms_norm(x, weight, eps)


def backbone_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A decoder layer's own norm, through `rms_norm` where it is Llama's."""
    if type(norm).__name__ in _LLAMA_NORMS:
        return rms_norm(x, norm.weight, norm.variance_epsilon)
    return norm(x)


class ProxyVRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class ProxyVZeroLinear(nn.Linear):
    """A linear layer that starts at zero (the VisionMLP output, so a new VisionMLP is the identity)."""


class ProxyVVisionMLP(nn.Module):
    """Updates full vision tokens from their own state and their proxy's context.

    update = out(SiLU(fuse([proj_vision(norm(v)), proj_proxy(norm(p))])));  v <- v + update.
    `out` starts at zero, so a freshly converted model passes the vision states through unchanged.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, eps: float):
        super().__init__()
        self.norm_vision = ProxyVRMSNorm(hidden_size, eps)
        self.norm_proxy = ProxyVRMSNorm(hidden_size, eps)
        self.proj_vision = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.proj_proxy = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.fuse = nn.Linear(2 * intermediate_size, intermediate_size, bias=True)
        self.out = ProxyVZeroLinear(intermediate_size, hidden_size, bias=False)

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        for module in self.modules():
            init_proxyv_module(module, std)

    def forward(self, vision: torch.Tensor, proxies: torch.Tensor, context, overwrite: bool = False) -> torch.Tensor:
        # vision: (B, V, H) full tokens; proxies: (B, P, H) their proxies after this layer; context maps per-proxy
        # features (B, P, I) to per-vision-token ones (B, V, I) in a new tensor. The projection is per token, so it is
        # applied to the P proxies before they are spread over the V tokens. overwrite: the update is added to
        # `vision` in place (a contiguous tensor no gradient goes through), which is then returned.
        # fuse([own, ctx]) = W_own @ own + W_ctx @ ctx + b; W_ctx is applied to the P proxies before they are spread
        # over the V tokens (spreading is linear), and no concatenated copy is made.
        width = self.proj_vision.out_features
        w_own, w_ctx = self.fuse.weight[:, :width], self.fuse.weight[:, width:]
        if torch.compiler.is_compiling():
            # Compiled, the additions are left to inductor's fusion: graphs with the addmm form below warned
            # "Constructing input/output tensor meta failed for Extern Choice" once per layer on an H100 and ran
            # batch 1 slower than the previous version, which had this form (benchmarks/results/h100-2026-11-27b).
            ctx = context(F.linear(self.proj_proxy(self.norm_proxy(proxies)), w_ctx))  # (B, V, I)
            own = F.linear(self.proj_vision(self.norm_vision(vision)), w_own, self.fuse.bias)  # (B, V, I)
            return vision + self.out(F.silu(own + ctx))  # (B, V, H)
        # Eager, the bias joins the proxies' side (spreading copies it unchanged), and the two additions are the
        # matrix products' own (addmm): two kernels fewer. Where no gradient is needed, the products add into the
        # tensors they update (addmm would first copy them). Autocast casts no in-place product, and in addmm it would
        # round the residual stream itself: under it the residual is added apart, in its own dtype, as the decoder
        # layers add theirs.
        ctx = context(F.linear(self.proj_proxy(self.norm_proxy(proxies)), w_ctx, self.fuse.bias))  # (B, V, I)
        own = self.proj_vision(self.norm_vision(vision)).reshape(-1, width)  # (B*V, I)
        rows = vision.reshape(-1, vision.shape[-1])  # (B*V, H)
        autocast = torch.is_autocast_enabled(vision.device.type)
        if not torch.is_grad_enabled() and not autocast:
            fused = F.silu(ctx.view(-1, width).addmm_(own, w_own.t()), inplace=True)  # (B*V, I)
            if overwrite:
                rows.addmm_(fused, self.out.weight.t())
                return vision
        else:
            fused = F.silu(torch.addmm(ctx.reshape(-1, width), own, w_own.t()))
        if autocast:
            updated = (rows + F.linear(fused, self.out.weight)).view(vision.shape)  # (B, V, H)
        else:
            updated = torch.addmm(rows, fused, self.out.weight.t()).view(vision.shape)  # (B, V, H)
        return vision.copy_(updated) if overwrite else updated


class ProxyVLearnedProxies(nn.Module):
    """Non-spatial proxies: `count` learned queries attend over the vision tokens of one image grid (any number of
    them, in any layout); the same attention weights, normalised per token, carry the proxies' context back."""

    def __init__(self, hidden_size: int, width: int, count: int, eps: float):
        super().__init__()
        self.norm = ProxyVRMSNorm(hidden_size, eps)
        self.key = nn.Linear(hidden_size, width, bias=False)
        self.queries = nn.Parameter(torch.empty(count, width))

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens: (G, N, H) of G grids padded to N, valid: (G, N) -> proxies (G, K, H), weights back (G, N, K)."""
        keys = self.key(self.norm(tokens))  # (G, N, I)
        scores = torch.einsum("ki,gni->gkn", self.queries.to(keys.dtype), keys) * keys.shape[-1] ** -0.5
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        weights = scores.float().softmax(-1).to(tokens.dtype)  # (G, K, N): each proxy a convex mix of tokens
        back = weights.transpose(1, 2)
        back = back / back.sum(-1, keepdim=True).clamp_min(1e-9)  # each token's weights over the proxies sum to 1
        return weights @ tokens, back


@torch.no_grad()
def init_proxyv_module(module: nn.Module, std: float) -> None:
    """Initial values of one ProxyV submodule (norms at one, projections normal(0, std), the output at zero)."""
    if isinstance(module, ProxyVLearnedProxies):
        module.queries.normal_(0.0, 1.0)
    elif isinstance(module, ProxyVRMSNorm):
        module.weight.fill_(1.0)
    elif isinstance(module, ProxyVZeroLinear):
        module.weight.zero_()
    elif isinstance(module, nn.Linear):
        module.weight.normal_(0.0, std)
        if module.bias is not None:
            module.bias.zero_()


class ProxyVModules(nn.Module):
    """All parameters ProxyV adds to a model: one VisionMLP per layer from the start layer on, and with learned
    proxies the module that makes them."""

    def __init__(self, config: ProxyVLlavaConfig):
        super().__init__()
        text = config.text_config
        self.vision_mlps = nn.ModuleDict(
            {
                str(i): ProxyVVisionMLP(text.hidden_size, config.proxyv_vision_mlp_size, text.rms_norm_eps)
                for i in range(config.proxyv_start_layer, text.num_hidden_layers)
            }
        )
        if config.proxyv_proxy == "learned":
            self.learned = ProxyVLearnedProxies(
                text.hidden_size, config.proxyv_vision_mlp_size, config.proxyv_learned_proxies, text.rms_norm_eps
            )

    def reset_parameters(self, std: float) -> None:
        for module in self.modules():
            init_proxyv_module(module, std)


@dataclass(frozen=True)
class ProxyVGrid:
    """One image's 2-D grid of vision tokens in a prompt: cell (i, j) is row `start + i * stride + j`.

    `stride` is `width` for a plain grid and `width + 1` when every grid row ends with a newline token. A grid of
    several video frames (`frames` > 1, frame k's cells `k * frame_stride` rows further on) shares one set of proxies,
    the frames averaged in time.
    """

    start: int
    height: int
    width: int
    stride: int
    frames: int = 1
    frame_stride: int = 0

    def rows(self) -> np.ndarray:
        cells = (self.start + np.arange(self.height)[:, None] * self.stride + np.arange(self.width)).reshape(-1)
        return cells if self.frames == 1 else (np.arange(self.frames)[:, None] * self.frame_stride + cells).reshape(-1)

    def proxy_shape(self, factor: int) -> tuple[int, int]:
        return -(-self.height // factor), -(-self.width // factor)  # ceil: a partial block still gets a proxy


_EMPTY = np.zeros(0, dtype=np.int64)


def padded(items: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(B, longest) int64 items padded with 0, and which entries are real."""
    lengths = np.array([len(item) for item in items])
    valid = np.arange(lengths.max(initial=0)) < lengths[:, None]
    out = np.zeros(valid.shape, dtype=np.int64)
    out[valid] = np.concatenate(items) if items else _EMPTY
    return out, valid


def flat_rows(index: np.ndarray, rows: int) -> np.ndarray:
    """(B, K) row indices into (B, rows, D) -> (B*K,) indices into its (B*rows, D) view."""
    return (index + np.arange(index.shape[0])[:, None] * rows).reshape(-1)


@dataclass
class ProxyVContext:
    """What ProxyV prefills leave beside a KV cache for a later prefill that continues it (a chat's next turn with an
    image): which cached rows a proxy may see (text; not full vision or newline tokens; rows past `proxy_sees` are
    text), and the proxies made so far, their causal order and, per layer, their keys and values. The proxies never
    enter the cache itself, so decoding never sees them."""

    proxy_sees: np.ndarray  # (B, L) over the first L cached rows
    proxy_order: np.ndarray  # (B, P0)
    proxy_valid: np.ndarray  # (B, P0)
    keys: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> keys and values (B, kv_h, P0, d)


class ProxyVPlan:
    """Index tensors and the attention mask of one ProxyV prefill, shared by every ProxyV layer.

    Layout of the hidden states between ProxyV layers: rows [0, T) are the sequence as given, rows [T, T + P) the
    proxies (each sample's grids' proxies, padded to the longest sample). Queries are `Qt` text slots (text tokens,
    including image tokens outside any grid such as newline tokens, which are computed like text) followed by the P
    proxy slots; slots that a sample does not use are computed and discarded.

    The index arithmetic runs on the host in NumPy (an operation there costs a fraction of a torch CPU operator's
    dispatch); the results go to the device in one copy per dtype.
    """

    def __init__(
        self,
        image_mask: torch.Tensor,
        attention_mask: torch.Tensor | None,
        grids: list[list[ProxyVGrid]],
        *,
        device: torch.device,
        factor: int,
        start_layer: int,
        num_layers: int,
        modules: ProxyVModules,
        sliding_window: int | None = None,
        learned: int | None = None,
        cached: int = 0,
        cache_rows: int = 0,
        cached_valid: np.ndarray | None = None,
        previous: ProxyVContext | None = None,
    ):
        """`image_mask` and `attention_mask` (None, or which tokens are real): (B, T) booleans on the CPU; the plan's
        tensors are made for `device`. `learned`: proxies per grid made by the learned module (else spatial: the grid
        downsampled by `factor`). Continuing a cache of `cached` rows: the layers attend over the `cache_rows` key
        rows it returns (the cached ones, which of them are real: `cached_valid` (B, cached), then these T), and over
        the proxies of the prefills before (`previous`)."""
        batch, seq = image_mask.shape
        if attention_mask is not None:
            attention_mask = attention_mask.numpy()
        self.padded = attention_mask is not None and not bool(attention_mask.all())  # some token is not real
        self.modules = modules
        self.learned = learned is not None
        self.start_layer, self.last_layer = start_layer, num_layers - 1
        self.seq_len = seq

        # Per sample: the grid rows (vision slots), each vision slot's proxy, the proxies' source rows. Index patterns
        # are made once per grid shape and shifted to each grid's place.
        patterns: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        vision, upsample, sources = [], [], []
        # Per grid shape (spatial) or for all grids (learned): each grid's flat token rows, sample and first proxy slot.
        groups: dict[tuple[int, int], list[tuple[np.ndarray, int, int]]] = {}
        for b, sample_grids in enumerate(grids):
            rows, ups, srcs, offset = [], [], [], 0
            for grid in sample_grids:
                ph, pw = grid.proxy_shape(factor) if learned is None else (1, learned)
                key = (grid.height, grid.width, grid.stride, grid.frames, grid.frame_stride, ph, pw)
                if key not in patterns:
                    cell_i = np.arange(grid.height)[:, None] * ph // grid.height  # nearest: floor(i * ph / h)
                    cell_j = np.arange(grid.width) * pw // grid.width
                    patterns[key] = (dataclasses.replace(grid, start=0).rows(),
                                     np.tile((cell_i * pw + cell_j).reshape(-1), grid.frames), np.arange(ph * pw))
                grid_rows, grid_ups, proxy_range = patterns[key]
                rows.append(grid.start + grid_rows)
                ups.append(offset + grid_ups)
                srcs.append(grid.start + proxy_range)
                group = (grid.frames, grid.height, grid.width) if learned is None else (0, 0, 0)
                groups.setdefault(group, []).append((b * seq + rows[-1], b, offset))
                offset += ph * pw
            vision.append(np.concatenate(rows) if rows else _EMPTY)
            upsample.append(np.concatenate(ups) if ups else _EMPTY)
            sources.append(np.concatenate(srcs) if srcs else _EMPTY)

        vision_index, vision_valid = padded(vision)
        upsample_index, _ = padded(upsample)
        proxy_source, proxy_valid = padded(sources)
        num_vision, proxies = vision_index.shape[1], proxy_source.shape[1]
        vision_sample, vision_slot = np.nonzero(vision_valid)
        # Kind of every row; text slots are the rows that are not vision slots, in order (padded with row 0).
        kind = np.where(image_mask.numpy(), NEWLINE, TEXT)  # (B, T)
        kind[vision_sample, vision_index[vision_valid]] = VISION
        is_text = kind != VISION
        text_lengths = is_text.sum(1)
        text_slots = int(text_lengths.max())
        text_index = np.argsort(~is_text, axis=1, kind="stable")[:, :text_slots]
        text_valid = np.arange(text_slots) < text_lengths[:, None]
        text_index[~text_valid] = 0
        self.num_proxies, self.num_text_slots = proxies, text_slots
        # Each text slot's row in the sequence, `seq` for an unused slot (see `sequence_attention`).
        self._text_rows = np.where(text_valid, text_index, seq)
        self.attentions: list[torch.Tensor] | None = None  # per ProxyV layer, when the forward outputs attentions
        # Row r of a layer's output is row out_index[r] of cat([text slots, proxy slots, vision slots]).
        out_index = np.empty((batch, seq + proxies), dtype=np.int64)
        out_index[:, :seq] = is_text.cumsum(1) - 1
        out_index[vision_sample, vision_index[vision_valid]] = text_slots + proxies + vision_slot
        out_index[:, seq:] = np.arange(text_slots, text_slots + proxies)

        # The grid groups of make_proxies: flat source rows and flat proxy slots of every grid of one shape.
        host: dict[str, np.ndarray] = {}
        group_shapes = []
        for g, ((frames, height, width), members) in enumerate(groups.items()):
            if learned is None:
                proxy_shape = ProxyVGrid(0, height, width, width).proxy_shape(factor)
                group_shapes.append(((frames, height, width), proxy_shape))
                count = proxy_shape[0] * proxy_shape[1]
                host[f"group_rows{g}"] = np.concatenate([rows for rows, _, _ in members])
                host[f"group_slots{g}"] = np.concatenate(
                    [b * proxies + offset + np.arange(count) for _, b, offset in members])
            else:
                host.update(self._learned_layout(members, vision, proxies, num_vision, learned))

        query_index = np.concatenate([text_index, np.broadcast_to(np.arange(seq, seq + proxies), (batch, proxies))], 1)
        proxy_source = np.minimum(proxy_source, seq - 1)  # causal order and RoPE position of each proxy
        # Each key's causal order and each query's; whether a key is one a proxy may see (text or proxy).
        key_order = np.concatenate([np.broadcast_to(np.arange(seq), (batch, seq)), proxy_source], axis=1)  # (B, T+P)
        rows = seq + proxies
        # Row r of a layer's output as a row of [every sample's query slots; every sample's vision slots] (B*Q + B*V
        # rows): the layout in which a layer without gradients writes both parts before one gather puts them in place.
        query_slots, sample = text_slots + proxies, np.arange(batch)[:, None]
        split_index = np.where(out_index < query_slots, sample * query_slots + out_index,
                               batch * query_slots + sample * num_vision + out_index - query_slots)
        host.update(
            query_index=query_index,  # (B, Q)
            proxy_source=proxy_source,  # (B, P)
            # The index sets flattened for the (B*rows, H) views they are used on (index_select copies whole rows).
            query_rows=flat_rows(query_index, rows),
            vision_rows=flat_rows(vision_index, rows),
            split_rows=split_index.reshape(-1),
            upsample_rows=flat_rows(upsample_index, proxies),  # vision slot -> proxy slot, (B*V,)
        )
        self.num_vision = num_vision
        sequence_valid = np.ones((batch, seq), dtype=bool) if attention_mask is None else attention_mask
        host["mask"] = self._attention_mask(
            {
                "key_order": key_order,
                "query_index": query_index,
                "query_order": np.take_along_axis(key_order, query_index, axis=1),
                "proxy_sees": np.concatenate([kind == TEXT, np.ones((batch, proxies), dtype=bool)], axis=1),
                "slot_valid": np.concatenate([text_valid, proxy_valid], axis=1),
                "proxy_valid": proxy_valid,
            },
            sequence_valid,
            sliding_window,
        )
        self.cached, self.previous = cached, previous
        old_order, old_valid = (_EMPTY.reshape(batch, 0), np.zeros((batch, 0), dtype=bool)) if previous is None else (
            previous.proxy_order, previous.proxy_valid)
        if cached:
            seen = np.ones((batch, cached), dtype=bool)
            if previous is not None:
                recorded = min(cached, previous.proxy_sees.shape[1])
                seen[:, :recorded] = previous.proxy_sees[:, :recorded]
            valid = np.ones((batch, cached), dtype=bool) if cached_valid is None else cached_valid
            query_valid = np.take_along_axis(np.concatenate([sequence_valid, proxy_valid], axis=1), query_index,
                                             axis=1) & np.concatenate([text_valid, proxy_valid], axis=1)
            query_order = cached + np.take_along_axis(key_order, query_index, axis=1)  # (B, Q)
            host["mask"] = self._context_columns(
                host["mask"], query_valid, query_order, seen & valid, valid, cache_rows - cached - seq, old_order,
                old_valid, sliding_window)
            may_see = np.concatenate([(seen & valid).any(0), ((kind == TEXT) & sequence_valid).any(0),
                                      np.zeros(cache_rows - cached - seq, dtype=bool), old_valid.any(0),
                                      np.ones(proxies, dtype=bool)])
            # What a prefill after this one sees: these rows and proxies after the ones before.
            seen = np.concatenate([seen, kind == TEXT], axis=1)
        else:
            seen = kind == TEXT
            may_see = np.concatenate([(seen & sequence_valid).any(0), np.ones(proxies, dtype=bool)])
        self.next_context = ProxyVContext(
            proxy_sees=seen, proxy_order=np.concatenate([old_order, cached + proxy_source], axis=1),
            proxy_valid=np.concatenate([old_valid, proxy_valid], axis=1), keys={})
        # A proxy sees only text and proxies: its queries attend over those key rows alone (of thousands of keys, a
        # few hundred for a video), the text queries over every key. The rows are every text row, whatever the causal
        # order, so that prompts alike but for where their images are keep one layout (see plan_layout).
        mask = host.pop("mask")
        host["proxy_columns"] = np.flatnonzero(may_see)
        host["mask"] = np.ascontiguousarray(mask[:, :, :text_slots])
        host["proxy_mask"] = np.ascontiguousarray(mask[:, :, text_slots:][..., host["proxy_columns"]])
        on_device = to_device({name: torch.from_numpy(array) for name, array in host.items()}, device)
        self.proxy_groups = [
            (shape, proxy_shape, on_device[f"group_rows{g}"], on_device[f"group_slots{g}"])
            for g, (shape, proxy_shape) in enumerate(group_shapes)
        ]
        if self.learned:
            self.learned_rows, self.learned_valid = on_device["learned_rows"], on_device["learned_valid"]
            self.learned_slots, self.learned_back_rows = on_device["learned_slots"], on_device["learned_back_rows"]
            self.learned_back: torch.Tensor | None = None
        self.query_index, self.proxy_source = on_device["query_index"], on_device["proxy_source"]
        self.query_rows, self.vision_rows = on_device["query_rows"], on_device["vision_rows"]
        self.split_rows, self.upsample_rows = on_device["split_rows"], on_device["upsample_rows"]
        self.mask, self.proxy_mask = on_device["mask"], on_device["proxy_mask"]  # (B, 1, Qt, K), (B, 1, P, C)
        self.proxy_columns = on_device["proxy_columns"]  # (C,) the key rows any proxy sees
        # Every slot used (e.g. one prompt, or prompts alike): each row is written exactly once, in place.
        self.dense = bool(text_valid.all() and proxy_valid.all() and vision_valid.all())
        self._tables: tuple[torch.Tensor, ...] = ()

    def _attention_mask(self, host: dict[str, np.ndarray], sequence_valid: np.ndarray, sliding_window) -> np.ndarray:
        """(B, 1, Q, T + P), True = attend. Causal by order; text (and newline tokens, computed like text) never sees
        proxies; proxies see only text and proxies; padding and unused slots attend to themselves only (finite, and
        never seen by a real query)."""
        seq, text_slots = self.seq_len, self.num_text_slots
        key_order, query_index = host["key_order"], host["query_index"]
        key_valid = np.concatenate([sequence_valid, host["proxy_valid"]], axis=1)  # (B, T + P)
        query_valid = np.take_along_axis(key_valid, query_index, axis=1) & host["slot_valid"]
        query_order = np.where(query_valid, host["query_order"], -1)  # sees no key until its own is set below
        allowed = key_order[:, None, :] <= query_order[:, :, None]  # (B, Q, T + P)
        if sliding_window is not None:
            allowed &= (query_order[:, :, None] - key_order[:, None, :]) < sliding_window
        allowed[:, :text_slots, seq:] = False
        allowed[:, :text_slots, :seq] &= key_valid[:, None, :seq]
        allowed[:, text_slots:] &= (key_valid & host["proxy_sees"])[:, None, :]
        np.put_along_axis(allowed, query_index[:, :, None], True, axis=2)  # a valid query already sees itself
        return allowed[:, None]

    def _context_columns(self, mask: np.ndarray, query_valid: np.ndarray, query_order: np.ndarray,
                         proxy_sees: np.ndarray, valid: np.ndarray, unused: int, old_order: np.ndarray,
                         old_valid: np.ndarray, sliding_window: int | None) -> np.ndarray:
        """The mask (B, 1, Q, T + P) of a prefill continuing a cache -> (B, 1, Q, C + T + E + P0 + P), the key rows
        [cached rows; these rows; E unused cache rows (a static cache's); earlier proxies; these proxies]. A text
        query sees every real cached row, a proxy the cached text and the earlier proxies: all come before it."""
        batch, _, queries, _ = mask.shape
        cached, text_slots, seq = valid.shape[1], self.num_text_slots, self.seq_len
        is_proxy = (np.arange(queries) >= text_slots)[None, :, None]
        before = np.where(is_proxy, proxy_sees[:, None, :], valid[:, None, :])  # (B, Q, C)
        old = np.broadcast_to(is_proxy & old_valid[:, None, :], (batch, queries, old_valid.shape[1]))
        if sliding_window is not None:  # orders in the whole sequence
            before = before & (query_order[:, :, None] - np.arange(cached) < sliding_window)
            old = old & (query_order[:, :, None] - old_order[:, None, :] < sliding_window)
        before, old = before & query_valid[:, :, None], old & query_valid[:, :, None]
        columns = [before, mask[:, 0, :, :seq], np.zeros((batch, queries, unused), dtype=bool), old,
                   mask[:, 0, :, seq:]]
        return np.concatenate(columns, axis=2)[:, None]

    def sequence_attention(self, weights: torch.Tensor, key_rows: int) -> torch.Tensor:
        """A ProxyV layer's attention weights (B, h, Q, keys) -> the sequence's (B, h, T, key_rows), as the original
        layer's: each text query's row over the sequence's keys (the cache's `key_rows` when one is given; a prefill
        continuing a cache attends over all of them). Proxy queries and proxy keys are no part of the sequence and are
        dropped (a text query never attends to a proxy, so its row still sums to 1); full vision tokens have no query
        from the start layer on: their rows are zeros."""
        batch, heads = weights.shape[:2]
        real = key_rows if self.cached else self.seq_len  # columns of the sequence's keys, in the order of its rows
        if getattr(self, "_text_rows_device", None) is None:
            self._text_rows_device = torch.from_numpy(self._text_rows).to(weights.device)
        rows = self._text_rows_device[:, None, :, None].expand(-1, heads, -1, real)
        out = weights.new_zeros(batch, heads, self.seq_len + 1, key_rows)  # the last row takes the unused slots
        out.scatter_(2, rows, weights[:, :, : self.num_text_slots, :real])
        return out[:, :, : self.seq_len]

    def keys_with_context(self, layer: int, cached: tuple[torch.Tensor, torch.Tensor] | None, key: torch.Tensor,
                          value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keeps this layer's proxy keys/values (after the earlier prefills' ones) for a prefill continuing the cache,
        and gives the keys/values to attend over: the layer's own (B, kv_h, T + P, d), or continuing a cache, the
        cache's rows (`cached`, as its update returned them) and every proxy."""
        seq = self.seq_len
        proxy_key, proxy_value = key[:, :, seq:], value[:, :, seq:]
        earlier = None if self.previous is None else self.previous.keys.get(layer)
        if earlier is None:
            proxy_key, proxy_value = proxy_key.clone(), proxy_value.clone()  # not views keeping the layer's keys
        else:
            proxy_key, proxy_value = torch.cat([earlier[0], proxy_key], 2), torch.cat([earlier[1], proxy_value], 2)
        self.next_context.keys[layer] = (proxy_key, proxy_value)
        if not self.cached:
            return key, value
        return torch.cat([cached[0], proxy_key], 2), torch.cat([cached[1], proxy_value], 2)

    def assemble(self, queries: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
        """The layer's output rows (B, T+P, H) from the query slots' (B, Q, H) and the vision slots' (B, V, H)."""
        batch, _, width = queries.shape
        if not self.dense:  # unused slots would write over real rows: pick each row's source instead
            parts = torch.cat([queries.reshape(-1, width), vision.reshape(-1, width)])
            return parts.index_select(0, self.split_rows).view(batch, -1, width)
        out = queries.new_empty(batch * (self.seq_len + self.num_proxies), width)
        out.index_copy_(0, self.query_rows, queries.reshape(-1, width))
        out.index_copy_(0, self.vision_rows, vision.reshape(-1, width))
        return out.view(batch, -1, width)

    def _learned_layout(self, members, vision, proxies: int, num_vision: int, count: int) -> dict[str, np.ndarray]:
        """Index arrays of learned proxies: every grid's tokens padded to the longest grid (G, N), its proxy slots,
        and for every vision slot its place in that padded layout."""
        token_rows, valid = padded([rows for rows, _, _ in members])
        longest = token_rows.shape[1]
        slots = np.concatenate([b * proxies + offset + np.arange(count) for _, b, offset in members])
        # Vision slots list each sample's grids in order, so the padded layout maps back slot by slot.
        to_layout = np.zeros((len(vision), num_vision), dtype=np.int64)
        position = np.zeros(len(vision), dtype=np.int64)
        for g, (rows, b, _) in enumerate(members):
            to_layout[b, position[b] : position[b] + len(rows)] = g * longest + np.arange(len(rows))
            position[b] += len(rows)
        return {"learned_rows": token_rows.reshape(-1), "learned_valid": valid, "learned_slots": slots,
                "learned_back_rows": to_layout.reshape(-1)}

    def context(self, features: torch.Tensor) -> torch.Tensor:
        """Per-proxy features (B, P, I) -> per-vision-token context (B, V, I): each token's proxy (spatial) or the
        proxies weighted by the token's attention weights (learned)."""
        batch, _, width = features.shape
        flat = features.reshape(-1, width)
        if not self.learned:
            return flat.index_select(0, self.upsample_rows).view(batch, -1, width)
        groups, longest = self.learned_valid.shape
        per_grid = flat.index_select(0, self.learned_slots).view(groups, -1, width)  # (G, K, I)
        spread = torch.bmm(self.learned_back, per_grid).reshape(-1, width)  # (G*N, I)
        return spread.index_select(0, self.learned_back_rows).view(batch, self.num_vision, width)

    def make_proxies(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, H) states at the start layer -> (B, P, H) proxies: bilinear downsampling of every grid, or the
        learned queries' attention over each grid's tokens."""
        batch, _, width = hidden.shape
        flat = hidden.reshape(-1, width)
        proxies = hidden.new_zeros(batch * self.num_proxies, width)
        if self.learned:
            groups, longest = self.learned_valid.shape
            tokens = flat.index_select(0, self.learned_rows).view(groups, longest, width)
            made, self.learned_back = self.modules.learned(tokens, self.learned_valid)
            proxies = proxies.index_copy(0, self.learned_slots, made.reshape(-1, width))
            return proxies.view(batch, self.num_proxies, width)
        for (frames, height, grid_width), (ph, pw), rows, slots in self.proxy_groups:
            grid = flat.index_select(0, rows).view(-1, frames, height, grid_width, width)
            grid = (grid[:, 0] if frames == 1 else grid.mean(1)).permute(0, 3, 1, 2)  # video frames: mean in time
            small = F.interpolate(grid, size=(ph, pw), mode="bilinear", align_corners=False)
            proxies = proxies.index_copy(0, slots, small.permute(0, 2, 3, 1).reshape(-1, width))
        return proxies.view(batch, self.num_proxies, width)

    def layer_tables(self, position_embeddings: tuple[torch.Tensor, torch.Tensor], fresh: bool = False
                     ) -> tuple[torch.Tensor, ...]:
        """What every ProxyV layer of a forward shares, made by its start layer (`fresh`; the plan's tensors may have
        been refilled since the last forward, as when a CUDA graph is replayed with a new prompt's plan copied in) and
        read by the layers after it. They are (cos, signed sin) of the T + P key rows and of the query rows, each
        (B, 1, L, d), for `apply_rope`, and the text and proxy queries' attention masks as additive biases in the
        states' dtype (0 where a query attends, MASKED_BIAS elsewhere; SDPA would otherwise turn a boolean mask into
        one in every layer: two more kernels per layer)."""
        if fresh or not self._tables:
            cos, sin = position_embeddings
            batch = self.query_index.shape[0]
            half = sin.shape[-1] // 2
            signed_sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)  # see apply_rope
            tables = []
            for table in (cos, signed_sin):
                table = table.expand(batch, -1, -1)
                keys = torch.cat([table, gather_rows(table, self.proxy_source)], dim=1)
                tables.append((keys, gather_rows(keys, self.query_index)))
            (cos_k, cos_q), (sin_k, sin_q) = tables
            biases = [torch.full_like(mask, MASKED_BIAS, dtype=cos.dtype).masked_fill_(mask, 0.0)
                      for mask in (self.mask, self.proxy_mask)]
            self._tables = (cos_k[:, None], sin_k[:, None], cos_q[:, None], sin_q[:, None], *biases)
        return self._tables


class ProxyVPendingPlan:
    """A forward's plan, built the first time it is asked for: by the first ProxyV layer, after the host has queued
    the device's work before it. `get()` gives the plan (None for prompts without images) and raises what building
    raises."""

    def __init__(self, build: Callable[[], ProxyVPlan | None]):
        self._build, self._plan = build, None

    def get(self) -> ProxyVPlan | None:
        if self._build is not None:
            self._plan = _outside_graph(self._build)
            self._build = None
        return self._plan

    def argument_for(self, language_model: nn.Module) -> "ProxyVPlan | ProxyVPendingPlan | None":
        """The `proxyv_plan` to call `language_model` with: the plan built now if it is compiled or the caller is
        (so that the graph breaks once, not in every ProxyV layer), else this pending plan, for its start layer to
        build."""
        return self.get() if hasattr(language_model, "_orig_mod") or torch.compiler.is_compiling() else self


@torch.compiler.disable
def _outside_graph(build: Callable[[], ProxyVPlan | None]) -> ProxyVPlan | None:
    """Runs `build` eagerly under torch.compile: the plan is host-side NumPy work that dynamo would otherwise trace
    into torch operations (some of which, like a cumulative sum of booleans, have no CPU kernel)."""
    return build()


def proxyv_attention(attn: nn.Module, query, key, value, mask: torch.Tensor, bias: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Masked attention of (B, h, Q, d) queries over (B, kv_h, K, d) keys/values -> (B, Q, h, d), and with eager
    attention the weights (B, h, Q, K) (SDPA gives none, as in the original layers); `mask` (True = attend) and the
    same mask as an additive `bias` (for SDPA)."""
    groups = attn.num_key_value_groups
    dropout = attn.attention_dropout if attn.training else 0.0
    if attn.config._attn_implementation == "eager":
        if groups > 1:
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
        weights = torch.matmul(query, key.transpose(2, 3)) * attn.scaling
        weights = weights.masked_fill(~mask, torch.finfo(weights.dtype).min)
        weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
        weights = F.dropout(weights, p=dropout, training=attn.training)
        out = torch.matmul(weights, value)
    else:
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=bias, dropout_p=dropout, scale=attn.scaling, enable_gqa=groups > 1
        )
        weights = None
    return out.transpose(1, 2), weights


def fuse_linears(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Lay the weights (and biases) of linear layers that read the same input out in one tensor, each layer's
    parameter becoming a view of its rows: one matrix product then computes all their outputs, and no weight is
    stored twice. Returns (weight, bias), or None where they cannot share one tensor (meta weights, different
    dtypes or devices, some with a bias and some without)."""
    if any(type(layer) is not nn.Linear for layer in linears):  # e.g. quantized or adapter-wrapped layers
        return None
    weights, biases = [layer.weight for layer in linears], [layer.bias for layer in linears]
    if (
        any(w.device.type == "meta" for w in weights)
        or len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1
        or len({b is None for b in biases}) != 1
    ):
        return None
    return _join(weights), None if biases[0] is None else _join(biases)


def _join(params: list[torch.Tensor]) -> torch.Tensor:
    """One tensor holding `params` one after another; each parameter becomes a view of its rows."""
    joined = torch.cat([p.detach() for p in params])
    for param, rows in zip(params, joined.split([p.shape[0] for p in params]), strict=True):
        param.data = rows
    return joined


_FUSABLE_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP")  # down(act(gate(x)) * up(x))


class ProxyVDecoderLayerMixin:
    """Mixed into the backbone's own decoder layer class (parameter names stay the same).

    Without a plan (ProxyV off, decoding, text-only prompts) the layer is exactly the original layer.
    """

    def fuse_projections(self, enabled: bool = True) -> None:
        """Key/value and gate/up weights laid out in one tensor each (see `fuse_linears`), so the ProxyV forward runs
        one matrix product for each pair. The parameters keep their names, shapes and values; moving the model
        (`.to()`, `.half()`, ...) lays them out again. `enabled=False` gives each parameter its own tensor again."""
        attn, mlp = self.self_attn, self.mlp
        if not enabled:
            if not self.__dict__.get("_proxyv_fused"):
                return
            for linear in (attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                for param in (linear.weight, linear.bias):
                    if param is not None:
                        param.data = param.data.clone()
            self._proxyv_fused = None
            return
        fused = {"kv": fuse_linears([attn.k_proj, attn.v_proj])}
        if type(mlp).__name__ in _FUSABLE_MLPS:
            fused["gate_up"] = fuse_linears([mlp.gate_proj, mlp.up_proj])
        self._proxyv_fused = {name: pair for name, pair in fused.items() if pair is not None}

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        if self.__dict__.get("_proxyv_fused") is not None:  # the parameters are new tensors now
            self.fuse_projections()
        return result

    def _fused(self, name: str, *linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The fused weight (and bias) of `name` if `linears` are still plain linear layers whose parameters are its
        rows, and no gradient reaches them. Otherwise the layers' own forwards run: an adapter (LoRA...) wrapping
        any of them, or a weight replaced since fusing, is then computed as it is. Not under torch.compile: compiled
        with mode="reduce-overhead" on an H100 the fused products made batch-1 prefill slower (25.9 ms against 17.6 ms
        with separate products, benchmarks/results/h100-2026-11-27b), where eager and CUDA-graph runs gain from them."""
        if torch.compiler.is_compiling():
            return None
        pair = (self.__dict__.get("_proxyv_fused") or {}).get(name)
        if pair is None:
            return None
        for joined, attr in zip(pair, ("weight", "bias"), strict=True):
            address = None if joined is None else joined.data_ptr()
            for linear in linears:
                if type(linear) is not nn.Linear:
                    return None
                param = getattr(linear, attr)
                if joined is None:
                    continue
                if param.data_ptr() != address or (torch.is_grad_enabled() and param.requires_grad):
                    return None
                address += param.numel() * param.element_size()
        return pair

    def _proxyv_kv(self, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.self_attn
        pair = self._fused("kv", attn.k_proj, attn.v_proj)
        if pair is None:
            return attn.k_proj(normed), attn.v_proj(normed)
        key, value = F.linear(normed, *pair).split([attn.k_proj.out_features, attn.v_proj.out_features], dim=-1)
        return key, value

    def _proxyv_mlp(self, x: torch.Tensor) -> torch.Tensor:
        mlp = self.mlp
        pair = self._fused("gate_up", mlp.gate_proj, mlp.up_proj) if type(mlp).__name__ in _FUSABLE_MLPS else None
        if pair is None:
            return mlp(x)
        gate, up = F.linear(x, *pair).chunk(2, dim=-1)
        return mlp.down_proj(mlp.act_fn(gate) * up)

    def forward(self, hidden_states: torch.Tensor, *args,
                proxyv_plan: ProxyVPlan | ProxyVPendingPlan | None = None, **kwargs):
        if isinstance(proxyv_plan, ProxyVPendingPlan):
            proxyv_plan = proxyv_plan.get()
        if proxyv_plan is None:
            return super().forward(hidden_states, *args, **kwargs)
        assert not args, "ProxyV layers take their arguments by keyword"
        return self._proxyv_forward(hidden_states, proxyv_plan, **kwargs)

    def _proxyv_forward(self, hidden_states, plan: ProxyVPlan, position_embeddings=None, **kwargs):
        attn = self.self_attn
        layer_idx = attn.layer_idx
        seq = plan.seq_len
        if layer_idx == plan.start_layer:
            hidden_states = hidden_states.contiguous()
            hidden_states = torch.cat([hidden_states, plan.make_proxies(hidden_states)], dim=1)
        batch, rows, _ = hidden_states.shape  # rows = T + P
        queries = plan.query_index.shape[1]
        tables = plan.layer_tables(position_embeddings, fresh=layer_idx == plan.start_layer)
        cos_k, sin_k, cos_q, sin_q, text_bias, proxy_bias = tables

        normed = backbone_norm(self.input_layernorm, hidden_states)  # (B, T+P, H)
        key, value = self._proxyv_kv(normed)
        key = key.reshape(batch, rows, -1, attn.head_dim).transpose(1, 2)  # (B, kv_h, T+P, d)
        value = value.reshape(batch, rows, -1, attn.head_dim).transpose(1, 2)
        query = attn.q_proj(select_rows(normed, plan.query_rows))
        query = query.view(batch, queries, -1, attn.head_dim).transpose(1, 2)  # (B, h, Q, d)
        query, key = apply_rope(query, cos_q, sin_q), apply_rope(key, cos_k, sin_k)

        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        key_rows = seq
        if cache is not None:  # the cache gets the sequence's own keys/values, never the proxies'
            cached = cache.update(key[:, :, :seq], value[:, :, :seq], layer_idx)
            key_rows = cached[0].shape[2]  # the keys the original layer attends over
            key, value = plan.keys_with_context(layer_idx, cached, key, value)

        # Text queries over every key; proxy queries over the key rows they can see (text and proxies) only.
        text_slots = plan.num_text_slots
        columns = plan.proxy_columns
        parts, weights = [], None
        if text_slots or attn.config._attn_implementation == "eager":  # SDPA is not given zero queries
            attended, weights = proxyv_attention(attn, query[:, :, :text_slots], key, value, plan.mask, text_bias)
            parts.append(attended)
        attended, _ = proxyv_attention(attn, query[:, :, text_slots:], key.index_select(2, columns),
                                       value.index_select(2, columns), plan.proxy_mask, proxy_bias)
        attended = torch.cat([*parts, attended], dim=1).view(batch, queries, -1)  # (B, Q, H)
        if plan.attentions is not None and weights is not None:  # eager attention: the text queries' weights
            plan.attentions.append(plan.sequence_attention(weights, key_rows))
        residual = select_rows(hidden_states, plan.query_rows)  # (B, Q, H)
        out_q = residual + attn.o_proj(attended)
        mlp_out = self._proxyv_mlp(backbone_norm(self.post_attention_layernorm, out_q))
        vision_mlp = plan.modules.vision_mlps[str(layer_idx)]

        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # Both parts are written into one buffer, [query slots; vision slots], the vision slots updated in place;
            # one row gather then lays the output out (scattering the two parts would write every row too, slower).
            width = hidden_states.shape[-1]
            split = batch * queries
            buffer = hidden_states.new_empty(split + batch * plan.num_vision, width)
            new_q = torch.add(out_q, mlp_out, out=buffer[:split].view(batch, queries, width))
            vision = torch.index_select(hidden_states.reshape(-1, width), 0, plan.vision_rows, out=buffer[split:])
            vision_mlp(vision.view(batch, -1, width), new_q[:, plan.num_text_slots :], plan.context, overwrite=True)
            out = buffer.index_select(0, plan.split_rows).view(batch, -1, width)  # (B, T+P, H)
        else:
            out_q = out_q + mlp_out
            vision = select_rows(hidden_states, plan.vision_rows)  # (B, V, H)
            out_v = vision_mlp(vision, out_q[:, plan.num_text_slots :], plan.context)  # new proxies: (B, P, H)
            out = plan.assemble(out_q, out_v)  # (B, T+P, H)
        return out[:, :seq] if layer_idx == plan.last_layer else out  # the proxies end with the last layer


_LAYER_CLASSES: dict[type, type] = {}


def proxyv_layer_class(base: type) -> type:
    """The ProxyV version of a decoder layer class (a subclass, so parameter names are unchanged)."""
    if base not in _LAYER_CLASSES:
        _LAYER_CLASSES[base] = type(f"ProxyV{base.__name__}", (ProxyVDecoderLayerMixin, base), {"__module__": __name__})
    return _LAYER_CLASSES[base]


class ProxyVInitMixin:
    """Initial values of the ProxyV modules when a model is built from a config (loading never re-initialises)."""

    def _init_weights(self, module):
        if isinstance(module, (ProxyVRMSNorm, ProxyVZeroLinear, ProxyVLearnedProxies)):
            init_proxyv_module(module, self.config.text_config.initializer_range)
        else:
            super()._init_weights(module)


# --- the language-model prefill in CUDA graphs ----------------------------------------------------------------------


def capture_cuda_graph(fn: Callable[[], object], pool=None) -> tuple["torch.cuda.CUDAGraph", object]:
    """`fn` captured in a CUDA graph (in the memory pool `pool`, if given), and the output tensors the graph writes.
    Two calls on a side stream first keep lazy initialisation (cuBLAS handles, workspaces) out of the graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


def plan_tensors(plan: ProxyVPlan) -> list[torch.Tensor]:
    """The index and mask tensors of a plan, in a fixed order (not the ones a forward computes and keeps)."""
    from torch.utils._pytree import tree_leaves

    skip = ("modules", "learned_back", "next_context", "previous", "attentions")
    fields = {k: v for k, v in vars(plan).items() if not k.startswith("_") and k not in skip}
    return [leaf for leaf in tree_leaves(fields) if isinstance(leaf, torch.Tensor)]


def plan_layout(plan: ProxyVPlan) -> tuple:
    """What a forward's control flow and shapes take from a plan: plans with the same layout differ only in the values
    of their tensors, which a captured forward reads from the tensors it was captured with."""
    return (plan.seq_len, plan.num_proxies, plan.num_text_slots, plan.num_vision, plan.dense, plan.learned,
            plan.start_layer, plan.last_layer, plan.cached,
            tuple((shape, proxy_shape) for shape, proxy_shape, _, _ in plan.proxy_groups),
            tuple((tuple(t.shape), t.dtype) for t in plan_tensors(plan)))


class _PrefillCache(DynamicCache):
    """The cache a captured prefill runs with: empty, it hands each layer its own keys and values back (what an empty
    cache's update returns) and records them; after a replay they go into the caller's cache."""

    def __init__(self, config):
        super().__init__(config=config)
        self.recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.recorded[layer_idx] = (key_states, value_states)
        return key_states, value_states


@functools.cache
def _known_module_class(cls: type) -> bool:
    """A module class of torch's, transformers' or this file's (not an adapter's or a user's)."""
    return cls.__module__.startswith(("torch.", "transformers.")) or cls.__module__ == __name__


@functools.cache
def cache_keyword(model_class: type) -> str:
    """The name of a model class's cache argument: transformers renamed `past_key_values` to `cache` (5.18+). Read
    once per class (a prefill asks in every forward)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


@dataclass
class _CapturedPrefill:
    graph: object  # replay() runs the captured prefill again
    inputs: dict[str, torch.Tensor]  # the tensors it reads its inputs from
    plan: ProxyVPlan  # the plan whose tensors it reads
    outputs: dict  # the tensors it writes: "hidden" (B, T, H), "keys" and "proxy_keys" {layer: (keys, values)}
    with_cache: bool


class ProxyVPrefillGraphs:
    """The language model's ProxyV prefill captured in a CUDA graph once per input shape, then replayed: at batch 1 the
    eager ProxyV layers take longer to launch their kernels than to run them, a replay launches them all at once.

    A new prompt's plan is built on the host as usual and copied into the captured plan's tensors, its embeddings (and
    mask, positions) into the captured inputs; after the replay the keys and values the graph wrote go into the
    caller's cache through its own `update` (which copies them), the proxies' keys beside it for a later turn, and the
    hidden states are copied out. A shape is captured the `after`-th time it is seen (so a prompt length seen once
    costs nothing more than the eager forward); at most `limit` graphs are kept, the least recently used dropped
    first (each keeps one prompt's keys and values on the device, about the size of its KV cache), and all are dropped
    when a weight moves (`.to()`, `fuse_projections`, a replaced parameter). `capture(fn) -> (graph, outputs)` captures
    on the devices named in `devices`; by default `capture_cuda_graph` on CUDA.
    """

    def __init__(self, capture: Callable | None = None, devices: tuple[str, ...] = ("cuda",), limit: int = 4,
                 after: int = 2):
        self.capture, self.devices, self.limit, self.after = capture, tuple(devices), limit, after
        self.entries: OrderedDict[tuple, _CapturedPrefill | None] = OrderedDict()  # None: the capture failed
        self.sightings: OrderedDict[tuple, int] = OrderedDict()  # shapes seen, not captured yet
        self.weights: tuple = ()  # where every weight was when the graphs were captured
        self.counts = {"captured": 0, "replayed": 0, "eager": 0}
        self._owner: int | None = None  # the thread whose forward is routed here
        self._lock = threading.Lock()

    def __deepcopy__(self, memo):  # a copied model captures graphs of its own weights
        return ProxyVPrefillGraphs(self.capture, self.devices, self.limit, self.after)

    def __reduce__(self):  # graphs are not saved with a pickled model
        return ProxyVPrefillGraphs, (None, self.devices, self.limit, self.after)

    @contextlib.contextmanager
    def routing(self, model) -> Iterator[None]:
        """Within this block this thread's calls of `model.language_model` go through the graphs (another thread's,
        and a second routed forward at the same time, run the language model's own forward)."""
        lm = model.language_model
        if not self._lock.acquire(blocking=False):
            yield
            return
        lm.forward = functools.partial(self._forward, model)
        self._owner = threading.get_ident()
        try:
            yield
        finally:
            del lm.forward
            self._owner = None
            self._lock.release()

    def _forward(self, model, *args, **kwargs):
        lm = model.language_model
        if args or threading.get_ident() != self._owner:  # the backbones pass every argument by keyword
            return type(lm).forward(lm, *args, **kwargs)
        pending = kwargs.get("proxyv_plan")
        plan = pending.get() if isinstance(pending, ProxyVPendingPlan) else pending
        key = None if plan is None else self._key(model, plan, kwargs)
        if key is None:
            self.counts["eager"] += 1
            return type(lm).forward(lm, **kwargs)
        return self._prefill(model, plan, key, kwargs)

    def _key(self, model, plan: ProxyVPlan, kwargs: dict) -> tuple | None:
        """What a captured prefill is reused for: the plan's layout, the inputs' shapes and the other arguments, the
        attention implementation. None where a graph cannot stand in for the forward."""
        if plan.cached or plan.padded or plan.attentions is not None:
            return None
        name = cache_keyword(type(model.language_model))
        cache = kwargs.get(name)
        if cache is not None and (type(cache) is not DynamicCache or cache.get_seq_length() != 0):
            return None
        tensors, settings = [], []
        for arg, value in sorted(kwargs.items()):
            if arg in (name, "proxyv_plan"):
                continue
            if isinstance(value, torch.Tensor):
                if value.device != plan.query_index.device or value.requires_grad:
                    return None
                tensors.append((arg, tuple(value.shape), value.dtype))
            elif value is None or isinstance(value, (bool, int, float, str)):
                settings.append((arg, value))
            else:
                return None
        if not self._replayable(model):
            return None
        attention = model.language_model.config._attn_implementation
        device = str(plan.query_index.device)
        return plan_layout(plan), tuple(tensors), tuple(settings), cache is not None, attention, device

    def _replayable(self, model) -> bool:
        """Whether a replay computes what the language model's forward computes: every module one of torch's,
        transformers' or this file's, none with a hook (but transformers' output capture, idle here) or a replaced
        forward. Drops the graphs when a weight has moved since they were captured."""
        from torch.nn.modules import module as torch_module

        if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
            return False
        lm, weights = model.language_model, []
        for part in (lm, model.proxyv):
            for module in part.modules():
                if not _known_module_class(type(module)):
                    return False
                attributes = module.__dict__  # where accelerate's hook and a replaced forward are set
                if (module is not lm and "forward" in attributes) or "_hf_hook" in attributes:
                    return False
                for hooks in (module._forward_hooks, module._forward_pre_hooks):
                    if hooks and any(getattr(h, "__name__", "") != "output_capturing_hook" for h in hooks.values()):
                        return False
                weights.extend((t.data_ptr(), t.shape) for t in module._parameters.values() if t is not None)
                weights.extend((t.data_ptr(), t.shape) for t in module._buffers.values() if t is not None)
        if tuple(weights) != self.weights:  # its shapes have been seen: captured again at their next call
            self.sightings.update(dict.fromkeys(self.entries, self.after - 1))
            self.entries.clear()
            self.weights = tuple(weights)
        return True

    def _prefill(self, model, plan: ProxyVPlan, key: tuple, kwargs: dict):
        lm = model.language_model
        context = plan.next_context  # the caller's (a capture's runs leave it alone)
        if key in self.entries:
            self.entries.move_to_end(key)
        else:
            seen = self.sightings.pop(key, 0) + 1
            if seen < self.after:
                self.sightings[key] = seen
                while len(self.sightings) > 64:
                    self.sightings.popitem(last=False)
                self.counts["eager"] += 1
                return type(lm).forward(lm, **kwargs)
            self.entries[key] = self._capture(model, plan, kwargs)
            while len(self.entries) > self.limit:
                self.entries.popitem(last=False)
        entry = self.entries[key]
        if entry is None:
            self.counts["eager"] += 1
            return type(lm).forward(lm, **kwargs)

        if plan is not entry.plan:
            for target, value in zip(plan_tensors(entry.plan), plan_tensors(plan), strict=True):
                target.copy_(value, non_blocking=True)
        for arg, buffer in entry.inputs.items():
            buffer.copy_(kwargs[arg], non_blocking=True)
        entry.graph.replay()
        self.counts["replayed"] += 1

        name = cache_keyword(type(lm))
        cache = kwargs.get(name)
        if cache is None and entry.with_cache:  # as the language model makes one
            cache = DynamicCache(config=lm.config)
        if cache is not None:
            for layer, (keys, values) in sorted(entry.outputs["keys"].items()):
                cache.update(keys, values, layer)
        proxies = [t for pair in entry.outputs["proxy_keys"].values() for t in pair]
        if proxies:  # copied out in one go: a later prefill continuing the cache reads them
            parts = iter(torch.cat([t.reshape(-1) for t in proxies]).split([t.numel() for t in proxies]))
            for layer, (keys, values) in entry.outputs["proxy_keys"].items():
                context.keys[layer] = (next(parts).view(keys.shape), next(parts).view(values.shape))
        out = BaseModelOutputWithPast(last_hidden_state=entry.outputs["hidden"].clone(), **{name: cache})
        return out if kwargs.get("return_dict", True) is not False else out.to_tuple()

    def _capture(self, model, plan: ProxyVPlan, kwargs: dict) -> _CapturedPrefill | None:
        """The prefill with these arguments captured, reading its inputs from copies of them and `plan`'s tensors."""
        lm = model.language_model
        name = cache_keyword(type(lm))
        with_cache = kwargs.get(name) is not None or bool(kwargs.get("use_cache"))
        inputs = {arg: value.clone() for arg, value in kwargs.items() if isinstance(value, torch.Tensor)}
        settings = {arg: value for arg, value in kwargs.items()
                    if not isinstance(value, torch.Tensor) and arg not in (name, "proxyv_plan")}

        def prefill() -> dict:
            plan.next_context = dataclasses.replace(plan.next_context, keys={})  # this run's, not the caller's
            cache = _PrefillCache(lm.config) if with_cache else None
            out = type(lm).forward(lm, **inputs, **settings, proxyv_plan=plan, **{name: cache})
            return {"hidden": out.last_hidden_state, "keys": {} if cache is None else dict(cache.recorded),
                    "proxy_keys": dict(plan.next_context.keys)}

        try:
            if self.capture is not None:
                graph, outputs = self.capture(prefill)
            else:  # each graph in a memory pool of its own: graphs replay in any order
                with torch.cuda.device(plan.query_index.device):
                    graph, outputs = capture_cuda_graph(prefill)
        except Exception as error:  # whatever fails to capture, the eager forward runs this shape
            warnings.warn(f"ProxyV could not capture the prefill in a CUDA graph ({type(error).__name__}: {error}); "
                          "prompts of this shape run eagerly", stacklevel=2)
            return None
        self.counts["captured"] += 1
        return _CapturedPrefill(graph, inputs, plan, outputs, with_cache)


# Signature of the backbone's own forward, per ProxyV model class (see ProxyVModelMixin.forward).
_FORWARD_SIGNATURES: dict[type, inspect.Signature] = {}
# The forward arguments that carry images or videos (pixels, or features encoded beforehand).
_VISUAL_INPUTS = ("pixel_values", "pixel_values_videos", "image_features", "video_features", "mm_encoder_outputs")


class ProxyVModelMixin:
    """The ProxyV parts of a LLaVA-family base model: the ProxyV layers, the `proxyv` modules, the plan of a forward
    and the ProxyV-off switch. Subclasses say where each prompt's image grids are (`_image_grids`)."""

    # The forward finds decoding steps by the cache's length, which a static cache keeps in a tensor, and builds the
    # plan on the host: one graph cannot hold both.
    _can_compile_fullgraph = False

    def __init_subclass__(cls, **kwargs):
        """Each model class's forward shows the backbone's own signature (transformers and users read it to find the
        inputs, e.g. `main_input_name`), while running `ProxyVModelMixin.forward`."""
        super().__init_subclass__(**kwargs)
        if "forward" not in cls.__dict__:
            cls.forward = functools.wraps(super().forward)(
                lambda self, *args, **kwargs: ProxyVModelMixin.forward(self, *args, **kwargs))

    def _attach_proxyv(self, config) -> None:
        """Swap the decoder layers from the start layer on for their ProxyV subclasses and add the ProxyV modules."""
        layers = self.language_model.layers
        for i in range(config.proxyv_start_layer, config.text_config.num_hidden_layers):
            layers[i] = proxyv_layer_class(type(layers[i]))(config.text_config, i)
        self.proxyv = ProxyVModules(config)
        self._proxyv_off = 0
        self.post_init()

    @property
    def proxyv_active(self) -> bool:
        return bool(self.config.proxyv_enabled) and not self._proxyv_off

    def fuse_projections(self, enabled: bool = True) -> None:
        """Lay each ProxyV layer's key/value and gate/up weights out in one tensor each (no copy is kept), so a ProxyV
        layer runs one matrix product for each pair (where no gradient needs the weights themselves, and not under
        torch.compile). Parameter names, shapes and values are unchanged, and so is the model with ProxyV off.
        `enabled=False` keeps (or puts back) separate weights and products. Without a call, the first ProxyV forward
        on a device decides: fused on CUDA (faster there, eager and in CUDA graphs), separate elsewhere (on CPU the
        separate products measured a little faster); see benchmarks/results/h100-2026-11-27b."""
        self._set_fusion(enabled)
        self._proxyv_fusion = "chosen"  # the forward leaves the layout alone from now on

    def _set_fusion(self, enabled: bool) -> None:
        for layer in self.language_model.layers[self.config.proxyv_start_layer :]:
            layer.fuse_projections(enabled)

    @contextlib.contextmanager
    def proxyv_disabled(self) -> Iterator[None]:
        """Within this block the model computes exactly what the original LLaVA model computes."""
        self._proxyv_off += 1
        try:
            yield
        finally:
            self._proxyv_off -= 1

    def _image_token_mask(self, input_ids, inputs_embeds) -> torch.Tensor:
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_embed = self.get_input_embeddings()(
            torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
        )
        return (inputs_embeds == image_embed).all(-1)

    def _image_grids(self, image_mask: torch.Tensor, arguments: dict) -> list[list[ProxyVGrid]]:
        raise NotImplementedError

    def _make_plan(self, arguments: dict, device: torch.device | None = None) -> ProxyVPlan | None:
        """The plan of a forward with these arguments, built now, its tensors on `device` (default: where the inputs
        are). From host-side inputs (token ids and attention mask on the CPU) with the model's device, it needs no copy
        from the device, so nothing waits for work already queued there (a CUDA-graph prefill builds the plan this
        way while the layers before the start layer run, see `proxyv_convert.bench.Runner.cuda_graph_prefill`)."""
        return self._pending_plan(arguments, device).get()

    def _pending_plan(self, arguments: dict, device: torch.device | None = None) -> ProxyVPendingPlan:
        """The plan of a forward with these arguments, to be built when the first ProxyV layer asks for it. The one
        device-to-host copy it needs (the image-token mask and the prompt's attention mask together; none for
        host-side inputs) starts now without waiting, so the host goes on queueing the vision tower and the layers
        before the start layer, and builds the plan while the device runs them."""
        image_mask = self._image_token_mask(arguments.get("input_ids"), arguments.get("inputs_embeds"))
        attention_mask = arguments.get("attention_mask")
        seq = image_mask.shape[1]
        cache = arguments.get("cache", arguments.get("past_key_values"))
        cached = 0 if cache is None else int(cache.get_seq_length())  # before this forward's layers add to it
        if attention_mask is not None and attention_mask.dim() == 4:  # e.g. generate's, with eager and a static cache
            attention_mask = attends_itself(attention_mask, cached)
        device = image_mask.device if device is None else torch.device(device)
        two_d = attention_mask is not None and attention_mask.dim() == 2
        masks = torch.cat([image_mask, attention_mask[:, -seq:].bool()]) if two_d else image_mask
        copied = None
        if masks.device.type == "cuda":  # into pinned memory: a copy into pageable memory would wait for the device
            masks = torch.empty(masks.shape, dtype=masks.dtype, pin_memory=True).copy_(masks, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(image_mask.device))
        else:
            masks = masks.cpu()

        def build() -> ProxyVPlan | None:
            if copied is not None:
                copied.synchronize()
            image_mask = masks[: len(masks) // 2] if two_d else masks
            refuse_hidden_images(arguments, found=bool(image_mask.any()))
            if not bool(image_mask.any()):
                return None
            if attention_mask is not None and not two_d:
                raise ValueError("ProxyV takes a 2-D attention mask (batch, sequence) of ones and zeros")
            continuing = {} if cached == 0 else self._continuation(
                cache, cached, seq, attention_mask if two_d else None, len(image_mask))
            fusion = self.__dict__.get("_proxyv_fusion")
            if fusion != "chosen" and fusion != device.type:  # the first ProxyV forward on this kind of device
                self._set_fusion(device.type == "cuda")
                self._proxyv_fusion = device.type
            plan = ProxyVPlan(
                image_mask, masks[len(masks) // 2 :] if two_d else None, self._image_grids(image_mask, arguments),
                device=device, modules=self.proxyv, **self._plan_settings, **continuing,
            )
            if arguments.get("output_attentions"):
                plan.attentions = []
            if cache is not None:  # for a later prefill continuing this cache (the proxies are not in it)
                cache._proxyv_context = plan.next_context
            return plan

        return ProxyVPendingPlan(build)

    def _continuation(self, cache, cached: int, seq: int, attention_mask: torch.Tensor | None, batch: int) -> dict:
        """The plan's arguments for a prefill of `seq` tokens with images after `cached` ones (a chat's next turn):
        how many key rows the cache gives the layers, which cached tokens are real, and what the ProxyV prefills
        before left beside the cache."""
        rows, offset = cache.get_mask_sizes(seq, self.config.proxyv_start_layer)
        if offset:
            raise ValueError("ProxyV continues only a cache that holds the whole sequence, not a sliding-window cache")
        previous = getattr(cache, "_proxyv_context", None)
        if previous is not None and previous.proxy_sees.shape[0] != batch:
            raise ValueError(f"the cache holds {previous.proxy_sees.shape[0]} sequences, this call continues {batch}")
        valid = None
        if attention_mask is not None and attention_mask.shape[1] >= cached + seq:  # the whole sequence's mask
            valid = attention_mask[:, attention_mask.shape[1] - cached - seq : -seq].bool().cpu().numpy()
        return {"cached": cached, "cache_rows": int(rows), "cached_valid": valid, "previous": previous}

    @functools.cached_property
    def _plan_settings(self) -> dict:
        """The plan's settings from the config, read once per model (a config attribute read costs microseconds, and
        a plan needs a dozen of them)."""
        config, text = self.config, self.config.text_config
        return {
            "factor": config.proxyv_reduce_factor,
            "start_layer": config.proxyv_start_layer,
            "num_layers": text.num_hidden_layers,
            "sliding_window": getattr(text, "sliding_window", None) if getattr(text, "use_sliding_window", True)
            else None,
            "learned": config.proxyv_learned_proxies if config.proxyv_proxy == "learned" else None,
        }

    def _prefill_graphs(self, arguments: dict) -> ProxyVPrefillGraphs | None:
        """The prefill graphs (`ProxyVPrefillGraphs`) a forward with these arguments may replay, or None where they do
        not apply: `proxyv_cuda_graphs` off, a device they do not serve (CPU), more than one prompt, gradients,
        training, compiling, attentions or hidden states asked for, a cache other than an empty DynamicCache, a
        language model whose forward was replaced (compiled, wrapped). The language model makes the last checks when
        it is called (an empty cache, no padding, no adapters or hooks: see `ProxyVPrefillGraphs._key`)."""
        if not getattr(self.config, "proxyv_cuda_graphs", True):
            return None
        graphs = self.__dict__.get("_proxyv_graphs")
        devices = ("cuda",) if graphs is None else graphs.devices
        tokens = arguments.get("input_ids")
        tokens = arguments.get("inputs_embeds") if tokens is None else tokens
        if tokens is None or tokens.device.type not in devices or tokens.shape[0] != 1:
            return None
        if torch.is_grad_enabled() or self.training or torch.compiler.is_compiling():
            return None
        for name in ("output_attentions", "output_hidden_states"):
            asked = arguments.get(name)
            if asked or (asked is None and (getattr(self.config, name, False)
                                            or getattr(self.config.text_config, name, False))):
                return None
        cache = arguments.get("cache", arguments.get("past_key_values"))
        lm = self.language_model
        if (cache is not None and type(cache) is not DynamicCache) or "forward" in lm.__dict__ or hasattr(
                lm, "_orig_mod"):
            return None
        if graphs is None:
            graphs = self._proxyv_graphs = ProxyVPrefillGraphs()
        return graphs

    @staticmethod
    def _decoding(args: tuple, kwargs: dict) -> bool:
        """A decoding step: token ids continuing a sequence the cache already holds, with no images. ProxyV has no
        work there, so the forward does not even look for image tokens (a device-to-host copy per step)."""
        images = ("pixel_values", "inputs_embeds", "mm_encoder_outputs")
        if args or any(kwargs.get(name) is not None for name in images):
            return False
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        return cache is not None and cache.get_seq_length() > 0

    def forward(self, *args, **kwargs):
        if not self.proxyv_active or self._decoding(args, kwargs):
            return super().forward(*args, **kwargs)
        signature = _FORWARD_SIGNATURES.get(type(self))
        if signature is None:  # once per class, not on every decode step
            signature = _FORWARD_SIGNATURES[type(self)] = inspect.signature(super().forward)
        arguments = signature.bind(*args, **kwargs).arguments
        arguments.update(arguments.pop("kwargs", {}))
        if arguments.get("input_ids") is not None and not any(
            value is not None for name, value in arguments.items() if name in _VISUAL_INPUTS
        ):  # without images or videos, image-token ids are embedded as ordinary tokens, as LLaVA does
            return super().forward(*args, **kwargs)
        if arguments.get("output_attentions") is None and getattr(self.config, "output_attentions", False):
            arguments["output_attentions"] = True  # also for the language model's layers before the start layer
        plan = self._pending_plan(arguments)
        return_dict = arguments.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        graphs = self._prefill_graphs(arguments)
        with contextlib.nullcontext() if graphs is None else graphs.routing(self):
            outputs = super().forward(**arguments, proxyv_plan=plan.argument_for(self.language_model),
                                      return_dict=True)
        built = plan.get()  # None: no image in the prompts, the forward was the original one
        if built is not None and outputs.hidden_states is not None:  # drop the proxies carried between layers
            outputs.hidden_states = tuple(None if h is None else h[:, : built.seq_len] for h in outputs.hidden_states)
        if built is not None and built.attentions:  # the layers before the start layer recorded theirs
            outputs.attentions = tuple(outputs.attentions or ()) + tuple(built.attentions)
        return outputs if return_dict else outputs.to_tuple()


def attends_itself(mask: torch.Tensor, cached: int) -> torch.Tensor:
    """A 4-D attention mask (B, 1, T, keys), boolean (True = attend) or additive (0 = attend), of T tokens following
    `cached` ones -> the 2-D mask it was made from, (B, cached + T): a token is real if it attends to itself (a
    sliding window or a causal mask never hides a token from itself), a cached one if the last token attends to it."""
    allowed = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0
    own = allowed.diagonal(offset=cached, dim1=-2, dim2=-1)[:, : mask.shape[2]]  # (B, T)
    return torch.cat([allowed[:, -1, :cached], own], dim=1)


class ProxyVHeadMixin:
    """The ProxyV switch and parameters, on the model with the language-modeling head."""

    _can_compile_fullgraph = False  # see ProxyVModelMixin
    proxyv_model_class: type  # the family's ProxyV model, which the head wraps

    def __init__(self, config):
        # The pretrained-model base alone: the family's own head __init__ would build the original backbone.
        PreTrainedModel.__init__(self, config)
        self.model = self.proxyv_model_class(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def proxyv_disabled(self):
        """Within this block the model computes exactly what the original model computes."""
        return self.model.proxyv_disabled()

    def fuse_projections(self, enabled: bool = True) -> None:
        """See ProxyVModelMixin.fuse_projections."""
        self.model.fuse_projections(enabled)

    def proxyv_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters ProxyV adds (the only ones distillation trains)."""
        return ((f"model.proxyv.{name}", p) for name, p in self.model.proxyv.named_parameters())


def refuse_hidden_images(arguments: dict, found: bool) -> None:
    """ProxyV never computes the original model quietly. A caller that merged the image features into
    `inputs_embeds` and passes no token ids (vLLM's Transformers backend does, with several prompts packed into one
    row) leaves no image token to find: refused, as are packed prompts (position ids restarting within a row)."""
    if arguments.get("input_ids") is not None:
        return
    if not found and all(arguments.get(name) is None for name in ("pixel_values", "pixel_values_videos")):
        raise ValueError(
            "ProxyV cannot find images merged into inputs_embeds without input_ids: pass input_ids (or the image "
            "token's embedding where the images go) with the pixel values, use `with model.proxyv_disabled():` for "
            'text-only embeddings, or serve with vLLM through proxyv\'s plugin (pip install "proxyv[vllm]")'
        )
    positions = arguments.get("position_ids")
    if found and positions is not None and arguments.get("attention_mask") is None and positions.shape[-1] > 1:
        if bool((positions.reshape(-1, positions.shape[-1]).diff(dim=-1) != 1).any()):
            raise ValueError("ProxyV takes one prompt per row, but position_ids restart within a row (packed prompts)")


def contiguous_images(rows: np.ndarray, sizes: list[int]) -> list[int]:
    """Start rows of consecutive images of `sizes` tokens among the image-token `rows` of one prompt."""
    starts, position = [], 0
    for size in sizes:
        start = int(rows[position])
        if int(rows[position + size - 1]) - start != size - 1:
            raise ValueError(f"each image's {size} image tokens must be contiguous in the prompt")
        starts.append(start)
        position += size
    return starts


# --- LLaVA (1.5) ----------------------------------------------------------------------------------------------------


class ProxyVLlavaPreTrainedModel(ProxyVInitMixin, LlavaPreTrainedModel):
    config_class = ProxyVLlavaConfig
    config: ProxyVLlavaConfig


class ProxyVLlavaModel(ProxyVModelMixin, ProxyVLlavaPreTrainedModel, LlavaModel):
    """LLaVA model (vision tower, projector, language model) whose decoder layers from the start layer on run ProxyV."""

    def __init__(self, config: ProxyVLlavaConfig):
        LlavaModel.__init__(self, config)
        self._attach_proxyv(config)

    @functools.cached_property
    def _grid_shape(self) -> tuple[tuple[int, int], int]:
        """((rows, columns) of an image's grid, image tokens per image), read from the config once per model."""
        side, per_image = vision_grid(self.config)
        return ((side, side) if self.config.proxyv_proxy == "spatial" else (1, per_image)), per_image

    def _image_grids(self, image_mask: torch.Tensor, arguments: dict) -> list[list[ProxyVGrid]]:
        """Each prompt's images: runs of grid x grid image tokens, one image after another (learned proxies take any
        number of tokens per image, as one row)."""
        (height, width), per_image = self._grid_shape
        grids = []
        for sample in image_mask.numpy():
            rows = np.flatnonzero(sample)
            if len(rows) % per_image:
                raise ValueError(
                    f"ProxyV needs whole images of {per_image} image tokens in one forward, but a prompt has "
                    f"{len(rows)} image tokens"
                )
            starts = contiguous_images(rows, [per_image] * (len(rows) // per_image))
            grids.append([ProxyVGrid(start, height, width, width) for start in starts])
        return grids


class ProxyVLlavaForConditionalGeneration(
    ProxyVHeadMixin, ProxyVLlavaPreTrainedModel, LlavaForConditionalGeneration, GenerationMixin
):
    """LLaVA with a language-modeling head whose language model runs ProxyV from the start layer on."""

    proxyv_model_class = ProxyVLlavaModel


# --- LLaVA-NeXT (AnyRes) --------------------------------------------------------------------------------------------


class ProxyVLlavaNextPreTrainedModel(ProxyVInitMixin, LlavaNextPreTrainedModel):
    config_class = ProxyVLlavaNextConfig
    config: ProxyVLlavaNextConfig


class ProxyVLlavaNextModel(ProxyVModelMixin, ProxyVLlavaNextPreTrainedModel, LlavaNextModel):
    """LLaVA-NeXT model whose decoder layers from the start layer on run ProxyV.

    Each image is a base crop (a grid x grid token grid) followed by its high-resolution crops, arranged side by side,
    unpadded to the image's aspect ratio, with a newline token closing every row. Proxies are made per grid: the base
    grid and the high-resolution grid (downsampled to ceil(rows / factor) x ceil(columns / factor)); the newline
    tokens are computed like text.
    """

    def __init__(self, config: ProxyVLlavaNextConfig):
        LlavaNextModel.__init__(self, config)
        self._attach_proxyv(config)

    def image_layout(self, image_size: list[int]) -> tuple[int, list[tuple[int, int, int, int]]]:
        """(token count, [(offset, rows, columns, stride) of each grid]) of one image of `image_size` (height, width),
        as LlavaNextModel.pack_image_features lays it out (transformers' own functions give the shapes)."""
        side = self.config.proxyv_grid
        crops_high, crops_wide = get_anyres_image_grid_shape(
            image_size, self.config.image_grid_pinpoints, self.config.vision_config.image_size
        )
        height, width = unpad_image(torch.empty(1, crops_high * side, crops_wide * side), image_size).shape[1:]
        base = (0, side, side, side)
        high_resolution = (side * side, height, width, width + 1)
        return side * side + height * (width + 1), [base, high_resolution]

    def get_image_features(self, pixel_values, image_sizes, *args, **kwargs):
        output = super().get_image_features(pixel_values, image_sizes, *args, **kwargs)
        if not isinstance(output, tuple):  # generate() may pass the features on without image_sizes: keep them here
            output.proxyv_image_sizes = image_sizes
        return output

    def _image_grids(self, image_mask: torch.Tensor, arguments: dict) -> list[list[ProxyVGrid]]:
        image_sizes = arguments.get("image_sizes")
        if image_sizes is None:
            encoded = (arguments.get("mm_encoder_outputs") or {}).get("image")
            image_sizes = getattr(encoded, "proxyv_image_sizes", None)
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT prompts with images need `image_sizes` (the processor returns them)")
        known = self.__dict__.setdefault("_proxyv_layouts", {})  # image size -> layout, read from the config once
        layouts = []
        for size in torch.as_tensor(image_sizes).tolist():
            if tuple(size) not in known:
                known[tuple(size)] = self.image_layout(size)
            layouts.append(known[tuple(size)])
        grids, image = [], 0
        for sample in image_mask.numpy():
            rows = np.flatnonzero(sample)
            sizes, total = [], 0
            while total < len(rows):
                if image == len(layouts):
                    raise ValueError("the prompts have more image tokens than `image_sizes` describes")
                sizes.append(layouts[image][0])
                total += layouts[image][0]
                image += 1
            if total != len(rows):
                raise ValueError(f"a prompt has {len(rows)} image tokens but its images need {total}")
            starts = contiguous_images(rows, sizes)
            first = image - len(sizes)
            grids.append([
                ProxyVGrid(start + offset, height, width, stride)
                for start, (_, parts) in zip(starts, layouts[first:image], strict=True)
                for offset, height, width, stride in parts
            ])
        return grids


class ProxyVLlavaNextForConditionalGeneration(
    ProxyVHeadMixin, ProxyVLlavaNextPreTrainedModel, LlavaNextForConditionalGeneration, GenerationMixin
):
    """LLaVA-NeXT with a language-modeling head whose language model runs ProxyV from the start layer on."""

    proxyv_model_class = ProxyVLlavaNextModel


# --- LLaVA-OneVision and LLaVA-NeXT-Video (images and videos) ------------------------------------------------------


def shifted(parts: list[ProxyVGrid], start: int) -> list[ProxyVGrid]:
    """An item's grids (rows counted from the item's first token) placed at row `start` of a prompt."""
    return [dataclasses.replace(grid, start=grid.start + start) for grid in parts]


class ProxyVVideoMixin:
    """Images and videos in one prompt, for the families with a video token. To the plan both are image tokens; each
    image is laid out as in LLaVA-NeXT (`image_layout`), each video as its frames' grids one after another
    (`video_layout`). Tokens of an item outside its grids (newlines) are computed like text."""

    def _video_token_mask(self, input_ids, inputs_embeds) -> torch.Tensor:
        if input_ids is not None:
            return input_ids == self.config.video_token_id
        video_embed = self.get_input_embeddings()(
            torch.tensor(self.config.video_token_id, dtype=torch.long, device=inputs_embeds.device)
        )
        return (inputs_embeds == video_embed).all(-1)

    def _image_token_mask(self, input_ids, inputs_embeds) -> torch.Tensor:
        return super()._image_token_mask(input_ids, inputs_embeds) | self._video_token_mask(input_ids, inputs_embeds)

    @staticmethod
    def _decoding(args: tuple, kwargs: dict) -> bool:
        return kwargs.get("pixel_values_videos") is None and ProxyVModelMixin._decoding(args, kwargs)

    def get_video_features(self, pixel_values_videos, *args, **kwargs):
        output = super().get_video_features(pixel_values_videos, *args, **kwargs)
        if not isinstance(output, tuple):  # generate() passes the features on without the pixels: keep the shape
            output.proxyv_video_frames = tuple(pixel_values_videos.shape[:2])
        return output

    def video_layout(self, frames: int) -> tuple[int, list[ProxyVGrid]]:
        """(token count, grids) of one video of `frames` frames: each frame a frame_grid x frame_grid grid, in groups
        of `proxyv_video_frames` neighbouring frames that share their proxies; OneVision closes a video with one
        newline token."""
        side, group = self.config.proxyv_frame_grid, self.config.proxyv_video_frames
        per_frame = side * side
        grids = [ProxyVGrid(first * per_frame, side, side, side, min(group, frames - first), per_frame)
                 for first in range(0, frames, group)]
        return frames * per_frame + int(self._video_newline), grids

    def _layouts(self, arguments: dict) -> tuple[list, list]:
        """The layout (token count, grids) of every image and every video of the batch, in order."""
        encoded = arguments.get("mm_encoder_outputs") or {}
        videos = arguments.get("pixel_values_videos")
        shape = tuple(videos.shape[:2]) if videos is not None else getattr(encoded.get("video"), "proxyv_video_frames",
                                                                            None)
        video_layouts = [] if shape is None else [self.video_layout(shape[1])] * shape[0]
        return self._image_layouts(arguments, encoded.get("image")), video_layouts

    def _image_grids(self, image_mask: torch.Tensor, arguments: dict) -> list[list[ProxyVGrid]]:
        image_layouts, video_layouts = self._layouts(arguments)
        video_mask = self._video_token_mask(arguments.get("input_ids"), arguments.get("inputs_embeds")).cpu().numpy()
        image_mask = image_mask.numpy()
        grids, used = [], {"image": 0, "video": 0}
        for b in range(len(image_mask)):
            sample = []
            for kind, mask, layouts in (("image", image_mask[b] & ~video_mask[b], image_layouts),
                                        ("video", video_mask[b], video_layouts)):
                rows = np.flatnonzero(mask)
                sizes, total = [], 0
                while total < len(rows):
                    if used[kind] == len(layouts):
                        raise ValueError(
                            f"the prompts have more {kind} tokens than the {len(layouts)} {kind}s passed describe "
                            f"(pass {'pixel_values and image_sizes' if kind == 'image' else 'pixel_values_videos'})"
                        )
                    sizes.append(layouts[used[kind]][0])
                    total += sizes[-1]
                    used[kind] += 1
                if total != len(rows):
                    raise ValueError(f"a prompt has {len(rows)} {kind} tokens but its {kind}s need {total}")
                starts = contiguous_images(rows, sizes)
                items = layouts[used[kind] - len(sizes) : used[kind]]
                sample += [grid for start, (_, parts) in zip(starts, items, strict=True)
                           for grid in shifted(parts, start)]
            grids.append(sorted(sample, key=lambda grid: grid.start))
        return grids


class ProxyVLlavaOnevisionPreTrainedModel(ProxyVInitMixin, LlavaOnevisionPreTrainedModel):
    config_class = ProxyVLlavaOnevisionConfig
    config: ProxyVLlavaOnevisionConfig


class ProxyVLlavaOnevisionModel(ProxyVVideoMixin, ProxyVModelMixin, ProxyVLlavaOnevisionPreTrainedModel,
                                LlavaOnevisionModel):
    """LLaVA-OneVision model whose decoder layers from the start layer on run ProxyV.

    An image alone in its prompt is a base crop (a grid x grid token grid, 27x27 for SigLIP-384/14) followed by its
    AnyRes crops side by side, unpadded, shrunk to at most `vision_aspect_ratio`'s crop count (`anyres_max_9`), a
    newline closing every row; an image among several in a prompt is its base crop and one newline. A video is its
    frames' grids (each frame's grid interpolated to ceil(grid / 2) per side) and one newline at the end. Proxies are
    made per grid (video frames: per group of `proxyv_video_frames` frames).
    """

    _video_newline = True

    def __init__(self, config: ProxyVLlavaOnevisionConfig):
        LlavaOnevisionModel.__init__(self, config)
        self._attach_proxyv(config)

    def image_layout(self, image_size: list[int], patched: bool = True) -> tuple[int, list[ProxyVGrid]]:
        """(token count, grids) of one image of `image_size` (height, width), as `pack_image_features` lays it out:
        `patched` False for an image among several in its prompt (base crop only)."""
        side = self.config.proxyv_grid
        base = ProxyVGrid(0, side, side, side)
        if not patched:
            return side * side + 1, [base]
        crops_high, crops_wide = get_anyres_image_grid_shape(
            image_size, self.config.image_grid_pinpoints, self.config.vision_config.image_size
        )
        height, width = unpad_image(torch.empty(1, crops_high * side, crops_wide * side), image_size).shape[1:]
        max_crops = int(self.config.vision_aspect_ratio.removeprefix("anyres_max_"))
        ratio = math.sqrt(height * width / (max_crops * side**2))
        if ratio > 1.1:  # shrunk by bilinear interpolation in pack_image_features
            height, width = int(height // ratio), int(width // ratio)
        return side * side + height * (width + 1), [base, ProxyVGrid(side * side, height, width, width + 1)]

    def get_image_features(self, pixel_values, image_sizes, *args, batch_num_images=None, **kwargs):
        output = super().get_image_features(pixel_values, image_sizes, *args, batch_num_images=batch_num_images,
                                            **kwargs)
        if not isinstance(output, tuple):  # generate() passes the features on without these: keep them
            output.proxyv_image_sizes, output.proxyv_batch_num_images = image_sizes, batch_num_images
        return output

    def _image_layouts(self, arguments: dict, encoded) -> list[tuple[int, list[ProxyVGrid]]]:
        image_sizes, counts = arguments.get("image_sizes"), arguments.get("batch_num_images")
        if image_sizes is None:
            image_sizes = getattr(encoded, "proxyv_image_sizes", None)
            counts = getattr(encoded, "proxyv_batch_num_images", None)
        if image_sizes is None:
            return []
        sizes = torch.as_tensor(image_sizes).tolist()
        # as get_image_features decides: only an image alone in its prompt gets its AnyRes crops
        patched = [True] * len(sizes) if counts is None else [n == 1 for n in torch.as_tensor(counts).tolist()
                                                              for _ in range(n)]
        return [self.image_layout(size, alone) for size, alone in zip(sizes, patched, strict=True)]


class ProxyVLlavaOnevisionForConditionalGeneration(
    ProxyVHeadMixin, ProxyVLlavaOnevisionPreTrainedModel, LlavaOnevisionForConditionalGeneration, GenerationMixin
):
    """LLaVA-OneVision with a language-modeling head whose language model runs ProxyV from the start layer on."""

    proxyv_model_class = ProxyVLlavaOnevisionModel


class ProxyVLlavaNextVideoPreTrainedModel(ProxyVInitMixin, LlavaNextVideoPreTrainedModel):
    config_class = ProxyVLlavaNextVideoConfig
    config: ProxyVLlavaNextVideoConfig


class ProxyVLlavaNextVideoModel(ProxyVVideoMixin, ProxyVModelMixin, ProxyVLlavaNextVideoPreTrainedModel,
                                LlavaNextVideoModel):
    """LLaVA-NeXT-Video model whose decoder layers from the start layer on run ProxyV: images as in LLaVA-NeXT, a
    video as its frames' grids (each frame's grid pooled by `spatial_pool_stride`), without newline tokens."""

    _video_newline = False

    def __init__(self, config: ProxyVLlavaNextVideoConfig):
        LlavaNextVideoModel.__init__(self, config)
        self._attach_proxyv(config)

    def image_layout(self, image_size: list[int]) -> tuple[int, list[ProxyVGrid]]:
        """(token count, grids) of one image of `image_size` (height, width): LLaVA-NeXT's layout."""
        tokens, parts = ProxyVLlavaNextModel.image_layout(self, image_size)
        return tokens, [ProxyVGrid(*part) for part in parts]

    def get_image_features(self, pixel_values, image_sizes, *args, **kwargs):
        output = super().get_image_features(pixel_values, image_sizes, *args, **kwargs)
        if not isinstance(output, tuple):  # generate() may pass the features on without image_sizes: keep them here
            output.proxyv_image_sizes = image_sizes
        return output

    def _image_layouts(self, arguments: dict, encoded) -> list[tuple[int, list[ProxyVGrid]]]:
        image_sizes = arguments.get("image_sizes")
        if image_sizes is None:
            image_sizes = getattr(encoded, "proxyv_image_sizes", None)
        if image_sizes is None:
            return []
        return [self.image_layout(size) for size in torch.as_tensor(image_sizes).tolist()]


class ProxyVLlavaNextVideoForConditionalGeneration(
    ProxyVHeadMixin, ProxyVLlavaNextVideoPreTrainedModel, LlavaNextVideoForConditionalGeneration, GenerationMixin
):
    """LLaVA-NeXT-Video with a language-modeling head whose language model runs ProxyV from the start layer on."""

    proxyv_model_class = ProxyVLlavaNextVideoModel


__all__ = [
    "ProxyVLlavaForConditionalGeneration",
    "ProxyVLlavaModel",
    "ProxyVLlavaNextForConditionalGeneration",
    "ProxyVLlavaNextModel",
    "ProxyVLlavaNextPreTrainedModel",
    "ProxyVLlavaNextVideoForConditionalGeneration",
    "ProxyVLlavaNextVideoModel",
    "ProxyVLlavaNextVideoPreTrainedModel",
    "ProxyVLlavaOnevisionForConditionalGeneration",
    "ProxyVLlavaOnevisionModel",
    "ProxyVLlavaOnevisionPreTrainedModel",
    "ProxyVLlavaPreTrainedModel",
]
