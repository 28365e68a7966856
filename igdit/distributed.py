"""What igdit checks and uses when it runs as several processes (torchrun or SLURM's srun).

Training: Lightning owns ranks and devices; ``check_launch`` only compares the launcher's process layout
with ``trainer.devices`` / ``trainer.num_nodes`` before anything is built, so a mismatch is a one-line
error instead of a hang or a traceback from deep inside the Trainer.

`igdit data build` under torchrun: ``BuildGroup`` gives the rank and world size and a gloo process group
used only for barriers and for broadcasting small Python objects (the build plan, an error) from rank 0.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Callable, Mapping, Optional

import torch

from igdit.config import ConfigError


def device_count(devices: Any) -> Optional[int]:
    """How many devices a ``trainer.devices`` value asks for; None when Lightning decides (``auto``, -1)."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str):
        text = devices.strip()
        if "," in text:
            return len([d for d in text.split(",") if d.strip()])
        if text.lstrip("-").isdigit():
            devices = int(text)
        else:
            return None
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        return devices
    return None


def launcher_layout(env: Mapping[str, str] = os.environ) -> Optional[dict]:
    """The process layout a launcher created: {launcher, world_size, per_node, nodes}, or None when this
    process was not started by torchrun or srun (a plain `igdit fit`; Lightning then starts the processes)."""
    if "TORCHELASTIC_RUN_ID" in env and "WORLD_SIZE" in env and "LOCAL_WORLD_SIZE" in env:
        world, per_node = int(env["WORLD_SIZE"]), int(env["LOCAL_WORLD_SIZE"])
        return {"launcher": "torchrun", "world_size": world, "per_node": per_node, "nodes": world // max(per_node, 1),
                "per_node_flag": "--nproc_per_node (GPUS=)", "nodes_flag": "--nnodes (NODES=)"}
    if "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        world = int(env["SLURM_NTASKS"])
        nodes = int(env.get("SLURM_NNODES", "1"))
        per_node_text = env.get("SLURM_NTASKS_PER_NODE", "")
        per_node = int(per_node_text) if per_node_text.isdigit() else world // max(nodes, 1)
        return {"launcher": "srun", "world_size": world, "per_node": per_node, "nodes": nodes,
                "per_node_flag": "--ntasks-per-node", "nodes_flag": "--nodes"}
    return None


def check_launch(devices: Any, num_nodes: Any, env: Mapping[str, str] = os.environ) -> None:
    """Under torchrun or srun: trainer.devices must equal the processes per node and trainer.num_nodes the
    node count (so devices x num_nodes = WORLD_SIZE). One-line ConfigError naming the field otherwise."""
    layout = launcher_layout(env)
    if layout is None:
        return
    launcher, world = layout["launcher"], layout["world_size"]
    count = device_count(devices)
    if count is not None and count != layout["per_node"]:
        raise ConfigError("trainer.devices", devices, f"{launcher} started {layout['per_node']} process(es) per node "
                          f"({layout['per_node_flag']}) and WORLD_SIZE {world}; set trainer.devices to "
                          f"{layout['per_node']} so that devices x num_nodes = {world}")
    nodes = int(num_nodes) if isinstance(num_nodes, (int, str)) and str(num_nodes).isdigit() else None
    if nodes is not None and nodes != layout["nodes"]:
        raise ConfigError("trainer.num_nodes", num_nodes, f"{launcher} started {layout['nodes']} node(s) "
                          f"({layout['nodes_flag']}; WORLD_SIZE {world} = {layout['nodes']} x {layout['per_node']}); "
                          f"set trainer.num_nodes to {layout['nodes']}")


def check_device(device: str, field: str) -> None:
    """A torch device this machine has (cpu, cuda, cuda:<index> of a visible GPU), or a one-line ConfigError."""
    allowed = "expected cpu, cuda or cuda:<index> of a visible GPU"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(field, device, allowed) from None
    if parsed.type == "cuda" and (not torch.cuda.is_available()
                                  or (parsed.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(field, device, f"{allowed}; this machine has {torch.cuda.device_count()} usable GPU(s)")
    if parsed.type not in ("cpu", "cuda"):
        raise ConfigError(field, device, allowed)


def check_accelerator(accelerator: Any) -> None:
    """A GPU asked for on a machine without one: a one-line ConfigError naming ``trainer.accelerator`` (Lightning
    would stop with a traceback from inside the Trainer)."""
    name = getattr(accelerator, "class_path", accelerator)
    name = str(name).rsplit(".", 1)[-1].lower() if name is not None else "auto"
    if name in ("gpu", "cuda", "cudaaccelerator") and not torch.cuda.is_available():
        raise ConfigError("trainer.accelerator", name, "this machine has no usable CUDA GPU "
                          "(torch.cuda.is_available() is False); use cpu or auto")
    if name in ("mps", "mpsaccelerator") and not torch.backends.mps.is_available():
        raise ConfigError("trainer.accelerator", name, "this machine has no Apple MPS device; use cpu or auto")


class BuildGroup:
    """Rank, world size and a gloo process group for a command launched by torchrun (one process otherwise).

    Use as a context manager; ``barrier`` and ``broadcast`` are no-ops for a single process. The timeout is
    long because ranks wait at the end of a build for the slowest rank's encoding.
    """

    def __init__(self, timeout: timedelta = timedelta(hours=24)):
        env = os.environ
        launched = "RANK" in env and "WORLD_SIZE" in env
        self.rank = int(env["RANK"]) if launched else 0
        self.world_size = int(env["WORLD_SIZE"]) if launched else 1
        self.local_rank = int(env.get("LOCAL_RANK", 0)) if launched else 0
        self.timeout, self._owned = timeout, False

    def __enter__(self) -> "BuildGroup":
        dist = torch.distributed
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("gloo", timeout=self.timeout)
            self._owned = True
        return self

    def __exit__(self, *exc) -> None:
        if self._owned:
            torch.distributed.destroy_process_group()
            self._owned = False

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def broadcast(self, value: Any = None) -> Any:
        """Rank 0's ``value`` on every rank (a small picklable object)."""
        if self.world_size == 1:
            return value
        box = [value if self.rank == 0 else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def on_rank0(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 and hand its result to every rank; its ConfigError is raised on every rank
        (the others would otherwise wait at the next barrier until the timeout)."""
        outcome = None
        if self.rank == 0:
            try:
                outcome = ("ok", fn())
            except ConfigError as err:
                outcome = ("config", (err.field, err.value, err.allowed))
            except Exception as err:  # broadcast, then re-raise here with its traceback
                outcome = ("error", f"{type(err).__name__}: {err}")
                self.broadcast(outcome)
                raise
        outcome = self.broadcast(outcome)
        kind, payload = outcome
        if kind == "config":
            raise ConfigError(*payload)
        if kind == "error":
            raise RuntimeError(f"rank 0 failed: {payload}")
        return payload
