"""Reading module values and navigating the module tree, checked against plain PyTorch."""

from __future__ import annotations

import pytest
import torch

import raysight
from helpers import assert_no_hooks, capture


def test_output_of_a_submodule_equals_the_torch_output(model, mlp, x):
    with model.trace(x):
        h = model.layer1.output.save()
    assert torch.allclose(h.value, capture(mlp, mlp.layer1, x)["output"])


def test_input_is_the_first_positional_argument(model, mlp, x):
    with model.trace(x):
        i = model.layer2.input.save()
    assert torch.allclose(i.value, capture(mlp, mlp.layer2, x)["args"][0])


def test_inputs_are_args_and_kwargs(model, mlp, x):
    with model.trace(x):
        ins = model.layer2.inputs.save()
    args, kwargs = ins.value
    expected = capture(mlp, mlp.layer2, x)["args"]
    assert isinstance(args, tuple) and len(args) == len(expected) == 1
    assert torch.allclose(args[0], expected[0])
    assert kwargs == {}


def test_inputs_include_keyword_arguments_of_the_call(kw_model, kw_net, x4):
    with kw_model.trace(x4, scale=2.5):
        ins = kw_model.scaler.inputs.save()
        out = kw_model.output.save()
    seen = capture(kw_net, kw_net.scaler, x4, scale=2.5)
    args, kwargs = ins.value
    assert torch.allclose(args[0], seen["args"][0])
    assert set(kwargs) == set(seen["kwargs"]) == {"scale", "mask"}
    assert kwargs["scale"] == 2.5 and kwargs["mask"] is None
    assert torch.allclose(out.value, kw_net(x4, scale=2.5))


def test_root_output_is_the_model_output(model, mlp, x):
    with model.trace(x):
        out = model.output.save()
    assert torch.allclose(out.value, mlp(x))


def test_root_input_is_the_model_input(model, x):
    with model.trace(x):
        i = model.input.save()
    assert torch.equal(i.value, x)


def test_forward_kwargs_go_to_the_model(kw_model, kw_net, x4):
    with kw_model.trace(x4, scale=-3.0):
        out = kw_model.output.save()
    assert torch.allclose(out.value, kw_net(x4, scale=-3.0))
    assert not torch.allclose(out.value, kw_net(x4))


def test_modulelist_child_by_negative_index(stack_model, stack, x4):
    with stack_model.trace(x4):
        first = stack_model.layers[0].linear.output.save()
        last = stack_model.layers[-1].output.save()
    assert torch.allclose(last.value, capture(stack, stack.layers[2], x4)["output"])
    assert torch.allclose(first.value, capture(stack, stack.layers[0].linear, x4)["output"])


def test_modulelist_index_past_the_end_raises_index_error_naming_the_path(stack_model, stack):
    with pytest.raises(IndexError, match=r"model\.layers"):
        stack_model.layers[3]
    with pytest.raises(IndexError, match=r"model\.layers"):
        stack_model.layers[-4]
    assert_no_hooks(stack)


def test_missing_module_raises_attribute_error_naming_it(stack_model):
    with pytest.raises(AttributeError, match="nonexistent") as info:
        stack_model.layers[0].nonexistent
    assert "model.layers.0" in str(info.value)


def test_plain_attributes_of_the_module_are_reachable(stack_model, stack):
    stack.config = {"hidden": 6}
    assert stack_model.config is stack.config
    assert stack_model.layers[1].act.inplace is stack.layers[1].act.inplace


def test_rename_alias_of_a_child_name_and_real_path_both_work(stack, x4):
    model = raysight.NNsight(stack, rename={"layers": "blocks"})
    with model.trace(x4):
        via_alias = model.blocks[1].output.save()
        via_path = model.layers[1].output.save()
    expected = capture(stack, stack.layers[1], x4)["output"]
    assert torch.allclose(via_alias.value, expected)
    assert torch.allclose(via_path.value, expected)


def test_rename_alias_of_a_dotted_path_and_real_path_both_work(stack, x4):
    model = raysight.NNsight(stack, rename={"layers.2.linear": "last_linear"})
    with model.trace(x4):
        via_alias = model.last_linear.output.save()
        via_path = model.layers[2].linear.output.save()
    expected = capture(stack, stack.layers[2].linear, x4)["output"]
    assert torch.allclose(via_alias.value, expected)
    assert torch.allclose(via_path.value, expected)


def test_print_model_shows_the_torch_module_tree(stack_model, stack, capsys):
    print(stack_model)
    assert capsys.readouterr().out == repr(stack) + "\n"


def test_tuple_output_is_returned_as_the_module_returns_it(tuple_model, tuple_net, x4):
    with tuple_model.trace(x4):
        out = tuple_model.pair.output.save()
        gate = tuple_model.pair.output[1].save()
    expected = capture(tuple_net, tuple_net.pair, x4)["output"]
    assert isinstance(out.value, tuple) and len(out.value) == 2
    assert torch.allclose(out.value[0], expected[0])
    assert torch.allclose(gate.value, expected[1])


def test_module_values_outside_a_trace_raise_trace_error(model):
    with pytest.raises(raysight.TraceError):
        model.layer1.output


def test_module_methods_that_return_the_module_return_the_wrapper(model, mlp):
    assert model.eval() is model and not mlp.training
    assert model.train() is model and mlp.training
    assert model.to(torch.float64) is model and mlp.layer1.weight.dtype == torch.float64
    model.to(torch.float32)
    assert model.requires_grad_(False) is model and not mlp.layer1.weight.requires_grad
    model.requires_grad_(True)


class _Head(torch.nn.Module):
    """A model whose child is named `output` (as Llama's reference code names its vocabulary head)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(5, 4)
        self.output = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.body(x)) * 2


def test_a_child_named_output_takes_the_name_and_nns_output_is_the_value(x):
    torch.manual_seed(0)
    net = _Head()
    model = raysight.NNsight(net)
    assert model.output is model.output_  # the child envoy (nnsight 0.4 mounts it at its name)
    with model.trace(x):
        head = model.output.output.save()  # the child's output
        model.nns_output[:] = 0  # the root's own output, edited in place
        final = model.nns_output.save()
    with torch.no_grad():
        assert torch.allclose(head.value, net.output(net.body(x)))
    assert torch.equal(final.value, torch.zeros(2, 3))


def test_setting_a_mounted_name_to_a_value_points_to_nns_output(x):
    model = raysight.NNsight(_Head())
    with pytest.raises(raysight.TraceError, match=r"child module named 'output'.*\.nns_output = \.\.\."):
        with model.trace(x):
            model.output = torch.zeros(2, 3)
