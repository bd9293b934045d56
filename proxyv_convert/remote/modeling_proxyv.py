"""ProxyV for LLaVA models in transformers ("Streamline Without Sacrifice", arXiv 2505.15816).

From decoder layer S on, each image's vision tokens are represented by a few proxy tokens (the token grid
downsampled by a factor r per side). In every layer l >= S:
  - queries are the proxies and the text tokens; keys/values are the full vision tokens, the proxies and the text;
  - a proxy sees earlier proxies and the text before its image, never full vision tokens;
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
import inspect
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, LlavaForConditionalGeneration, LlavaModel
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector, LlavaPreTrainedModel

from .configuration_proxyv import ProxyVLlavaConfig

TEXT, VISION, PROXY = 0, 1, 2


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (B, L, D), index: (B, K) -> (B, K, D)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def flat_rows(index: torch.Tensor, rows: int) -> torch.Tensor:
    """(B, K) row indices into (B, rows, D) -> (B*K,) indices into its (B*rows, D) view."""
    offsets = torch.arange(index.shape[0], device=index.device)[:, None] * rows
    return (index + offsets).reshape(-1)


def select_rows(x: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
    """Rows of x (B, L, D) at flat indices from `flat_rows` -> (B, K, D): one contiguous row copy per index."""
    return x.reshape(-1, x.shape[-1]).index_select(0, flat_index).view(x.shape[0], -1, x.shape[-1])


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, L, d); cos/sin: (B, 1, L, d)."""
    return x * cos + rotate_half(x) * sin


class ProxyVRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


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

    def forward(self, vision: torch.Tensor, proxies: torch.Tensor, upsample_index: torch.Tensor) -> torch.Tensor:
        # vision: (B, V, H) full tokens; proxies: (B, P, H) their proxies after this layer;
        # upsample_index: (V,) proxy slot of each vision slot (nearest upsampling of the proxy grid).
        # The projection is per token, so it is applied to the P proxies before upsampling to V.
        ctx = self.proj_proxy(self.norm_proxy(proxies)).index_select(1, upsample_index)  # (B, V, I)
        own = self.proj_vision(self.norm_vision(vision))  # (B, V, I)
        update = self.out(F.silu(self.fuse(torch.cat([own, ctx], dim=-1))))  # (B, V, H)
        return vision + update


@torch.no_grad()
def init_proxyv_module(module: nn.Module, std: float) -> None:
    """Initial values of one ProxyV submodule (norms at one, projections normal(0, std), the output at zero)."""
    if isinstance(module, ProxyVRMSNorm):
        module.weight.fill_(1.0)
    elif isinstance(module, ProxyVZeroLinear):
        module.weight.zero_()
    elif isinstance(module, nn.Linear):
        module.weight.normal_(0.0, std)
        if module.bias is not None:
            module.bias.zero_()


class ProxyVModules(nn.Module):
    """All parameters ProxyV adds to a model: one VisionMLP per layer from the start layer on."""

    def __init__(self, config: ProxyVLlavaConfig):
        super().__init__()
        text = config.text_config
        self.vision_mlps = nn.ModuleDict(
            {
                str(i): ProxyVVisionMLP(text.hidden_size, config.proxyv_vision_mlp_size, text.rms_norm_eps)
                for i in range(config.proxyv_start_layer, text.num_hidden_layers)
            }
        )

    def reset_parameters(self, std: float) -> None:
        for mlp in self.vision_mlps.values():
            mlp.reset_parameters(std)


