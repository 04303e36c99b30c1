"""CPU/gloo backend for Megatron-Core.

Megatron-Core 0.16 places tensors with ``torch.cuda.current_device()`` and forks
dropout RNG through a CUDA generator tracker. On a machine without CUDA this module
(and only this module) redirects those to the CPU:

* ``torch.cuda.current_device`` returns ``"cpu"``, so every ``device=`` argument built
  from it places tensors on the CPU; a ``TorchFunctionMode`` serves the remaining literal
  ``device='cuda'`` requests, ``Tensor.cuda()`` and ``'torch.cuda.*Tensor'`` type checks
  inside Megatron's optimizers and grad scaler (including their gradient clipping);
  the pipeline schedules see a ``torch`` whose tensor factories build on the CPU;
* the model-parallel RNG tracker keeps CPU generator states instead of CUDA ones, so
  dropout under tensor parallelism forks and restores exactly as on GPU;
* ``torch.cuda.Stream``/``Event``/``stream``/``current_stream``/``synchronize`` become
  synchronous no-ops (MoE token dispatchers and the shared expert overlap work on side
  streams; on the CPU everything already runs in order);
* the alltoall MoE dispatcher receives its split sizes as host arrays, as it does on GPU
  after its device-to-host copy;
* tied input/output embeddings split across pipeline stages are synchronised by Megatron's
  ``LanguageModule.setup_embeddings_and_output_layer``, which moves the weight with
  ``.cuda()`` first: that method runs under the CUDA-to-CPU mode;
* ``torch.cuda.manual_seed`` seeds the CPU default generator (on GPU the default CUDA
  generator carries the data-parallel seed; on CPU that role falls to the CPU one);
* pipeline sends hand gloo an alias of the sent tensor, whose storage the schedules cannot
  swap out while gloo still reads it.

Each ``install_*`` function here is one entry of :mod:`attnres_megatron.compat.registry`, which
installs them for ``--device cpu`` only (``enable_cpu_backend`` installs the CPU set) and refuses
where CUDA is available, so the GPU path always stays stock Megatron-Core.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
import types
from collections.abc import Iterator

import torch


class CpuRNGStatesTracker:
    """Drop-in for Megatron's ``CudaRNGStatesTracker`` that tracks CPU generator states."""

    def __init__(self) -> None:
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        generator = torch.Generator()
        generator.manual_seed(seed)
        self.states_[name] = generator.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer_state = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer_state)


class CpuStream:
    """Stands in for ``torch.cuda.Stream``: CPU work is synchronous, so ordering is free."""

    def wait_stream(self, stream: CpuStream) -> None:
        return None

    def wait_event(self, event: CpuEvent) -> None:
        return None

    def record_event(self, event: CpuEvent | None = None) -> CpuEvent:
        return event if event is not None else CpuEvent()

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True


class CpuEvent:
    """Stands in for ``torch.cuda.Event`` (timing through ``time.perf_counter``)."""

    def __init__(self, enable_timing: bool = False, **_: object) -> None:
        self.time = 0.0

    def record(self, stream: CpuStream | None = None) -> None:
        self.time = time.perf_counter()

    def wait(self, stream: CpuStream | None = None) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: CpuEvent) -> float:
        return (end.time - self.time) * 1000.0


_DEFAULT_STREAM = CpuStream()


def _host_split_sizes(tensor, as_numpy: bool = False, record_stream: bool = False):
    """CPU twin of ``moe_utils.maybe_move_tensor_to_cpu``: the GPU version turns device
    tensors into host (numpy) split sizes; CPU tensors must take the same form."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


def _cpu_current_device() -> str:
    return "cpu"


def _is_cuda_device(device: object) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


_CPU = torch.device("cpu")
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
}


class CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Serve CUDA placement requests from the CPU.

    ``device='cuda'`` arguments become the CPU, ``Tensor.cuda()`` is the identity, and
    ``Tensor.type()`` reports the CUDA type name Megatron's optimizers check for.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": _CPU}
        if func is torch.Tensor.to and any(_is_cuda_device(a) for a in args[1:]):
            args = tuple(_CPU if _is_cuda_device(a) else a for a in args)
        return func(*args, **kwargs)


_FACTORIES = frozenset(
    {"zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "ones_like", "empty_like"}
)


class _TorchWithCpuFactories(types.ModuleType):
    """A ``torch`` stand-in for one Megatron module: tensor factories asked for a CUDA
    device build on the CPU; every other attribute is torch's own."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str):
        attribute = getattr(torch, name)
        if name not in _FACTORIES:
            return attribute

        @functools.wraps(attribute)
        def factory(*args, **kwargs):
            if _is_cuda_device(kwargs.get("device")):
                kwargs["device"] = _CPU
            return attribute(*args, **kwargs)

        return factory


