"""Quantization methods. Adding one: see methods/README.md. Registration is one import line each."""

from qtool.registry import Registry

METHODS: Registry = Registry("method")

from qtool.methods import rtn  # noqa: E402,F401  (registers "rtn")
from qtool.methods import gptq  # noqa: E402,F401  (registers "gptq")
from qtool.methods import awq  # noqa: E402,F401  (registers "awq")
from qtool.methods import hqq  # noqa: E402,F401  (registers "hqq")
from qtool.methods import autoround  # noqa: E402,F401  (registers "autoround")
from qtool.methods import aqlm  # noqa: E402,F401  (registers "aqlm")
