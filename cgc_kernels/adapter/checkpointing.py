"""Gradient (activation) checkpointing under CGC-LoRA: the recomputation gets the forward's routing.

Checkpointing reruns a decoder layer during the backward, after the forward's task context has
closed, so the adapted layers inside would find no routing. transformers stores the checkpoint
function on each checkpointing module (`module._gradient_checkpointing_func`, a partial of torch's
`checkpoint`) and calls it as `func(layer_forward, *args)`. Every forward of a CGCModel wraps each
such function, once, in a `RoutingCarrier`: it captures the routing in effect when the layer runs
and hands torch a function that reinstates it for as long as it runs, recomputation included.

That works whatever the order (checkpointing enabled on the base model before it was wrapped,
through the CGCModel, or on `cgc.model` directly) and whatever the flavour (non-reentrant, or
reentrant, whose backward replays the function the same way), and needs no `context_fn`.
`unload()` puts the original functions back.
"""

from __future__ import annotations

import copy

_ATTR = "_gradient_checkpointing_func"


def enable_model_checkpointing(model, kwargs: dict | None = None, **extra) -> None:
    """transformers' own checkpointing verb on `model`: `activation_checkpointing_enable` from
    transformers 5.24 on, `gradient_checkpointing_enable` before (5.17 has only that name)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs, **extra)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, **extra)
    else:
        raise ValueError(f"{type(model).__name__} has no activation checkpointing to enable")


def checkpointing_training_argument(enabled: bool) -> dict:
    """The TrainingArguments keyword that turns checkpointing on: `activation_checkpointing` from
    transformers 5.24 on, `gradient_checkpointing` before. `TrainingArguments(**this(True), ...)`."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}


class RoutingCarrier:
    """`checkpoint_func(function, *args, **kwargs)` that runs `function` with the CGCModel's routing
    (a task_ids.LayerRouting) of the moment it was called, in the forward and again in the
    backward's recomputation."""

    def __init__(self, inner, routing):
        self.inner, self.routing = inner, routing

    def __call__(self, function, *args, **kwargs):
        slot, routing = self.routing, self.routing.current

        def run_with_routing(*a, **kw):
            with slot.using(routing):  # only the recomputation changes it: the forward has it set
                return function(*a, **kw)

        return self.inner(run_with_routing, *args, **kwargs)

    def __deepcopy__(self, memo):
        # A copy of the model (merge_task) holds no CGC layers: it gets the plain function back.
        return copy.deepcopy(self.inner, memo)


class CheckpointingMixin:
    """CGCModel's checkpointing verbs (PEFT / transformers names) and the routing carriers."""

    _checkpointable: list | None = None  # found by the first _checkpointable_modules()

    def _checkpointable_modules(self) -> list:
        """The modules transformers may give a checkpoint function: those with a
        `gradient_checkpointing` flag (the decoder layers, and the model that holds them). Found
        once; wrapping adapters replaces linear layers only, so the list stays right."""
        if self._checkpointable is None:
            self._checkpointable = [m for m in self.model.modules() if hasattr(type(m), "gradient_checkpointing")
                                    or "gradient_checkpointing" in m.__dict__ or _ATTR in m.__dict__]
        return self._checkpointable

    def _carry_routing_into_checkpoints(self) -> None:
        """Wrap every checkpoint function of the base model not yet wrapped (per forward: one
        attribute read per decoder layer)."""
        for module in self._checkpointable_modules():
            func = module.__dict__.get(_ATTR)
            if func is not None and not isinstance(func, RoutingCarrier):
                setattr(module, _ATTR, RoutingCarrier(func, self._routing))

    def _remove_routing_carriers(self) -> None:
        for module in self.model.modules():
            func = module.__dict__.get(_ATTR)
            if isinstance(func, RoutingCarrier):
                setattr(module, _ATTR, func.inner)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs) -> None:
        """Enable the base model's checkpointing (transformers' default: non-reentrant). Reentrant
        (`{"use_reentrant": True}`) works too: the input embeddings' output is made to require
        grad, as PEFT does, so the reentrant backward reaches the adapters of a frozen base."""
        kw = dict(activation_checkpointing_kwargs or {"use_reentrant": False})
        enable_model_checkpointing(self.model, kw, **kwargs)
        # transformers does this itself for models fed input_ids; once is enough (a second call
        # would leave a hook that disable_input_require_grads cannot remove)
        if (kw.get("use_reentrant") and hasattr(self.model, "enable_input_require_grads")
                and not getattr(self.model, "_require_grads_hooks", None)):
            self.model.enable_input_require_grads()
        self._carry_routing_into_checkpoints()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs) -> None:
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        disable = getattr(self.model, "activation_checkpointing_disable", None)
        (disable or self.model.gradient_checkpointing_disable)()

    gradient_checkpointing_disable = activation_checkpointing_disable

    @property
    def is_activation_checkpointing(self) -> bool:
        if hasattr(type(self.model), "is_activation_checkpointing"):
            return bool(self.model.is_activation_checkpointing)
        return bool(getattr(self.model, "is_gradient_checkpointing", False))

    is_gradient_checkpointing = is_activation_checkpointing

