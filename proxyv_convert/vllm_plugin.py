"""The `vllm.general_plugins` entry point (`pip install "proxyv[vllm]"`): vLLM serves converted folders with the model
classes of `vllm_model.py`. Kept apart from them so that loading the plugin imports none of vLLM's model code."""

import logging

logger = logging.getLogger("proxyv.vllm")


def register() -> None:
    """vLLM's plugin hook: for every family with a vLLM model class (`families.Family.vllm`), its ProxyV config for
    transformers, its class and config check for vLLM, under the architecture name converted folders carry."""
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from .families import FAMILIES

    supported = set(ModelRegistry.get_supported_archs())
    for family in FAMILIES.values():
        if not family.vllm:
            continue
        try:
            AutoConfig.register(family.config.model_type, family.config)
        except ValueError:  # registered already (the hook may run more than once in a process)
            pass
        architecture = family.head.__name__  # config.json `architectures`
        if architecture not in supported:
            ModelRegistry.register_model(architecture, f"proxyv_convert.vllm_model:{family.vllm}")
        MODELS_CONFIG_MAP[architecture] = ProxyVServingConfig


class ProxyVServingConfig:
    """vLLM's per-architecture config hook: a ProxyV prompt's proxies are made from all its images in one step and
    are never cached, so every prompt is prefilled in one step (no chunked prefill) and no prefix is reused from the
    cache (no prefix caching). With `proxyv_enabled: false` vLLM's defaults stay."""

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        pass

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        model_config = vllm_config.model_config
        if not getattr(model_config.hf_config, "proxyv_enabled", True):
            return
        scheduler, cache = vllm_config.scheduler_config, vllm_config.cache_config
        changed = [name for name, on in (("chunked prefill", scheduler.enable_chunked_prefill),
                                         ("prefix caching", cache.enable_prefix_caching)) if on]
        scheduler.enable_chunked_prefill = False
        scheduler.disable_chunked_mm_input = True
        scheduler.long_prefill_token_threshold = 0
        scheduler.max_num_batched_tokens = max(scheduler.max_num_batched_tokens, model_config.max_model_len)
        # The encoder budget was derived from the old token budget: an image larger than it would wait forever.
        scheduler.max_num_encoder_input_tokens = max(scheduler.max_num_encoder_input_tokens,
                                                     scheduler.max_num_batched_tokens)
        scheduler.encoder_cache_size = max(scheduler.encoder_cache_size, scheduler.max_num_batched_tokens)
        cache.enable_prefix_caching = False
        if changed:
            logger.warning("ProxyV prefills each prompt in one step: %s turned off", " and ".join(changed))