class ProxyVPlan:
    """Index tensors and the attention mask of one ProxyV prefill, shared by every ProxyV layer.

    Layout of the hidden states between ProxyV layers: rows [0, T) are the sequence as given, rows [T, T + P) the
    proxies (M image slots of p proxies each, M = most images in one sample). Queries are `Qt` text slots followed
    by the P proxies; slots that a sample does not use are computed and discarded.
    """

    def __init__(
        self,
        image_mask: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        grid: int,
        factor: int,
        start_layer: int,
        num_layers: int,
        modules: ProxyVModules,
        sliding_window: int | None = None,
    ):
        batch, seq = image_mask.shape
        per_image = grid * grid
        counts_list = image_mask.sum(1).tolist()  # the one host sync of a ProxyV forward
        for count in counts_list:
            if count % per_image:
                raise ValueError(
                    f"ProxyV needs whole images of {per_image} image tokens in one forward, but a prompt has {count} "
                    "image tokens"
                )
        device = image_mask.device
        side = grid // factor
        self.modules = modules
        self.start_layer, self.last_layer = start_layer, num_layers - 1
        self.num_images = max(counts_list) // per_image
        self.seq_len = seq
        self.proxies_per_image = side * side
        self.num_proxies = self.num_images * self.proxies_per_image
        self.grid, self.side = grid, side
        self.num_text_slots = seq - min(counts_list)
        num_vision = self.num_images * per_image
        proxies, text_slots = self.num_proxies, self.num_text_slots

        counts = image_mask.sum(1)  # (B,)
        is_text = ~image_mask
        # Stable sorts list each sample's image rows (then its text rows) in sequence order.
        image_first = torch.argsort(is_text.to(torch.int8), dim=1, stable=True)
        text_first = torch.argsort(image_mask.to(torch.int8), dim=1, stable=True)
        self.vision_index = image_first[:, :num_vision]  # (B, V)
        text_index = text_first[:, :text_slots]  # (B, Qt)
        proxy_rows = torch.arange(seq, seq + proxies, device=device).expand(batch, proxies)
        self.query_index = torch.cat([text_index, proxy_rows], dim=1)  # (B, Q)

        # Row r of a layer's output is row out_index[r] of cat([query outputs, vision outputs]).
        image_rank = image_mask.cumsum(1) - 1
        text_rank = is_text.cumsum(1) - 1
        query_count = text_slots + proxies
        self.out_index = torch.cat(
            [
                torch.where(image_mask, query_count + image_rank, text_rank),
                torch.arange(text_slots, query_count, device=device).expand(batch, proxies),
            ],
            dim=1,
        )  # (B, T + P)

        # Proxy j of an image starting at row s takes the causal order and RoPE position of row s + j.
        image_start = self.vision_index[:, ::per_image]  # (B, M)
        offsets = torch.arange(self.proxies_per_image, device=device)
        self.proxy_source = (image_start[:, :, None] + offsets).reshape(batch, proxies).clamp(max=seq - 1)  # (B, P)
        image_valid = torch.arange(self.num_images, device=device) < (counts // per_image)[:, None]  # (B, M)
        proxy_valid = image_valid.repeat_interleave(self.proxies_per_image, dim=1)  # (B, P)

        # Nearest upsampling of the proxy grid back to the full grid, for every image slot.
        cell = torch.arange(per_image, device=device)
        proxy_of_cell = (cell // grid // factor) * side + (cell % grid) // factor
        slots = torch.arange(self.num_images, device=device)[:, None] * self.proxies_per_image
        self.upsample_index = (slots + proxy_of_cell).reshape(num_vision)  # (V,)

        # The same index sets flattened for the (B*rows, H) views they are used on (index_select copies whole rows).
        rows = seq + proxies
        self.query_rows = flat_rows(self.query_index, rows)
        self.vision_rows = flat_rows(self.vision_index, rows)
        self.vision_rows_start = flat_rows(self.vision_index, seq)  # at the start layer, before the proxies exist
        self.out_rows = flat_rows(self.out_index, text_slots + proxies + num_vision)

        self.mask = self._attention_mask(image_mask, attention_mask, counts, proxy_valid, sliding_window)
        self._rope_source: torch.Tensor | None = None
        self._rope: tuple[torch.Tensor, ...] = ()

    def _attention_mask(self, image_mask, attention_mask, counts, proxy_valid, sliding_window) -> torch.Tensor:
        batch, seq = image_mask.shape
        device = image_mask.device
        real = torch.ones_like(image_mask) if attention_mask is None else attention_mask[:, -seq:].bool()
        rows = torch.arange(seq, device=device).expand(batch, seq)
        key_order = torch.cat([rows, self.proxy_source], dim=1)  # (B, T + P)
        key_kind = torch.cat(
            [image_mask.long(), torch.full_like(self.proxy_source, PROXY)], dim=1
        )  # TEXT=0, VISION=1, PROXY=2
        key_valid = torch.cat([real, proxy_valid], dim=1)
        query_order = key_order.gather(1, self.query_index)  # (B, Q)
        query_kind = key_kind.gather(1, self.query_index)
        text_slot_valid = torch.arange(self.num_text_slots, device=device) < (seq - counts)[:, None]
        query_valid = torch.cat([text_slot_valid & key_valid.gather(1, self.query_index[:, : self.num_text_slots]),
                                 proxy_valid], dim=1)

        allowed = key_valid[:, None, :] & (key_order[:, None, :] <= query_order[:, :, None])
        if sliding_window is not None:
            allowed &= (query_order[:, :, None] - key_order[:, None, :]) < sliding_window
        hidden_kind = torch.where(query_kind == TEXT, PROXY, VISION)  # what each query may not see
        allowed &= key_kind[:, None, :] != hidden_kind[:, :, None]
        # Padding and unused slots attend to themselves only: finite, and never seen by a real query.
        own = torch.arange(seq + self.num_proxies, device=device) == self.query_index[:, :, None]
        allowed = torch.where(query_valid[:, :, None], allowed, own)
        return allowed[:, None]  # (B, 1, Q, T + P), True = attend

    def make_proxies(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, H) states at the start layer -> (B, P, H) proxies: bilinear downsampling of each image grid."""
        batch, _, width = hidden.shape
        vision = select_rows(hidden, self.vision_rows_start)  # (B, M*g*g, H)
        grid = vision.view(batch * self.num_images, self.grid, self.grid, width).permute(0, 3, 1, 2)
        small = F.interpolate(grid, size=(self.side, self.side), mode="bilinear", align_corners=False)
        return small.permute(0, 2, 3, 1).reshape(batch, self.num_proxies, width)

    def rope(self, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(cos, sin) of the T + P key rows and of the query rows, each (B, 1, L, d); computed once per forward."""
        cos, sin = position_embeddings
        if self._rope_source is not cos:
            batch = self.query_index.shape[0]
            tables = []
            for table in (cos, sin):
                table = table.expand(batch, -1, -1)
                keys = torch.cat([table, gather_rows(table, self.proxy_source)], dim=1)
                tables.append((keys, gather_rows(keys, self.query_index)))
            (cos_k, cos_q), (sin_k, sin_q) = tables
            self._rope = (cos_k[:, None], sin_k[:, None], cos_q[:, None], sin_q[:, None])
            self._rope_source = cos
        return self._rope


def proxyv_attention(attn: nn.Module, query, key, value, mask: torch.Tensor) -> torch.Tensor:
    """Masked attention of (B, h, Q, d) queries over (B, kv_h, K, d) keys/values -> (B, Q, h, d)."""
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
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=attn.scaling, enable_gqa=groups > 1
        )
    return out.transpose(1, 2)


class ProxyVDecoderLayerMixin:
    """Mixed into the backbone's own decoder layer class (parameter names stay the same).

    Without a plan (ProxyV off, decoding, text-only prompts) the layer is exactly the original layer.
    """

    def forward(self, hidden_states: torch.Tensor, *args, proxyv_plan: ProxyVPlan | None = None, **kwargs):
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
        cos_k, sin_k, cos_q, sin_q = plan.rope(position_embeddings)

        normed = self.input_layernorm(hidden_states)  # (B, T+P, H)
        key = attn.k_proj(normed).view(batch, rows, -1, attn.head_dim).transpose(1, 2)  # (B, kv_h, T+P, d)
        value = attn.v_proj(normed).view(batch, rows, -1, attn.head_dim).transpose(1, 2)
        query = attn.q_proj(select_rows(normed, plan.query_rows))
        query = query.view(batch, queries, -1, attn.head_dim).transpose(1, 2)  # (B, h, Q, d)
        query, key = apply_rope(query, cos_q, sin_q), apply_rope(key, cos_k, sin_k)

        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:  # the cache gets the sequence's own keys/values, never the proxies'
            cache.update(key[:, :, :seq], value[:, :, :seq], layer_idx)

        attended = proxyv_attention(attn, query, key, value, plan.mask).reshape(batch, queries, -1)
        residual = select_rows(hidden_states, plan.query_rows)  # (B, Q, H)
        out_q = residual + attn.o_proj(attended)
        out_q = out_q + self.mlp(self.post_attention_layernorm(out_q))

        vision_mlp = plan.modules.vision_mlps[str(layer_idx)]
        vision = select_rows(hidden_states, plan.vision_rows)  # (B, V, H)
        new_proxies = out_q[:, plan.num_text_slots :]  # (B, P, H)
        out_v = vision_mlp(vision, new_proxies, plan.upsample_index)

        out = select_rows(torch.cat([out_q, out_v], dim=1), plan.out_rows)  # (B, T+P, H)
        if layer_idx == plan.last_layer:
            out = out[:, :seq]
        return out


_LAYER_CLASSES: dict[type, type] = {}


def proxyv_layer_class(base: type) -> type:
    """The ProxyV version of a decoder layer class (a subclass, so parameter names are unchanged)."""
    if base not in _LAYER_CLASSES:
        _LAYER_CLASSES[base] = type(f"ProxyV{base.__name__}", (ProxyVDecoderLayerMixin, base), {"__module__": __name__})
    return _LAYER_CLASSES[base]


class ProxyVLlavaPreTrainedModel(LlavaPreTrainedModel):
    config_class = ProxyVLlavaConfig
    config: ProxyVLlavaConfig

    def _init_weights(self, module):
        if isinstance(module, (ProxyVRMSNorm, ProxyVZeroLinear)):
            init_proxyv_module(module, self.config.text_config.initializer_range)
        else:
            super()._init_weights(module)


class ProxyVLlavaModel(ProxyVLlavaPreTrainedModel, LlavaModel):
    """LLaVA model (vision tower, projector, language model) whose decoder layers from the start layer on run ProxyV."""

    def __init__(self, config: ProxyVLlavaConfig):
        ProxyVLlavaPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        layers = self.language_model.layers
        for i in range(config.proxyv_start_layer, config.text_config.num_hidden_layers):
            layers[i] = proxyv_layer_class(type(layers[i]))(config.text_config, i)
        self.proxyv = ProxyVModules(config)
        self._proxyv_off = 0
        self.post_init()

    @property
    def proxyv_active(self) -> bool:
        return bool(self.config.proxyv_enabled) and not self._proxyv_off

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

    def _make_plan(self, arguments: dict) -> ProxyVPlan | None:
        image_mask = self._image_token_mask(arguments.get("input_ids"), arguments.get("inputs_embeds"))
        if not bool(image_mask.any()):
            return None
        if arguments.get("output_attentions") or self.config.output_attentions:
            raise ValueError("output_attentions is not available with ProxyV on; use `with model.proxyv_disabled():`")
        cache = arguments.get("cache", arguments.get("past_key_values"))
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError(
                "ProxyV prefills images only at the start of a sequence (the cache already holds "
                f"{cache.get_seq_length()} tokens); pass the whole prompt in one call"
            )
        text = self.config.text_config
        window = getattr(text, "sliding_window", None) if getattr(text, "use_sliding_window", True) else None
        return ProxyVPlan(
            image_mask,
            arguments.get("attention_mask"),
            grid=self.config.proxyv_grid,
            factor=self.config.proxyv_reduce_factor,
            start_layer=self.config.proxyv_start_layer,
            num_layers=text.num_hidden_layers,
            modules=self.proxyv,
            sliding_window=window,
        )

    def forward(self, *args, **kwargs):
        if not self.proxyv_active:
            return super().forward(*args, **kwargs)
        arguments = inspect.signature(LlavaModel.forward).bind(self, *args, **kwargs).arguments
        arguments.pop("self")
        arguments.update(arguments.pop("kwargs", {}))
        plan = self._make_plan(arguments)
        if plan is None:
            return super().forward(**arguments)
        return_dict = arguments.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        outputs = super().forward(**arguments, proxyv_plan=plan, return_dict=True)
        if outputs.hidden_states is not None:  # drop the proxies carried between layers
            outputs.hidden_states = tuple(h[:, : plan.seq_len] for h in outputs.hidden_states)
        return outputs if return_dict else outputs.to_tuple()


class ProxyVLlavaForConditionalGeneration(ProxyVLlavaPreTrainedModel, LlavaForConditionalGeneration):
    """LLaVA with a language-modeling head whose language model runs ProxyV from the start layer on."""

    def __init__(self, config: ProxyVLlavaConfig):
        ProxyVLlavaPreTrainedModel.__init__(self, config)
        self.model = ProxyVLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def proxyv_disabled(self):
        """Within this block the model computes exactly what the original LLaVA model computes."""
        return self.model.proxyv_disabled()

    def proxyv_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters ProxyV adds (the only ones distillation trains)."""
        return ((f"model.proxyv.{name}", p) for name, p in self.model.proxyv.named_parameters())


__all__ = ["ProxyVLlavaForConditionalGeneration", "ProxyVLlavaModel", "ProxyVLlavaPreTrainedModel"]
