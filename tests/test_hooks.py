import torch

from pipeline.sources.hooks import capture_outputs, run_until_captured


def _model():
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2), torch.nn.Tanh())


def test_outputs_are_captured_and_hooks_removed_on_exit():
    model = _model()
    with capture_outputs({"first": model[0], "last": model[3]}) as outputs:
        result = model(torch.ones(5, 3))
    assert outputs["first"].shape == (5, 4)
    assert torch.equal(outputs["last"], result)
    assert all(not layer._forward_hooks for layer in model)


def test_hooks_are_removed_even_when_the_body_fails():
    model = _model()
    try:
        with capture_outputs({"first": model[0]}):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert not model[0]._forward_hooks


def test_the_forward_pass_stops_once_every_module_has_fired():
    model = _model()
    calls = []
    model[3].register_forward_hook(lambda *_: calls.append("tanh"))
    # Given out of execution order: the pass stops after the later of the two, not the last named.
    with capture_outputs({"middle": model[2], "first": model[0]}, stop_when_all_captured=True) as outputs:
        for _ in range(2):  # a second pass after clearing stops at the same place
            outputs.clear()
            run_until_captured(model, torch.ones(2, 3))
    assert outputs["middle"].shape == (2, 2) and outputs["first"].shape == (2, 4)
    assert calls == []  # the layer after the last needed one never ran


def test_tuple_outputs_keep_their_first_element():
    class Pair(torch.nn.Module):
        def forward(self, x):
            return x * 2, x * 3

    module = Pair()
    with capture_outputs({"pair": module}) as outputs:
        module(torch.ones(1))
    assert outputs["pair"].item() == 2.0
