"""Context parallelism: one generation split over K ranks by tokens, with the forecasting cache on each shard.

    cache = taylorseer.apply(pipe, CacheConfig(interval=5, max_order=1))      # optional, before or after
    cp = parallel.enable(pipe, ulysses=2)          # diffusers' native context parallelism (Ulysses / Ring)
    image = pipe(prompt, generator=torch.Generator().manual_seed(0)).images[0]   # same on every rank

The engine is diffusers' own (``ContextParallelConfig`` + ``ModelMixin.enable_parallelism``): its plan splits
the model's tokens at the input (FLUX: ``hidden_states``/``encoder_hidden_states`` and their position ids) and
gathers them after ``proj_out``; attention runs over every token through Ulysses all-to-alls (heads <-> tokens)
or Ring passes. Where diffusers has no plan for a model of the project (HunyuanVideo in 0.42.1) the plan is
written here (:data:`PLANS`), not a fork of the model.

The cache composes without a change to its mathematics:

* every cached module runs inside the split region, so each rank's factors are its own tokens' features:
  cache bytes per rank = 1/K of one process's (when K divides the token counts, which :func:`check` demands);
  a forecast step's work (the weighted sum of factors) splits the same way;
* every rank must make the same full/forecast decision at every step, or the ranks that compute wait forever in
  an all-to-all the others skip. Interval/budget/calibrated schedules depend on the step index only; the adaptive
  schedule's probe error ``sum|p^ - p| / sum|p|`` is summed over the ranks of the generation (numerator and
  denominator, one all-reduce of two numbers per step: :func:`shard_cache`), so it is the one-process error.

Data parallel x context parallel: ``world = D x K`` ranks form D groups of K consecutive ranks (a node of 8 GPUs:
2 groups of 4 -> each generation on 4 GPUs of one NVLink domain); :class:`Layout` says which group a rank is in
and which rank of its group writes the outputs. On a CPU (gloo) torch has no accelerator and diffusers' mesh setup
divides by ``torch.accelerator.device_count()`` (0): :func:`enable` makes that count 1 during the call only, and
only when the model is on the CPU. Ring attention needs a backend that returns the log-sum-exp; native SDPA on a
CPU does not ("Native attention does not support return_lse=True"), so ``ring > 1`` is refused there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .hooks import _resolve, get_cache

ATTR = "_taylorseer_context_parallel"


class ContextParallelError(ValueError):
    """A degree, token count or attention backend that context parallelism cannot run with; raised before compute."""


@dataclass(frozen=True)
class Layout:
    """Where one rank stands in ``world = groups x degree``: D data-parallel groups of K context-parallel ranks."""

    rank: int
    world_size: int
    degree: int = 1  # K = ulysses x ring

    def __post_init__(self):
        if self.degree < 1 or self.world_size % self.degree:
            raise ContextParallelError(
                f"parallel degree {self.degree} (ulysses x ring) does not divide the {self.world_size} ranks: start "
                f"a multiple of {self.degree} processes (NPROC=K or NPROC=D*K)")

    groups = property(lambda self: self.world_size // self.degree)  # D: generations at once
    group = property(lambda self: self.rank // self.degree)  # this rank's data-parallel index
    local = property(lambda self: self.rank % self.degree)  # this rank's place in its generation
    writes = property(lambda self: self.local == 0)  # the rank of a group that saves images and records

    def shard(self, items: list) -> list:
        """This rank's group's share of ``items`` (every item to exactly one group; all ranks of a group alike)."""
        return list(items[self.group::self.groups])


def heads_of(model) -> int | None:
    config = getattr(model, "config", {})
    return config.get("num_attention_heads") if hasattr(config, "get") else None


def check(model, ulysses: int = 1, ring: int = 1, *, world_size: int | None = None,
          tokens: dict[str, int] | None = None) -> None:
    """Refuse, before any compute, what the engine cannot split: a degree that does not divide the world, the heads
    (Ulysses) or the token counts; a model without a plan; an attention backend without context parallelism.
    ``model=None`` checks the numbers only (an app, before it loads the weights)."""
    degree = ulysses * ring
    if ulysses < 1 or ring < 1 or degree < 2:
        raise ContextParallelError(f"parallel.ulysses={ulysses} x parallel.ring={ring}: context parallelism needs a "
                                   f"degree of at least 2")
    if world_size is not None:
        Layout(0, world_size, degree)
    for what, count in (tokens or {}).items():
        if count % degree:
            raise ContextParallelError(f"{count} {what} tokens are not divisible by the parallel degree {degree}: "
                                       f"each rank holds tokens/K of them; choose a size whose token count K divides")
    if model is None:
        return
    heads = heads_of(model)
    if heads is not None and heads % ulysses:
        raise ContextParallelError(f"parallel.ulysses={ulysses} does not divide the {heads} attention heads of "
                                   f"{type(model).__name__}: Ulysses gives each rank heads/K heads")
    if plan_for(model) is None:
        raise ContextParallelError(f"{type(model).__name__} has no context-parallel plan (diffusers' _cp_plan or "
                                   f"taylorseer.attach.parallel.PLANS)")
    _check_backend(model, ring)


def _check_backend(model, ring: int) -> None:
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    backend = _backend(model)
    if backend is None:
        return
    name = backend if isinstance(backend, AttentionBackendName) else AttentionBackendName(backend)
    if not _AttentionBackendRegistry._is_context_parallel_available(name):
        raise ContextParallelError(f"attention backend {name.value!r} cannot do context parallelism; use one of "
                                   f"{sorted(_AttentionBackendRegistry._supports_context_parallel)} "
                                   f"(attention_backend=sdpa is 'native')")
    if ring > 1 and name == AttentionBackendName.NATIVE and _device(model).type == "cpu":
        raise ContextParallelError("parallel.ring > 1 needs attention that returns the log-sum-exp; native SDPA on"
                                   " a CPU does not (diffusers: 'Native attention does not support "
                                   "return_lse=True'). Use parallel.ulysses, or Ring on GPUs with flash/cudnn")


def _backend(model):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            return processor._attention_backend or _AttentionBackendRegistry.get_active_backend()[0]
    return None


def _device(model) -> torch.device:
    return next(model.parameters()).device


def plan_for(model) -> dict | None:
    """diffusers' plan for the model's class, else the project's (:data:`PLANS`)."""
    return getattr(model, "_cp_plan", None) or PLANS.get(type(model).__name__)


