"""qtool: quantize LLM checkpoints into the formats real runtimes load."""

__version__ = "0.1.0"
