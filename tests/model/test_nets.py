import numpy as np
import pytest
import torch
from torch import nn

from deepdark.model.nets import (
    PRESETS,
    Discriminator,
    Generator,
    GeneratorConfig,
    count_macs,
    count_params,
    describe_presets,
    format_presets,
    init_weights,
    model_input,
    patch_score,
)

MINI = 64


def _strips(b=2, size=MINI, w1=46, w2=4, h3=4, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 65536, (b, size, w1), dtype=np.uint16),
        rng.integers(0, 65536, (b, size, w2), dtype=np.uint16),
        rng.integers(0, 65536, (b, h3, size), dtype=np.uint16),
    )


# --- model_input -----------------------------------------------------------------------------


def test_model_input_constant_strips_give_constant_planes():
    b, s = 2, 32
    a1 = np.full((b, s, 46), 1000, np.uint16)
    a2 = np.full((b, s, 4), 2000, np.uint16)
    a3 = np.full((b, 4, s), 65535, np.uint16)
    x = model_input(a1, a2, a3, s)
    assert x.shape == (b, 3, s, s) and x.dtype == torch.float32
    for c, v in enumerate((1000, 2000, 65535)):
        torch.testing.assert_close(x[:, c], torch.full((b, s, s), v / 65535.0))


def test_model_input_resizes_whole_strip_bilinearly():
    # a1 varying only along rows: each row's value is broadcast over the columns
    s = 16
    rows = np.arange(s, dtype=np.uint16)[None, :, None] * 100
    a1 = np.broadcast_to(rows, (1, s, 46)).copy()
    # a3 varying only along columns
    cols = np.arange(s, dtype=np.uint16)[None, None, :] * 7
    a3 = np.broadcast_to(cols, (1, 4, s)).copy()
    a2 = np.zeros((1, s, 4), np.uint16)
    x = model_input(a1, a2, a3, s)
    plane = lambda a: torch.from_numpy(a / 65535.0).float()  # noqa: E731
    torch.testing.assert_close(x[0, 0], plane(np.repeat(rows[0], s, 1)))
    torch.testing.assert_close(x[0, 2], plane(np.repeat(cols[0], s, 0)))
    # a 2-column strip with values 0 | 65535 resized to 8 columns with align_corners=False:
    # source coordinate of output column j is (j + 0.5) / 4 - 0.5, clamped to [0, 1]
    a2 = np.zeros((1, 8, 2), np.uint16)
    a2[..., 1] = 65535
    x = model_input(np.zeros((1, 8, 46), np.uint16), a2, np.zeros((1, 4, 8), np.uint16), 8)
    expect = np.clip((np.arange(8) + 0.5) / 4 - 0.5, 0, 1)
    torch.testing.assert_close(x[0, 1, 3], torch.from_numpy(expect).float())


def test_model_input_matches_interpolate_and_takes_tensors():
    a1, a2, a3 = _strips(b=2, size=MINI, w1=10, w2=3, h3=5)  # widths from the arrays
    x = model_input(torch.from_numpy(a1.astype(np.int32)), a2, a3, MINI)
    assert x.shape == (2, 3, MINI, MINI)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(a3.astype(np.float32) / 65535.0)[:, None],
        size=(MINI, MINI),
        mode="bilinear",
        align_corners=False,
    )
    torch.testing.assert_close(x[:, 2:3], ref)
    assert x.min() >= 0.0 and x.max() <= 1.0


def test_model_input_extra_channels_and_errors():
    a1, a2, a3 = _strips(b=2, size=16)
    extra = torch.randn(2, 2, 16, 16)
    x = model_input(a1, a2, a3, 16, extra=extra)
    assert x.shape == (2, 5, 16, 16)
    torch.testing.assert_close(x[:, 3:], extra)
    torch.testing.assert_close(x[:, :3], model_input(a1, a2, a3, 16))
    with pytest.raises(ValueError, match="extra"):
        model_input(a1, a2, a3, 16, extra=torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="batch"):
        model_input(a1, a2[:1], a3, 16)
    with pytest.raises(ValueError, match="batched"):
        model_input(a1[0], a2, a3, 16)