@contextlib.contextmanager
def _cpu_device_count(device: torch.device) -> Iterator[None]:
    """diffusers resolves the rank's device as ``rank % torch.accelerator.device_count()``: 0 on a machine without an
    accelerator (ZeroDivisionError). On the CPU only, and only while the mesh is set up, that count is 1."""
    if device.type != "cpu" or torch.accelerator.device_count() > 0:
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def check_run(ulysses: int, ring: int, *, cache_impl: str, cache_enabled: bool, cpu_offload: bool,
              tokens: Callable[[], dict[str, int]]) -> None:
    """A pipeline app's ``parallel.ulysses x parallel.ring`` against its other settings, and the degree against the
    tokens of one call (``tokens()``, :func:`check`), before anything is loaded. One rank per generation: nothing
    to check."""
    if ulysses * ring <= 1:
        return
    if cache_impl != "taylorseer" and cache_enabled:
        raise ValueError("parallel.ulysses/ring > 1 runs the cache on each rank's tokens: cache_impl=taylorseer")
    if cpu_offload:
        raise ValueError("parallel.ulysses/ring > 1 keeps the transformer on each rank's GPU: cpu_offload=false")
    check(None, ulysses, ring, tokens=tokens())


def make_mesh(layout: Layout, ulysses: int, ring: int, device_type: str):
    """The device mesh ``(dp, ring, ulysses)``: ranks ``g*K .. g*K+K-1`` make generation ``g``."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (layout.groups, ring, ulysses), mesh_dim_names=("dp", "ring", "ulysses"))


@dataclass
class ContextParallel:
    """What :func:`enable` set up: the layout, the mesh and the process group of this rank's generation."""

    layout: Layout
    ulysses: int
    ring: int
    mesh: object
    group: object  # the generation's process group (the ring x ulysses ranks)

    def reduce_sums(self, *values: float) -> tuple[float, ...]:
        """``values`` summed over the ranks of this generation (float64: the order of the sum is all that varies)."""
        import torch.distributed as dist

        device = "cpu" if self.mesh.device_type == "cpu" else torch.device(self.mesh.device_type,
                                                                          torch.cuda.current_device())
        box = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(box, group=self.group)
        return tuple(float(v) for v in box.tolist())


