"""fastconv.nn: every layer's backward against finite differences, layers/loss/optimisers
against PyTorch, initialisation, modes and persistence."""

from __future__ import annotations

import numpy as np
import pytest

from fastconv import nn

#: gradchecks run on the ground truth and on what users get by default
GRAD_BACKENDS = ["reference", "auto"]


def f64(module: nn.Module) -> nn.Module:
    return module.astype(np.float64)


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


# --------------------------------------------------------------------------- gradcheck, layer by layer

CONV_CASES = [
    dict(in_channels=3, out_channels=4, kernel_size=3),
    dict(in_channels=3, out_channels=4, kernel_size=3, padding=1),
    dict(in_channels=2, out_channels=4, kernel_size=(2, 3), stride=2, padding=(1, 0)),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding="same", dilation=2, groups=2),
    dict(in_channels=4, out_channels=4, kernel_size=3, stride=(1, 2), groups=4, bias=False),
]


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
@pytest.mark.parametrize("kw", CONV_CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_gradcheck_conv2d(backend, kw):
    layer = f64(nn.Conv2d(**kw, rng=1)).set_backend(backend)
    res = nn.gradcheck(layer, randn(2, kw["in_channels"], 7, 8))
    assert res.ok, str(res)
    assert set(res.errors) == {"input", "weight"} | ({"bias"} if kw.get("bias", True) else set())


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
@pytest.mark.parametrize("layer, shape", [
    (lambda: nn.Linear(7, 5, rng=1), (4, 7)),
    (lambda: nn.Linear(7, 5, bias=False, rng=1), (4, 7)),
    (lambda: nn.ReLU(), (2, 3, 5, 5)),
    (lambda: nn.MaxPool2d(2), (2, 3, 6, 6)),
    (lambda: nn.MaxPool2d(3, stride=2, padding=1), (2, 3, 7, 6)),
    (lambda: nn.MaxPool2d(2, dilation=2, ceil_mode=True), (2, 2, 7, 7)),
    (lambda: nn.AvgPool2d(2), (2, 3, 6, 6)),
    (lambda: nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False, ceil_mode=True), (2, 3, 8, 7)),
    (lambda: nn.GlobalAvgPool2d(), (3, 4, 5, 6)),
    (lambda: nn.Flatten(), (3, 2, 4, 4)),
    (lambda: nn.Dropout(0.4, rng=3), (4, 6, 3, 3)),
    (lambda: nn.BatchNorm2d(3), (4, 3, 5, 5)),
    (lambda: nn.BatchNorm2d(3, affine=False), (4, 3, 5, 5)),
], ids=["linear", "linear-nobias", "relu", "maxpool2", "maxpool3s2p1", "maxpool-dil-ceil", "avgpool2",
        "avgpool-ceil-nopad", "gap", "flatten", "dropout", "batchnorm", "batchnorm-noaffine"])
def test_gradcheck_layers(backend, layer, shape):
    module = f64(layer()).set_backend(backend)
    x = randn(*shape, seed=2)
    res = nn.gradcheck(module, x)
    assert res.ok, str(res)


def test_gradcheck_batchnorm_eval_mode():
    bn = f64(nn.BatchNorm2d(3))
    bn.forward(randn(8, 3, 4, 4) * 2 + 1)  # move the running statistics away from (0, 1)
    bn.weight.data[:] = [0.5, 2.0, -1.0]
    bn.eval()
    res = nn.gradcheck(bn, randn(4, 3, 5, 5, seed=3))
    assert res.ok, str(res)


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
def test_gradcheck_whole_models(backend):
    stripes = f64(nn.stripes_net(rng=0, backend=backend))
    res = nn.gradcheck(stripes, randn(3, 1, 16, 16))
    assert res.ok, str(res)
    assert len(res.errors) == 1 + 6  # input + three weight/bias pairs


def test_gradcheck_simple_cnn():
    cnn = f64(nn.simple_cnn(rng=0, backend="reference"))
    res = nn.gradcheck(cnn, randn(2, 1, 28, 28), max_elements=8)
    assert res.ok, str(res)


