"""proxyv: convert LLaVA-family checkpoints into ProxyV models."""

__version__ = "0.1.0"
