"""AdapterCheckpointSaver / resume / install_adapter: best-on-validation and last checkpoints written atomically
under a run folder, a killed run resumed from its last epoch, shipped files never overwritten by accident."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from torch import nn

import monai_peft as mp
from monai_peft.bundle import (
    CHECKPOINT_INFO,
    TRAINER_STATE,
    AdapterCheckpointLoader,
    AdapterCheckpointSaver,
    install_adapter,
    load_training_checkpoint,
    main_process_handlers,
    save_training_checkpoint,
)
from monai_peft.errors import CheckpointError


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )


def _peft() -> mp.PeftModel:
    return mp.get_peft_model(_net(), mp.LoraConfig(r=2, alpha=4, target_modules=["0"]), modules_to_save=["4"])


def _data(n: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [
        {"image": torch.randn(2, 1, 6, 5, generator=g), "label": torch.tensor([i % 2, (i + 1) % 2])} for i in range(n)
    ]


class _ScriptedMetric:
    """An evaluator 'metric' whose value per epoch is scripted, so the best epoch is known in advance."""

    def __init__(self, values: list[float]) -> None:
        self.values = values

    def attach(self, engine, name):  # ignite Metric protocol used by MONAI's key_val_metric
        from ignite.engine import Events

        engine.add_event_handler(
            Events.EPOCH_COMPLETED, lambda e: e.state.metrics.__setitem__(name, self.values[e.state.epoch - 1])
        )


class _Fail:
    """Raises at a given trainer iteration: simulates a run killed mid-epoch."""

    def __init__(self, at_iteration: int) -> None:
        self.at = at_iteration

    def attach(self, engine):
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED(once=self.at), self._boom)

    def _boom(self, engine):
        raise KeyboardInterrupt("killed")


def _engines(model, out, epochs, values, extra=()):
    from monai.handlers import ValidationHandler

    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    evaluator = SupervisedEvaluator(
        device="cpu", val_data_loader=_data(2), network=model, key_val_metric={"val_auc": _ScriptedMetric(values)}
    )
    saver = AdapterCheckpointSaver(out, model, optimizer=opt, evaluator=evaluator)
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=epochs,
        train_data_loader=_data(),
        network=model,
        optimizer=opt,
        loss_function=nn.CrossEntropyLoss(),
        train_handlers=[ValidationHandler(1, evaluator), saver, *extra],
    )
    return trainer, evaluator, saver, opt


def test_best_and_last_checkpoints_follow_the_validation_metric(tmp_path):
    model = _peft()
    snapshots = {}
    trainer, _, saver, _ = _engines(model, tmp_path / "run", 3, [0.6, 0.9, 0.7])
    from ignite.engine import Events

    @trainer.on(Events.EPOCH_COMPLETED)
    def _snap(engine):
        snapshots[engine.state.epoch] = {k: v.clone() for k, v in model.adapter_state_dict().items()}

    trainer.run()
    best, last = tmp_path / "run" / "best", tmp_path / "run" / "last"
    assert saver.best_metric == 0.9 and saver.best_metric_epoch == 2
    info = __import__("json").loads((best / CHECKPOINT_INFO).read_text())
    assert info == {"epoch": 2, "metric": 0.9, "metric_name": "val_auc"}
    loaded = mp.PeftModel.from_pretrained(_net(), best)
    for k, v in loaded.adapter_state_dict().items():
        assert torch.equal(v, snapshots[2][k]), k  # best = the epoch-2 adapter, not the last one
    assert not torch.equal(snapshots[2]["adapter.0.lora_B"], snapshots[3]["adapter.0.lora_B"])
    state = torch.load(last / TRAINER_STATE, weights_only=True)
    assert state["epoch"] == 3 and state["iteration"] == 24 and state["best_metric"] == 0.9
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["best", "last"]  # no temporary leftovers


def test_a_killed_run_resumes_from_its_last_epoch_and_says_so(tmp_path, caplog):
    out = tmp_path / "run"
    model = _peft()
    trainer, _, _, _ = _engines(model, out, 4, [0.5, 0.8, 0.6, 0.7], extra=[_Fail(at_iteration=8 * 2 + 3)])
    with pytest.raises(KeyboardInterrupt):
        trainer.run()  # killed during epoch 3: last = epoch 2
    saved = torch.load(out / "last" / TRAINER_STATE, weights_only=True)
    assert saved["epoch"] == 2
    epoch2_adapter = mp.PeftModel.from_pretrained(_net(), out / "last").adapter_state_dict()

    fresh = _peft()
    trainer2, evaluator2, saver2, opt2 = _engines(fresh, out, 4, [0.5, 0.8, 0.6, 0.7])
    epochs_run = []
    from ignite.engine import Events

    trainer2.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs_run.append(e.state.epoch))
    starts = {}

    @trainer2.on(Events.EPOCH_STARTED(once=3))
    def _check_restored(engine):
        starts["adapter"] = {k: v.clone() for k, v in fresh.adapter_state_dict().items()}
        starts["opt_steps"] = next(iter(opt2.state.values()))["step"].item()

    with caplog.at_level(logging.INFO, logger="monai_peft.bundle.checkpoint"):
        trainer2.run()
    assert epochs_run == [3, 4]  # epochs 1-2 are not repeated
    assert f"resuming from {out / 'last' / TRAINER_STATE} at epoch 2" in caplog.text
    for k, v in epoch2_adapter.items():
        assert torch.equal(starts["adapter"][k], v), k
    assert starts["opt_steps"] == 16  # Adam state restored (2 epochs x 8 iterations)
    assert saver2.best_metric == 0.8 and saver2.best_metric_epoch == 2  # best tracking restored: 0.6/0.7 < 0.8
    assert __import__("json").loads((out / "best" / CHECKPOINT_INFO).read_text())["epoch"] == 2
    assert torch.load(out / "last" / TRAINER_STATE, weights_only=True)["epoch"] == 4


def test_loader_handler_alone_resumes(tmp_path, caplog):
    out = tmp_path / "run"
    model = _peft()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)  # differs from a fresh model's adapter
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    save_training_checkpoint(out / "last", model, opt, state={"epoch": 1, "iteration": 8})
    fresh = _peft()
    assert not all(torch.equal(fresh.adapter_state_dict()[k], v) for k, v in model.adapter_state_dict().items())
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=_data(),
        network=fresh,
        optimizer=torch.optim.SGD([p for p in fresh.parameters() if p.requires_grad], lr=0.1),
        loss_function=nn.CrossEntropyLoss(),
        train_handlers=[AdapterCheckpointLoader(out, fresh)],
    )
    with caplog.at_level(logging.INFO, logger="monai_peft.bundle.checkpoint"):
        trainer.run()
    assert "at epoch 1 (max_epochs 1 already reached" in caplog.text
    for k, v in model.adapter_state_dict().items():
        assert torch.equal(fresh.adapter_state_dict()[k], v), k  # loaded and no further step taken


def test_never_overwrites_a_folder_it_did_not_write(tmp_path):
    model = _peft()
    shipped = tmp_path / "models" / "adapter"
    model.save_adapter(shipped)
    before = {p.name: p.read_bytes() for p in shipped.iterdir()}
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        save_training_checkpoint(shipped, _peft())
    with pytest.raises(CheckpointError, match="is an adapter folder"):
        AdapterCheckpointSaver(shipped, model)
    with pytest.raises(CheckpointError, match="refusing to replace"):
        install_adapter(save_training_checkpoint(tmp_path / "run" / "best", _peft()), shipped)
    assert {p.name: p.read_bytes() for p in shipped.iterdir()} == before
    save_training_checkpoint(shipped, model, overwrite=True)  # explicit flag: allowed
    install_adapter(tmp_path / "run" / "best", shipped, overwrite=True)
    assert sorted(p.name for p in shipped.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_an_interrupted_swap_is_recovered_and_a_corrupt_state_fails_clearly(tmp_path):
    model = _peft()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    last = save_training_checkpoint(tmp_path / "last", model, opt, state={"epoch": 5, "iteration": 40})
    os.replace(last, tmp_path / ".last.old-1234")  # killed between the two renames of a swap
    assert load_training_checkpoint(tmp_path / "last", _peft())["epoch"] == 5
    assert last.is_dir()
    (last / TRAINER_STATE).write_bytes(b"garbage")
    with pytest.raises(
        CheckpointError, match=f"cannot resume from {last / TRAINER_STATE}.*Delete {last} to start over"
    ):
        load_training_checkpoint(last, _peft())
    other = mp.get_peft_model(_net(), mp.LoraConfig(r=3, alpha=4, target_modules=["0"]))
    with pytest.raises(CheckpointError, match="cannot resume"):
        load_training_checkpoint(last, other)


def test_main_process_handlers_keeps_everything_outside_ddp():
    from monai.handlers import StatsHandler, ValidationHandler

    handlers = [StatsHandler(), ValidationHandler(1, validator=None)]
    assert main_process_handlers(handlers) == handlers