class ModuleStandIn(types.ModuleType):
    """A module seen by one Megatron module in place of ``base``: ``overrides`` first, then ``base``."""

    def __init__(self, base: types.ModuleType, **overrides) -> None:
        super().__init__(base.__name__)
        self._base = base
        self.__dict__.update(overrides)

    def __getattr__(self, name: str):
        return getattr(self._base, name)


def _detached_send(send):
    @functools.wraps(send)
    def send_alias(tensor, *args, **kwargs):
        return send(tensor.detach(), *args, **kwargs)

    return send_alias


def _distributed_with_detached_sends() -> ModuleStandIn:
    """``torch.distributed`` whose sends hand gloo an alias of the tensor (``detach()``).

    gloo reads a pending send's tensor from its background thread; Megatron's schedules free
    a sent activation by swapping its storage out (``deallocate_output_tensor``), which the
    original tensor object would then show to gloo. The alias keeps the sent storage."""
    isend = _detached_send(torch.distributed.isend)

    def p2p_op(op, tensor, *args, **kwargs):
        if op is isend:
            op, tensor = torch.distributed.isend, tensor.detach()
        return torch.distributed.P2POp(op, tensor, *args, **kwargs)

    return ModuleStandIn(
        torch.distributed, isend=isend, send=_detached_send(torch.distributed.send), P2POp=p2p_op
    )


def install_detached_pipeline_sends() -> None:
    """Pipeline sends keep their storage while gloo sends them (see the class above)."""
    from megatron.core.pipeline_parallel import p2p_communication

    p2p_communication.torch = ModuleStandIn(torch, distributed=_distributed_with_detached_sends())


def _with_cuda_on_cpu(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with CudaToCpuMode():
            return function(*args, **kwargs)

    return wrapper


def _serve_optimizers_from_cpu() -> None:
    """Run Megatron's optimizer and grad-scaler methods under :class:`CudaToCpuMode`.

    Scoped to these classes: a process-wide mode would tax every tensor op of the model.
    """
    from megatron.core.optimizer import distrib_optimizer, grad_scaler, optimizer

    for module in (optimizer, distrib_optimizer, grad_scaler):
        for cls in vars(module).values():
            if not (isinstance(cls, type) and cls.__module__ == module.__name__):
                continue
            for name, attribute in list(vars(cls).items()):
                if inspect.isfunction(attribute) and (name == "__init__" or not name.startswith("__")):
                    setattr(cls, name, _with_cuda_on_cpu(attribute))


def install_rng_tracker() -> None:
    """The model-parallel RNG tracker keeps CPU generator states; recompute snapshots the CPU one."""
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mcore_random.initialize_rng_tracker = lambda *args, **kwargs: None
    # Activation recompute snapshots the "CUDA" generator; on CPU that is the default one,
    # which Megatron's checkpoint functions already save and restore themselves.
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda *args, **kwargs: None


def install_cuda_runtime_stand_ins() -> None:
    """``torch.cuda``'s device, stream, event, synchronize and seed calls answered on the CPU."""
    torch.cuda.current_device = _cpu_current_device
    torch.cuda.Stream = CpuStream
    torch.cuda.Event = CpuEvent
    torch.cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    torch.cuda.default_stream = lambda device=None: _DEFAULT_STREAM
    torch.cuda.stream = lambda stream: contextlib.nullcontext()
    torch.cuda.synchronize = lambda device=None: None
    # The default generator carries the data-parallel seed, as the CUDA one does on GPU.
    torch.cuda.manual_seed = torch.manual_seed


def install_embedding_sync_on_cpu() -> None:
    """Tied embeddings across pipeline stages: Megatron's sync moves the weight with ``.cuda()``."""
    from megatron.core.models.common.language_module.language_module import LanguageModule

    LanguageModule.setup_embeddings_and_output_layer = _with_cuda_on_cpu(
        LanguageModule.setup_embeddings_and_output_layer
    )


def install_schedule_factories_on_cpu() -> None:
    """The pipeline schedules' ``torch`` builds CUDA-placed tensors on the CPU."""
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _TorchWithCpuFactories()


def install_host_split_sizes() -> None:
    """The alltoall MoE dispatcher gets host split sizes from CPU tensors, as after its D2H copy."""
    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.maybe_move_tensor_to_cpu = _host_split_sizes


def enable_cpu_backend() -> None:
    """Redirect Megatron-Core's CUDA assumptions to the CPU (the registry's CPU entries). Idempotent."""
    from attnres_megatron.compat.registry import install_adaptations

    install_adaptations("cpu")


def cpu_backend_enabled() -> bool:
    """Whether the CPU backend has been installed in this process."""
    from attnres_megatron.compat.registry import installed_targets

    return "megatron.core.tensor_parallel.random._CUDA_RNG_STATE_TRACKER" in installed_targets()
