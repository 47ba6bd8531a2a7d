"""Output formats. Adding one: see formats/README.md. Registration is one import line each."""

from qtool.registry import Registry

FORMATS: Registry = Registry("format")

from qtool.formats import compressed_tensors, safetensors_plain  # noqa: E402,F401
from qtool.formats.gguf import writer as gguf_writer  # noqa: E402,F401
from qtool.formats import gptq  # noqa: E402,F401
from qtool.formats import awq, autoround  # noqa: E402,F401
from qtool.formats import bitsandbytes, torchao, fp8, eetq  # noqa: E402,F401
from qtool.formats import hqq  # noqa: E402,F401
from qtool.formats import quanto  # noqa: E402,F401
from qtool.formats import quark  # noqa: E402,F401
from qtool.formats import aqlm  # noqa: E402,F401
