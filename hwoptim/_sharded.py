"""Sharded checkpoints: model, optimizer and wrapper state through torch.distributed.checkpoint.

``save`` writes one DCP checkpoint: ``"model"`` and ``"optim"`` from torch's
``get_state_dict`` (each rank its shards), ``"hwoptim"`` the wrapper's state (counters,
loss scaler, skip counts; inside a window with ``save_partial_grads``, the window's
gradients and item counts), then one checksum file per rank. Under FSDP2 the window's
unsharded gradients are first reduce-scattered into the sharded ``.grad`` (one collective,
only at a checkpoint) so that they can be saved as shards. ``load`` checks the checksums,
the wrapper's part and every key, loads into fresh buffers and only then applies.
docs/checkpoints.md ("Sharded checkpoints with DCP") is the user's account.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hwoptim import _checkpoint
from hwoptim._numbers import check_int
from hwoptim._precision import NoScaling
from hwoptim._skips import SkipCounter
from hwoptim._torch_compat import fsdp2_unreduced_grads
from hwoptim._window import AccumulationWindow
from hwoptim.backends.base import unwrap_compiled
from hwoptim.num_items import ItemWindow

__all__ = ["load", "reduce_partial_grads", "save"]

#: the layout version written under "hwoptim.format"
FORMAT = 1
_KEY = "hwoptim"
_CHECKSUMS = ".hwoptim-crc32.rank{}.json"
_CHUNK = 1 << 24


def _dist(group: Any = None) -> tuple[int, int]:
    """(rank, world size) in ``group`` (None: the default one); (0, 1) outside torch.distributed."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _module(model: Any) -> torch.nn.Module:
    root = unwrap_compiled(model)
    if not isinstance(root, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (FSDP2, DDP or plain); got {type(model).__name__}")
    return root


def reduce_partial_grads(model: torch.nn.Module) -> int:
    """Reduce-scatter FSDP2's unreduced window gradients into the sharded ``.grad``.

    The same sum FSDP2 makes at the window's end (divided by its divide factor), for the
    micro-batches so far; FSDP2 adds the rest onto it there. Returns how many gradients
    were reduced. A collective: every rank calls it at the same point.
    """
    from torch.distributed.tensor import DTensor, Partial

    found = fsdp2_unreduced_grads(model)
    with torch.no_grad():
        for sharded, grad, factor, drop in found:
            if isinstance(grad, DTensor) or not isinstance(sharded, DTensor):
                raise ValueError(
                    "a checkpoint inside an accumulation window supports FSDP2 and HSDP, not "
                    "FSDP2 over tensor-parallel parameters; checkpoint at the end of a window"
                )
            mesh, placements = sharded.device_mesh, sharded.placements
            partial = DTensor.from_local(grad, mesh, [Partial()] * mesh.ndim, run_check=False)
            local = partial.redistribute(mesh, placements).to_local()
            local = (local / (mesh.size() if factor is None else factor)).to(sharded.dtype)
            if sharded.grad is None:
                sharded.grad = DTensor.from_local(
                    local, mesh, placements, run_check=False, shape=sharded.shape, stride=sharded.stride()
                )
            else:
                sharded.grad.to_local().add_(local)  # type: ignore[attr-defined]
            drop()
    return len(found)


def _keeps_fsdp1_grads(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def _names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}


def _wrapper_state(
    model: torch.nn.Module,
    window: AccumulationWindow,
    items: ItemWindow,
    precision: NoScaling,
    skips: SkipCounter,
    params: list[Tensor],
    partial_grads: bool,
    group: Any,
) -> dict[str, Any]:
    """The "hwoptim" entry: numbers and strings, and tensors only for the window."""
    from torch.distributed.tensor import DTensor

    rank, world = _dist(group)
    mid_window = not window.should_update()
    skipped, zeroed = skips.counts()
    state: dict[str, Any] = {
        "format": FORMAT, "world_size": world, "mid_window": mid_window,
        **window.state(), "skipped_steps": skipped, "zeroed_steps": zeroed,
    }
    scaler = precision.state_dict()
    if scaler is not None:
        state["loss_scaler"] = dict(scaler)
    if not (mid_window and partial_grads):
        return state
    state["partial"] = True
    names = _names(model)
    shared: dict[str, Tensor] = {}
    own: dict[str, Any] = {}
    for param in params:
        if param.grad is None:
            continue
        name = names.get(id(param))
        if name is None:
            raise ValueError(
                f"an optimizer parameter of shape {tuple(param.shape)} is not a parameter of the "
                "model given: pass the model the optimizer was built for"
            )
        (shared if isinstance(param.grad, DTensor) else own)[name] = param.grad.detach()
    state["grads"] = shared
    rank_state: dict[str, Any] = {"grads": own}
    window_items = items.saved()
    if window_items is not None:
        rank_state["items"] = window_items
    state[f"rank{rank}"] = rank_state
    return state


def save(
    checkpoint_id: Any,
    model: Any,
    optimizer: torch.optim.Optimizer,
    window: AccumulationWindow,
    items: ItemWindow,
    precision: NoScaling,
    skips: SkipCounter,
    params: list[Tensor],
    *,
    partial_grads: bool,
    async_save: bool,
    process_group: Any,
) -> Future[None] | None:
    """Save model, optimizer and wrapper state with ``dcp.save`` (or ``dcp.async_save``)."""
    from torch.distributed.checkpoint import state_dict_saver
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = _module(model)
    path = Path(checkpoint_id)
    if partial_grads and not window.should_update():
        if _keeps_fsdp1_grads(root):
            raise ValueError(
                "a checkpoint inside an accumulation window supports FSDP2 (fully_shard), not "
                "FSDP1 (FullyShardedDataParallel); checkpoint at the end of a window"
            )
        reduce_partial_grads(root)
    model_state, optim_state = get_state_dict(root, optimizer)
    state = {
        "model": model_state,
        "optim": optim_state,
        _KEY: _wrapper_state(root, window, items, precision, skips, params, partial_grads, process_group),
    }
    rank = _dist(process_group)[0]
    if not async_save:
        state_dict_saver.save(state, checkpoint_id=path, process_group=process_group)
        _write_checksums(path, rank)
        if _dist(process_group)[1] > 1:  # complete on every rank when this returns
            torch.distributed.barrier(group=process_group)
        return None
    if process_group is None:
        process_group = _background_group()
    pending = state_dict_saver.async_save(state, checkpoint_id=path, process_group=process_group)
    done: Future[None] = Future()

    def finish(saved: Any) -> None:
        try:
            saved.result()
            _write_checksums(path, rank)
        except BaseException as exc:  # handed to whoever waits on the future
            done.set_exception(exc)
        else:
            done.set_result(None)

    pending.add_done_callback(finish)  # type: ignore[union-attr]
    return done


#: (the default group it was made for, a gloo group of the same ranks for async_save)
_background: list[Any] = [None, None]


def _background_group() -> Any:
    """A gloo group of all ranks for ``dcp.async_save``'s background collectives, made once
    per default group (a collective itself): on the training's group they would interleave
    with FSDP's collectives of the next micro-batches."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.group.WORLD
    if _background[0] is not world:
        _background[:] = [world, dist.new_group(backend="gloo")]
    return _background[1]


# -- checksums -----------------------------------------------------------------------------


def _crc(path: Path) -> tuple[int, int]:
    crc = 0
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return path.stat().st_size, crc


def _write_checksums(path: Path, rank: int) -> None:
    """Write the size and CRC-32 of the files this rank wrote (rank 0: the metadata too).

    FileSystemWriter names a rank's files ``__<rank>_<n>.distcp``."""
    files = sorted(path.glob(f"__{rank}_*.distcp"))
    if rank == 0:
        files.append(path / ".metadata")
    sums = {f.name: _crc(f) for f in files}
    (path / _CHECKSUMS.format(rank)).write_text(json.dumps(sums))


def _verify(path: Path, group: Any) -> None:
    """Check every file against its checksum, the ranks sharing the work; raise on every
    rank if any is missing, truncated or changed."""
    rank, world = _dist(group)
    listed: dict[str, Any] = {}
    for sums in sorted(path.glob(_CHECKSUMS.format("*"))):
        listed.update(json.loads(sums.read_text()))
    bad: list[str] = []
    if not listed:
        bad.append("it has no checksum files (.hwoptim-crc32.rank*.json): its save did not finish")
    on_disk = {f.name for f in path.glob("*.distcp")}
    bad += [f"{name} is not listed in its checksums" for name in sorted(on_disk - set(listed))]
    for i, (name, (size, crc)) in enumerate(sorted(listed.items())):
        if i % world != rank:
            continue
        file = path / name
        if not file.exists():
            bad.append(f"{name} is missing")
            continue
        got_size, got_crc = _crc(file)
        if got_size != size:
            bad.append(f"{name} has {got_size} bytes, {size} were written (truncated?)")
        elif got_crc != crc:
            bad.append(f"{name} has CRC-32 {got_crc:#010x}, {crc:#010x} was written (corrupted)")
    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, bad, group=group)
        bad = sorted({b for found in gathered for b in found})
    if bad:
        raise ValueError(f"the sharded checkpoint {str(path)!r} is damaged: {'; '.join(bad)}; nothing was loaded")


