"Losses: CoA-loss gradient closed forms, focal/CE, entropy and the entropy hinge, the prompt-loss registry."
import math
import pytest, torch
from cocoamix.losses import (cross_entropy, coa_loss, focal_loss, entropy, entropy_hinge, prompt_loss,
                             PROMPT_LOSSES)


def closed_form_grad(z, y, w):
    "Per-sample dL/dz of CE + w(1-p_y): -(1-p_y)(1+w p_y) at y, p_c(1+w p_y) elsewhere."
    p = z.softmax(-1)
    py = p.gather(-1, y[:, None])
    g = p * (1 + w * py)
    g.scatter_(-1, y[:, None], -(1 - py) * (1 + w * py))
    return g


@pytest.mark.parametrize('w', [0.0, 0.5, 1.0, 2.0, 7.5])
@pytest.mark.parametrize('scale', [0.5, 3.0, 20.0])
def test_coa_gradient_matches_closed_form(w, scale):
    g = torch.Generator().manual_seed(int(w * 10 + scale))
    n, c = 32, 9
    z = (torch.randn(n, c, generator=g, dtype=torch.float64) * scale).requires_grad_()
    y = torch.randint(0, c, (n,), generator=g)
    coa_loss(z, y, w=w).backward()
    # the loss is a batch mean: per-sample gradient = N * autograd gradient
    torch.testing.assert_close(z.grad * n, closed_form_grad(z.detach(), y, w), rtol=1e-9, atol=1e-12)


def test_coa_gradient_single_sample_and_value():
    z = torch.tensor([[1.0, 2.0, -1.0, 0.5]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([2])
    loss = coa_loss(z, y, w=1.5)
    p = z.detach().softmax(-1)[0]
    assert math.isclose(loss.item(), -math.log(p[2]) + 1.5 * (1 - p[2]), rel_tol=1e-12)
    loss.backward()
    torch.testing.assert_close(z.grad, closed_form_grad(z.detach(), y, 1.5))


def test_coa_extra_push_targets_confusing_class():
    "The extra push w p_y p_c is largest on the class most confused with y."
    z = torch.tensor([[2.0, 1.9, -3.0, -3.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0])
    g_coa = torch.autograd.grad(coa_loss(z, y, w=1.0), z)[0]
    g_ce = torch.autograd.grad(cross_entropy(z, y), z)[0]
    extra = (g_coa - g_ce)[0, 1:]
    assert extra.argmax() == 0 and (extra > 0).all()


def test_coa_w0_is_ce_and_w_increases_loss():
    z, y = torch.randn(16, 5), torch.randint(0, 5, (16,))
    torch.testing.assert_close(coa_loss(z, y, w=0.0), cross_entropy(z, y))
    assert coa_loss(z, y, w=2.0) > coa_loss(z, y, w=1.0) > cross_entropy(z, y)


def test_focal_gamma0_is_ce_and_smaller_otherwise():
    z, y = torch.randn(64, 10) * 3, torch.randint(0, 10, (64,))
    torch.testing.assert_close(focal_loss(z, y, gamma=0.0), cross_entropy(z, y))
    torch.testing.assert_close(focal_loss(z, y, gamma=0), cross_entropy(z, y))
    assert focal_loss(z, y, gamma=2.0) < focal_loss(z, y, gamma=1.0) < cross_entropy(z, y)


@pytest.mark.parametrize('c', [2, 7, 100])
def test_entropy_uniform_is_log_c(c):
    torch.testing.assert_close(entropy(torch.full((3, c), 4.2)), torch.full((3,), math.log(c)))
    assert (entropy(torch.randn(50, c)) <= math.log(c) + 1e-5).all()
    assert entropy(torch.randn(4, c)).shape == (4,)


def test_entropy_hinge_values_and_gradient():
    c = 10
    t0 = torch.randn(8, c) * 3
    h0 = entropy(t0)
    # zero once the margin holds: uniform t_i is log C - H(t0) nats flatter; choose d just under the smallest gap
    d_ok = float((math.log(c) - h0).min()) - 1e-3
    assert entropy_hinge(t0, torch.zeros(8, c), d=d_ok) == 0
    # over-confident t_i: every sample violates; the value is mean(H0 - Hi + d)
    ti = (torch.randn(8, c) * 30).requires_grad_()
    h = entropy_hinge(t0, ti, d=0.5)
    expected = (h0 - entropy(ti.detach()) + 0.5).clamp(min=0).mean()
    assert h > 0
    torch.testing.assert_close(h, expected)
    h.backward()
    assert ti.grad is not None and ti.grad.abs().sum() > 0
    # partially satisfied: samples meeting the margin contribute 0, the mean is over all samples
    mixed = torch.cat([torch.zeros(4, c), torch.randn(4, c) * 30])
    t0b = torch.cat([torch.randn(4, c) * 10, torch.randn(4, c)])
    per = (entropy(t0b) - entropy(mixed) + 0.5).clamp(min=0)
    torch.testing.assert_close(entropy_hinge(t0b, mixed, 0.5), per.mean())


def test_prompt_loss_registry():
    assert set(PROMPT_LOSSES) == {'ce', 'coa', 'focal'}
    z, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    torch.testing.assert_close(prompt_loss('coa', w=0.3)(z, y), coa_loss(z, y, 0.3))
    torch.testing.assert_close(prompt_loss('coa')(z, y), coa_loss(z, y, 1.0))
    torch.testing.assert_close(prompt_loss('focal', gamma=1.0)(z, y), focal_loss(z, y, 1.0))
    with pytest.raises(ValueError, match="'ce', 'coa', 'focal'"): prompt_loss('coaloss')
    for bad in ('1.0', None, True, [1.0]):
        with pytest.raises(TypeError): prompt_loss('coa', w=bad)
        with pytest.raises(TypeError): coa_loss(z, y, w=bad)
    with pytest.raises(TypeError): prompt_loss('ce', w=1.0)