def test_gradcheck_detects_a_wrong_backward():
    class BrokenReLU(nn.ReLU):  # forgets to zero the gradient where x < 0
        def backward(self, grad_out, *, need_input=True):
            return grad_out

    res = nn.gradcheck(nn.Sequential(BrokenReLU()), randn(2, 3, 4, 4))
    assert not res.ok and res.errors["input"] > 1e3

    class BrokenLinear(nn.Linear):  # weight gradient off by a factor 2
        def backward(self, grad_out, *, need_input=True):
            out = super().backward(grad_out, need_input=need_input)
            self.weight.grad *= 2
            return out

    res = nn.gradcheck(f64(BrokenLinear(4, 3, rng=0)), randn(5, 4))
    assert not res.ok and res.errors["weight"] > 1e3 and res.errors["input"] <= 1


def test_gradcheck_requires_float64_parameters():
    with pytest.raises(TypeError, match="astype"):
        nn.gradcheck(nn.Linear(3, 2, rng=0), randn(2, 3))


# --------------------------------------------------------------------------- loss

def test_cross_entropy_value_and_gradient():
    logits, y = randn(6, 4), np.array([0, 3, 1, 1, 2, 0])
    ce = nn.CrossEntropyLoss()
    loss = ce(logits, y)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert loss == pytest.approx(-np.log(p[np.arange(6), y]).mean(), rel=1e-12)
    grad = ce.backward()
    eps, num = 1e-6, np.zeros_like(logits)
    for idx in np.ndindex(logits.shape):
        lp, lm = logits.copy(), logits.copy()
        lp[idx] += eps
        lm[idx] -= eps
        num[idx] = (ce(lp, y) - ce(lm, y)) / (2 * eps)
    np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-9)


def test_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1e4, 0.0, -1e4], [-1e30, 1e30, 0.0]], dtype=np.float32)
    ce = nn.CrossEntropyLoss()
    loss = ce(logits, np.array([0, 0]))
    grad = ce.backward()
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    assert loss == pytest.approx(2e30 / 2, rel=1e-6)  # sample 0 costs 0, sample 1 costs 2e30
    np.testing.assert_allclose(nn.softmax(logits).sum(1), 1.0, rtol=1e-6)


def test_cross_entropy_rejects_bad_targets():
    ce = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        ce(randn(2, 3), np.array([0, 3]))
    with pytest.raises(TypeError, match="integer"):
        ce(randn(2, 3), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="shape|expected"):
        ce(randn(2, 3), np.array([0, 1, 2]))


# --------------------------------------------------------------------------- init, modes, persistence

@pytest.mark.parametrize("make, fan_in", [
    (lambda rng: nn.Conv2d(16, 32, 3, rng=rng), 16 * 9),
    (lambda rng: nn.Conv2d(16, 32, (1, 5), groups=4, rng=rng), 4 * 5),
    (lambda rng: nn.Linear(300, 200, rng=rng), 300),
])
def test_default_init_is_pytorch_uniform(make, fan_in):
    layer = make(0)
    bound = 1 / np.sqrt(fan_in)
    for p in (layer.weight, layer.bias):
        assert p.data.dtype == np.float32
        assert np.abs(p.data).max() <= bound
    w = layer.weight.data
    assert w.std() == pytest.approx(bound / np.sqrt(3), rel=0.05)  # std of U(-b, b)
    assert abs(w.mean()) < 0.05 * bound
    np.testing.assert_array_equal(make(0).weight.data, w)  # seeded
    assert not np.array_equal(make(1).weight.data, w)


def test_dropout_train_and_eval():
    x = np.ones((200, 50), dtype=np.float32)
    drop = nn.Dropout(0.25, rng=0)
    y = drop(x)
    assert y.dtype == np.float32
    assert set(np.unique(y)) == {0.0, np.float32(1 / 0.75)}
    assert np.mean(y == 0) == pytest.approx(0.25, abs=0.02)
    g = drop.backward(np.ones_like(x))
    np.testing.assert_array_equal(g, y)  # same mask, same scale
    drop.eval()
    assert drop(x) is x