def test_model_input_can_measure_the_strips_from_offsets():
    """The physics-mode input: each strip as (ADU - its offset) / scale, resized as the paper's."""
    a1, a2, a3 = _strips(b=2, size=16)
    offsets = [np.median(s.reshape(2, -1), axis=1) for s in (a1, a2, a3)]
    x = model_input(a1, a2, a3, 16, strip_offsets=offsets, strip_scale=16.0)
    paper = model_input(a1, a2, a3, 16)
    for k in range(3):  # bilinear resizing is linear: the same planes, shifted and scaled
        want = (paper[:, k] * 65535.0 - torch.tensor(offsets[k], dtype=torch.float32)[:, None, None]) / 16.0
        torch.testing.assert_close(x[:, k], want, rtol=0, atol=2e-3)
    with pytest.raises(ValueError, match="three strips' offsets"):
        model_input(a1, a2, a3, 16, strip_scale=16.0)
    with pytest.raises(ValueError, match="a strip offset has 1 values for a batch of 2"):
        model_input(a1, a2, a3, 16, strip_offsets=[o[:1] for o in offsets], strip_scale=16.0)


# --- generator -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_generator_shapes_mini_window(name):
    torch.manual_seed(0)
    g = Generator(PRESETS[name])
    x = torch.rand(2, PRESETS[name].in_channels, MINI, MINI)
    y = g(x)
    assert y.shape == (2, 1, MINI, MINI)
    assert y.min() >= 0 and y.max() <= 1
    y = g.predict(x)
    assert y.shape == (2, 1, MINI, MINI) and g.training  # mode restored


@pytest.mark.slow
@pytest.mark.parametrize("name", ["compact", "paper"])
def test_generator_forward_full_window(name):
    g = Generator(PRESETS[name], seed=0)
    with torch.no_grad():
        y = g.predict(torch.rand(1, 3, 1024, 1024))
    assert y.shape == (1, 1, 1024, 1024)
    assert y.min() >= 0 and y.max() <= 1


def test_output_in_unit_interval_even_for_extreme_inputs():
    g = Generator(GeneratorConfig(width=4, n_blocks=1, norm="none"), seed=1)
    with torch.no_grad():
        for p in g.head.parameters():
            p.fill_(5.0)  # saturate tanh
        y = g(torch.full((1, 3, 16, 16), 1e3))
    assert y.min() >= 0 and y.max() <= 1 and y.max() > 0.999


@pytest.mark.parametrize("n_down", [1, 2, 3])
def test_multiple_enforced(n_down):
    g = Generator(GeneratorConfig(width=4, n_blocks=1, n_down=n_down), seed=0)
    assert g.multiple == 2**n_down
    g(torch.rand(1, 3, 8 * g.multiple, 4 * g.multiple))
    with pytest.raises(ValueError, match=f"multiple of {2**n_down}"):
        g(torch.rand(1, 3, 8 * g.multiple + g.multiple // 2, 8 * g.multiple))
    with pytest.raises(ValueError, match="expected input"):
        g(torch.rand(1, 4, 16, 16))


@pytest.mark.parametrize("upsample", ["transpose", "resize"])
def test_skip_connections_double_up_stage_inputs(upsample):
    cfg = GeneratorConfig(width=8, n_blocks=2, upsample=upsample, n_down=2)
    g = Generator(cfg, seed=0)
    convs = [[m for m in u.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))][0] for u in g.up]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(2 * 32, 16), (2 * 16, 8)]
    assert isinstance(convs[0], nn.ConvTranspose2d if upsample == "transpose" else nn.Conv2d)
    head = [m for m in g.head.modules() if isinstance(m, nn.Conv2d)][0]
    assert (head.in_channels, head.out_channels) == (2 * 8, 1)
    # the skip really carries information: the output depends on the stem features
    x = torch.rand(1, 3, 16, 16)
    y0 = g.predict(x)
    g.head[1].weight.data[:, 8:] = 0  # cut the stem skip into the head
    assert not torch.allclose(y0, g.predict(x))


def test_residual_block_count_and_norms():
    g = Generator(GeneratorConfig(width=8, n_blocks=5, norm="instance"), seed=0)
    assert len(g.blocks) == 5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in g.modules())
    assert any(isinstance(m, nn.InstanceNorm2d) for m in g.modules())
    g = Generator(GeneratorConfig(width=8, n_blocks=1, norm="none"), seed=0)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) for m in g.modules())
    with pytest.raises(ValueError, match="batch, instance, none"):
        GeneratorConfig(norm="layer")
    with pytest.raises(ValueError, match="transpose, resize"):
        GeneratorConfig(upsample="pixelshuffle")


def test_eval_batchnorm_is_per_sample_train_is_not():
    g = Generator(GeneratorConfig(width=8, n_blocks=2), seed=0)
    # give the running statistics non-trivial values
    g.train()
    with torch.no_grad():
        for _ in range(3):
            g(torch.rand(4, 3, 16, 16))
    x = torch.rand(3, 3, 16, 16)
    other = torch.rand(3, 3, 16, 16) * 5
    batch1 = torch.cat([x[:1], x[1:]])
    batch2 = torch.cat([x[:1], other[1:]])
    g.eval()
    with torch.no_grad():
        torch.testing.assert_close(g(batch1)[0], g(batch2)[0])
        torch.testing.assert_close(g(batch1)[:1], g(x[:1]))
    g.train()
    with torch.no_grad():
        assert not torch.allclose(g(batch1)[0], g(batch2)[0], atol=1e-4)


