"""ProxyV in vLLM: the model classes vLLM serves a converted folder with, registered by a `vllm.general_plugins` entry
point (installed with `pip install "proxyv[vllm]"`), so `vllm serve ./m` and `vllm.LLM("./m")` run ProxyV prefill.

vLLM's own LLaVA classes run everything but the language model's steps that hold image tokens. In such a step, from
the start layer on:
  - vLLM's attention runs over the step's real tokens as usual: it writes the keys/values of the text and of the full
    vision tokens into the KV cache and gives the text (and every other request in the step) its attention output. The
    full vision tokens get no query projection (a zero query, whose output is dropped), no FFN;
  - the proxies attend, in torch, over the text before their image and earlier proxies of the same prompt; they never
    enter the KV cache;
  - the FFN runs on the text and the proxies, and each layer's VisionMLP updates the full vision tokens.
Steps without image tokens, and decoding, are vLLM's ordinary path. The proxies of a prompt need its text and images in
one step, so the plugin turns chunked prefill and prefix caching off for ProxyV models (`vllm_plugin.py`).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .remote.configuration_proxyv import vision_grid
from .remote.modeling_proxyv import ProxyVGrid, ProxyVModules, ProxyVPlan, contiguous_images

PROXYV_WEIGHTS = "model.proxyv."  # checkpoint prefix of the ProxyV tensors (model_folder.PROXYV_PREFIX)


def _step_metadata():
    """The attention metadata of the running step (any layer's: they share the request layout), or None (a warm-up
    or profiling run without one)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    if isinstance(metadata, list):  # micro-batches
        return None
    if isinstance(metadata, dict):
        metadata = next(iter(metadata.values()), None)
    return metadata if getattr(metadata, "query_start_loc", None) is not None else None


