"""PyTorch Lightning callback: sparse training with a plain LightningModule, exact resume.

    from sparsekernels.integrations.lightning import SparseTraining

    trainer = L.Trainer(max_steps=10_000, callbacks=[SparseTraining("rigl", sparsity=0.9)])
    trainer.fit(module)                        # or trainer.fit(module, ckpt_path=...)

Where each step happens in ``Trainer.fit`` (lightning 2.6):

1. ``setup`` (callbacks' hook, every stage): a load pre-hook goes on the module. Lightning
   then loads a checkpoint's weights into the module, still dense: the hook swaps the
   layers the checkpoint holds as sparse first, so the (strict) load finds its keys. This
   also serves ``validate`` / ``test`` / ``predict`` with ``ckpt_path``.
2. ``load_state_dict`` (callbacks' state, from the checkpoint): the method's state is kept.
3. ``configure_optimizers`` runs (on the dense module, or on the resumed sparse one).
4. ``on_fit_start``: the method is built on the real optimizer (under Lightning's wrapper).
   It swaps the dense layers and re-points the optimizer; on resume it finds them sparse
   already and takes the kept state (step, schedule history).
5. Lightning then restores the optimizer state (the sparse values' moments) and the loops.

Strategies that restore after setup (``restore_checkpoint_after_setup``) run 2 after 4; the
state then goes straight into the method.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from ..methods.base import SparseTrainingMethod
from ._trainer_support import (SparseLayersOnLoad, build_method, has_sparse_layers, resolve_method,
                               restore_method_state)


class SparseTraining(pl.Callback):
    """Trains the module's layers sparse with ``method`` (a registered name such as
    ``"rigl"``, ``"set"``, ``"gmp"``, ``"static"``, ``"srste"``, or a method class), built
    with ``method_kwargs`` once the optimizer exists. The LightningModule needs no
    sparsekernels code.

    ``total_steps`` defaults to the trainer's ``estimated_stepping_batches`` for methods that
    take it. The method's state is saved in the trainer's checkpoints (under this callback's
    state) and restored on ``trainer.fit(module, ckpt_path=...)``, so a resumed run equals
    an uninterrupted one. ``self.method`` is the method object once fitting has started.

    The module must configure exactly one optimizer holding the weights of the layers to
    sparsify.
    """

    def __init__(self, method: str | type, **method_kwargs: Any) -> None:
        self.method_class, self.method_kwargs = resolve_method("SparseTraining", method, method_kwargs)
        self.method = None
        self._restored_state: dict | None = None
        self._state_loaded = False
        self._load_hook: SparseLayersOnLoad | None = None

    @property
    def state_key(self) -> str:
        return f"SparseTraining[{self.method_class.__name__}]"

    # ---------------------------------------------------------------- before the weights load
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._state_loaded = False
        # Every stage: validate / test / predict with ckpt_path load sparse weights too.
        if self._load_hook is None or self._load_hook.model is not pl_module:
            if self._load_hook is not None:
                self._load_hook.remove()
            self._load_hook = SparseLayersOnLoad(pl_module, self.method_kwargs)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None

    # ---------------------------------------------------------------- once the optimizer exists
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(f"SparseTraining: configure_optimizers must return exactly one optimizer (the one "
                             f"holding the weights to sparsify), got {len(optimizers)}")
        if isinstance(self.method, SparseTrainingMethod):
            # A further fit() with this callback: the earlier method stops hooking its
            # optimizer; the new run starts its own schedule (or the checkpoint's).
            self.method.remove()
        self.method = build_method(self.method_class, self.method_kwargs, pl_module, optimizers[0],
                                   trainer.estimated_stepping_batches)
        if self._restored_state is not None:
            state, self._restored_state = self._restored_state, None
            restore_method_state(self.method, state)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Everything is restored by now: a resumed run must have brought the method's state.
        if trainer.global_step > 0 and trainer.ckpt_path is not None and not self._state_loaded:
            raise ValueError(f"SparseTraining: resumed from {trainer.ckpt_path!r} at step {trainer.global_step}, but "
                             "that checkpoint holds no SparseTraining state (it was written without this callback, "
                             "or with another method); the sparse schedule cannot continue exactly")
        if not has_sparse_layers(pl_module):
            raise ValueError("SparseTraining: the module has no sparse layer after the method was built")

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"method_state": self.method.state_dict()} if self.method is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict):
            raise TypeError(f"SparseTraining.load_state_dict: expected a dict with 'method_state', got "
                            f"{type(state_dict).__name__}")
        if "method_state" not in state_dict:
            raise ValueError(f"SparseTraining.load_state_dict: expected a dict with 'method_state', got keys "
                             f"{sorted(state_dict)}")
        self._state_loaded = True
        if self.method is not None:
            restore_method_state(self.method, state_dict["method_state"])
        else:
            self._restored_state = state_dict["method_state"]
