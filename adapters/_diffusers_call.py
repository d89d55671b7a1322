"""One denoiser call of a classic pipeline, normalised: its arguments, rows and timestep.

The pipeline calls its denoiser in its own convention (positional or keyword arguments, its
CFG batch, a tensor or ``...Output`` back); guidekit calls the same forward with the plan's
rows. This module reads a call once -- the arguments bound by the forward's signature, the
timestep parsed to one number, the rows split into conditionings -- and puts a prediction
back into the structure the pipeline reads.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping
from types import FrameType
from typing import Any

import attrs
import torch

from guidekit.errors import GuidanceValueError

from ._diffusers_rows import take_apart
from ._frames import calling_frame


@attrs.define(eq=False)
class DenoiserCall:
    """One denoiser call: keyword arguments by name, the latents and the one timestep."""

    x_name: str
    x: torch.Tensor
    arguments: dict[str, Any]
    timestep: float

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])


def _pipeline_classes() -> tuple[type, ...]:
    """diffusers' pipeline base classes (none when diffusers was never imported)."""
    diffusers = sys.modules.get("diffusers")
    if diffusers is None:
        return ()
    names = ("DiffusionPipeline", "ModularPipeline")
    return tuple(c for c in (getattr(diffusers, n, None) for n in names) if isinstance(c, type))


def calling_pipeline(pipe: Any) -> Any:
    """The diffusers pipeline other than ``pipe`` whose code is calling the denoiser now: the
    nearest pipeline up the stack (``None``: ``pipe`` itself, or a loop of the user's own).

    Pipelines sharing a denoiser (``from_pipe``, the same components) reach its guided
    forward too; only the stack tells whose call it is, so it is read, nearest frame first.
    """
    kinds = _pipeline_classes()
    if not kinds:
        return None

    def owned_by_a_pipeline(frame: FrameType) -> bool:
        if "self" not in frame.f_code.co_varnames:
            return False
        owner = frame.f_locals.get("self")
        return owner is pipe or isinstance(owner, kinds)

    frame = calling_frame(owned_by_a_pipeline)
    owner = None if frame is None else frame.f_locals.get("self")
    return None if owner is pipe else owner


def refuse_other_callers(pipe: Any, denoiser: Any, expr: Any) -> None:
    """Refuse a call of the guided denoiser that another pipeline sharing it makes: its own
    guidance arguments would be ignored, and run unguided it would ignore the block's."""
    other = calling_pipeline(pipe)
    if other is None:
        return
    mine, theirs = type(pipe).__name__, type(other).__name__
    if mine == theirs:
        theirs = f"another {theirs}"
    raise GuidanceValueError(
        f"{theirs} called the {type(denoiser).__name__} that guided({mine}, {expr!r}) guides "
        f"(the pipelines share it: from_pipe(...) or the same components), and inside the "
        f"block it guides only that {mine}'s own calls: call the other pipeline outside the "
        f"with block (it then runs exactly as diffusers runs it), or guide it in a block of "
        f"its own, with guided(other_pipe, expr)"
    )


def _timestep(t: Any) -> float:
    if t is None:
        raise GuidanceValueError("the denoiser was called without a timestep")
    values = torch.as_tensor(t).detach().flatten().double().cpu()
    if values.numel() == 0 or not bool((values == values[0]).all()):
        raise GuidanceValueError(
            "the denoiser got different timesteps in one call; guidekit needs one noise "
            "level per call"
        )
    return float(values[0])


def read_call(signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> DenoiserCall:
    """``args`` / ``kwargs`` of one denoiser call, bound by the forward's ``signature``."""
    bound = signature.bind(*args, **kwargs)
    arguments: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise GuidanceValueError("the denoiser got extra positional arguments")
        else:
            arguments[name] = value
    x_name = next(iter(signature.parameters))
    x = arguments.get(x_name)
    if not isinstance(x, torch.Tensor):
        raise GuidanceValueError(f"the denoiser's first argument {x_name!r} is not a tensor")
    if arguments.get("skip_layers") is not None:
        raise GuidanceValueError(
            "the pipeline asked for a skip-layer pass (skip_guidance_layers=...); inside "
            "guided(...) write that guidance in the expression instead (SLG(...))"
        )
    return DenoiserCall(x_name, x, arguments, _timestep(arguments.get("timestep")))


@attrs.define(eq=False)
class Split:
    """A call's rows split into guidekit's inputs: ``x`` (B rows), conditionings, the rest."""

    x: torch.Tensor
    conds: dict[str, dict[str, torch.Tensor]]
    shared: dict[str, torch.Tensor]
    template: dict[str, Any]  # the arguments, per-row tensors as Leaf placeholders

    @property
    def batch(self) -> int:
        return int(self.x.shape[0])


def split_rows(call: DenoiserCall, blocks: Mapping[str, slice]) -> Split:
    """Split ``call``'s rows into conditionings (``blocks`` names their row ranges)."""
    first = next(iter(blocks.values()))
    batch = int(call.x[first].shape[0])
    parts = take_apart(call.arguments, call.x_name, call.rows, batch)
    conds = {name: {p: v[rows] for p, v in parts.rows.items()} for name, rows in blocks.items()}
    shared = {p: v[first] for p, v in parts.shared.items()}
    return Split(call.x[first], conds, shared, parts.template)


def sample_of(out: Any) -> torch.Tensor:
    """The prediction tensor of a denoiser's output (tensor, tuple or ``...Output``)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise GuidanceValueError(
        f"the denoiser returned {type(out).__name__}; expected a tensor, a tuple whose first "
        f"item is the prediction, or an output object with .sample"
    )


def like(proto: Any, sample: torch.Tensor) -> Any:
    """``sample`` in the structure of the original output ``proto`` (what the pipeline reads)."""
    if isinstance(proto, torch.Tensor):
        return sample
    if isinstance(proto, tuple):
        return (sample, *proto[1:])
    if isinstance(proto, list):
        return [sample, *proto[1:]]
    if isinstance(proto, Mapping):  # diffusers' BaseOutput is an ordered dict of its fields
        fields = {k: (sample if k == "sample" else v) for k, v in proto.items()}
        return type(proto)(**fields)
    raise GuidanceValueError(f"cannot rebuild a denoiser output of type {type(proto).__name__}")


def tile(v: torch.Tensor, k: int) -> torch.Tensor:
    """``v`` repeated ``k`` times along the batch axis."""
    return v if k == 1 else v.repeat(k, *([1] * (v.ndim - 1)))
