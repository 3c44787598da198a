"""Find, validate, read and write safetensors checkpoints (single file, sharded + index, Mistral's).

Reading never unpickles anything: a directory that holds only ``*.bin`` / ``*.pt`` / ``*.pth`` weights is
refused with the command that converts it. Every file's header is parsed and checked against the
file's size before a tensor is read, so a truncated or corrupt file is reported by name up front.
Tensors are then read lazily through ``safetensors.safe_open`` (mmap: a tensor costs no RAM until its
pages are touched).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_DTYPE_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                 "U8": torch.uint8, "BOOL": torch.bool}
_MAX_HEADER = 100 * 1024 * 1024
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or in a refused format."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, safetensors dtype string, shape and byte offset in the file."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return _TORCH_DTYPES.get(self.dtype)

    @property
    def nbytes(self) -> int:
        n = _DTYPE_SIZE[self.dtype]
        for s in self.shape:
            n *= s
        return n


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one ``.safetensors`` header against the file's size.

    Raises :class:`CheckpointError` naming the file when it is missing, shorter than its header says
    (truncated download), or its header is not valid safetensors JSON.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors header (says {n} bytes, file is {size})"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    infos: dict[str, TensorInfo] = {}
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, (begin, stop) = entry["dtype"], entry["data_offsets"]
            shape = tuple(int(s) for s in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
        info = TensorInfo(path, dtype, shape, 8 + n + int(begin))
        if dtype not in _DTYPE_SIZE or stop - begin != info.nbytes or begin < 0:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name!r}")
        infos[name] = info
        end = max(end, stop)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated: tensors need {8 + n + end} bytes, the file has {size} (re-download it)"
        )
    return infos


def _refuse_pickle(root: Path, layout: str) -> None:
    pickled = sorted(p.name for p in root.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickled:
        if layout == "mistral":  # transformers cannot read this layout: convert each file on its own
            how = ("`python -c \"import torch; from safetensors.torch import save_file; "
                   f"save_file({{k: v.contiguous() for k, v in torch.load('{root / pickled[0]}', "
                   f"weights_only=True).items()}}, '{root / Path(pickled[0]).stem}.safetensors')\"` "
                   "(each file to consolidated*.safetensors)")
        else:
            how = ("`python -c \"from transformers import AutoModelForCausalLM as M; "
                   f"M.from_pretrained('{root}').save_pretrained('OUT_DIR')\"` (writes safetensors), "
                   "or use the Hugging Face 'convert to safetensors' Space")
        raise CheckpointError(
            f"{root}: only pickle weights found ({', '.join(pickled[:3])}); moekit never unpickles files "
            "(loading a pickle can run arbitrary code). Convert them once, in an environment you trust, "
            f"e.g. {how}"
        )
    raise CheckpointError(
        f"{root}: no {SINGLE_NAME}, {INDEX_NAME} or consolidated*.safetensors found"
    )


def _from_index(root: Path) -> dict[str, TensorInfo]:
    index_path = root / INDEX_NAME
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: corrupt index ({type(e).__name__}: {e})") from None
    infos: dict[str, TensorInfo] = {}
    headers: dict[str, dict[str, TensorInfo]] = {}
    for name, shard in weight_map.items():
        if shard not in headers:
            if not (root / shard).is_file():
                raise CheckpointError(
                    f"{root / shard}: shard listed in {INDEX_NAME} is missing (tensor {name!r})"
                )
            headers[shard] = read_header(root / shard)
        if name not in headers[shard]:
            raise CheckpointError(
                f"{root / shard}: tensor {name!r} listed in {INDEX_NAME} is not in this shard"
            )
        infos[name] = headers[shard][name]
    return infos


def _from_files(files: Iterable[Path]) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    for path in files:
        for name, info in read_header(path).items():
            if name in infos:
                raise CheckpointError(f"tensor {name!r} is in both {infos[name].file} and {path}")
            infos[name] = info
    return infos


def find_tensors(root: Path, layout: str) -> dict[str, TensorInfo]:
    """All tensors of the checkpoint in directory ``root``, validated.

    ``layout`` is ``"hf"`` (``model.safetensors`` or the index + shards) or ``"mistral"``
    (``consolidated*.safetensors``).
    """
    if layout == "mistral":
        files = sorted(root.glob("consolidated*.safetensors"))
        if not files:
            _refuse_pickle(root, layout)
        return _from_files(files)
    if (root / INDEX_NAME).is_file():
        return _from_index(root)
    if (root / SINGLE_NAME).is_file():
        return read_header(root / SINGLE_NAME)
    _refuse_pickle(root, layout)
    raise AssertionError("unreachable")


class TensorReader:
    """Reads tensors by name from the files in a ``{name: TensorInfo}`` map.

    ``reader(name)`` is a zero-copy mmap view (``safe_open``): right for tensors kept as they are.
    ``reader.read_into(name, out)`` reads the bytes straight into ``out`` with plain file reads, for
    tensors that are converted anyway (stacked experts, dtype / device changes): the mapped source
    pages would otherwise stay resident next to the converted copy until the file is closed.
    """

    def __init__(self, infos: dict[str, TensorInfo]) -> None:
        self.infos = infos
        self._handles: dict[Path, object] = {}
        self._files: dict[Path, Any] = {}

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Copy tensor ``name`` into ``out`` (same shape; any dtype / device: converted on the way)."""
        info = self.infos[name]
        src_dtype = info.torch_dtype
        if tuple(out.shape) != info.shape or src_dtype is None:
            out.copy_(self(name))
            return
        if info.nbytes == 0:
            return
        direct = out.device.type == "cpu" and out.dtype == src_dtype and out.is_contiguous()
        buf = out if direct else torch.empty(info.shape, dtype=src_dtype)
        f = self._files.get(info.file)
        if f is None:
            f = self._files[info.file] = open(info.file, "rb")  # noqa: SIM115 - closed in close()
        f.seek(info.offset)
        view = memoryview(buf.view(-1).view(torch.uint8).numpy())
        if f.readinto(view) != info.nbytes:
            raise CheckpointError(f"{info.file}: truncated while reading tensor {name!r}")
        if not direct:
            out.copy_(buf)

    def read(self, name: str) -> torch.Tensor:
        """A fresh (not file-backed) copy of tensor ``name``."""
        info = self.infos[name]
        if info.torch_dtype is None:
            return self(name).clone()
        out = torch.empty(info.shape, dtype=info.torch_dtype)
        self.read_into(name, out)
        return out

    def __call__(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        handle = self._handles.get(info.file)
        try:
            if handle is None:
                handle = self._handles[info.file] = safe_open(str(info.file), framework="pt")
            return handle.get_tensor(name)  # type: ignore[attr-defined]
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{info.file}: cannot read tensor {name!r}: {e}") from e

    def close(self) -> None:
        self._handles.clear()
        for f in self._files.values():
            f.close()
        self._files.clear()


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; ValueError naming the file when it is not valid JSON or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def parse_size(size: int | str) -> int:
    """Bytes of ``5GB`` / ``500MB`` / ``20KB`` / ``1GiB``, an int or its digits (``"10000"``)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise ValueError(f"max_shard_size must be >= 1 byte, got {size}")
        return size
    if not isinstance(size, str):
        raise TypeError(f"max_shard_size must be an int or a string like '5GB', got {size!r}")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    text = size.strip().upper()
    if text.isdigit():  # a bare byte count, as transformers accepts
        return parse_size(int(text))
    for unit, mult in units.items():
        if text.endswith(unit):
            try:
                return parse_size(int(float(text[: -len(unit)]) * mult))
            except ValueError:
                break
    raise ValueError(f"max_shard_size must look like '5GB', '500MB', '20KB', '1GiB' or a byte count, "
                     f"got {size!r}")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")  # tokenizer.json holds non-ASCII text, whatever the locale
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_sharded(
    tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: Path,
    max_shard_size: int | str = "5GB",
    prefix: str = "model",
    index: bool = True,
) -> list[Path]:
    """Write tensors as ``{prefix}.safetensors`` or ``{prefix}-0000k-of-0000n.safetensors`` shards.

    Shards are filled greedily in order up to ``max_shard_size`` (a tensor larger than that gets a shard
    of its own), as transformers does; with more than one shard and ``index``, ``{prefix}.safetensors.
    index.json`` lists where each tensor is. Each file is written to a temporary name and renamed, and
    stale files of an earlier save with the same prefix are removed afterwards. Returns the files.
    """
    limit = parse_size(max_shard_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f".tmp{os.getpid()}"
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        tmp = out_dir / f".{prefix}-part{len(written):05d}{tag}"
        save_file(shard, str(tmp), metadata={"format": "pt"})
        written.append((tmp, list(shard)))

    try:
        for name, t in tensors:
            nbytes = t.numel() * t.element_size()
            if shard and size + nbytes > limit:
                flush()
                shard, size = {}, 0
            # one shard at a time is brought to CPU (a GPU model never needs a full CPU copy)
            shard[name] = t.detach().to("cpu").contiguous()
            size += nbytes
            total += nbytes
        flush()
        shard = {}
        n = len(written)
        names = [f"{prefix}.safetensors"] if n == 1 else [
            f"{prefix}-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)
        ]
        for (tmp, _), fname in zip(written, names):
            os.replace(tmp, out_dir / fname)
    finally:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
    index_path = out_dir / f"{prefix}.safetensors.index.json"
    if n > 1 and index:
        weight_map = {name: fname for (_, keys), fname in zip(written, names) for name in keys}
        body = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_text(index_path, json.dumps(body, indent=2) + "\n")
    elif index_path.exists():
        index_path.unlink()
    keep = set(names)
    for stale in out_dir.glob(f"{prefix}*.safetensors"):
        if stale.name not in keep and (stale.name == f"{prefix}.safetensors" or "-of-" in stale.name):
            stale.unlink()
    return [out_dir / f for f in names]
