"""A deliberately naive ProxyV forward (one prompt, token-by-token masks) to check the real implementation against.

It follows DESIGN.md section 2 literally and shares no code with `modeling_proxyv.py`: it only reads the model's
weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@torch.no_grad()
def reference_logits(model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                     grids: list[tuple[int, int, int, int]] | None = None, attentions: dict | None = None,
                     **inputs) -> torch.Tensor:
    """Logits (T, vocab) of ProxyV for one prompt `input_ids` (T,), computed token by token.

    `attentions`: a dict that receives, for every layer from the start layer on, the attention weights (heads, T, T)
    of the sequence's queries over its keys (text and newline queries; full vision tokens have no query: zero rows).

    `grids`: (first row, rows, columns, row stride) of every image grid; by default each run of grid*grid image
    tokens is one square grid (LLaVA-1.5). Image tokens outside every grid (LLaVA-NeXT's newlines) act as text that
    proxies do not see. A video grid adds (frames, rows between frames): its frames share one set of proxies, made
    from the frames' mean. Video tokens count as image tokens.
    """
    config = model.config
    start, factor, side = config.proxyv_start_layer, config.proxyv_reduce_factor, config.proxyv_grid
    lm = model.model.language_model
    text_config = config.text_config
    with model.proxyv_disabled():  # layers before the start layer are the original ones
        states = model(input_ids=input_ids[None], pixel_values=pixel_values, output_hidden_states=True, **inputs)
    hidden = states.hidden_states[start][0]  # (T, H): the input of the start layer

    seq = input_ids.shape[0]
    media_ids = {config.image_token_id, getattr(config, "video_token_id", None)}
    image_rows = [t for t in range(seq) if int(input_ids[t]) in media_ids]
    if grids is None:
        grids = [(image_rows[i], side, side, side) for i in range(0, len(image_rows), side * side)]
    # tokens: dicts with kind, order (causal), pos (RoPE), state
    tokens = [{"kind": "newline" if t in image_rows else "text", "order": t, "pos": t, "row": t} for t in range(seq)]
    learned = config.proxyv_proxy == "learned"
    for k, (first, height, width, stride, *video) in enumerate(grids):
        frames, frame_stride = video or (1, 0)
        rows = [first + f * frame_stride + i * stride + j
                for f in range(frames) for i in range(height) for j in range(width)]
        if learned:  # learned queries attend over the grid's tokens; the same weights carry the context back
            module = model.model.proxyv.learned
            keys = module.key(rms(hidden[rows], module.norm.weight, module.norm.eps))
            weights = torch.softmax(module.queries @ keys.T * keys.shape[-1] ** -0.5, dim=-1)  # (K, N)
            made = list(weights @ hidden[rows])
            back = weights.T / weights.T.sum(-1, keepdim=True)  # (N, K)
        else:
            ph, pw = -(-height // factor), -(-width // factor)
            grid_states = hidden[rows].T.reshape(-1, frames, height, width).mean(1)[None]  # (1, H, h, w)
            small = F.interpolate(grid_states, size=(ph, pw), mode="bilinear", align_corners=False)[0]
            made = [small[:, j // pw, j % pw] for j in range(ph * pw)]
        for j, state in enumerate(made):
            tokens.append({"kind": "proxy", "order": first + j, "pos": first + j, "image": k, "cell": j,
                           "state": state})
        for index, row in enumerate(rows):
            i, j = divmod(index % (height * width), width)
            if learned:
                tokens[row].update(kind="vision", image=k, back=back[index])
            else:
                tokens[row].update(kind="vision", image=k, proxy_cell=(i * ph // height) * pw + j * pw // width)
    for tok in tokens:
        if tok["kind"] != "proxy":
            tok["state"] = hidden[tok["row"]]

    heads, kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
    head_dim = text_config.hidden_size // heads
    for layer_idx in range(start, text_config.num_hidden_layers):
        layer = lm.layers[layer_idx]
        attn = layer.self_attn
        x = torch.stack([tok["state"] for tok in tokens])  # (n, H)
        normed = rms(x, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        positions = torch.tensor([[tok["pos"] for tok in tokens]])
        cos, sin = lm.rotary_emb(x[None], positions)
        cos, sin = cos[0][:, None], sin[0][:, None]  # (n, 1, d)
        q = rope(attn.q_proj(normed).view(-1, heads, head_dim), cos, sin)
        k = rope(attn.k_proj(normed).view(-1, kv_heads, head_dim), cos, sin)
        v = attn.v_proj(normed).view(-1, kv_heads, head_dim)
        new_states = {}
        weights = torch.zeros(heads, seq, seq)
        for qi, tok in enumerate(tokens):
            if tok["kind"] == "vision":
                continue
            hidden_kinds = ("vision", "newline") if tok["kind"] == "proxy" else ("proxy",)
            keys = [ki for ki, other in enumerate(tokens)
                    if other["order"] <= tok["order"] and other["kind"] not in hidden_kinds]
            out = []
            for h in range(heads):
                kv = h // (heads // kv_heads)
                scores = (k[keys, kv] @ q[qi, h]) * head_dim**-0.5
                out.append(torch.softmax(scores, dim=0) @ v[keys, kv])
                if qi < seq:  # a query of the sequence (text or newline); its keys are the sequence's rows
                    weights[h, qi, keys] = torch.softmax(scores, dim=0)
            after_attn = tok["state"] + attn.o_proj(torch.cat(out))
            post = layer.post_attention_layernorm
            new_states[qi] = after_attn + layer.mlp(rms(after_attn, post.weight, post.variance_epsilon))
        if attentions is not None:
            attentions[layer_idx] = weights
        mlp = model.model.proxyv.vision_mlps[str(layer_idx)]
        proxy_state = {(tok["image"], tok["cell"]): new_states[i] for i, tok in enumerate(tokens)
                       if tok["kind"] == "proxy"}
        for qi, tok in enumerate(tokens):
            if tok["kind"] != "vision":
                continue
            own = mlp.proj_vision(rms(tok["state"], mlp.norm_vision.weight, mlp.norm_vision.eps))
            if "back" in tok:
                ctx = sum(weight * mlp.proj_proxy(rms(proxy_state[(tok["image"], c)], mlp.norm_proxy.weight,
                                                      mlp.norm_proxy.eps)) for c, weight in enumerate(tok["back"]))
            else:
                proxy = proxy_state[(tok["image"], tok["proxy_cell"])]
                ctx = mlp.proj_proxy(rms(proxy, mlp.norm_proxy.weight, mlp.norm_proxy.eps))
            new_states[qi] = tok["state"] + mlp.out(F.silu(mlp.fuse(torch.cat([own, ctx]))))
        for qi, tok in enumerate(tokens):
            tok["state"] = new_states[qi]

    final = torch.stack([tok["state"] for tok in tokens if tok["kind"] != "proxy"])  # (T, H) in sequence order
    return model.lm_head(lm.norm(final))
