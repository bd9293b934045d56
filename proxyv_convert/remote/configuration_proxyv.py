"""Configuration of ProxyV models ("Streamline Without Sacrifice", arXiv 2505.15816).

A ProxyV config is the configuration of the LLaVA checkpoint it was converted from plus a few
`proxyv_*` fields. This file is self-contained (standard library + transformers) because it is
copied into every converted checkpoint and loaded with `trust_remote_code=True`.
"""

from transformers import LlavaConfig, LlavaNextConfig, LlavaNextVideoConfig, LlavaOnevisionConfig

SUPPORTED_TEXT_MODELS = ("llama", "mistral", "qwen2")
# Vision towers with a 2-D patch grid, and whether they prepend a CLS token to it.
SUPPORTED_VISION_MODELS = {"clip_vision_model": True, "siglip_vision_model": False}
VISION_MLP_FORMS = ("residual",)
PROXY_KINDS = ("spatial", "learned")


def default_vision_mlp_size(hidden_size: int) -> int:
    """Width of the per-layer VisionMLP: H/4, or H/2 for models narrower than 1024 (as in the paper)."""
    return hidden_size // 2 if hidden_size < 1024 else hidden_size // 4


def vision_grid(config: LlavaConfig) -> tuple[int, int]:
    """(grid side, image tokens per image) that the language model sees for one image."""
    vision = config.vision_config
    if vision.model_type not in SUPPORTED_VISION_MODELS:
        raise ValueError(
            f"vision tower '{vision.model_type}' is not supported; supported: "
            f"{', '.join(sorted(SUPPORTED_VISION_MODELS))}"
        )
    side = vision.image_size // vision.patch_size
    tokens = side * side + int(SUPPORTED_VISION_MODELS[vision.model_type])
    if config.vision_feature_select_strategy == "default":
        tokens -= 1
    return side, tokens


def check_proxyv_settings(config: LlavaConfig, start_layer: int, reduce_factor: int, proxy: str = "spatial") -> None:
    """Raise ValueError, with the fix in the message, when ProxyV cannot be applied as asked."""
    text = config.text_config
    if text.model_type not in SUPPORTED_TEXT_MODELS:
        raise ValueError(
            f"language model '{text.model_type}' is not supported; supported: {', '.join(SUPPORTED_TEXT_MODELS)}"
        )
    layers = text.num_hidden_layers
    if not 0 <= start_layer < layers:
        raise ValueError(
            f"start layer {start_layer} is out of range: the model has {layers} decoder layers (0-{layers - 1})"
        )
    side, tokens = vision_grid(config)
    if proxy == "learned":  # learned proxies need no 2-D grid
        return
    if tokens != side * side:
        raise ValueError(
            f"the vision tower gives {tokens} tokens per image, which is not a {side}x{side} grid "
            f"(vision_feature_select_strategy='{config.vision_feature_select_strategy}'); use proxy 'learned'"
        )
    if reduce_factor < 1 or side % reduce_factor:
        valid = [f for f in range(1, side + 1) if side % f == 0]
        raise ValueError(
            f"reduce factor {reduce_factor} does not divide the {side}x{side} vision grid; "
            f"use one of {', '.join(map(str, valid))}"
        )


PROXYV_DOC = r"""
    Args:
        proxyv_start_layer (`int`, *optional*):
            First decoder layer that runs ProxyV (layers before it are untouched). Defaults to the middle layer.
        proxyv_reduce_factor (`int`, defaults to 4):
            Each image's token grid is downsampled by this factor per side to make its proxy tokens.
        proxyv_enabled (`bool`, defaults to `True`):
            `False` makes the model compute exactly what the original LLaVA model computes.
        proxyv_vision_mlp_size (`int`, *optional*):
            Width of the per-layer VisionMLP that updates the full vision tokens. Defaults to H/4 (H/2 when H < 1024).
        proxyv_vision_mlp (`str`, defaults to `"residual"`):
            Form of the VisionMLP. `"residual"`: the update is added to the vision token and its output layer starts
            at zero, so an undistilled conversion passes the vision states through unchanged.
        proxyv_proxy (`str`, defaults to `"spatial"`):
            How proxies are made. `"spatial"`: bilinear downsampling of the 2-D token grid. `"learned"`: learned
            queries attend over an image's vision tokens (any number of them), and each token's VisionMLP context
            comes back through the same attention weights.
        proxyv_learned_proxies (`int`, *optional*):
            Proxies per image grid with `"learned"` (default: as many as the spatial variant makes).
        proxyv_base_model (`str`, *optional*):
            The checkpoint this model was converted from (provenance only).
        proxyv_cuda_graphs (`bool`, defaults to `True`):
            On CUDA, a single prompt's language-model prefill with images is captured in a CUDA graph the second time
            its shape is seen and replayed after that (the same computation, launched at once). `False`: always the
            eager forward.
"""


