"""The Lightning callback: a plain LightningModule trains sparse, and a run resumed from a
checkpoint equals the uninterrupted run bit for bit (masks, values, optimizer state,
method schedule)."""

from __future__ import annotations

import glob
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning.pytorch")

from sparsekernels.integrations.lightning import SparseTraining  # noqa: E402
from sparsekernels.methods import RigL  # noqa: E402
from sparsekernels.methods.base import unwrap_optimizer  # noqa: E402
from sparsekernels.nn import Sparse24Linear, SparseLinear  # noqa: E402

from conftest import assert_identical  # noqa: E402

# Lightning's notices about what these tiny runs leave out on purpose (workers, a
# validation loader, the ModelCheckpoint of the run that wrote the checkpoint) and its own
# use of a deprecated torch API.
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:.*does not have many workers"),
              pytest.mark.filterwarnings("ignore:.*have no `val_dataloader`"),
              pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint"),
              pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)")]

STEPS, SAVE_AT = 12, 4  # 4 batches an epoch: the checkpoint falls between two epochs


class MLP(L.LightningModule):
    """A LightningModule with no sparsekernels code in it."""

    def __init__(self, init_seed: int) -> None:
        super().__init__()
        torch.manual_seed(init_seed)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


def _trainer(callbacks) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=any(
                         isinstance(c, L.callbacks.ModelCheckpoint) for c in callbacks),
                     callbacks=callbacks, num_sanity_val_steps=0)


def _fit(module, callback, ckpt_dir=None, ckpt_path=None) -> L.Trainer:
    callbacks = [callback]
    if ckpt_dir is not None:
        callbacks.append(L.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=SAVE_AT, save_top_k=-1,
                                                     filename="{step}"))
    trainer = _trainer(callbacks)
    trainer.fit(module, train_dataloaders=_loader(), ckpt_path=ckpt_path)
    return trainer