def enable(target, ulysses: int = 1, ring: int = 1, *, tokens: dict[str, int] | None = None,
           plan: dict | None = None) -> ContextParallel:
    """Split ``target``'s transformer (a model or a pipeline) over ``ulysses x ring`` ranks of the running process
    group (D groups of K when the world is larger). Checks first (:func:`check`); puts the probe-error reduction on
    the attached cache, if any (a cache applied later takes it through :func:`shard_cache`)."""
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    model, _ = _resolve(target)
    if not dist.is_initialized():
        raise ContextParallelError("context parallelism needs the process group: start with torchrun / "
                                   "taylorseer.harness.launch (NPROC=K) and call distributed.init() first")
    layout = Layout(dist.get_rank(), dist.get_world_size(), ulysses * ring)
    check(model, ulysses, ring, world_size=layout.world_size, tokens=tokens)
    device = _device(model)
    mesh = make_mesh(layout, ulysses, ring, device.type)
    config = ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring, mesh=mesh)
    extra = EXTRA_HOOKS.get(type(model).__name__)
    if extra is not None:
        extra[0](model, layout.degree)
    engine_plan, inner_inputs = _outside_forward(plan or plan_for(model))
    with _cpu_device_count(device):
        model.enable_parallelism(config=config, cp_plan=engine_plan)
    for name, inputs in inner_inputs.items():
        _split_inputs_before(model.get_submodule(name), inputs, config._flattened_mesh)
    if extra is not None:
        extra[1](model, layout.local, layout.degree)
    group = config._flattened_mesh.get_group()  # diffusers flattened (ring, ulysses) of this generation
    cp = ContextParallel(layout, ulysses, ring, mesh, group)
    setattr(model, ATTR, cp)
    cache = get_cache(model)
    if cache is not None:
        shard_cache(cache, cp)
    return cp


def _outside_forward(plan: dict) -> tuple[dict, dict]:
    """(the plan for diffusers, the input splits of inner modules to do as torch pre-hooks).

    diffusers splits a module's inputs by wrapping its ``forward``; the cache replaces the ``forward`` of the blocks it
    caches (a forecast step does not call the original). A split at a block's input (Wan: ``blocks.0``) would then
    be skipped on forecast steps, so inner modules' input splits run as ``register_forward_pre_hook``s, which torch
    calls before whichever ``forward`` the module has. The model's own inputs (``""``), output splits and gathers stay
    diffusers' hooks (the cache never replaces the model's forward)."""
    from diffusers.models._modeling_parallel import ContextParallelInput

    engine, inner = {}, {}
    for name, entry in plan.items():
        if name and isinstance(entry, dict) and all(isinstance(v, ContextParallelInput) and not v.split_output
                                                    for v in entry.values()):
            inner[name] = entry
        else:
            engine[name] = entry
    return engine, inner


def _split_inputs_before(module, inputs: dict, mesh) -> None:
    """Shard ``module``'s named inputs with diffusers' own sharder, before its forward (whichever it is)."""
    import inspect

    from diffusers.hooks.context_parallel import EquipartitionSharder

    params = [p for p in inspect.signature(type(module).forward).parameters][1:]  # without self

    def pre_hook(_module, args, kwargs):
        args = list(args)
        for name, how in inputs.items():
            index = params.index(name) if name in params else None
            if name in kwargs:
                value = kwargs[name]
            elif index is not None and index < len(args):
                value = args[index]
            else:
                continue
            if not isinstance(value, torch.Tensor) or (how.expected_dims and value.dim() != how.expected_dims):
                continue
            value = EquipartitionSharder.shard(value, how.split_dim, mesh)
            if name in kwargs:
                kwargs[name] = value
            else:
                args[index] = value
        return tuple(args), kwargs

    module.register_forward_pre_hook(pre_hook, with_kwargs=True)


