"""monai_peft.bundle.distributed on a real gloo process group (2 CPU processes)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as torch_mp


def _validation_shards(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from monai_peft.bundle.distributed import distributed_sampler

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        shards = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for n in (1, 3):  # fewer items than ranks, and an uneven count
                shards[n] = list(iter(distributed_sampler(list(range(n)), shuffle=False, even_divisible=False)))
        msgs = [str(w.message) for w in caught]
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"shards": shards, "warnings": msgs}))
    finally:
        dist.destroy_process_group()


def test_validation_sampler_with_fewer_items_than_ranks(tmp_path):
    """One validation case on 2 ranks: MONAI's uneven sampler would raise; every rank scores the case instead,
    with a warning. With 3 items the shards stay uneven and disjoint (no item is scored twice)."""
    torch_mp.spawn(_validation_shards, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["shards"]["1"] for r in ranks] == [[0], [0]]
    three = [r["shards"]["3"] for r in ranks]
    assert sorted(three[0] + three[1]) == [0, 1, 2], three
    for r in ranks:
        assert any("1 item(s) for 2 processes" in m for m in r["warnings"]), r["warnings"]
        assert not any("3 item(s)" in m for m in r["warnings"])
