"""swapd: one OpenAI endpoint that starts, swaps and evicts inference engines."""

__version__ = "0.1.0"
