"""Decoder-only MoE language models of the Mixtral family, built on :class:`moekit.MoE`."""

from moekit.models.config import PRESETS, ModelConfig, get_preset
from moekit.models.model import CausalLMOutput, MoEForCausalLM

__all__ = ["PRESETS", "CausalLMOutput", "ModelConfig", "MoEForCausalLM", "get_preset"]