def setup(target, ulysses: int, ring: int, *, rank: int, world_size: int,
          tokens: dict[str, int] | None = None) -> tuple[ContextParallel | None, Layout]:
    """For the apps: context parallelism when ``ulysses x ring > 1`` (else None), and this rank's :class:`Layout`
    (plain data parallel: every rank a generation of its own)."""
    if ulysses * ring == 1:
        return None, Layout(rank, world_size, 1)
    cp = enable(target, ulysses, ring, tokens=tokens)
    return cp, cp.layout


def shard_cache(cache, cp: ContextParallel | None) -> None:
    """The cache of one shard: the adaptive probe error is summed over the generation's ranks (None: one process)."""
    cache.error_reducer = None if cp is None else cp.reduce_sums


def get(target) -> ContextParallel | None:
    model, _ = _resolve(target)
    return getattr(model, ATTR, None)


# ------------------------------------------------------------------------------------------- HunyuanVideo
def _hunyuan_video_plan() -> dict:
    """HunyuanVideoTransformer3DModel (diffusers 0.42.1 has no ``_cp_plan`` for it).

    The split is after the embedders, not at the model's input: RoPE and the patch embedding need the whole latent
    (its frame/height/width grid) and the token refiner attends over the whole prompt under its mask. So the outputs
    of ``rope`` (cos, sin: (video tokens, head_dim)), ``x_embedder`` (B, video tokens, C) and ``context_embedder``
    (B, text tokens, C) are split by tokens, every block runs on its rank's video and text tokens (a block's
    attention concatenates [video_r; text_r], and Ulysses gathers [video_0; text_0; video_1; ...]), and ``proj_out``'s
    output is gathered before the model un-patchifies. The attention mask the model builds from the local lengths
    would be wrong for the text shards (padding is at the end of the *whole* prompt): :func:`_hunyuan_mask_hooks`
    gives every block the mask of its rank's tokens, which Ulysses all-gathers in the same order as the keys."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    def split(dim: int, dims: int):
        return ContextParallelInput(split_dim=dim, expected_dims=dims, split_output=True)

    return {
        "rope": {0: split(0, 2), 1: split(0, 2)},
        "x_embedder": {0: split(1, 3)},
        "context_embedder": {0: split(1, 3)},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


def _hunyuan_mask_hooks(model, rank: int, degree: int) -> list:
    """Give every block the key mask of its own tokens: [its video tokens (all valid); its slice of the prompt,
    valid where the prompt's token index < the prompt's length]. Returns the hook handles."""
    seen: dict = {}

    def remember(_module, args, kwargs):
        mask = kwargs.get("encoder_attention_mask", args[3] if len(args) > 3 else None)
        seen["lengths"] = mask.sum(dim=1, dtype=torch.int)  # [B]: the model's own rule (valid tokens first)
        seen["text"] = mask.shape[1]
        seen["local"] = None

    def local_mask(_module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        local = seen.get("local")
        if local is None or local.shape[-1] != hidden.shape[1] + seen["text"] // degree:
            index = torch.arange(seen["text"], device=hidden.device).unsqueeze(0)
            text = (index < seen["lengths"].to(hidden.device).unsqueeze(1)).chunk(degree, dim=1)[rank]
            video = torch.ones(hidden.shape[0], hidden.shape[1], dtype=torch.bool, device=hidden.device)
            local = seen["local"] = torch.cat([video, text], dim=1)[:, None, None, :]  # [B, 1, 1, local tokens]
        if "attention_mask" in kwargs or len(args) <= 3:
            return args, {**kwargs, "attention_mask": local}
        return (*args[:3], local, *args[4:]), kwargs

    handles = [model.register_forward_pre_hook(remember, with_kwargs=True)]
    for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
        handles.append(block.register_forward_pre_hook(local_mask, with_kwargs=True))
    return handles


def _hunyuan_check(model, degree: int) -> None:
    if getattr(model.config, "image_condition_type", None) == "token_replace":
        raise ContextParallelError("HunyuanVideo's token-replace image-to-video blocks index the first frame's tokens;"
                                   " context parallelism here covers text-to-video (image_condition_type=None)")


PLANS: dict[str, dict] = {"HunyuanVideoTransformer3DModel": _hunyuan_video_plan()}
EXTRA_HOOKS = {"HunyuanVideoTransformer3DModel": (_hunyuan_check, _hunyuan_mask_hooks)}  # class -> (check, install)
