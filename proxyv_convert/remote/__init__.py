"""The ProxyV model code copied into every converted checkpoint (self-contained: stdlib, torch, transformers)."""
