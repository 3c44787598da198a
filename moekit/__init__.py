"""moekit: Mixture-of-Experts for PyTorch and scikit-learn."""

__version__ = "0.1.0"

from moekit.core import MoE, MoEConfig, MoEOutput, RouterOutput, RoutingInfo  # noqa: E402

__all__ = ["MoE", "MoEConfig", "MoEOutput", "RouterOutput", "RoutingInfo", "__version__"]