class ProxyVServingMixin:
    """ProxyV on top of one of vLLM's LLaVA-family model classes (the class after this mixin)."""

    def _init_proxyv(self, vllm_config) -> None:
        config = vllm_config.model_config.hf_config
        parallel = vllm_config.parallel_config
        if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
            raise ValueError("ProxyV in vLLM runs on one device: tensor and pipeline parallelism are not supported")
        if vllm_config.quant_config is not None:
            raise ValueError("ProxyV in vLLM needs unquantized weights")
        self.proxyv = ProxyVModules(config)
        self._proxyv_image_mask: torch.Tensor | None = None
        self._proxyv_newline: torch.Tensor | None = None
        from vllm.platforms import current_platform

        self.proxyv_kv = None
        if current_platform.is_cpu():
            # vLLM's CPU build keeps only a packed copy of each weight, so the key/value rows of the fused
            # query/key/value weight cannot be used alone: the ProxyV layers get a key/value projection of their own
            # for the vision tokens (a copy of those rows, packed by vLLM in turn), which then skip the query product.
            from vllm.model_executor.layers.linear import ReplicatedLinear

            layers = self.language_model.model.layers
            self.proxyv_kv = nn.ModuleDict({
                str(i): ReplicatedLinear(
                    config.text_config.hidden_size, 2 * layers[i].self_attn.kv_size,
                    bias=layers[i].self_attn.qkv_proj.bias is not None, prefix=f"proxyv_kv.{i}",
                )
                for i in range(config.proxyv_start_layer, config.text_config.num_hidden_layers)
            })

    @property
    def proxyv_enabled(self) -> bool:
        return bool(getattr(self.config, "proxyv_enabled", True))

    # -- weights ------------------------------------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The ProxyV tensors go to `self.proxyv`, the rest to vLLM's own loader (tower keys saved by transformers 5.x,
        `vision_tower.embeddings...`, are given the `vision_tower.vision_model...` names it expects)."""
        params = dict(self.proxyv.named_parameters())
        loaded: set[str] = set()

        def others():
            for name, tensor in weights:
                if name.startswith(PROXYV_WEIGHTS):
                    local = name[len(PROXYV_WEIGHTS):]
                    if local not in params:
                        raise ValueError(f"unexpected ProxyV tensor {name} in the checkpoint")
                    with torch.no_grad():
                        params[local].copy_(tensor)
                    loaded.add(f"proxyv.{local}")
                    continue
                yield _vllm_tower_name(name), tensor

        loaded |= super().load_weights(others())
        if self.proxyv_kv is not None:  # copies of the key/value rows, before vLLM packs the weights
            layers = self.language_model.model.layers
            with torch.no_grad():
                for index, kv in self.proxyv_kv.items():
                    qkv = layers[int(index)].self_attn.qkv_proj
                    q_size = layers[int(index)].self_attn.q_size
                    kv.weight.copy_(qkv.weight[q_size:])
                    loaded.add(f"proxyv_kv.{index}.weight")
                    if kv.bias is not None:
                        kv.bias.copy_(qkv.bias[q_size:])
                        loaded.add(f"proxyv_kv.{index}.bias")
        missing = sorted(f"proxyv.{local}" for local in params if f"proxyv.{local}" not in loaded)
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} ProxyV tensors, e.g. model.{missing[0]}")
        return loaded

    # -- one step -----------------------------------------------------------------------------------------------------

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None, **kwargs):
        embeds = super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kwargs)
        # The forward that follows gets only the merged embeddings: keep where this step's image tokens are.
        has_images = is_multimodal is not None and multimodal_embeddings is not None and len(multimodal_embeddings)
        self._proxyv_image_mask = is_multimodal.clone() if has_images else None
        self._proxyv_newline = self._newline_rows(embeds, is_multimodal) if has_images else None
        return embeds

    def _newline_rows(self, embeds: torch.Tensor, is_multimodal: torch.Tensor) -> torch.Tensor | None:
        return None

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        image_mask, self._proxyv_image_mask = self._proxyv_image_mask, None
        newline, self._proxyv_newline = self._proxyv_newline, None
        metadata = _step_metadata()
        if (
            not self.proxyv_enabled or image_mask is None or inputs_embeds is None or metadata is None
            or intermediate_tensors is not None or not bool(image_mask.any())
        ):
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        return self._proxyv_step(positions, inputs_embeds, image_mask, newline, metadata)

    def _image_grids(self, image_mask: np.ndarray, newline: np.ndarray | None) -> list[ProxyVGrid]:
        """The image grids of one prompt whose image tokens are `image_mask` (its rows from 0)."""
        raise NotImplementedError

    @torch.no_grad()
    def _proxyv_step(self, positions, inputs_embeds, image_mask, newline, metadata) -> torch.Tensor:
        config, text = self.config, self.config.text_config
        lm = self.language_model.model
        start = config.proxyv_start_layer
        rows = image_mask.shape[0]
        device = inputs_embeds.device

        # The requests of the step (rows [bounds[i], bounds[i+1]) of the flat batch) that hold image tokens.
        bounds = metadata.query_start_loc.cpu().numpy()
        host_mask = image_mask.cpu().numpy()
        host_newline = None if newline is None else newline.cpu().numpy()
        first_positions = positions[torch.as_tensor(bounds[:-1], device=positions.device).clamp_max(rows - 1)]
        first_positions = first_positions.cpu().numpy()
        requests, grids = [], []
        for i in range(len(bounds) - 1):
            lo, hi = int(bounds[i]), int(bounds[i + 1])
            if hi <= lo or not host_mask[lo:hi].any():
                continue
            if int(first_positions[i]) != 0:
                raise RuntimeError(
                    "ProxyV needs a prompt with images prefilled in one step, but this step continues one from "
                    f"position {int(first_positions[i])}: serve it with chunked prefill and prefix caching off"
                )
            requests.append((lo, hi))
            grids.append(self._image_grids(host_mask[lo:hi], None if host_newline is None else host_newline[lo:hi]))

        # The image requests laid out as a right-padded batch (B, longest) for the plan.
        lengths = [hi - lo for lo, hi in requests]
        longest = max(lengths)
        batch_mask = np.zeros((len(requests), longest), dtype=bool)
        batch_valid = np.zeros((len(requests), longest), dtype=bool)
        padded_rows = np.zeros((len(requests), longest), dtype=np.int64)  # flat row of each (b, t); 0 for padding
        for b, (lo, hi) in enumerate(requests):
            batch_mask[b, : hi - lo] = host_mask[lo:hi]
            batch_valid[b, : hi - lo] = True
            padded_rows[b, : hi - lo] = np.arange(lo, hi)
        plan = ProxyVPlan(
            torch.from_numpy(batch_mask), torch.from_numpy(batch_valid), grids, device=device,
            factor=config.proxyv_reduce_factor, start_layer=start, num_layers=text.num_hidden_layers,
            modules=self.proxyv, sliding_window=_sliding_window(text),
            learned=config.proxyv_learned_proxies if config.proxyv_proxy == "learned" else None,
        )
        batch, proxies = len(requests), plan.num_proxies
        padded_index = torch.from_numpy(padded_rows.reshape(-1)).to(device)
        # Every grid cell's flat row, in the plan's vision-slot order (B, V); the other rows get queries and the FFN.
        vision_slots = plan.vision_rows.view(batch, -1)
        in_request = vision_slots % (longest + proxies)
        vision_valid = torch.from_numpy(np.arange(plan.num_vision) < _vision_counts(grids)[:, None]).to(device)
        vision_flat = padded_index.view(batch, longest).gather(1, in_request.clamp_max(longest - 1))
        vision_flat_valid = vision_flat[vision_valid]
        is_vision = torch.zeros(rows, dtype=torch.bool, device=device)
        is_vision[vision_flat_valid] = True
        text_rows = torch.nonzero(~is_vision).squeeze(1)
        proxy_positions = plan.proxy_source.reshape(-1).to(positions.dtype)

        hidden, residual = inputs_embeds, None
        for index in range(start):
            hidden, residual = lm.layers[index](positions, hidden, residual)
        hidden = hidden if residual is None else hidden + residual
        hidden = hidden.clone()
        proxy_states = plan.make_proxies(hidden.index_select(0, padded_index).view(batch, longest, -1))
        for index in range(start, text.num_hidden_layers):
            hidden, proxy_states = self._proxyv_layer(
                index, lm.layers[index], plan, positions, hidden, proxy_states,
                text_rows=text_rows, vision_flat=vision_flat, vision_valid=vision_valid,
                vision_flat_valid=vision_flat_valid, padded_index=padded_index, longest=longest,
                proxy_positions=proxy_positions,
            )
        return lm.norm(hidden)

    def _proxyv_layer(self, index, layer, plan, positions, hidden, proxy_states, *, text_rows, vision_flat,
                      vision_valid, vision_flat_valid, padded_index, longest, proxy_positions):
        attn = layer.self_attn
        batch, proxies, width = proxy_states.shape
        q_size, kv_size, head_dim = attn.q_size, attn.kv_size, attn.head_dim
        normed = layer.input_layernorm(hidden)  # (N, H)
        normed_proxies = layer.input_layernorm(proxy_states.reshape(-1, width))  # (B*P, H)
        # Queries, keys and values of the text rows and the proxies; only keys and values of the vision tokens.
        text_and_proxies = torch.cat([normed.index_select(0, text_rows), normed_proxies])
        vision_normed = normed.index_select(0, vision_flat_valid)
        if self.proxyv_kv is not None:
            qkv_text = attn.qkv_proj(text_and_proxies)[0]
            kv_vision = self.proxyv_kv[str(index)](vision_normed)[0]
        else:  # the fused weight itself: its key/value rows alone for the vision tokens
            weight, bias = attn.qkv_proj.weight, attn.qkv_proj.bias
            qkv_text = F.linear(text_and_proxies, weight, bias)
            kv_vision = F.linear(vision_normed, weight[q_size:], None if bias is None else bias[q_size:])
        qkv_text, qkv_proxies = qkv_text.split([len(text_rows), batch * proxies])
        qkv = hidden.new_zeros(hidden.shape[0], q_size + 2 * kv_size)
        qkv.index_copy_(0, text_rows, qkv_text)
        qkv[:, q_size:].index_copy_(0, vision_flat_valid, kv_vision)
        query, key, value = qkv.split([q_size, kv_size, kv_size], dim=-1)
        query, key = attn.rotary_emb(positions, query.contiguous(), key.contiguous())
        out = attn.attn(query, key, value.contiguous())  # writes the cache; text (and other requests) attend here

        # The proxies: over the keys of their prompt's rows that a proxy sees (text before its image) and proxies.
        p_query, p_key, p_value = qkv_proxies.split([q_size, kv_size, kv_size], dim=-1)
        p_query, p_key = attn.rotary_emb(proxy_positions, p_query.contiguous(), p_key.contiguous())
        keys = torch.cat([key.index_select(0, padded_index).view(batch, longest, -1),
                          p_key.view(batch, proxies, -1)], 1).index_select(1, plan.proxy_columns)
        values = torch.cat([value.index_select(0, padded_index).view(batch, longest, -1),
                            p_value.view(batch, proxies, -1)], 1).index_select(1, plan.proxy_columns)
        heads, kv_heads = q_size // head_dim, kv_size // head_dim
        p_out = F.scaled_dot_product_attention(
            p_query.view(batch, proxies, heads, head_dim).transpose(1, 2),
            keys.view(batch, -1, kv_heads, head_dim).transpose(1, 2),
            values.view(batch, -1, kv_heads, head_dim).transpose(1, 2),
            attn_mask=plan.proxy_mask, scale=attn.scaling, enable_gqa=heads != kv_heads,
        ).transpose(1, 2).reshape(batch * proxies, q_size)

        # Output projection, residual, FFN: text rows and proxies only.
        attended = torch.cat([out.index_select(0, text_rows), p_out])
        states = torch.cat([hidden.index_select(0, text_rows), proxy_states.reshape(-1, width)])
        states = states + attn.o_proj(attended)[0]
        states = states + layer.mlp(layer.post_attention_layernorm(states))
        text_states, proxy_states = states.split([len(text_rows), batch * proxies])
        proxy_states = proxy_states.view(batch, proxies, width)

        # The full vision tokens: the VisionMLP from their own state and their proxy's new state.
        vision = hidden.index_select(0, vision_flat.reshape(-1)).view(batch, -1, width)
        vision = self.proxyv.vision_mlps[str(index)](vision, proxy_states, plan.context)
        hidden = hidden.index_copy(0, text_rows, text_states)
        hidden.index_copy_(0, vision_flat_valid, vision[vision_valid])
        return hidden, proxy_states


def _vision_counts(grids: list[list[ProxyVGrid]]) -> np.ndarray:
    return np.array([sum(grid.height * grid.width * grid.frames for grid in sample) for sample in grids])


def _sliding_window(text) -> int | None:
    return getattr(text, "sliding_window", None) if getattr(text, "use_sliding_window", True) else None


_TOWER_PARTS = ("vision_tower.embeddings.", "vision_tower.encoder.", "vision_tower.pre_layrnorm.",
                "vision_tower.post_layernorm.", "vision_tower.head.")


def _vllm_tower_name(name: str) -> str:
    """`[model.]vision_tower.X` as transformers 5.x saves it -> `[model.]vision_tower.vision_model.X`."""
    bare = name[len("model."):] if name.startswith("model.vision_tower.") else name
    if bare.startswith(_TOWER_PARTS):
        return name.replace("vision_tower.", "vision_tower.vision_model.", 1)
    return name


def _run_starts(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of each run of True in a 1-D mask."""
    rows = np.flatnonzero(mask)
    if not len(rows):
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    return [(int(run[0]), len(run)) for run in np.split(rows, breaks)]


