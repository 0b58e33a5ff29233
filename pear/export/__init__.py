"""Output formats beyond the Hugging Face folder: a GGUF file for llama.cpp / Ollama / LM Studio,
and a PEFT IA3 adapter that switches the re-weighting on and off at run time.

Both exporters work from one description of the change: per layer, a vector of scales for
the *input channels* of the attention output projection, shape ``(H * D,)``
(`channel_scales` builds it from the coefficients: a per-head coefficient repeated over
head_dim, a per-channel one, `--scales channels`, as it is).
"""

from .scales import FORMATS, ChannelScaling, channel_scales, check_channel_scales

__all__ = ["FORMATS", "ChannelScaling", "channel_scales", "check_channel_scales"]