def test_batchnorm_matches_torch_train_and_eval():
    torch = pytest.importorskip("torch")
    x = randn(6, 3, 4, 5) * 3 + 2
    ours = f64(nn.BatchNorm2d(3, momentum=0.2))
    ours.weight.data[:] = [1.5, -0.5, 2.0]
    ours.bias.data[:] = [0.1, 0.2, -0.3]
    ref = torch.nn.BatchNorm2d(3, momentum=0.2).double()
    with torch.no_grad():
        ref.weight[:] = torch.tensor([1.5, -0.5, 2.0], dtype=torch.float64)
        ref.bias[:] = torch.tensor([0.1, 0.2, -0.3], dtype=torch.float64)
    gy = randn(6, 3, 4, 5, seed=5)
    for mode in ("train", "eval"):
        getattr(ours, mode)()
        getattr(ref, mode)()
        xt = torch.tensor(x, requires_grad=True)
        yt = ref(xt)
        yt.backward(torch.tensor(gy))
        ours.zero_grad()
        y = ours(x)
        gx = ours.backward(gy)
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(ours.weight.grad, ref.weight.grad.numpy(), rtol=1e-10)
        np.testing.assert_allclose(ours.running_mean, ref.running_mean.numpy(), rtol=1e-12)
        np.testing.assert_allclose(ours.running_var, ref.running_var.numpy(), rtol=1e-12)
        ref.zero_grad()


def test_model_matches_torch_forward_and_backward():
    torch = pytest.importorskip("torch")
    model = nn.stripes_net(rng=0)
    ref = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(16, 2))
    state = model.state_dict()
    ref.load_state_dict({k.replace("6.", "7."): torch.tensor(v) for k, v in state.items()})
    x = np.random.default_rng(0).random((5, 1, 16, 16), dtype=np.float32)
    y = np.array([0, 1, 1, 0, 1])
    ce = nn.CrossEntropyLoss()
    loss = ce(model(x), y)
    model.backward(ce.backward())
    ref_loss = torch.nn.functional.cross_entropy(ref(torch.tensor(x)), torch.tensor(y))
    ref_loss.backward()
    assert loss == pytest.approx(ref_loss.item(), rel=1e-5)
    ref_grads = {k.replace("7.", "6."): p.grad.numpy() for k, p in ref.named_parameters()}
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, ref_grads[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_named_parameters_train_eval_and_backend():
    model = nn.simple_cnn(rng=0, backend="reference")
    names = [n for n, _ in model.named_parameters()]
    assert names == ["0.weight", "0.bias", "3.weight", "3.bias", "7.weight", "7.bias", "10.weight", "10.bias"]
    assert model.num_parameters() == 32 * 9 + 32 + 64 * 32 * 9 + 64 + 3136 * 128 + 128 + 1280 + 10
    assert all(m.backend == "reference" for m in model.modules())
    model.eval()
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())


