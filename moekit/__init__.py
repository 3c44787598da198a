"""moekit: Mixture-of-Experts for PyTorch and scikit-learn."""

__version__ = "0.1.0"
