"""knormctl: benchmark KV-cache compression (KnormPress and controls) in causal LMs."""

__version__ = "0.1.0"
