import pytest
import torch

from deepdark.model.losses import LOSSES, LossConfig, discriminator_loss, generator_loss


@pytest.fixture
def t():
    g = torch.Generator().manual_seed(0)
    return {
        "d_real": torch.randn(2, 1, 3, 3, generator=g) * 2,
        "d_fake": torch.randn(2, 1, 3, 3, generator=g) * 2,
        "fake": torch.rand(2, 1, 4, 4, generator=g),
        "real": torch.rand(2, 1, 4, 4, generator=g),
    }


# Written out by hand. D outputs are logits:
# BCE(l, 1) = -log sigmoid(l), BCE(l, 0) = -log(1 - sigmoid(l)); MSE on the raw logits.
def bce_real(l):
    return -torch.log(torch.sigmoid(l)).mean()


def bce_fake(l):
    return -torch.log(1 - torch.sigmoid(l)).mean()


def mse_real(l):
    return ((l - 1) ** 2).mean()


def mse_fake(l):
    return (l**2).mean()


def l1(fake, real, lam):
    return lam * (fake - real).abs().mean()


EXPECTED_D = {
    "pix2pix": lambda r, f: 0.5 * (bce_real(r) + bce_fake(f)),
    "lsgan": lambda r, f: 0.5 * (mse_real(r) + mse_fake(f)),
    "mixed": lambda r, f: 0.5 * (bce_real(r) + bce_fake(f)),
    "deepdark": lambda r, f: 0.5 * (mse_real(r) + mse_fake(f)),
}
EXPECTED_G = {  # name -> {component: f(d_fake)}; the non-saturating BCE(D(G(x)), 1)
    "pix2pix": {"g_bce": bce_real},
    "lsgan": {"g_mse": mse_real},
    "mixed": {"g_mse": mse_real},
    "deepdark": {"g_bce": bce_real, "g_mse": mse_real},
}


def test_names():
    assert {"deepdark", "pix2pix", "lsgan", "mixed"} == LOSSES
    assert set(EXPECTED_D) == set(LOSSES) == set(EXPECTED_G)
    assert LossConfig() == LossConfig("deepdark", 100.0)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_discriminator_loss_by_hand(name, t):
    got = discriminator_loss(LossConfig(name), t["d_real"], t["d_fake"])
    torch.testing.assert_close(got, EXPECTED_D[name](t["d_real"], t["d_fake"]))
    torch.testing.assert_close(discriminator_loss(name, t["d_real"], t["d_fake"]), got)


@pytest.mark.parametrize("lam", [100.0, 7.5, 0.0])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_generator_loss_by_hand(name, lam, t):
    total, parts = generator_loss(LossConfig(name, lam), t["d_fake"], t["fake"], t["real"])
    expected = {k: f(t["d_fake"]) for k, f in EXPECTED_G[name].items()}
    expected["g_l1"] = l1(t["fake"], t["real"], lam)
    assert set(parts) == set(expected)
    for k in expected:
        torch.testing.assert_close(parts[k], expected[k])
    torch.testing.assert_close(total, sum(expected.values()))


def test_deepdark_generator_formula_in_full(t):
    d, fake, real = t["d_fake"], t["fake"], t["real"]
    p = torch.sigmoid(d)
    expected = (-torch.log(p)).mean() + ((d - 1) ** 2).mean() + 100 * (fake - real).abs().mean()
    total, _ = generator_loss(LossConfig(), d, fake, real)
    torch.testing.assert_close(total, expected)


def test_gradients_flow_to_generator_and_discriminator(t):
    fake = t["fake"].clone().requires_grad_(True)
    d_fake = t["d_fake"].clone().requires_grad_(True)
    total, parts = generator_loss(LossConfig(), d_fake, fake, t["real"])
    total.backward()
    assert fake.grad is not None and d_fake.grad is not None
    assert all(not v.requires_grad for v in parts.values())
    d_real = t["d_real"].clone().requires_grad_(True)
    discriminator_loss("deepdark", d_real, t["d_fake"]).backward()
    assert d_real.grad is not None


def test_bce_is_stable_for_large_logits():
    big = torch.full((1, 1, 2, 2), 200.0)
    assert torch.isfinite(discriminator_loss("pix2pix", big, -big))
    total, _ = generator_loss("pix2pix", -big, torch.zeros(1), torch.zeros(1))
    torch.testing.assert_close(total, torch.tensor(200.0))


def test_unknown_name_and_bad_weight():
    with pytest.raises(ValueError) as e:
        LossConfig("wgan")
    for n in ("deepdark", "lsgan", "mixed", "pix2pix"):
        assert n in str(e.value)
    with pytest.raises(ValueError, match="deepdark"):
        discriminator_loss("hinge", torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match="l1_weight"):
        LossConfig("deepdark", -1.0)