def _snapshot(trainer: L.Trainer, callback: SparseTraining) -> dict:
    module = trainer.lightning_module
    optimizer = unwrap_optimizer(trainer.optimizers[0])
    return {
        "masks": callback.method.masks(),
        "model": {k: v.clone() for k, v in module.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "method": callback.method.state_dict(),
    }


@pytest.mark.parametrize("method,kwargs", [("rigl", {"sparsity": 0.8, "update_interval": 3}),
                                           ("static", {"sparsity": 0.8}),
                                           ("set", {"sparsity": 0.8, "update_interval": 3}),
                                           ("gmp", {"sparsity": 0.8, "update_interval": 3}),
                                           # set-ups that change the layers they adopt (the
                                           # resumed module holds the checkpoint's first)
                                           ("gap", {"sparsity": 0.8, "partitions": 2}),
                                           ("acdc", {"sparsity": 0.8}),
                                           ("srste", {})])
def test_resume_equals_uninterrupted_run(tmp_path, method, kwargs):
    full_cb = SparseTraining(method, **kwargs)
    full = _fit(MLP(init_seed=0), full_cb, ckpt_dir=tmp_path)
    expected = _snapshot(full, full_cb)
    assert all(isinstance(m, (SparseLinear, Sparse24Linear)) for m in (full.lightning_module.net[i] for i in (0, 2, 4)))
    if method == "rigl":
        # updates at steps 3, 6 and 9 (t_end = 0.75 * 12 from the trainer's step count): on
        # both sides of the checkpoint, and the one after it moved weights
        assert [r["step"] for r in full_cb.method.history] == [3, 6, 9]
        assert full_cb.method.total_steps == STEPS
        assert any(layer["grown"] > 0 for layer in full_cb.method.history[1]["layers"].values())

    ckpt = os.path.join(tmp_path, f"step={SAVE_AT}.ckpt")
    assert os.path.isfile(ckpt), glob.glob(str(tmp_path / "*"))
    resumed_cb = SparseTraining(method, **kwargs)
    # another init: everything must come from the checkpoint
    resumed = _fit(MLP(init_seed=1), resumed_cb, ckpt_path=ckpt)
    assert resumed.global_step == STEPS
    assert_identical(_snapshot(resumed, resumed_cb), expected)


def test_checkpoint_holds_method_state_and_sparse_weights(tmp_path):
    cb = SparseTraining("rigl", sparsity=0.8, update_interval=3)
    _fit(MLP(init_seed=0), cb, ckpt_dir=tmp_path)
    ckpt = torch.load(os.path.join(tmp_path, f"step={SAVE_AT}.ckpt"), weights_only=False)
    state = ckpt["callbacks"][cb.state_key]["method_state"]
    assert state["method"] == "rigl" and state["step"] == SAVE_AT and [r["step"] for r in state["history"]] == [3]
    assert "net.0.values" in ckpt["state_dict"] and "net.0.weight" not in ckpt["state_dict"]
    nnz = ckpt["state_dict"]["net.0.values"].numel()
    assert ckpt["optimizer_states"][0]["state"][0]["exp_avg"].shape == (nnz,)

    # validate (no fit) from the checkpoint into a dense-constructed module
    module = MLP(init_seed=1)
    _trainer([SparseTraining("rigl", sparsity=0.8)]).validate(
        module, dataloaders=_loader(), ckpt_path=os.path.join(tmp_path, f"step={SAVE_AT}.ckpt"), verbose=False)
    assert isinstance(module.net[0], SparseLinear)
    assert torch.equal(module.net[0].values, ckpt["state_dict"]["net.0.values"])


def test_method_class_and_bare_method_recipe():
    # a class instead of a name; the method object is reachable once fitting started
    cb = SparseTraining(RigL, sparsity=0.5, update_interval=2, total_steps=4)
    trainer = _fit(MLP(init_seed=0), cb)
    assert isinstance(cb.method, RigL) and cb.method.step == STEPS and cb.method.total_steps == 4
    assert cb.method.optimizer is unwrap_optimizer(trainer.optimizers[0])
    assert [r["step"] for r in cb.method.history] == [2]  # t_end = 3 from the given total_steps

    # the plain-loop recipe is unchanged
    model = MLP(init_seed=0).net
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rigl = RigL(model, opt, sparsity=0.5, update_interval=1, total_steps=4)
    for x, y in _loader():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert rigl.step == 4 and len(rigl.history) == 3


def test_resume_from_checkpoint_without_method_state_is_an_error(tmp_path):
    # a dense run's checkpoint: resuming it with the callback cannot continue any schedule
    trainer = _trainer([L.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=SAVE_AT, save_top_k=-1,
                                                    filename="{step}")])
    trainer.fit(MLP(init_seed=0), train_dataloaders=_loader())
    with pytest.raises(ValueError, match="holds no SparseTraining state"):
        _fit(MLP(init_seed=0), SparseTraining("static", sparsity=0.5),
             ckpt_path=os.path.join(tmp_path, f"step={SAVE_AT}.ckpt"))


def test_bad_arguments_fail_when_the_callback_is_built():
    with pytest.raises(ValueError, match="unknown method 'rigel'"):
        SparseTraining("rigel", sparsity=0.9)
    with pytest.raises(TypeError, match="takes no argument.*'sparsty'"):
        SparseTraining("rigl", sparsty=0.9)
    with pytest.raises(TypeError, match="'optimizer' is not a method argument"):
        SparseTraining("static", optimizer=None)
    with pytest.raises(TypeError, match="expected a method name or class"):
        SparseTraining(3)
    # (distribution is left to the method: ACDC also takes "global")
    for kwargs, match in (({"sparsity": 1.5}, "sparsity"), ({"update_interval": 0}, "update_interval")):
        with pytest.raises(ValueError, match=match):
            SparseTraining("rigl", **kwargs)
    with pytest.raises(TypeError, match="method_state"):
        SparseTraining("rigl").load_state_dict(None)
