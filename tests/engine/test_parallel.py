"""FSDP2 (train.strategy=fsdp) against DDP in 2 gloo ranks, sharded checkpoints resumed at another world size,
MoCo v3's momentum encoder on DTensor shards, and export from a sharded checkpoint.

One spawned 2-rank job runs every multi-process training here (spawning costs seconds); the single-process
resumes and exports then read its folders.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitssl.ssl  # noqa: F401  (registers the objectives, in the spawned ranks too)
from tests._dist import run_distributed
from vitssl.config import ConfigError, load_config
from vitssl.engine import load_checkpoint, train
from vitssl.engine.checkpoint import find_resume_checkpoint, list_step_checkpoints
from vitssl.engine.sharded import is_sharded_checkpoint

# test_tiny with 80 samples: 5 steps of 16 in one epoch, a sharded checkpoint at step 3 (mid-epoch) and at 5
_TINY = ["train.epochs=1", "data.train.kwargs.num_samples=80", "train.checkpoint_every_steps=3", "train.keep_last=5"]
# MoCo v3 on digits with test_vit and small heads: 3 steps of 32 (no accumulation: contrastive)
_MOCO = [
    "model.backbone=test_vit",
    "~model.backbone_kwargs",
    "objective.dim=16",
    "objective.mlp_dim=32",
    "train.batch_size=32",
    "train.stop_after_steps=3",
    "train.log_every_steps=1",
    "eval.knn_every_epochs=0",
]


def _losses(out: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def _tiny(out: Path, *overrides: str):
    return load_config("pretrain/test_tiny", [f"output_dir={out}", *_TINY, *overrides])


def _two_rank_runs(root: str) -> dict[str, int]:
    """Every 2-rank run of this module, in one process group."""
    from vitssl import distributed as dist

    root_path = Path(root)
    steps = {}
    for strategy in ("ddp", "fsdp"):
        steps[strategy] = train(_tiny(root_path / strategy, f"train.strategy={strategy}")).step
    # resume the FSDP run from its step-3 checkpoint on 2 ranks (a copy of the folder without the later steps)
    if dist.get_rank() == 0:
        _copy_until(root_path / "fsdp", root_path / "resume2", 3)
        _copy_until(root_path / "fsdp", root_path / "resume1", 3)
        _copy_until(root_path / "fsdp", root_path / "resume4", 3)
        _copy_until(root_path / "fsdp", root_path / "fsdp_to_ddp", 3)
        _copy_until(root_path / "ddp", root_path / "ddp_to_fsdp", 3, suffix=".pth")
    dist.barrier()
    steps["resume2"] = train(_tiny(root_path / "resume2", "train.strategy=fsdp")).step
    # a DDP checkpoint (one file) resumed under FSDP, and an FSDP one (shards) under DDP
    steps["ddp_to_fsdp"] = train(_tiny(root_path / "ddp_to_fsdp", "train.strategy=fsdp")).step
    steps["fsdp_to_ddp"] = train(_tiny(root_path / "fsdp_to_ddp", "train.strategy=ddp")).step
    for strategy in ("ddp", "fsdp"):
        out = root_path / f"moco_{strategy}"
        cfg = load_config("pretrain/mocov3_demo", [f"output_dir={out}", *_MOCO, f"train.strategy={strategy}"])
        steps[f"moco_{strategy}"] = train(cfg).step
    return steps


def _copy_until(src: Path, dst: Path, step: int, suffix: str = ".dcp") -> None:
    """A run folder holding ``src``'s config and its checkpoint at ``step`` only (as if it stopped there)."""
    dst.mkdir(parents=True)
    shutil.copy(src / "config.yaml", dst / "config.yaml")
    name = f"checkpoint_{step:08d}{suffix}"
    (shutil.copytree if suffix == ".dcp" else shutil.copy)(src / name, dst / name)


def _resume_on_four(root: str) -> int:
    return train(_tiny(Path(root) / "resume4", "train.strategy=fsdp")).step


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fsdp")
    steps = run_distributed(_two_rank_runs, 2, str(root), timeout_s=300)
    expected = {"ddp": 5, "fsdp": 5, "resume2": 5, "ddp_to_fsdp": 5, "fsdp_to_ddp": 5, "moco_ddp": 3, "moco_fsdp": 3}
    assert steps[0] == steps[1] == expected
    return root


