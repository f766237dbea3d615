"""Distributed helpers: single-process defaults, launcher-variable checks, and real collectives in 2 gloo ranks."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed.nn.functional as dist_fn

from tests._dist import run_distributed
from vitssl import distributed as D

_N, _D = 3, 4  # rows per rank, feature width


@pytest.fixture
def launcher_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A clean slate of launcher variables, restored after the test."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_single_process_defaults(launcher_env: pytest.MonkeyPatch) -> None:
    launcher_env.setenv("LOCAL_RANK", "3")  # without a process group the launcher's variables do not count
    assert not D.is_distributed()
    assert (D.get_rank(), D.get_world_size(), D.get_local_rank()) == (0, 1, 0)
    assert D.is_main_process()
    D.barrier()
    D.destroy_distributed()
    assert not D.is_distributed()


def test_single_process_collectives_are_identities() -> None:
    x = torch.randn(_N, _D, requires_grad=True)
    assert D.all_gather_with_grad(x) is x
    gathered = D.all_gather_no_grad(x)
    assert torch.equal(gathered, x) and not gathered.requires_grad
    for reduce in (D.all_reduce_sum, D.all_reduce_mean):
        reduced = reduce(x)
        assert torch.equal(reduced, x) and not reduced.requires_grad
    obj = {"a": [1, 2]}
    assert D.broadcast_object(obj) is obj
    assert D.all_gather_object(obj) == [obj]


@pytest.mark.parametrize("world_size", [None, "1"])
def test_init_is_a_no_op_for_one_process(launcher_env: pytest.MonkeyPatch, world_size: str | None) -> None:
    if world_size is not None:
        launcher_env.setenv("WORLD_SIZE", world_size)
    D.init_distributed()
    assert not D.is_distributed()


def test_init_names_missing_launcher_variables(launcher_env: pytest.MonkeyPatch) -> None:
    launcher_env.setenv("WORLD_SIZE", "2")
    launcher_env.setenv("RANK", "0")
    with pytest.raises(ValueError, match=r"LOCAL_RANK, MASTER_ADDR, MASTER_PORT"):
        D.init_distributed()
    assert not D.is_distributed()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORLD_SIZE": "two"}, r"WORLD_SIZE='two' is not an integer"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, r"RANK=2 is outside \[0, WORLD_SIZE=2\)"),
    ],
)
def test_init_rejects_malformed_variables(launcher_env: pytest.MonkeyPatch, env: dict[str, str], message: str) -> None:
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", **env}.items():
        launcher_env.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        D.init_distributed(backend="gloo")
    assert not D.is_distributed()


def test_find_free_port_can_be_bound() -> None:
    port = D.find_free_port()
    assert 0 < port < 65536
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", port))


def _two_rank_checks() -> dict:
    """Runs on every rank of a 2-process gloo group; returns what the parent asserts."""
    rank, world = D.get_rank(), D.get_world_size()
    out: dict = {"ids": (rank, world, D.get_local_rank(), D.is_main_process(), D.is_distributed())}
    D.init_distributed()  # a second call must keep the existing group

    x = torch.arange(_N * _D, dtype=torch.float32).reshape(_N, _D) + 100 * rank
    out["gathered"] = D.all_gather_no_grad(x.requires_grad_())
    out["gathered_requires_grad"] = out["gathered"].requires_grad
    out["gathered_non_contiguous"] = D.all_gather_no_grad(x.detach().T)  # (D, N) view with strides (1, D)

    # Gradient of all_gather_with_grad: every rank's loss uses every slice, with rank-specific weights, so the
    # correct gradient for this rank's slice is the sum over ranks of each loss's gradient for that slice.
    weights = torch.randn(world, world * _N, _D, generator=torch.Generator().manual_seed(0))  # same on all ranks
    local = torch.randn(_N, _D, generator=torch.Generator().manual_seed(10 + rank)).requires_grad_()
    gathered = D.all_gather_with_grad(local)  # (W·N, D)
    (weights[rank] * gathered**2).sum().backward()
    out["with_grad_values"] = gathered.detach()
    out["with_grad_grad"] = local.grad
    out["expected_grad"] = 2 * local.detach() * weights[:, rank * _N : (rank + 1) * _N].sum(0)
    # PyTorch's own differentiable all_gather as a second opinion.
    twin = local.detach().clone().requires_grad_()
    (weights[rank] * torch.cat(dist_fn.all_gather(twin)) ** 2).sum().backward()
    out["torch_grad"] = twin.grad

    value = torch.tensor([rank + 1.0])
    out["sum"], out["mean"], out["value_after"] = D.all_reduce_sum(value), D.all_reduce_mean(value), value
    out["broadcast0"] = D.broadcast_object({"from": rank, "payload": list(range(rank + 2))}, src=0)
    out["broadcast1"] = D.broadcast_object(("from", rank), src=1)
    out["objects"] = D.all_gather_object(f"rank{rank}")
    D.barrier()
    return out


def test_collectives_in_two_gloo_ranks() -> None:
    results = run_distributed(_two_rank_checks, 2)
    base = torch.arange(_N * _D, dtype=torch.float32).reshape(_N, _D)
    for rank, out in enumerate(results):
        assert out["ids"] == (rank, 2, rank, rank == 0, True)
        assert torch.equal(out["gathered"], torch.cat([base, base + 100]))
        assert not out["gathered_requires_grad"]
        assert torch.equal(out["gathered_non_contiguous"], torch.cat([base.T, base.T + 100]))
        locals_ = [torch.randn(_N, _D, generator=torch.Generator().manual_seed(10 + r)) for r in range(2)]
        assert torch.equal(out["with_grad_values"], torch.cat(locals_))
        torch.testing.assert_close(out["with_grad_grad"], out["expected_grad"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out["with_grad_grad"], out["torch_grad"], rtol=1e-6, atol=1e-6)
        assert out["sum"].item() == 3.0 and out["mean"].item() == 1.5
        assert out["value_after"].item() == rank + 1.0  # the input is not reduced in place
        assert out["broadcast0"] == {"from": 0, "payload": [0, 1]}
        assert out["broadcast1"] == ("from", 1)
        assert out["objects"] == ["rank0", "rank1"]
