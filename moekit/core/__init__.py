"""The sparse MoE layer and its pieces, in the order data flows through them."""

from moekit.core.config import ACTIVATIONS, BACKENDS, ROUTERS, MoEConfig
from moekit.core.dispatch import Dispatcher, DispatchMeta, capacity_keep_mask
from moekit.core.experts import Experts, SharedExpert
from moekit.core.losses import BalanceStats, cv_squared, load_balancing_loss, z_loss
from moekit.core.moe import MoE
from moekit.core.router import ROUTER_CLASSES, Router, build_router
from moekit.core.types import MoEOutput, RouterOutput, RoutingInfo

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "ROUTERS",
    "ROUTER_CLASSES",
    "BalanceStats",
    "DispatchMeta",
    "Dispatcher",
    "Experts",
    "MoE",
    "MoEConfig",
    "MoEOutput",
    "Router",
    "RouterOutput",
    "RoutingInfo",
    "SharedExpert",
    "build_router",
    "capacity_keep_mask",
    "cv_squared",
    "load_balancing_loss",
    "z_loss",
]