def finish_proxyv_config(config) -> None:
    """Defaults that depend on the model, then the checks (shared by the LLaVA and LLaVA-NeXT configs)."""
    if config.proxyv_start_layer is None:
        config.proxyv_start_layer = config.text_config.num_hidden_layers // 2
    if config.proxyv_vision_mlp_size is None:
        config.proxyv_vision_mlp_size = default_vision_mlp_size(config.text_config.hidden_size)
    if config.proxyv_vision_mlp not in VISION_MLP_FORMS:
        raise ValueError(f"proxyv_vision_mlp '{config.proxyv_vision_mlp}' is not one of {VISION_MLP_FORMS}")
    if config.proxyv_proxy not in PROXY_KINDS:
        raise ValueError(f"proxyv_proxy '{config.proxyv_proxy}' is not one of {PROXY_KINDS}")
    check_proxyv_settings(config, config.proxyv_start_layer, config.proxyv_reduce_factor, config.proxyv_proxy)
    if config.proxyv_learned_proxies is None:
        side = vision_grid(config)[0]
        per_side = -(-side // config.proxyv_reduce_factor)  # ceil
        config.proxyv_learned_proxies = per_side * per_side
    tokens = vision_grid(config)[1]
    learned = config.proxyv_learned_proxies
    if not isinstance(learned, int) or isinstance(learned, bool) or not 1 <= learned <= tokens:
        # proxies stand in for an image's tokens: more of them than tokens only costs memory (10**9 would exhaust it)
        raise ValueError(f"learned proxies must be between 1 and the {tokens} tokens of an image grid, got {learned}")


class ProxyVConfigMixin:
    """The ProxyV behaviour shared by the LLaVA and LLaVA-NeXT configs (each declares the `proxyv_*` fields itself:
    configs are dataclasses, whose fields come from dataclass bases only)."""

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        finish_proxyv_config(self)

    @classmethod
    def from_llava_config(cls, config, **proxyv_settings):
        """The ProxyV configuration of a source checkpoint's configuration (same family) and the ProxyV settings."""
        fields = config.to_dict()
        for key in ("model_type", "architectures", "auto_map", "transformers_version"):
            fields.pop(key, None)
        return cls(**fields, **proxyv_settings)

    @property
    def proxyv_grid(self) -> int:
        """Side of one image's (one crop's) token grid."""
        return vision_grid(self)[0]


class ProxyVLlavaConfig(ProxyVConfigMixin, LlavaConfig):
    __doc__ = "[`LlavaConfig`] plus the ProxyV settings.\n" + PROXYV_DOC

    model_type = "proxyv_llava"

    proxyv_start_layer: int | None = None
    proxyv_reduce_factor: int = 4
    proxyv_enabled: bool = True
    proxyv_vision_mlp_size: int | None = None
    proxyv_vision_mlp: str = "residual"
    proxyv_proxy: str = "spatial"
    proxyv_learned_proxies: int | None = None
    proxyv_base_model: str | None = None
    proxyv_cuda_graphs: bool = True


class ProxyVLlavaNextConfig(ProxyVConfigMixin, LlavaNextConfig):
    __doc__ = "[`LlavaNextConfig`] plus the ProxyV settings; `proxyv_reduce_factor` applies to every crop's grid.\n" + (
        PROXYV_DOC
    )

    model_type = "proxyv_llava_next"

    proxyv_start_layer: int | None = None
    proxyv_reduce_factor: int = 4
    proxyv_enabled: bool = True
    proxyv_vision_mlp_size: int | None = None
    proxyv_vision_mlp: str = "residual"
    proxyv_proxy: str = "spatial"
    proxyv_learned_proxies: int | None = None
    proxyv_base_model: str | None = None
    proxyv_cuda_graphs: bool = True




# --- LLaVA-OneVision and LLaVA-NeXT-Video (images and videos) ---------------------------------------------------------


def video_frame_grid(config) -> int:
    """Side of one video frame's token grid after the family's pooling: OneVision interpolates each frame's grid to
    ceil(side / 2) per side; LLaVA-NeXT-Video pools it with `spatial_pool_stride` (kernel = stride, so floor)."""
    side = vision_grid(config)[0]
    stride = getattr(config, "spatial_pool_stride", None)
    return -(-side // 2) if stride is None else side // stride


def check_video_settings(config) -> None:
    """The video fields of a ProxyV config: proxies for video are made over `proxyv_video_frames` neighbouring frames
    (1: per frame, the spatial baseline)."""
    frames = config.proxyv_video_frames
    if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1:
        raise ValueError(f"proxyv_video_frames must be a whole number of frames, 1 or more; got {frames!r}")
    if frames > 1 and config.proxyv_proxy != "spatial":
        raise ValueError("proxyv_video_frames > 1 (proxies across neighbouring frames) needs proxy 'spatial'")


VIDEO_DOC = r"""
        proxyv_video_frames (`int`, defaults to 1):
            Video proxies are made over this many neighbouring frames: each frame's grid is downsampled by
            `proxyv_reduce_factor` and the frames of a group are averaged in time (1: proxies per frame). A video's
            last group may hold fewer frames.
"""


class ProxyVVideoConfigMixin(ProxyVConfigMixin):
    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        check_video_settings(self)

    @property
    def proxyv_frame_grid(self) -> int:
        """Side of one video frame's token grid."""
        return video_frame_grid(self)


class ProxyVLlavaOnevisionConfig(ProxyVVideoConfigMixin, LlavaOnevisionConfig):
    __doc__ = (
        "[`LlavaOnevisionConfig`] plus the ProxyV settings; `proxyv_reduce_factor` must divide the base crop's grid "
        "(27 for SigLIP-384/14: 1, 3, 9 or 27) and applies to every grid (the unpadded high-resolution grid and video "
        "frames, rounding up).\n" + PROXYV_DOC + VIDEO_DOC
    )

    model_type = "proxyv_llava_onevision"

    proxyv_start_layer: int | None = None
    proxyv_reduce_factor: int = 3
    proxyv_enabled: bool = True
    proxyv_vision_mlp_size: int | None = None
    proxyv_vision_mlp: str = "residual"
    proxyv_proxy: str = "spatial"
    proxyv_learned_proxies: int | None = None
    proxyv_base_model: str | None = None
    proxyv_cuda_graphs: bool = True
    proxyv_video_frames: int = 1


class ProxyVLlavaNextVideoConfig(ProxyVVideoConfigMixin, LlavaNextVideoConfig):
    __doc__ = (
        "[`LlavaNextVideoConfig`] plus the ProxyV settings; `proxyv_reduce_factor` applies to every crop's grid and to "
        "every (pooled) video frame's grid.\n" + PROXYV_DOC + VIDEO_DOC
    )

    model_type = "proxyv_llava_next_video"

    proxyv_start_layer: int | None = None
    proxyv_reduce_factor: int = 4
    proxyv_enabled: bool = True
    proxyv_vision_mlp_size: int | None = None
    proxyv_vision_mlp: str = "residual"
    proxyv_proxy: str = "spatial"
    proxyv_learned_proxies: int | None = None
    proxyv_base_model: str | None = None
    proxyv_cuda_graphs: bool = True
    proxyv_video_frames: int = 1


__all__ = ["ProxyVLlavaConfig", "ProxyVLlavaNextConfig", "ProxyVLlavaNextVideoConfig", "ProxyVLlavaOnevisionConfig"]
