"""The narrow convolutions' channels-last layout (medseg.train.layout): which layers, what decides, same results."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from monai.networks.nets import DynUNet, UNet

from medseg.train import layout
from medseg.train.layout import convert_layers, narrow_channels_last, narrow_convolutions, step_ms


def _unet(classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return UNet(3, 1, classes, [16, 32], [2], num_res_units=2, norm="instance")


def test_the_narrow_convolutions_are_those_off_the_onednn_channel_block() -> None:
    # MONAI UNet: the first unit takes one channel (its convolution and its strided residual), the last unit is
    # 3 -> 3; the transposed convolution before it is not a candidate (channels-last made it slower)
    assert set(narrow_convolutions(_unet())) == {
        "model.0.conv.unit0.conv",
        "model.0.residual",
        "model.2.1.conv.unit0.conv",
    }
    assert set(narrow_convolutions(_unet(classes=16))) == {"model.0.conv.unit0.conv", "model.0.residual"}
    dynunet = DynUNet(3, 1, 3, [3, 3, 3], [1, 2, 2], [2, 2], filters=[16, 32, 64])
    names = set(narrow_convolutions(dynunet))
    assert "output_block.conv.conv" in names  # the 1x1x1 16 -> 3 head
    assert not any("transp" in name for name in names)


def test_2d_networks_run_per_slice_and_their_layers_are_timed_at_batch_times_slices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from medseg.networks import SliceNetwork

    torch.manual_seed(0)
    net = SliceNetwork(UNet(2, 1, 3, [16, 32], [2], num_res_units=2, norm="instance"))
    assert "net.model.2.1.conv.unit0.conv" in narrow_convolutions(net)
    timed: dict[str, tuple[int, ...]] = {}

    def fake_step_ms(
        conv: torch.nn.Module, shape: tuple[int, ...], autocast: torch.dtype | None, input_grad: bool
    ) -> tuple[float, float]:
        timed[f"{conv.in_channels}->{conv.out_channels}"] = shape
        return 10.0, 5.0

    monkeypatch.setattr(layout, "step_ms", fake_step_ms)
    default = copy.deepcopy(net)
    narrow_channels_last(net, (4, 1, 32, 24, 2), None, None)  # batches of 4 patches of 2 slices
    assert timed["3->3"] == (8, 3, 32, 24)
    x = torch.randn(2, 1, 32, 24, 2)
    torch.testing.assert_close(net(x), default(x), atol=1e-5, rtol=1e-5)
    default_ms, channels_last_ms = step_ms(torch.nn.Conv2d(3, 3, 3, padding=1), (2, 3, 32, 32), None, iterations=1)
    assert default_ms > 0 and channels_last_ms > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_converted_network_computes_what_the_default_does(dtype: torch.dtype) -> None:
    default = _unet()
    converted = copy.deepcopy(default)
    names = convert_layers(converted, list(narrow_convolutions(converted)))
    assert len(names) == 3
    assert converted.state_dict().keys() == default.state_dict().keys()  # checkpoints load either way
    seen = []  # whether the last unit's input is channels-last (these hooks run after the conversion's)
    for net in (default, converted):
        dict(net.named_modules())["model.2.1.conv.unit0.conv"].register_forward_pre_hook(
            lambda _m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last_3d))
        )
    x = torch.randn(2, 1, 16, 24, 16)
    outputs, grads = [], []
    for net in (default, converted):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = net(x)
        assert out.is_contiguous()
        out.float().square().mean().backward()
        outputs.append(out.float())
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert seen == [False, True]  # the default's last unit got contiguous input, the converted one's channels-last
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(outputs[1], outputs[0], atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(grads[1], grads[0], atol=tolerance, rtol=tolerance * 10)
    layers = dict(converted.named_modules())
    assert all(layers[name].weight.is_contiguous() for name in names)  # only the input's layout changes


def test_the_timing_decides_per_layer_and_leaves_model_and_random_state_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net = _unet()
    before = copy.deepcopy(net.state_dict())
    rng = torch.get_rng_state()
    timed: dict[int, tuple[int, ...]] = {}
    input_grads: dict[int, bool] = {}

    def fake_step_ms(
        conv: torch.nn.Conv3d, shape: tuple[int, ...], autocast: torch.dtype | None, input_grad: bool
    ) -> tuple[float, float]:
        timed[conv.out_channels] = shape
        input_grads[conv.out_channels] = input_grad
        return (10.0, 5.0) if conv.out_channels == 3 else (10.0, 9.0)  # pays for the 3 -> 3 layer only

    monkeypatch.setattr(layout, "step_ms", fake_step_ms)
    net.train()
    chosen = narrow_channels_last(net, (4, 1, 16, 24, 16), torch.bfloat16, None)
    assert chosen == ["model.2.1.conv.unit0.conv"]
    assert timed[3] == (4, 3, 16, 24, 16)  # the layer's own input at the training batch, found by a forward pass
    assert timed[16] == (4, 1, 16, 24, 16)
    # the first layer takes the image, whose gradient a training step never computes; the last unit's it does
    assert input_grads == {16: False, 3: True}
    assert net.training  # the shape-finding pass ran in eval mode and put the mode back
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    # forced: every narrow layer, nothing timed; off: none
    timed.clear()
    assert len(narrow_channels_last(_unet(), (4, 1, 16, 24, 16), None, True)) == 3 and not timed
    assert narrow_channels_last(_unet(), (4, 1, 16, 24, 16), None, False) == []


def test_the_real_timing_returns_both_layouts_and_touches_nothing() -> None:
    conv = torch.nn.Conv3d(3, 3, 3, padding=1)
    rng = torch.get_rng_state()
    default_ms, channels_last_ms = step_ms(conv, (2, 3, 16, 16, 16), None, iterations=1)
    assert default_ms > 0 and channels_last_ms > 0
    assert conv.weight.grad is None and torch.equal(torch.get_rng_state(), rng)


def test_a_compiled_converted_step_runs_at_one_and_two_threads() -> None:
    """torch 2.13's inductor failed whole channels-last networks at one thread (``Trainer.forward``): the hooks'
    conversions, compiled, at the thread counts the tuner switches between, float32 (where that failure was)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(1, 3, 3, padding=1), torch.nn.PReLU(), torch.nn.Conv3d(3, 3, 3, padding=1)
    )
    reference = copy.deepcopy(net)
    convert_layers(net, ["2"])
    compiled = torch.compile(net)
    x = torch.randn(2, 1, 8, 12, 8)
    threads = torch.get_num_threads()
    try:
        for n in (2, 1, 2):
            torch.set_num_threads(n)
            out = compiled(x)
            out.sum().backward()
            torch.testing.assert_close(out, reference(x), atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_a_resumed_run_keeps_its_first_sessions_layout(
    tiny_dataset: dict, make_config: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose first session's timing picks channels-last for its 3 -> 3 layer, crashed at epoch 3 and resumed
    under a timing that would pick nothing, keeps the first choice."""
    from test_train import _crash_at_3_then_resume, _history  # tests/train is on sys.path (pytest)

    from medseg import tracking
    from medseg.io import read_json
    from medseg.models import load_state

    root = tiny_dataset["root"]
    config = make_config(root, epochs=4, network="unet", channels_last_narrow=None)
    timed: dict[str, list[str]] = {"first session": [], "resumed": []}

    def first_pays(
        conv: torch.nn.Conv3d, shape: tuple[int, ...], autocast: torch.dtype | None, **_: bool
    ) -> tuple[float, float]:
        session = "resumed" if (root / "train" / "last.pt").exists() else "first session"
        timed[session].append(f"{conv.in_channels}->{conv.out_channels}")
        pays = session == "first session" and conv.in_channels == conv.out_channels == 3
        return (10.0, 5.0) if pays else (10.0, 10.0)

    monkeypatch.setattr(layout, "step_ms", first_pays)
    _crash_at_3_then_resume(
        (config, tiny_dataset["manifest"], tiny_dataset["resample_dir"]), root / "train", monkeypatch
    )
    assert "3->3" in timed["first session"]  # the tiny network's last unit (3 classes) was timed
    assert timed["resumed"] == []  # the resumed session timed nothing: it took the recorded choice
    assert load_state(root / "train" / "last.pt")["progress"]["narrow_channels_last"] == ["model.2.1.conv.unit0.conv"]
    run = tracking.client(config.tracking).get_run(read_json(root / "train" / "run.json")["run_id"])
    assert run.data.tags["narrow_channels_last"] == "model.2.1.conv.unit0.conv"  # on record in MLflow
    assert len(_history(root / "train")) == 4


def test_deterministic_runs_and_forced_settings_skip_the_timing(
    tiny_dataset: dict, make_config: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medseg.models import load_state
    from medseg.train.run import run

    def no_timing(*_: object, **__: object) -> tuple[float, float]:
        raise AssertionError("timed")

    monkeypatch.setattr(layout, "step_ms", no_timing)
    root = tiny_dataset["root"]
    args = (tiny_dataset["manifest"], tiny_dataset["resample_dir"])
    for name, settings, expected in (
        ("deterministic", {"deterministic": True, "channels_last_narrow": None}, []),
        ("forced", {"channels_last_narrow": True}, None),
        ("off", {"channels_last_narrow": False}, []),
    ):
        run(make_config(root, epochs=1, network="unet", **settings), *args, root / name)
        recorded = load_state(root / name / "last.pt")["progress"]["narrow_channels_last"]
        assert recorded == expected if expected is not None else "model.2.1.conv.unit0.conv" in recorded


def test_a_failed_timing_trains_in_the_default_layout(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def out_of_memory(*_: object, **__: object) -> tuple[float, float]:
        raise RuntimeError("DefaultCPUAllocator: not enough memory")

    monkeypatch.setattr(layout, "step_ms", out_of_memory)
    net = _unet()
    with caplog.at_level("WARNING", logger="medseg.train.layout"):
        assert narrow_channels_last(net, (2, 1, 16, 24, 16), None, None) == []
    assert "timing the narrow convolutions failed (RuntimeError: DefaultCPUAllocator" in caplog.text
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