def _import_vllm_llava():
    from vllm.model_executor.models.llava import LlavaForConditionalGeneration
    from vllm.model_executor.models.llava_next import LlavaNextForConditionalGeneration

    return LlavaForConditionalGeneration, LlavaNextForConditionalGeneration


_VllmLlava, _VllmLlavaNext = _import_vllm_llava()


class ProxyVLlavaForConditionalGeneration(ProxyVServingMixin, _VllmLlava):
    """vLLM's LLaVA with ProxyV prefill."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_proxyv(vllm_config)

    def _image_grids(self, image_mask: np.ndarray, newline: np.ndarray | None) -> list[ProxyVGrid]:
        side, per_image = vision_grid(self.config)
        height, width = (side, side) if self.config.proxyv_proxy == "spatial" else (1, per_image)
        rows = np.flatnonzero(image_mask)
        if len(rows) % per_image:
            raise RuntimeError(f"ProxyV needs whole images of {per_image} tokens, but a prompt has {len(rows)}")
        starts = contiguous_images(rows, [per_image] * (len(rows) // per_image))
        return [ProxyVGrid(start, height, width, width) for start in starts]


class ProxyVLlavaNextForConditionalGeneration(ProxyVServingMixin, _VllmLlavaNext):
    """vLLM's LLaVA-NeXT with ProxyV prefill: per image a base grid and the unpadded high-resolution grid whose rows
    end in newline tokens (found by their embedding, the model's `image_newline`), as in the transformers model."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_proxyv(vllm_config)

    def _newline_rows(self, embeds: torch.Tensor, is_multimodal: torch.Tensor) -> torch.Tensor:
        return is_multimodal & (embeds == self.image_newline.to(embeds.dtype)).all(-1)

    def _image_grids(self, image_mask: np.ndarray, newline: np.ndarray | None) -> list[ProxyVGrid]:
        side = self.config.proxyv_grid
        base = side * side
        grids = []
        for start, length in _run_starts(image_mask):
            position, end = start, start + length
            while position < end:  # one image: its base grid, then rows of `width` cells and a newline
                high = position + base
                following = np.flatnonzero(newline[high:end]) if high < end else np.zeros(0, dtype=np.int64)
                if high > end or not len(following):
                    raise RuntimeError("ProxyV could not find a LLaVA-NeXT image's grids among its image tokens")
                width = int(following[0])
                height = 0
                while high + height * (width + 1) + width < end and newline[high + height * (width + 1) + width]:
                    height += 1
                grids += [ProxyVGrid(position, side, side, side), ProxyVGrid(high, height, width, width + 1)]
                position = high + height * (width + 1)
        return grids
