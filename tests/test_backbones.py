"""Backbones: published sizes and FLOPs, shapes, and parity with insightface's arcface_torch.

The reference is arcface_torch's own module code (tests/reference/arcface_torch, a copy of
its backbones/ package): for every backbone with an arcface_torch name, the state dict its
`get_model(name)` builds must have our names and shapes, and on the same weights the two
must compute the same embedding. The big ones (r2060 is 1.1 G parameters, ViT-H 0.76 G)
are compared on the meta device (names and shapes, no memory); outputs are compared on the
others that run in a second or two on a CPU.
"""

import pytest
import torch

from arcface_core.backbones import BACKBONES, NAMES, backbone_spec, build_backbone, count_macs, count_parameters
from reference.arcface_torch import get_model

INSIGHTFACE = [name for name in NAMES if BACKBONES[name].insightface]
# Outputs compared on these (each class and head of the family; the rest differ in depth or
# width only, and their names and shapes are compared below).
OUTPUT_CHECKED = ["iresnet18", "mobilefacenet", "mobilefacenet-large", "vit_t"]


def _random_state(model: torch.nn.Module, seed: int) -> dict:
    """A state dict for `model` with every parameter and batch-norm statistic away from its
    initial value (an untrained model's BN layers are identities, which would hide a
    misplaced one)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(100)
        elif name.endswith("running_var"):
            state[name] = torch.rand(t.shape, generator=g) + 0.5
        else:  # 1-d tensors (BN/LN scales and shifts, PReLU slopes, biases) around 1, the rest around 0
            state[name] = torch.randn(t.shape, generator=g) * 0.05 + (1.0 if t.ndim == 1 else 0.0)
    return state


def _pair(name: str, num_features: int, seed: int):
    """arcface_torch's module and ours, both holding the same random weights (built on the
    meta device and given the weights with assign: no time spent initialising either)."""
    with torch.device("meta"):
        theirs = get_model(BACKBONES[name].insightface, num_features=num_features)
        ours = build_backbone(name, num_features=num_features)
    state = _random_state(theirs, seed)
    theirs.load_state_dict(state, strict=True, assign=True)
    ours.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True, assign=True)
    return theirs, ours


@pytest.mark.parametrize("name, gflops, mparams", [("iresnet50", 6.3, 43.6), ("iresnet100", 12.1, 65.2),
                                                   ("mobilefacenet", 0.45, 2.0)])
def test_published_flops_and_parameters(name, gflops, mparams):
    with torch.device("meta"):  # shapes only: nothing allocated, nothing computed
        model = build_backbone(name)
    assert count_macs(model) / 1e9 == pytest.approx(gflops, rel=0.05)
    assert count_parameters(model) / 1e6 == pytest.approx(mparams, rel=0.05)


@pytest.mark.parametrize("name", [n for n in NAMES if BACKBONES[n].zoo_gflops])
def test_macs_match_the_model_zoo(name):
    """Our MAC count beside the figure arcface_torch's README quotes. Within 3%: ptflops,
    which made the zoo's figures, also counts batch-norm and activation element operations
    (MobileFaceNet's many BN/PReLU layers on large maps are 2.7% of its 0.45 G; r200's 0.3%)."""
    with torch.device("meta"):
        model = build_backbone(name)
    assert count_macs(model) / 1e9 == pytest.approx(BACKBONES[name].zoo_gflops, rel=0.03)


def test_macs_hand_counted():
    """count_macs against a hand count: conv 3->4 (3x3, stride 1, pad 1) on 8x8, then a
    linear 256->5, then one attention product (2 x 3 tokens x 3 tokens x 4 dims)."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.fc = torch.nn.Linear(256, 5)

        def forward(self, x):
            y = self.conv(x)
            t = y.flatten(2)[:, :, :3].transpose(1, 2)  # 3 tokens of 4 dims
            return self.fc(y.flatten(1)).sum() + ((t @ t.transpose(1, 2)) @ t).sum()

    assert count_macs(Net(), input_size=8) == 8 * 8 * 4 * 3 * 9 + 256 * 5 + 2 * 3 * 3 * 4


def test_insightface_state_dict_layout():
    sd = build_backbone("iresnet50").state_dict()
    # names and shapes as in arcface_torch's iresnet50 checkpoints
    assert sd["conv1.weight"].shape == (64, 3, 3, 3)
    assert sd["layer1.0.downsample.0.weight"].shape == (64, 64, 1, 1)
    assert sd["layer3.13.conv2.weight"].shape == (256, 256, 3, 3)
    assert sd["layer4.0.prelu.weight"].shape == (512,)
    assert sd["fc.weight"].shape == (512, 512 * 7 * 7)
    assert sd["features.running_var"].shape == (512,)
    assert "layer3.14.conv1.weight" not in sd


@pytest.mark.parametrize("name", INSIGHTFACE)
def test_names_and_shapes_equal_arcface_torch(name):
    with torch.device("meta"):
        ours = build_backbone(name).state_dict()
        theirs = get_model(BACKBONES[name].insightface, num_features=512).state_dict()
    assert list(ours) == list(theirs)  # same names in the same order
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


@pytest.mark.parametrize("name", OUTPUT_CHECKED)
def test_outputs_equal_arcface_torch_on_its_weights(name):
    """A state dict from arcface_torch's module loads into ours (strict) and both give the
    same embedding in eval mode."""
    theirs, ours = _pair(name, 128, seed=1)
    theirs.eval(), ours.eval()
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = theirs(x), ours(x)
    assert got.shape == (2, 128)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_vit_training_forward_equals_arcface_torch():
    """In training mode (patch masking and stochastic depth on) the same random draws give
    the same output: our masking and DropPath consume the generator as the reference does."""
    theirs, ours = _pair("vit_t", 64, seed=3)
    theirs.train(), ours.train()
    x = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(5)
    expected = theirs(x)
    torch.manual_seed(5)
    got = ours(x)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    # and the masking did something: eval mode (no masking, no drop path) differs
    with torch.no_grad():
        assert not torch.allclose(ours.eval()(x), got.detach(), atol=1e-3)


def test_activation_checkpointing_changes_nothing_but_memory():
    """r2060's recomputed stages (and ViT-B's blocks) give the same output and gradients."""
    from arcface_core.backbones.iresnet import IResNet

    torch.manual_seed(6)
    plain = IResNet((1, 4, 6, 1), num_features=32, widths=(8, 16, 32, 64), stem_stride=2).train()
    recomputed = IResNet((1, 4, 6, 1), num_features=32, widths=(8, 16, 32, 64), stem_stride=2,
                         checkpoint_segments=(0, 2, 3, 0))
    recomputed.load_state_dict(plain.state_dict())
    recomputed.train()
    x = torch.randn(4, 3, 112, 112)
    a, b = plain(x), recomputed(x)
    a.square().sum().backward()
    b.square().sum().backward()
    assert torch.allclose(a, b, atol=1e-5)
    for (n, p), q in zip(plain.named_parameters(), recomputed.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), n


def test_insightface_names_are_accepted():
    assert backbone_spec("r100").name == "iresnet100" and backbone_spec("mbf_large").name == "mobilefacenet-large"
    assert backbone_spec("VIT_T").name == "vit_t"
    with pytest.raises(ValueError, match="unknown backbone 'r101'.*iresnet100.*r2060"):
        build_backbone("r101")


@pytest.mark.parametrize("name", ["tiny", "mobilefacenet"])
def test_forward_shapes(name):
    model = build_backbone(name, num_features=128).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 128) and torch.isfinite(out).all()