def test_state_dict_save_load_roundtrip(tmp_path):
    a, b = nn.Sequential(nn.Conv2d(1, 2, 3, rng=0), nn.BatchNorm2d(2)), None
    a.forward(randn(4, 1, 5, 5).astype(np.float32))  # running stats change
    a.save(tmp_path / "w.npz")
    b = nn.Sequential(nn.Conv2d(1, 2, 3, rng=9), nn.BatchNorm2d(2))
    b.load(tmp_path / "w.npz")
    for (k, va), (k2, vb) in zip(sorted(a.state_dict().items()), sorted(b.state_dict().items())):
        assert k == k2
        np.testing.assert_array_equal(va, vb)
    assert set(a.state_dict()) == {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"}
    # the state dict holds copies
    a.state_dict()["0.weight"][...] = 7
    assert not np.any(a[0].weight.data == 7)


def test_load_rejects_wrong_shapes_and_keys(tmp_path):
    nn.Sequential(nn.Linear(4, 3, rng=0)).save(tmp_path / "w.npz")
    with pytest.raises(ValueError, match=r"w\.npz.*'0\.weight'.*\(3, 4\).*\(5, 4\)"):
        nn.Sequential(nn.Linear(4, 5, rng=0)).load(tmp_path / "w.npz")
    with pytest.raises(KeyError, match=r"missing keys \['1\.bias', '1\.weight'\]"):
        nn.Sequential(nn.Linear(4, 3, rng=0), nn.Linear(3, 2, rng=0)).load(tmp_path / "w.npz")
    model = nn.Sequential(nn.Linear(4, 3, rng=0), nn.Linear(3, 2, rng=0))
    model.load(tmp_path / "w.npz", strict=False)  # loads what matches


# --------------------------------------------------------------------------- optimisers against torch

OPTIMIZERS = [
    ("sgd", dict(lr=0.1)),
    ("sgd", dict(lr=0.1, momentum=0.9)),
    ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    ("sgd", dict(lr=0.05, momentum=0.5, dampening=0.3, weight_decay=1e-3)),
    ("adam", dict(lr=1e-2)),
    ("adam", dict(lr=1e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2)),
]


@pytest.mark.parametrize("kind, kw", OPTIMIZERS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(OPTIMIZERS)])
def test_optimizers_match_torch(kind, kw):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    p = nn.Parameter(rng.standard_normal((3, 4)))
    tp = torch.tensor(p.data.copy(), requires_grad=True)
    ours = (nn.SGD if kind == "sgd" else nn.Adam)([p], **kw)
    ref = (torch.optim.SGD if kind == "sgd" else torch.optim.Adam)([tp], **kw)
    for _ in range(6):
        g = rng.standard_normal((3, 4))
        ours.zero_grad()
        p.grad += g
        ours.step()
        tp.grad = torch.tensor(g)
        ref.step()
        np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_optimizer_argument_checks():
    p = nn.Parameter(np.zeros(2))
    with pytest.raises(ValueError, match="lr"):
        nn.SGD([p], lr=0)
    with pytest.raises(ValueError, match="Nesterov"):
        nn.SGD([p], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="empty"):
        nn.Adam([])


def test_float32_stays_float32_through_a_training_step():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, rng=0), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.AvgPool2d(2), nn.Flatten(), nn.Dropout(0.5, rng=0), nn.Linear(16, 3, rng=0),
                          backend="reference")
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    outs = model.forward_all(x)
    assert all(o.dtype == np.float32 for o in outs), [o.dtype for o in outs]
    ce = nn.CrossEntropyLoss()
    ce(outs[-1], np.array([0, 1, 2, 0, 1]))
    g = ce.backward()
    assert g.dtype == np.float32
    assert model.backward(g).dtype == np.float32
    opt = nn.Adam(model.parameters())
    opt.step()
    assert all(p.data.dtype == np.float32 and p.grad.dtype == np.float32 for p in model.parameters())


@pytest.mark.parametrize("pool", [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1),
                                  dict(kernel_size=2, ceil_mode=True)])
def test_sequential_runs_relu_after_max_pool_with_identical_results(pool):
    """Sequential swaps ReLU -> MaxPool2d into MaxPool2d -> ReLU: outputs and gradients are
    bit-identical to running the layers one by one in their written order, with ties, zeros,
    all-negative windows and NaN."""
    rng = np.random.default_rng(0)
    x = np.round(rng.standard_normal((3, 4, 9, 9)) * 2).astype(np.float32)   # ties and zeros
    x[0, 0, :3, :3] = -5.0                                                     # a negative window
    x[1, 2, 4, 4] = np.nan
    layers = [nn.ReLU(), nn.MaxPool2d(**pool), nn.Flatten()]
    model = nn.Sequential(*layers)
    got = model.forward(x)
    gy = rng.standard_normal(got.shape).astype(np.float32)
    got_gx = model.backward(gy)
    want = x
    for layer in layers:  # written order, one by one
        want = layer.forward(want)
    want_gx = gy
    for layer in reversed(layers):
        want_gx = layer.backward(want_gx)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_gx, want_gx)
    assert [type(a) for a in model._run_order()] == [nn.MaxPool2d, nn.ReLU, nn.Flatten]
    outs = model.forward_all(x)  # the plots' view keeps the written order ...
    np.testing.assert_array_equal(outs[0], np.maximum(x, 0))
    np.testing.assert_array_equal(model.backward(gy), want_gx)  # ... and backward follows it
