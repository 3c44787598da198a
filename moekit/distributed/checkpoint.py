"""Expert-sharded checkpoints: save from ``N`` EP ranks, load into ``M`` ranks (``M = 1`` included).

Layout of a checkpoint directory (safetensors only, every file written atomically)::

    model-replicated.safetensors              router, attention, norms, embeddings ... (rank 0)
    model-experts-00000-of-0000N.safetensors  experts [0, E/N) of every MoE layer (EP rank 0)
    ...
    model-experts-0000{N-1}-of-0000N.safetensors
    sharding.json                             written last: format, ep_size, expert params with their E

Expert tensors keep their full names (``model.layers.3.mlp.experts.gate_up_proj``) and are split along
dim 0 (the expert dimension). Loading reads only the slices a rank needs (``safe_open(...).get_slice``),
so re-sharding never materialises the full model on one rank unless ``M = 1``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from moekit.distributed.groups import ParallelGroups, single_process_groups

FORMAT = "moekit-expert-sharded"
INDEX = "sharding.json"
REPLICATED = "model-replicated.safetensors"


def expert_file(shard: int, num_shards: int) -> str:
    return f"model-experts-{shard:05d}-of-{num_shards:05d}.safetensors"


def expert_param_names(model: nn.Module) -> dict[str, int]:
    """Names of the stacked expert tensors of every ``moekit.MoE`` in ``model`` -> global ``E``.

    Works for a plain model and for one whose experts were sharded by ``parallelize_moe`` (the
    global ``E`` comes from the layer's config either way).
    """
    from moekit.core.moe import MoE

    names: dict[str, int] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, MoE):
            head = f"{prefix}.experts." if prefix else "experts."
            for pname, _ in module.experts.named_parameters():
                names[head + pname] = module.config.num_experts
    return names


def _save_atomic(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _barrier(groups: ParallelGroups) -> None:
    if groups.world_size > 1:
        dist.barrier()


def save_sharded(
    model: nn.Module, directory: str | os.PathLike, groups: ParallelGroups | None = None
) -> Path:
    """Save ``model`` as an expert-sharded checkpoint; a collective call under torch.distributed.

    EP ranks of the first EP group (global ranks ``0..P-1``) each write their expert shard; rank 0
    writes the replicated tensors and, after every shard is on disk, ``sharding.json``.
    """
    groups = groups or single_process_groups()
    out = Path(directory)
    state = model.state_dict()
    experts = expert_param_names(model)
    if groups.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    _barrier(groups)
    meta = {"format": FORMAT, "ep_size": str(groups.ep_size)}
    if groups.rank < groups.ep_size:  # the first EP group holds one copy of every expert
        shard = {k: v for k, v in state.items() if k in experts}
        _save_atomic(shard, out / expert_file(groups.ep_rank, groups.ep_size), meta)
    if groups.rank == 0:
        _save_atomic({k: v for k, v in state.items() if k not in experts}, out / REPLICATED, meta)
    _barrier(groups)
    if groups.rank == 0:
        index = {"format": FORMAT, "version": 1, "ep_size": groups.ep_size, "expert_params": experts}
        tmp = out / f"{INDEX}.tmp{os.getpid()}"
        tmp.write_text(json.dumps(index, indent=1, sort_keys=True))
        os.replace(tmp, out / INDEX)
    _barrier(groups)
    return out


def read_index(directory: str | os.PathLike) -> dict:
    """The ``sharding.json`` of a checkpoint; ``ValueError`` when ``directory`` is not one."""
    path = Path(directory) / INDEX
    if not path.is_file():
        raise ValueError(f"{directory} is not an expert-sharded moekit checkpoint (no {INDEX})")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{path}: format is {index.get('format')!r}, expected {FORMAT!r}")
    return index


def _read_expert_rows(
    directory: Path, name: str, saved_shards: int, num_experts: int, lo: int, hi: int
) -> Tensor:
    """Rows ``[lo, hi)`` (global expert ids) of expert tensor ``name`` from the saved shard files."""
    per_file = num_experts // saved_shards
    pieces = []
    for shard in range(lo // per_file, (hi - 1) // per_file + 1):
        a, b = max(lo, shard * per_file), min(hi, (shard + 1) * per_file)
        with safe_open(str(directory / expert_file(shard, saved_shards)), framework="pt") as f:
            pieces.append(f.get_slice(name)[a - shard * per_file : b - shard * per_file])
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def load_sharded(
    model: nn.Module, directory: str | os.PathLike, groups: ParallelGroups | None = None, strict: bool = True
) -> None:
    """Load an expert-sharded checkpoint saved with any EP size into ``model`` on this rank.

    ``model`` is either a plain model (``groups`` ``None``: every expert is loaded) or one sharded by
    ``parallelize_moe`` with ``groups`` (this rank's ``E / ep_size`` experts are loaded).

    Raises:
        ValueError: not a checkpoint, or an expert tensor whose ``E`` is not divisible by ``ep_size``.
    """
    groups = groups or single_process_groups()
    directory = Path(directory)
    index = read_index(directory)
    saved_shards = int(index["ep_size"])
    saved_experts: dict[str, int] = index["expert_params"]
    mine = expert_param_names(model)
    if set(mine) != set(saved_experts):
        raise ValueError(
            f"expert tensors differ between the model and {directory}: "
            f"missing {sorted(set(saved_experts) - set(mine))[:4]}, "
            f"unexpected {sorted(set(mine) - set(saved_experts))[:4]}"
        )
    state: dict[str, Tensor] = {}
    with safe_open(str(directory / REPLICATED), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            state[key] = f.get_tensor(key)
    for name, num_experts in saved_experts.items():
        if num_experts % groups.ep_size:
            raise ValueError(
                f"{name}: num_experts={num_experts} is not divisible by ep_size={groups.ep_size}"
            )
        per_rank = num_experts // groups.ep_size
        lo = groups.ep_rank * per_rank
        state[name] = _read_expert_rows(directory, name, saved_shards, num_experts, lo, lo + per_rank)
    model.load_state_dict(state, strict=strict)
