"""The gating tree of a (hierarchical) mixture of experts, and its upward and downward passes.

A tree is given by ``branching = (b_1, ..., b_D)``: the root has ``b_1`` children, each of those
``b_2`` children, and so on; level ``l`` (root = 0) holds ``m_l = b_1 * ... * b_l`` nodes and the
``L = m_D`` leaves are the experts, numbered left to right. A flat mixture of ``K`` experts is the
tree ``(K,)``. Every internal node has a softmax gate over its children.

Shapes (``n`` samples): ``log_gates[l]`` is ``(n, m_l, b_{l+1})``, the log-probability that node
``j`` of level ``l`` routes a sample to each child; ``log_leaf`` is ``(n, L)``, the log-density of
``y`` under each expert. Everything is in log space (Jordan & Jacobs 1994, section 4).
"""

from __future__ import annotations

import numpy as np

from ._logsumexp import logsumexp


def level_sizes(branching: tuple[int, ...]) -> list[int]:
    """``[m_0, ..., m_D]``: number of nodes on each level, root first, leaves last."""
    sizes = [1]
    for b in branching:
        sizes.append(sizes[-1] * b)
    return sizes


def upward(log_gates: list[np.ndarray], log_leaf: np.ndarray) -> list[np.ndarray]:
    """Node likelihoods, leaves up: ``log_lik[l]`` is ``(n, m_l)`` = log P(y | x, reached node).

    ``log_lik[0][:, 0]`` is the log-likelihood of each sample under the whole mixture.
    """
    n = log_leaf.shape[0]
    log_lik = [log_leaf]
    for lg in reversed(log_gates):
        m, b = lg.shape[1], lg.shape[2]
        log_lik.append(logsumexp(lg + log_lik[-1].reshape(n, m, b), axis=2))
    return log_lik[::-1]


def downward(log_gates: list[np.ndarray], log_lik: list[np.ndarray]) -> list[np.ndarray]:
    """Node posteriors, root down: ``log_post[l]`` is ``(n, m_l)`` = log P(path through node | x, y).

    A child's posterior is its parent's times ``g_child * L_child / L_parent``; ``log_post[-1]`` are
    the expert responsibilities, and the children of any node sum to that node.
    """
    n = log_lik[0].shape[0]
    log_post = [np.zeros((n, 1))]
    for l, lg in enumerate(log_gates):
        m, b = lg.shape[1], lg.shape[2]
        child = log_post[l][:, :, None] + lg + log_lik[l + 1].reshape(n, m, b) - log_lik[l][:, :, None]
        log_post.append(child.reshape(n, m * b))
    return log_post


def path_log_prob(log_gates: list[np.ndarray]) -> np.ndarray:
    """``(n, L)``: log of the product of gate probabilities along the root-to-leaf path."""
    n = log_gates[0].shape[0]
    lp = np.zeros((n, 1))
    for lg in log_gates:
        lp = (lp[:, :, None] + lg).reshape(n, -1)
    return lp


def aggregate(leaf_post: np.ndarray, branching: tuple[int, ...]) -> list[np.ndarray]:
    """Posteriors of every level from leaf posteriors ``(n, L)`` by summing over subtrees."""
    n, L = leaf_post.shape
    return [leaf_post.reshape(n, m, L // m).sum(axis=2) for m in level_sizes(branching)]