# -- loading -------------------------------------------------------------------------------


def _flat_keys(value: Any, prefix: str) -> list[str]:
    """The keys DCP flattens the tensors of nested dicts to."""
    if isinstance(value, Mapping):
        return [k for name, v in value.items() for k in _flat_keys(v, f"{prefix}.{name}")]
    return [prefix] if isinstance(value, Tensor) else []


def _empty_like(value: Any) -> Any:
    """``value`` with fresh tensors of the same layout (DTensors keep their sharding)."""
    if isinstance(value, Mapping):
        return {k: _empty_like(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_empty_like(v) for v in value]
    if isinstance(value, Tensor):
        return torch.empty_like(value)
    return value


def _unflatten(flat: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The "hwoptim" entry back from DCP's flat keys (only its own names hold dots: the
    parameters' names under "grads", kept whole)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key[len(prefix) + 1:].split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            if part == "grads":
                node.setdefault("grads", {})[".".join(parts[i + 1:])] = value
                break
            node = node.setdefault(part, {})
        else:
            node[parts[-1]] = value
    return out


def _read_wrapper_state(path: Path, metadata: Any, group: Any) -> dict[str, Any]:
    """Load the small part of "hwoptim": everything but the gradients."""
    from torch.distributed.checkpoint import state_dict_loader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    rank = _dist(group)[0]
    prefix = f"{_KEY}."
    template: dict[str, Any] = {}
    for key, meta in metadata.state_dict_metadata.items():
        if not key.startswith(prefix) or ".grads." in key:
            continue
        if key.startswith(f"{prefix}rank") and not key.startswith(f"{prefix}rank{rank}."):
            continue
        if isinstance(meta, TensorStorageMetadata):
            template[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
        else:
            template[key] = None
    state_dict_loader.load(template, checkpoint_id=path, process_group=group)
    return _unflatten(template, _KEY)


def _check_wrapper_state(saved: dict[str, Any], path: Path, window: AccumulationWindow, group: Any) -> None:
    fmt = saved.get("format")
    if fmt != FORMAT:
        raise ValueError(
            f"the sharded checkpoint {str(path)!r} has hwoptim format {fmt!r}; this hwoptim reads {FORMAT}"
        )
    world = check_int(saved.get("world_size"), f"{_KEY}.world_size", 1)
    acc = check_int(saved.get("accumulative_counts"), f"{_KEY}.accumulative_counts", 1)
    if not saved.get("partial"):  # counters only: resumes as state_dict() does, with its warnings
        return
    inner = saved.get("inner_count")
    if acc != window.acc:
        raise ValueError(
            f"the sharded checkpoint {str(path)!r} was taken inside a window of accumulative_counts="
            f"{acc} (after micro-batch {inner}); this wrapper uses {window.acc}, so the window "
            "cannot be finished: resume with the same accumulative_counts, or checkpoint at the "
            "end of a window to change it; nothing was loaded"
        )
    here = _dist(group)[1]
    if world != here:
        raise ValueError(
            f"the sharded checkpoint {str(path)!r} was taken inside an accumulation window on {world} "
            f"rank(s); this run has {here}: the window's partial gradients and item counts belong "
            f"to those ranks' data. Resume it on {world} ranks, or checkpoint at the end of a "
            "window to change the number of ranks; nothing was loaded"
        )


def load(
    checkpoint_id: Any,
    model: Any,
    optimizer: torch.optim.Optimizer,
    window: AccumulationWindow,
    items: ItemWindow,
    precision: NoScaling,
    skips: SkipCounter,
    params: list[Tensor],
    *,
    process_group: Any,
) -> None:
    """Check the checkpoint, load it into fresh buffers, then apply it all."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    root = _module(model)
    path = Path(checkpoint_id)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a sharded checkpoint: it has no .metadata file")
    metadata = FileSystemReader(path).read_metadata()
    keys = metadata.state_dict_metadata
    if f"{_KEY}.format" not in keys:
        raise ValueError(
            f"the DCP checkpoint {str(path)!r} holds no hwoptim state (no {_KEY!r} entry): it was "
            "not saved by save_sharded; nothing was loaded"
        )
    _verify(path, process_group)
    saved = _read_wrapper_state(path, metadata, process_group)
    _check_wrapper_state(saved, path, window, process_group)
    counters = window.check_saved(saved)
    scaler_state = precision.check_saved(saved.get("loss_scaler"))
    skipped = check_int(saved.get("skipped_steps", 0), f"{_KEY}.skipped_steps", 0)
    zeroed = check_int(saved.get("zeroed_steps", 0), f"{_KEY}.zeroed_steps", 0)
    rank = _dist(process_group)[0]
    own = saved.get(f"rank{rank}", {})
    items_window = ItemWindow.check_saved(own.get("items"), f"{_KEY}.rank{rank}.items")

    fresh_optimizer = not optimizer.state
    try:
        template, grads = _read_all(path, keys, root, optimizer, params, saved, rank, process_group)
    except BaseException:
        if fresh_optimizer:  # get_state_dict made its state (a step with lr 0): undo it
            optimizer.state.clear()
        raise

    # Everything is read and checked: apply.
    set_model_state_dict(root, template["model"])
    set_optimizer_state_dict(root, optimizer, template["optim"])
    if not template["optim"]["state"]:
        optimizer.state.clear()
    for _, _, _, drop in fsdp2_unreduced_grads(root):  # a rollback: the live window goes
        drop()
    plan = _checkpoint.LoadPlan(
        optimizer_state={}, counters=counters, grads=grads, items_window=items_window, scaler_state=scaler_state
    )
    _checkpoint.apply_window(plan, optimizer, window, items, precision, params)
    skips.load(skipped, zeroed, params[0].device if params else None)


def _read_all(
    path: Path, keys: Mapping[str, Any], root: torch.nn.Module, optimizer: torch.optim.Optimizer,
    params: list[Tensor], saved: dict[str, Any], rank: int, process_group: Any,
) -> tuple[dict[str, Any], tuple[Tensor | None, ...] | None]:
    """Read model, optimizer and window gradients into fresh buffers: (template, grads)."""
    from torch.distributed.checkpoint import state_dict_loader
    from torch.distributed.checkpoint.state_dict import get_state_dict

    # The template: fresh buffers shaped like this run's shards; DCP reshards into them.
    model_state, optim_state = get_state_dict(root, optimizer)
    template: dict[str, Any] = {"model": _empty_like(model_state), "optim": _empty_like(optim_state)}
    if not any(k.startswith("optim.state.") for k in keys):  # saved before the first step
        template["optim"]["state"] = {}
    missing = [k for k in _flat_keys(template, "")[:] if k[1:] not in keys]
    if missing:
        shown = ", ".join(k[1:] for k in missing[:5])
        raise ValueError(
            f"the sharded checkpoint {str(path)!r} lacks {len(missing)} entr(ies) of this model and "
            f"optimizer ({shown}{', ...' if len(missing) > 5 else ''}): it was saved for another "
            "model or optimizer; nothing was loaded"
        )
    grads: tuple[Tensor | None, ...] | None = None
    if saved.get("partial"):
        by_name = dict(root.named_parameters(remove_duplicate=False))
        wanted: dict[str, Tensor] = {}
        for key in keys:
            for prefix in (f"{_KEY}.grads.", f"{_KEY}.rank{rank}.grads."):
                if key.startswith(prefix):
                    name = key[len(prefix):]
                    if name not in by_name:
                        raise ValueError(
                            f"the sharded checkpoint {str(path)!r} holds a gradient of {name!r}, "
                            "which this model does not have; nothing was loaded"
                        )
                    template[key] = torch.zeros_like(by_name[name])
                    wanted[key] = by_name[name]
    state_dict_loader.load(template, checkpoint_id=path, process_group=process_group)
    if saved.get("partial"):
        loaded = {id(param): template[key] for key, param in wanted.items()}
        grads = tuple(loaded.get(id(p)) for p in params)
    return template, grads
