"""data.worker_sharing: how loader workers hand batches over (torch.multiprocessing sharing strategy)."""

import pytest
import torch
import torch.multiprocessing
from torch.utils.data import DataLoader
from train_utils import SharingProbe, compose_config, make_colour_dataset, tiny_overrides
from transformers.trainer_utils import seed_worker

from llava_train.config import to_typed
from llava_train.data.config import DataConfig
from llava_train.train import steps
from llava_train.train.trainer import WorkerSharing


@pytest.fixture
def restore_strategy():
    before = torch.multiprocessing.get_sharing_strategy()
    yield
    torch.multiprocessing.set_sharing_strategy(before)


def test_an_unknown_strategy_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="data.worker_sharing='shm'.*file_system"):
        DataConfig(worker_sharing="shm")


def _cfg(tmp_path, workers: int, sharing: str, *extra: str):
    data = make_colour_dataset(tmp_path / "data", n=16)
    overrides = ["stage=finetune", "model=tiny", "stage.pretrain_mm_mlp_adapter=null"]
    overrides += [f"data.num_workers={workers}", f"data.worker_sharing={sharing}", *extra]
    return to_typed(compose_config(overrides + tiny_overrides(data, tmp_path / "run")))


def _data(tmp_path, workers: int, sharing: str):
    cfg = _cfg(tmp_path, workers, sharing)
    tokenizer = steps.build_tokenizer(cfg)
    return steps.build_data(cfg, tokenizer, steps.build_model(cfg, tokenizer))


def _flat(batch: dict) -> list:
    out = []
    for key in sorted(batch):
        values = batch[key] if isinstance(batch[key], list) else [batch[key]]
        out += [(key, v) for v in values]
    return out


@pytest.mark.parametrize("sharing", ["file_system", "file_descriptor"])
def test_workers_hand_over_the_same_batches_as_the_training_process(tmp_path, restore_strategy, sharing):
    torch.multiprocessing.set_sharing_strategy(
        "file_descriptor" if sharing == "file_system" else "file_system"
    )
    dataset, collator = _data(tmp_path, workers=1, sharing=sharing)
    assert torch.multiprocessing.get_sharing_strategy() == sharing  # set before any loader forks
    with_worker = list(DataLoader(dataset, batch_size=4, collate_fn=collator, num_workers=1))
    in_process = list(DataLoader(dataset, batch_size=4, collate_fn=collator, num_workers=0))
    assert len(with_worker) == len(in_process) == 4
    for got, want in zip(with_worker, in_process):
        got, want = _flat(got), _flat(want)
        assert [k for k, _ in got] == [k for k, _ in want]
        for (key, a), (_, b) in zip(got, want):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, key
    assert any(
        isinstance(v, torch.Tensor) and v.dim() == 4 for _, v in _flat(with_worker[0])
    )  # images crossed


def test_no_workers_leaves_the_process_strategy_alone(tmp_path, restore_strategy):
    torch.multiprocessing.set_sharing_strategy("file_descriptor")
    _data(tmp_path, workers=0, sharing="file_system")
    assert torch.multiprocessing.get_sharing_strategy() == "file_descriptor"


def test_spawned_workers_take_the_strategy_from_their_init_fn(restore_strategy):
    torch.multiprocessing.set_sharing_strategy("file_system")
    spawn = dict(batch_size=None, num_workers=1, multiprocessing_context="spawn")
    assert list(DataLoader(SharingProbe(), **spawn)) == ["file_descriptor"] * 2  # torch's default, not ours
    assert (
        list(DataLoader(SharingProbe(), **spawn, worker_init_fn=WorkerSharing("file_system")))
        == ["file_system"] * 2
    )


@pytest.mark.parametrize("budget", [None, 200])
def test_the_train_loader_sets_the_strategy_in_its_workers(tmp_path, restore_strategy, budget):
    cfg = _cfg(tmp_path, 1, "file_system", f"data.max_tokens_per_batch={budget or 'null'}")
    tokenizer = steps.build_tokenizer(cfg)
    model = steps.build_model(cfg, tokenizer)
    trainer = steps.build_trainer(cfg, model, tokenizer, *steps.build_data(cfg, tokenizer, model))
    init = trainer.get_train_dataloader().worker_init_fn
    assert isinstance(init, WorkerSharing) and init.strategy == "file_system"
    assert init.then.func is seed_worker  # the Trainer's per-worker seeding still runs after it
    if budget is None:  # and a spawned worker of the prepared loader really runs it
        trainer.train_dataset, trainer.data_collator = SharingProbe(), list
        trainer.args.dataloader_multiprocessing_context = "spawn"
        trainer.llava_cfg.data.group_by_modality_length = trainer.llava_cfg.data.group_by_length = False
        torch.multiprocessing.set_sharing_strategy("file_system")
        assert [s for batch in trainer.get_train_dataloader() for s in batch] == ["file_system"] * 2
