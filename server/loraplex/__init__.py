"""loraplex: multi-tenant LoRA adapter serving."""

__version__ = "0.1.0"
