"""Hugging Face Trainer callback: sparse training with an unchanged model, exact resume.

    from sparsekernels.integrations.hf import SparseTrainingCallback

    trainer = Trainer(model, args, train_dataset=ds, callbacks=[SparseTrainingCallback("rigl", sparsity=0.9)])
    trainer.train()                            # or trainer.train(resume_from_checkpoint=...)

Where each step happens (transformers 5.x ``Trainer``):

1. ``on_init_end`` (end of ``Trainer.__init__``): a load pre-hook goes on the model.
   ``train(resume_from_checkpoint=...)`` loads the checkpoint's weights into the model
   first thing, before any other callback event and before the optimizer exists: the hook
   swaps the layers the checkpoint holds as sparse, so the load finds every key instead of
   (as the Trainer does for a key mismatch) logging it and training on from random weights.
2. The Trainer builds the optimizer from the model (dense, or sparse on resume), wraps it
   in accelerate's ``AcceleratedOptimizer`` and, on resume, loads ``optimizer.pt`` into it:
   the sparse values' moments, into an optimizer that already holds the sparse values.
3. ``on_train_begin``: the method is built on the real optimizer under the wrapper (on a
   fresh run it swaps the dense layers and re-points the optimizer; on resume it finds them
   sparse) and, on resume, takes its saved state.
4. The method's state is saved in ``trainer_state.json`` of every checkpoint (its
   ``stateful_callbacks``, key ``"sparsekernels"``), so resuming needs only the checkpoint
   folder, wherever it is and whatever the new run's ``output_dir``.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import torch
from transformers import TrainerCallback

from ..methods.base import SparseTrainingMethod
from ._trainer_support import (SparseLayersOnLoad, build_method, has_sparse_layers, resolve_method,
                               restore_method_state)

STATE_KEY = "sparsekernels"


def _encode_state(state: dict) -> dict:
    """The method state in a form ``trainer_state.json`` holds exactly: as itself when it
    survives a JSON round trip unchanged (numbers, names, lists, str-keyed dicts: every
    built-in method), else as a base64 ``torch.save`` payload (tensors, tuples, int keys)."""
    try:
        back = json.loads(json.dumps(state))
        if back == state and _same_types(state, back):
            return {"json": state}
    except (TypeError, ValueError):  # not JSON at all (a tensor, a non-str key, ...)
        pass
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return {"torch_save_base64": base64.b64encode(buffer.getvalue()).decode("ascii")}


def _decode_state(encoded: dict) -> dict:
    """Inverse of :func:`_encode_state`."""
    bad = f"SparseTrainingCallback: the checkpoint's '{STATE_KEY}' entry is not a saved method state"
    if not isinstance(encoded, dict) or not ({"json", "torch_save_base64"} & encoded.keys()):
        raise ValueError(bad)
    if "json" in encoded:
        return encoded["json"]
    try:
        return torch.load(io.BytesIO(base64.b64decode(encoded["torch_save_base64"], validate=True)), weights_only=True)
    except Exception as exc:  # bad base64, a truncated or foreign payload
        raise ValueError(f"{bad} ({type(exc).__name__}: {exc})") from None


def _same_types(a: object, b: object) -> bool:
    """Whether ``b`` (a JSON round trip of ``a``) has ``a``'s container and number types
    (JSON turns tuples into lists; ``==`` alone would not notice)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return all(_same_types(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return all(_same_types(x, y) for x, y in zip(a, b))
    return True


class SparseTrainingCallback(TrainerCallback):
    """Trains the model's layers sparse with ``method`` (a registered name such as
    ``"rigl"``, ``"set"``, ``"gmp"``, ``"static"``, ``"srste"``, or a method class), built
    with ``method_kwargs`` once the Trainer has built its optimizer. The model needs no
    sparsekernels code.

    ``total_steps`` defaults to the Trainer's ``max_steps`` for methods that take it. Pass the
    callback to ``Trainer(callbacks=[...])`` (it must see the model when the Trainer is
    built, before a resumed checkpoint is loaded). ``self.method`` is the method object once
    training has started.

    Raises ValueError at the start of a resumed run whose model did not come back sparse or
    whose checkpoint holds no method state (or a stale one): such a run would otherwise
    continue from the wrong weights or restart the sparse schedule.
    """

    def __init__(self, method: str | type, **method_kwargs: Any) -> None:
        self.method_class, self.method_kwargs = resolve_method("SparseTrainingCallback", method, method_kwargs)
        self.method = None
        self._load_hook: SparseLayersOnLoad | None = None

    # ---------------------------------------------------------------- before the weights load
    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None and (self._load_hook is None or self._load_hook.model is not model):
            if self._load_hook is not None:
                self._load_hook.remove()
            self._load_hook = SparseLayersOnLoad(model, self.method_kwargs)

    # ---------------------------------------------------------------- once the optimizer exists
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise ValueError("SparseTrainingCallback: the Trainer passed no model / optimizer to on_train_begin")
        stored = None
        if state.global_step > 0:  # resumed: everything must come from the checkpoint
            if not has_sparse_layers(model):
                raise ValueError("SparseTrainingCallback: resumed at step "
                                 f"{state.global_step} but the model has no sparse layer: either the checkpoint is "
                                 "dense, or the callback was added after the Trainer was built (pass it in "
                                 "Trainer(callbacks=[...]) so it sees the checkpoint's weights load)")
            stored = state.stateful_callbacks.get(STATE_KEY)
            if stored is not None and (not isinstance(stored, dict) or "method_state" not in stored):
                raise ValueError(f"SparseTrainingCallback: the checkpoint's '{STATE_KEY}' entry is not a saved "
                                 "method state (a dict with 'method_state' and 'global_step')")
            if stored is None:
                raise ValueError(f"SparseTrainingCallback: resumed at step {state.global_step} from a checkpoint "
                                 "whose trainer_state.json holds no sparse method state (written without this "
                                 "callback); the sparse schedule cannot continue exactly")
            if stored.get("global_step") != state.global_step:
                raise ValueError(f"SparseTrainingCallback: the checkpoint's sparse method state is from step "
                                 f"{stored.get('global_step')}, the checkpoint from step {state.global_step} (another "
                                 "callback set should_save after this one ran; put this callback last)")
        if isinstance(self.method, SparseTrainingMethod):
            # A further train(): the Trainer may keep its optimizer, which must not carry
            # the earlier method's step hook as well as the new one's.
            self.method.remove()
        self.method = build_method(self.method_class, self.method_kwargs, model, optimizer, state.max_steps)
        if stored is not None:
            restore_method_state(self.method, _decode_state(stored["method_state"]))

    # ---------------------------------------------------------------- checkpoint
    # The Trainer writes trainer_state.json right after these events when it saves: keep
    # the method state there current at those moments only (not every step: the history
    # grows with the run).
    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            self._store(state)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._store(state)

    def on_evaluate(self, args, state, control, **kwargs):
        self._store(state)  # save_strategy="best" decides to save after evaluating

    def _store(self, state) -> None:
        if self.method is not None:
            state.stateful_callbacks[STATE_KEY] = {"global_step": state.global_step,
                                                   "method_state": _encode_state(self.method.state_dict())}
