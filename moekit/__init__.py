"""moekit: Mixture-of-Experts for PyTorch and scikit-learn."""

__version__ = "0.1.0"

from moekit.core import MoE, MoEConfig, MoEOutput, RouterOutput, RoutingInfo  # noqa: E402
from moekit.hf import HFTokenizer, from_pretrained, load_tokenizer  # noqa: E402
from moekit.inference import generate, generate_text  # noqa: E402
from moekit.models import PRESETS, ModelConfig, MoEForCausalLM, get_preset  # noqa: E402

__all__ = ["MoE", "MoEConfig", "MoEOutput", "RouterOutput", "RoutingInfo", "__version__"]
__all__ += ["HFTokenizer", "from_pretrained", "load_tokenizer"]
__all__ += ["PRESETS", "ModelConfig", "MoEForCausalLM", "generate", "generate_text", "get_preset"]
