"""The ProxyV model code that is copied into every converted checkpoint (self-contained: stdlib, torch, transformers)."""
