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
def reference_logits(model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
    """Logits (T, vocab) of ProxyV for one prompt `input_ids` (T,), computed token by token."""
    config = model.config
    start, factor, grid = config.proxyv_start_layer, config.proxyv_reduce_factor, config.proxyv_grid
    side = grid // factor
    lm = model.model.language_model
    text_config = config.text_config
    with model.proxyv_disabled():  # layers before the start layer are the original ones
        states = model(input_ids=input_ids[None], pixel_values=pixel_values, output_hidden_states=True)
    hidden = states.hidden_states[start][0]  # (T, H): the input of the start layer

    seq = input_ids.shape[0]
    image_rows = [t for t in range(seq) if input_ids[t] == config.image_token_id]
    per_image = grid * grid
    images = [image_rows[i : i + per_image] for i in range(0, len(image_rows), per_image)]
    # tokens: dicts with kind, order (causal), pos (RoPE), state
    tokens = []
    for t in range(seq):
        kind = "vision" if t in image_rows else "text"
        tokens.append({"kind": kind, "order": t, "pos": t, "row": t})
    for k, rows in enumerate(images):
        assert rows == list(range(rows[0], rows[0] + per_image)), "an image's tokens are contiguous"
        grid_states = hidden[rows].T.reshape(1, -1, grid, grid)
        small = F.interpolate(grid_states, size=(side, side), mode="bilinear", align_corners=False)[0]
        for j in range(side * side):
            tokens.append(
                {"kind": "proxy", "order": rows[0] + j, "pos": rows[0] + j, "image": k, "cell": j,
                 "state": small[:, j // side, j % side]}
            )
    for tok in tokens:
        if tok["kind"] != "proxy":
            tok["state"] = hidden[tok["row"]]
        if tok["kind"] == "vision":
            for k, rows in enumerate(images):
                if tok["row"] in rows:
                    i, j = divmod(rows.index(tok["row"]), grid)
                    tok["image"], tok["proxy_cell"] = k, (i // factor) * side + j // factor

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
        for qi, tok in enumerate(tokens):
            if tok["kind"] == "vision":
                continue
            hidden_kind = "proxy" if tok["kind"] == "text" else "vision"
            keys = [ki for ki, other in enumerate(tokens)
                    if other["order"] <= tok["order"] and other["kind"] != hidden_kind]
            out = []
            for h in range(heads):
                kv = h // (heads // kv_heads)
                scores = (k[keys, kv] @ q[qi, h]) * head_dim**-0.5
                out.append(torch.softmax(scores, dim=0) @ v[keys, kv])
            after_attn = tok["state"] + attn.o_proj(torch.cat(out))
            post = layer.post_attention_layernorm
            new_states[qi] = after_attn + layer.mlp(rms(after_attn, post.weight, post.variance_epsilon))
        mlp = model.model.proxyv.vision_mlps[str(layer_idx)]
        proxy_state = {(tok["image"], tok["cell"]): new_states[i] for i, tok in enumerate(tokens)
                       if tok["kind"] == "proxy"}
        for qi, tok in enumerate(tokens):
            if tok["kind"] != "vision":
                continue
            proxy = proxy_state[(tok["image"], tok["proxy_cell"])]
            own = mlp.proj_vision(rms(tok["state"], mlp.norm_vision.weight, mlp.norm_vision.eps))
            ctx = mlp.proj_proxy(rms(proxy, mlp.norm_proxy.weight, mlp.norm_proxy.eps))
            new_states[qi] = tok["state"] + mlp.out(F.silu(mlp.fuse(torch.cat([own, ctx]))))
        for qi, tok in enumerate(tokens):
            tok["state"] = new_states[qi]

    final = torch.stack([tok["state"] for tok in tokens if tok["kind"] != "proxy"])  # (T, H) in sequence order
    return model.lm_head(lm.norm(final))
