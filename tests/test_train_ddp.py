"""NORM_SYNC and SyncBN across processes (gloo on CPU): 2 processes x 1 image must give the losses of
1 process x 2 images, and the test shows that without them they do not."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils import comm
from model_utils import instances
from train_helpers import OPTIONS_OPTS, SHAPES_CONFIG, TINY_OPTS

from fcos.engine.config import get_fcos_cfg
from fcos.engine.launch import launch

SIZE = 64


def _build(head_norm: str) -> torch.nn.Module:
    """Same weights in every process (seeded); FrozenBN backbone so only the head's norm sees the batch."""
    cfg = get_fcos_cfg()
    cfg.merge_from_file(str(SHAPES_CONFIG))
    cfg.merge_from_list(TINY_OPTS)
    cfg.merge_from_list(
        [
            "MODEL.DEVICE",
            "cpu",
            "MODEL.FCOS.NUM_CLASSES",
            "3",
            "MODEL.RESNETS.NORM",
            "FrozenBN",
            "MODEL.FCOS.HEAD_NORM",
            head_norm,
            "MODEL.FCOS.NORM_SYNC",
            "True",
        ]
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    return model


def _inputs() -> List[Dict]:
    """Two different images; the first has three boxes (many positives), the second one small box."""
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, SIZE, SIZE, generator=generator) * 255 * (i + 1) / 2 for i in range(2)]
    return [
        {
            "image": images[0],
            "instances": instances(
                (SIZE, SIZE), [[2, 2, 30, 40], [20, 8, 62, 60], [40, 40, 56, 50]], [0, 1, 2]
            ),
        },
        {"image": images[1], "instances": instances((SIZE, SIZE), [[10, 12, 24, 22]], [1])},
    ]


def _losses(model: torch.nn.Module, inputs: List[Dict]) -> Dict[str, float]:
    return {k: float(v.detach()) for k, v in model(inputs).items()}


def _loss_worker(result_file: str) -> None:
    """Each process takes one image; rank 0 writes the mean over processes of every loss."""
    rank = comm.get_rank()
    results = {}
    for head_norm in ("SyncBN", "BN"):
        model = _build(head_norm)
        for norm_sync in (True, False):
            model.norm_sync = norm_sync
            gathered = comm.all_gather(_losses(model, _inputs()[rank : rank + 1]))
            results[f"{head_norm}/{norm_sync}"] = {
                k: sum(g[k] for g in gathered) / len(gathered) for k in gathered[0]
            }
    if rank == 0:
        Path(result_file).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def two_process_losses(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Dict[str, float]]:
    result_file = tmp_path_factory.mktemp("ddp") / "losses.json"
    launch(_loss_worker, 2, dist_url="auto", args=(str(result_file),), device="cpu")
    return json.loads(result_file.read_text())


@pytest.fixture(scope="module")
def one_process_losses() -> Dict[str, float]:
    # One process: SyncBN is plain BN over the two images, NORM_SYNC a no-op.
    return _losses(_build("SyncBN"), _inputs())


@pytest.mark.slow
def test_norm_sync_and_syncbn_match_one_process(two_process_losses, one_process_losses) -> None:
    synced = two_process_losses["SyncBN/True"]
    assert (
        synced.keys()
        == one_process_losses.keys()
        == {"loss_cls", "loss_box_reg", "loss_centerness"}
    )
    for key, value in one_process_losses.items():
        assert synced[key] == pytest.approx(value, rel=1e-5), key


@pytest.mark.slow
def test_without_norm_sync_the_losses_differ(two_process_losses, one_process_losses) -> None:
    # Each process divides by its own positive count (many vs. few), so the mean is not the batch loss.
    unsynced = two_process_losses["SyncBN/False"]
    assert unsynced["loss_cls"] != pytest.approx(one_process_losses["loss_cls"], rel=1e-2)


@pytest.mark.slow
def test_plain_bn_head_differs_across_processes(two_process_losses, one_process_losses) -> None:
    # Per-process BN statistics of one image each differ from the statistics of both images.
    per_process_bn = two_process_losses["BN/True"]
    assert any(
        per_process_bn[k] != pytest.approx(v, rel=1e-3) for k, v in one_process_losses.items()
    )




def _options_ddp_worker(result_file: str) -> None:
    """IoU quality + deformable tower + P2 in DistributedDataParallel, find_unused_parameters off:
    DDP raises at the next iteration if a parameter went without a gradient. Rank 1's second batch
    has no object at all (quality and box losses 0, yet connected to every parameter)."""
    from torch.nn.parallel import DistributedDataParallel

    rank = comm.get_rank()
    cfg = get_fcos_cfg()
    cfg.merge_from_file(str(SHAPES_CONFIG))
    cfg.merge_from_list(TINY_OPTS + OPTIONS_OPTS)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.FCOS.NUM_CLASSES", "3"])
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    ddp = DistributedDataParallel(model, find_unused_parameters=False)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
    inputs = _inputs()[rank : rank + 1]
    empty = [{"image": inputs[0]["image"], "instances": instances((SIZE, SIZE), [], [])}]
    losses = []
    for step in range(3):
        loss_dict = ddp(empty if (rank == 1 and step == 1) else inputs)
        optimizer.zero_grad()
        sum(loss_dict.values()).backward()
        optimizer.step()
        losses.append({k: float(v.detach()) for k, v in loss_dict.items()})
    # Gradients were all-reduced, so every process took the same step: the weights are still equal.
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    gathered = comm.all_gather({"losses": losses, "checksum": checksum})
    if rank == 0:
        Path(result_file).write_text(json.dumps(gathered))


@pytest.mark.slow
def test_options_train_under_ddp_without_unused_parameters(tmp_path: Path) -> None:
    result_file = tmp_path / "options.json"
    launch(_options_ddp_worker, 2, dist_url="auto", args=(str(result_file),), device="cpu")
    ranks = json.loads(result_file.read_text())
    assert len(ranks) == 2
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-9)
    keys = {"loss_cls", "loss_box_reg", "loss_quality"}
    for rank in ranks:
        assert [set(step) for step in rank["losses"]] == [keys] * 3
    assert ranks[1]["losses"][1]["loss_quality"] == 0.0
    assert ranks[0]["losses"][1]["loss_quality"] > 0
