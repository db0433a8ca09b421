"""The Hugging Face Trainer callback: an unchanged transformers model trains sparse, and a
run resumed from a checkpoint folder (written to another output_dir) equals the
uninterrupted run bit for bit (masks, values, optimizer state, method schedule)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import Dataset

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from safetensors.torch import load_file  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

from sparsekernels.integrations.hf import STATE_KEY, SparseTrainingCallback, _decode_state, _encode_state  # noqa: E402
from sparsekernels.methods import RigL  # noqa: E402
from sparsekernels.methods.base import unwrap_optimizer  # noqa: E402
from sparsekernels.nn import Sparse24Linear, SparseLinear  # noqa: E402

from conftest import assert_identical  # noqa: E402

STEPS, SAVE_EVERY = 6, 2  # 16 samples, batches of 8: the checkpoint at step 2 ends the first epoch


pytestmark = pytest.mark.usefixtures("one_thread")


class Pairs(Dataset):
    """16 random token sequences with random labels."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 100, (16, 12), generator=g)
        self.labels = torch.randint(0, 2, (16,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": self.labels[i]}


def _bert(init_seed: int) -> BertForSequenceClassification:
    torch.manual_seed(init_seed)
    return BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=64, vocab_size=100, num_labels=2,
                                                    max_position_embeddings=32))


def _trainer(model, output_dir, callbacks, max_steps=STEPS) -> Trainer:
    # The Trainer's defaults, bar what keeps the test small, quiet and on the CPU.
    args = TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, save_steps=SAVE_EVERY,
                             per_device_train_batch_size=8, learning_rate=1e-3, report_to=[], use_cpu=True,
                             disable_tqdm=True, logging_steps=1000)
    return Trainer(model=model, args=args, train_dataset=Pairs(), callbacks=callbacks)


def _snapshot(trainer: Trainer, callback: SparseTrainingCallback) -> dict:
    return {
        "masks": callback.method.masks(),
        "model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
        "optimizer": unwrap_optimizer(trainer.optimizer).state_dict(),
        "scheduler": trainer.lr_scheduler.state_dict(),
        "method": callback.method.state_dict(),
    }


@pytest.mark.parametrize("method,kwargs", [("rigl", {"sparsity": 0.8, "update_interval": 1}),
                                           ("static", {"sparsity": 0.8}),
                                           ("gmp", {"sparsity": 0.8, "update_interval": 1}),
                                           # set-ups that change the layers they adopt (the
                                           # resumed model holds the checkpoint's first)
                                           ("gap", {"sparsity": 0.8, "partitions": 2, "cycles": 1,
                                                    "phase_length": 2}),
                                           ("acdc", {"sparsity": 0.8, "warmup": 1, "phase_length": 1,
                                                     "dense_end": 5}),
                                           ("srste", {})])
def test_resume_equals_uninterrupted_run(tmp_path, method, kwargs):
    full_cb = SparseTrainingCallback(method, **kwargs)
    full = _trainer(_bert(0), tmp_path / "run", [full_cb])
    full.train()
    expected = _snapshot(full, full_cb)
    query = full.model.bert.encoder.layer[0].attention.self.query
    assert isinstance(query, Sparse24Linear if method == "srste" else SparseLinear)
    if method == "rigl":
        # updates at 1..4 (t_end = int(0.75 * max_steps)): on both sides of the checkpoint,
        # and the one at step 3 moved weights
        assert [r["step"] for r in full_cb.method.history] == [1, 2, 3, 4]
        assert full_cb.method.total_steps == STEPS
        assert any(layer["grown"] > 0 for layer in full_cb.method.history[2]["layers"].values())
    if method == "gmp":  # pruned on both sides of the checkpoint: nnz changes across it
        assert [r["step"] for r in full_cb.method.history] == [1, 2, 3, 4]

    # the checkpoint folder: sparse weights, the sparse values' moments, the method state
    checkpoint = tmp_path / "run" / f"checkpoint-{SAVE_EVERY}"
    weights = load_file(checkpoint / "model.safetensors")
    key = "bert.encoder.layer.0.attention.self.query"
    stored = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"][STATE_KEY]
    assert stored["global_step"] == SAVE_EVERY
    method_state = _decode_state(stored["method_state"])
    assert method_state["method"] == method
    if method == "srste":  # 2:4 metadata beside the dense master weight the optimizer trains
        trained = f"{key}.weight"
        assert f"{key}.meta" in weights and method_state["forwards"][key] == SAVE_EVERY
    else:
        trained = f"{key}.values"
        assert f"{key}.weight" not in weights and method_state["step"] == SAVE_EVERY
    moments = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    assert any(s["exp_avg"].shape == weights[trained].shape for s in moments.values())

    resumed_cb = SparseTrainingCallback(method, **kwargs)
    # another init and another output_dir: everything must come from the checkpoint folder
    resumed = _trainer(_bert(1), tmp_path / "elsewhere", [resumed_cb])
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == STEPS
    assert_identical(_snapshot(resumed, resumed_cb), expected)


