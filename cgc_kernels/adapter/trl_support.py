"""What TRL's trainers call on the model they train, for a CGCModel (mixed into CGCModel).

* `add_model_tags(tags)`: TRL tags the model it trains (for its model card); passed on to the
  wrapped transformers model, which keeps them in `model_tags`.
* A fused LM head: TRL replaces the trained model's `forward` with one that runs the backbone
  (`model.base_model`) and scores the labels from the LM head's weight in tiles
  (trl.trainer.utils.add_fused_lm_head). On a CGCModel that replacement would skip the task
  routing, so it is made on the wrapped transformers model instead, with the same settings:
  CGCModel.forward then routes each row's task and passes `fused_lm_head=True` through to it.

Nothing of TRL is changed or imported unless TRL itself sets the forward.
"""

from __future__ import annotations

import types

_FUSED_SETTINGS = ("temperature", "cast_lm_head_to_fp32", "outputs")


class TRLMixin:
    def add_model_tags(self, tags: list[str] | str) -> None:
        """Tags for the model card, kept on the wrapped transformers model (`model_tags`)."""
        inner = getattr(self.model, "add_model_tags", None)
        if callable(inner):
            inner(tags)
        else:
            existing = getattr(self.model, "model_tags", None) or []
            self.model.model_tags = list(dict.fromkeys([*existing, *([tags] if isinstance(tags, str) else tags)]))

    @property
    def model_tags(self) -> list[str] | None:
        return getattr(self.model, "model_tags", None)

    def __setattr__(self, name, value):
        if name == "forward" and _is_trl_fused_forward(value, self):
            self._fuse_lm_head_of_wrapped_model(value)
            return
        super().__setattr__(name, value)  # other wrappers of forward (accelerate's autocast) wrap ours

    def _fuse_lm_head_of_wrapped_model(self, patched: types.MethodType) -> None:
        """TRL's fused LM head, added to the wrapped model with the settings TRL chose for this one."""
        from trl.trainer.utils import add_fused_lm_head

        fn = patched.__func__
        cells = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ()), strict=True))
        add_fused_lm_head(self.model, **{k: cells[k] for k in _FUSED_SETTINGS if k in cells})


def _is_trl_fused_forward(value, owner) -> bool:
    """True for the forward that trl.trainer.utils.add_fused_lm_head binds to `owner` (functools.wraps
    gives it the name of the forward it replaces, so its code and module tell it apart)."""
    if not isinstance(value, types.MethodType) or value.__self__ is not owner:
        return False
    fn = value.__func__
    return fn.__globals__.get("__name__", "").startswith("trl.") and fn.__code__.co_name == "_fused_forward"