def test_fsdp_gives_the_losses_and_weights_of_ddp(runs: Path) -> None:
    ddp, fsdp = _losses(runs / "ddp"), _losses(runs / "fsdp")
    assert list(fsdp) == [1, 2, 3, 4, 5]
    for step, loss in ddp.items():
        assert fsdp[step] == pytest.approx(loss, abs=1e-5), step
    # the finished FSDP run gathered its shards into the same timm-layout backbone file DDP writes
    a, b = load_file(runs / "ddp" / "backbone.safetensors"), load_file(runs / "fsdp" / "backbone.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)


def test_fsdp_writes_sharded_checkpoints(runs: Path) -> None:
    steps = sorted(list_step_checkpoints(runs / "fsdp"))
    assert [s for s, _ in steps] == [3, 5] and all(is_sharded_checkpoint(p) for _, p in steps)
    assert sorted(p.name for p in steps[-1][1].glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one per rank
    path, state = find_resume_checkpoint(runs / "fsdp")
    assert path.name == "checkpoint_00000005.dcp" and state["sharded"] and "model" not in state
    assert state["sampler"]["samples_in_epoch"] == 80 and state["world_size"] == 2
    # loaded whole in one process, it is the DDP run's checkpoint
    full, ddp = load_checkpoint(path)["model"], load_checkpoint(runs / "ddp" / "checkpoint_last.pth")["model"]
    assert full.keys() == ddp.keys()
    for key, value in ddp.items():
        torch.testing.assert_close(full[key], value, rtol=0, atol=1e-5)


def test_a_two_rank_fsdp_checkpoint_resumes_on_two_and_on_one_rank(runs: Path) -> None:
    uninterrupted = _losses(runs / "fsdp")
    on_two = _losses(runs / "resume2")
    assert list(on_two) == [4, 5]
    result = train(_tiny(runs / "resume1", "train.strategy=fsdp"))  # this process: one rank, nothing to shard
    assert result.step == 5 and result.status == "finished"
    on_one = _losses(runs / "resume1")
    assert list(on_one) == [4, 5]
    for step in (4, 5):
        assert on_two[step] == pytest.approx(uninterrupted[step], abs=1e-5)
        assert on_one[step] == pytest.approx(uninterrupted[step], abs=1e-5)


def test_a_two_rank_fsdp_checkpoint_resumes_on_four_ranks(runs: Path) -> None:
    """4 gloo processes (micro-batches of 4 instead of 8) continue the 2-rank run's global batches: same losses."""
    assert run_distributed(_resume_on_four, 4, str(runs), timeout_s=240) == [5] * 4
    on_four, uninterrupted = _losses(runs / "resume4"), _losses(runs / "fsdp")
    assert list(on_four) == [4, 5]
    for step in (4, 5):
        assert on_four[step] == pytest.approx(uninterrupted[step], abs=1e-5)
    newest = max(list_step_checkpoints(runs / "resume4"))[1]
    assert sorted(p.name for p in newest.glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(4)]


def test_the_global_sample_order_is_the_same_on_two_and_four_ranks() -> None:
    """What the engine's sampler gives each rank after a resume at step 3 of 5 (train.batch_size 16): the union
    over the ranks of each step's micro-batches is the same global batch, in the same step, on 2 and on 4 ranks."""
    from vitssl.engine.build import ResumableSampler

    def global_batches(world: int) -> list[set[int]]:
        micro = 16 // world
        per_rank = []
        for rank in range(world):
            sampler = ResumableSampler(80, world, rank, seed=0)
            sampler.set_epoch(0)
            sampler.set_start(3 * micro)  # the engine's set_start: steps done x micro-batch
            per_rank.append(list(sampler))
        return [{i for mine in per_rank for i in mine[s * micro : (s + 1) * micro]} for s in range(2)]

    two, four = global_batches(2), global_batches(4)
    assert two == four and all(len(b) == 16 for b in two) and not two[0] & two[1]


def test_checkpoints_move_between_ddp_and_fsdp(runs: Path) -> None:
    """A DDP run's single-file checkpoint resumes under train.strategy=fsdp and an FSDP run's shards under ddp,
    each continuing with the uninterrupted run's losses; each then writes its own strategy's format."""
    uninterrupted = _losses(runs / "ddp")
    for name, suffix in (("ddp_to_fsdp", ".dcp"), ("fsdp_to_ddp", ".pth")):
        resumed = _losses(runs / name)
        assert list(resumed) == [4, 5], name
        for step in (4, 5):
            assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-5), (name, step)
        assert max(list_step_checkpoints(runs / name))[1].suffix == suffix


def test_moco_momentum_encoder_under_fsdp(runs: Path) -> None:
    """The EMA update runs on the shards: losses and both encoders equal DDP's."""
    ddp, fsdp = _losses(runs / "moco_ddp"), _losses(runs / "moco_fsdp")
    assert list(fsdp) == [1, 2, 3]
    for step, loss in ddp.items():
        assert fsdp[step] == pytest.approx(loss, abs=1e-5), step
    a = load_checkpoint(runs / "moco_ddp" / "checkpoint_last.pth")["model"]
    b = load_checkpoint(max(list_step_checkpoints(runs / "moco_fsdp"))[1])["model"]
    momentum = [k for k in a if k.startswith("momentum_backbone.") and a[k].is_floating_point()]
    assert momentum
    for key in momentum:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)
    moved = [k for k in momentum if not torch.equal(a[k], a[k.replace("momentum_", "", 1)])]
    assert moved  # the momentum encoder moved off the online one by EMA, not by a copy


def test_unknown_strategy_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.strategy.*valid values: ddp, fsdp"):
        load_config("pretrain/test_tiny", [f"output_dir={tmp_path}", "train.strategy=zero3"])


def test_export_from_a_sharded_checkpoint(runs: Path, tmp_path: Path) -> None:
    """`vitssl export checkpoint` gives a single file a run resumes from; `export backbone` timm's layout."""
    from vitssl.cli import main

    single = tmp_path / "step3.pth"
    assert main(["export", "checkpoint", str(runs / "fsdp" / "checkpoint_00000003.dcp"), "--out", str(single)]) == 0
    state = load_checkpoint(single)
    assert state["step"] == 3 and isinstance(next(iter(state["optimizer"]["state"])), int)  # by slot, as torch's
    train(_tiny(tmp_path / "from_file", f"resume={single}"))  # one rank, DDP strategy, optimizer state restored
    resumed, uninterrupted = _losses(tmp_path / "from_file"), _losses(runs / "fsdp")
    assert list(resumed) == [4, 5]
    for step in (4, 5):
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-5)

    exported = tmp_path / "backbone.safetensors"
    assert main(["export", "backbone", str(runs / "fsdp"), "--out", str(exported)]) == 0  # the run's newest step
    written = load_file(runs / "fsdp" / "backbone.safetensors")
    for key, value in load_file(exported).items():
        assert torch.equal(value, written[key]), key
    assert main(["export", "backbone", str(runs / "fsdp"), "--out", str(exported)]) == 2  # exists: --force
    assert main(["export", "checkpoint", str(single), "--out", str(tmp_path / "again.pth")]) == 2  # not sharded