def test_method_class_argument(tmp_path):
    cb = SparseTrainingCallback(RigL, sparsity=0.5, update_interval=2, total_steps=4)
    trainer = _trainer(_bert(0), tmp_path, [cb])
    trainer.args.save_strategy = "no"
    trainer.train()
    assert isinstance(cb.method, RigL) and cb.method.step == STEPS and cb.method.total_steps == 4
    assert cb.method.optimizer is unwrap_optimizer(trainer.optimizer)
    assert [r["step"] for r in cb.method.history] == [2]  # t_end = 3 from the given total_steps

    # a second train(): the Trainer keeps its optimizer; only the new method hooks it
    first = cb.method
    trainer.train()
    assert cb.method is not first and first.step == STEPS and cb.method.step == STEPS


def test_resume_that_cannot_be_exact_is_an_error(tmp_path):
    _trainer(_bert(0), tmp_path / "dense", [], max_steps=SAVE_EVERY).train()
    # a dense run's checkpoint: the model stays dense, nothing to continue
    with pytest.raises(ValueError, match="no sparse layer"):
        _trainer(_bert(0), tmp_path / "a", [SparseTrainingCallback("static", sparsity=0.5)]).train(
            resume_from_checkpoint=str(tmp_path / "dense" / f"checkpoint-{SAVE_EVERY}"))

    _trainer(_bert(0), tmp_path / "sparse", [SparseTrainingCallback("static", sparsity=0.5)],
             max_steps=SAVE_EVERY).train()
    checkpoint = str(tmp_path / "sparse" / f"checkpoint-{SAVE_EVERY}")
    # the callback added after the Trainer was built never saw the weights load
    late = _trainer(_bert(0), tmp_path / "b", [])
    late.add_callback(SparseTrainingCallback("static", sparsity=0.5))
    with pytest.raises(ValueError, match="added after the Trainer was built"):
        late.train(resume_from_checkpoint=checkpoint)


def test_method_state_encoding_is_exact():
    plain = {"method": "rigl", "step": 7, "drop_fraction": 0.3, "t_end": None,
             "history": [{"step": 3, "layers": {"a": {"nnz": 5, "mean_grow_score": 0.1 + 0.2}}}]}
    encoded = _encode_state(plain)
    assert "json" in encoded  # readable in trainer_state.json
    assert _decode_state(json.loads(json.dumps(encoded))) == plain
    # what JSON would change (a tuple, an int key, a tensor) goes through torch.save
    odd = {"shape": (3, 4), "by_step": {3: 1.5}, "mask": torch.tensor([True, False])}
    encoded = _encode_state(odd)
    assert "torch_save_base64" in encoded
    back = _decode_state(json.loads(json.dumps(encoded)))
    assert back["shape"] == (3, 4) and back["by_step"] == {3: 1.5} and torch.equal(back["mask"], odd["mask"])
    with pytest.raises(ValueError, match="not a saved method state"):
        _decode_state({"something": 1})


def test_bad_arguments_fail_when_the_callback_is_built():
    with pytest.raises(ValueError, match="unknown method 'sett'"):
        SparseTrainingCallback("sett")
    with pytest.raises(TypeError, match="takes no argument.*'update_intervals'"):
        SparseTrainingCallback("set", update_intervals=10)
    with pytest.raises(TypeError, match="'model' is not a method argument"):
        SparseTrainingCallback("static", model=None)
    # (distribution is left to the method: ACDC also takes "global")
    for kwargs, match in (({"sparsity": 1.5}, "sparsity"), ({"update_interval": 0}, "update_interval")):
        with pytest.raises(ValueError, match=match):
            SparseTrainingCallback("rigl", **kwargs)


def test_a_malformed_saved_state_is_a_value_error():
    from sparsekernels.integrations.hf import _decode_state

    for bad in ({"torch_save_base64": "!!!"}, {"torch_save_base64": "aGVsbG8="}, {"other": 1}, None):
        with pytest.raises(ValueError, match="not a saved method state"):
            _decode_state(bad)


def test_a_failed_restore_detaches_the_method():
    from sparsekernels.integrations._trainer_support import restore_method_state
    from sparsekernels.methods import RigL

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    method = RigL(model, opt, sparsity=0.5, total_steps=10)
    with pytest.raises(ValueError):
        restore_method_state(method, {"method": "set"})
    assert not opt._optimizer_step_post_hooks  # no step hook left running