def test_seeded_build_is_reproducible_and_init_is_reference_normal():
    a = Generator(PRESETS["compact"], seed=3)
    b = Generator(PRESETS["compact"], seed=3)
    c = Generator(PRESETS["compact"], seed=4)
    for (n, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), n
    assert not torch.equal(a.stem[1].weight, c.stem[1].weight)
    torch.manual_seed(7)
    d1 = Discriminator()
    torch.manual_seed(7)
    d2 = Discriminator()
    assert all(torch.equal(p, q) for p, q in zip(d1.parameters(), d2.parameters()))
    w = Generator(PRESETS["paper"], seed=0).blocks[0].body[1].weight
    assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.02) < 1e-3
    lin = init_weights(nn.Linear(100, 100), gain=0.5)
    assert abs(lin.weight.std().item() - 0.5) < 0.02 and torch.all(lin.bias == 0)


# --- discriminator ---------------------------------------------------------------------------


def test_discriminator_layers_and_patch_logits():
    d = Discriminator(seed=0)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (4, 64, 2),
        (64, 128, 2),
        (128, 256, 2),
        (256, 512, 1),
        (512, 1, 1),
    ]
    assert all(c.kernel_size == (4, 4) for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in d.modules()) == 3  # none on the first
    assert sum(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.2 for m in d.modules()) == 4
    a, b = torch.rand(2, 3, MINI, MINI), torch.rand(2, 1, MINI, MINI)
    out = d(a, b)
    assert out.shape == (2, 1, 6, 6)  # 64 -> 32 -> 16 -> 8 -> 7 -> 6
    torch.testing.assert_close(out, d(torch.cat([a, b], 1)))
    s = d.score(out)
    assert s.shape == (2,)
    torch.testing.assert_close(s, out.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(patch_score(out), s)
    assert not isinstance(d.model[-1], (nn.Sigmoid, nn.Tanh))
    d5 = Discriminator(in_channels=6, n_layers=5)
    assert d5(torch.rand(1, 6, 128, 128)).shape == (1, 1, 2, 2)


# --- size accounting -------------------------------------------------------------------------


def test_count_macs_hand_computations():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_macs(conv, (2, 3, 10, 10)) == 2 * 8 * 10 * 10 * 3 * 3 * 3
    conv = nn.Conv2d(4, 6, 4, stride=2, padding=1, groups=2)
    assert count_macs(conv, (1, 4, 16, 16)) == 6 * 8 * 8 * (4 // 2) * 4 * 4
    tconv = nn.ConvTranspose2d(5, 7, 3, stride=2, padding=1, output_padding=1)
    assert count_macs(tconv, (1, 5, 6, 6)) == 5 * 6 * 6 * 7 * 3 * 3
    lin = nn.Linear(10, 4)
    assert count_macs(lin, (3, 10)) == 3 * 10 * 4
    seq = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Conv2d(2, 3, 1))
    assert count_macs(seq, (1, 1, 5, 5)) == 25 * 2 + 25 * 2 * 3
    assert count_params(conv) == 6 * 2 * 16 + 6
    assert conv.weight.device.type == "cpu"  # untouched


def test_describe_presets_table():
    rows = describe_presets(1024)
    by = {r["preset"]: r for r in rows}
    assert set(by) == set(PRESETS) | {"discriminator"}
    assert by["paper"]["params"] == count_params(Generator(PRESETS["paper"]))
    assert by["compact"]["gmacs"] * 10 < by["paper"]["gmacs"]
    assert by["compact"]["params"] < 1_000_000
    # the paper generator's MACs scale with the window area
    small = {r["preset"]: r for r in describe_presets(256)}
    assert by["paper"]["gmacs"] == pytest.approx(16 * small["paper"]["gmacs"])
    text = format_presets(rows)
    assert "paper" in text and "compact" in text


# --- training smoke --------------------------------------------------------------------------


def test_few_adam_steps_lower_l1():
    torch.manual_seed(0)
    g = Generator(GeneratorConfig(width=8, n_blocks=2, upsample="resize"), seed=0)
    x = torch.rand(2, 3, 16, 16)
    y = 0.3 + 0.2 * x[:, :1]
    opt = torch.optim.Adam(g.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = torch.nn.functional.l1_loss(g(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
