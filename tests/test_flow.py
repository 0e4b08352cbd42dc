"""Tests for flow.py: samplers on an exactly solvable flow, shift and timestep values, CFG, training."""
import math

import pytest
import torch

import flow
import model as M

# ----- An exact flow: Gaussian data ------------------------------------------------------------------
# Data x1 ~ N(m, diag(s²)), noise x0 ~ N(0, I). x_t is Gaussian with mean t·m and variance
# a(t) = t²s² + (1 − t)², and the optimal velocity E[x1 − x0 | x_t] is affine in x_t:
#     v(x, t) = m + (t·s² − (1 − t)) · (x − t·m) / a(t).
# The ODE keeps z = (x − t·m) / sqrt(a(t)) constant, so its exact endpoint from x at time t0 is m + s·z.

GEN = torch.Generator().manual_seed(0)
DIM = 6
MEAN = torch.rand(DIM, generator=GEN) * 2 - 1
STD = 0.3 + 1.7 * torch.rand(DIM, generator=GEN)


def gaussian_velocity(x, t):
    t = t[:, None].double()
    a = t ** 2 * STD ** 2 + (1 - t) ** 2
    return (MEAN + (t * STD ** 2 - (1 - t)) * (x.double() - t * MEAN) / a).float()


def exact_endpoint(x, t0):
    z = (x.double() - t0 * MEAN) / torch.sqrt(t0 ** 2 * STD ** 2 + (1 - t0) ** 2)
    return MEAN + STD * z


def solver_error(solver, steps, shift, noise):
    out = flow.sample(gaussian_velocity, noise, steps, solver=solver, shift=shift)
    # The DPM grid starts at noise level shift(0.999), i.e. it treats the noise as x at t0 = 1 − that.
    t0 = 1 - flow.dpm_sigma_grid(steps, shift)[0] if solver == "dpm" else 0.0
    return (out.double() - exact_endpoint(noise, t0)).abs().max().item()


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_samplers_converge_dpm_faster_than_euler(shift):
    noise = torch.randn(256, DIM, generator=torch.Generator().manual_seed(1))
    steps = (8, 16, 32, 64)
    errors = {s: [solver_error(s, n, shift, noise) for n in steps] for s in ("euler", "midpoint", "dpm")}
    print(shift, errors)
    for solver, errs in errors.items():
        assert all(a > b for a, b in zip(errs, errs[1:])), solver
    for e_dpm, e_euler in zip(errors["dpm"], errors["euler"]):
        assert e_dpm < e_euler
    # Euler is first order (the error halves per doubling); DPM-Solver++ 2M falls much faster (about
    # 3x per doubling at these step counts; its first-order last step to noise level 0 limits it).
    euler_gain, dpm_gain = errors["euler"][0] / errors["euler"][-1], errors["dpm"][0] / errors["dpm"][-1]
    assert 1.8 < errors["euler"][-2] / errors["euler"][-1] < 2.2
    assert errors["dpm"][-2] / errors["dpm"][-1] > 2.3
    assert dpm_gain > 2 * euler_gain


def test_dpm_reaches_the_true_distribution():
    n = 8192
    noise = flow.seeded_noise(n, DIM, 1, 1, seed=3).flatten(1)
    # The official settings: DPM-Solver++ 2M, 50 steps, shift 10.
    out = flow.sample(gaussian_velocity, noise, flow.DEFAULT_STEPS, solver="dpm", shift=flow.DEFAULT_SHIFT)
    out = out.double()
    assert ((out.mean(0) - MEAN).abs() < 4 * STD / math.sqrt(n)).all()
    assert ((out.std(0) / STD - 1).abs() < 0.03).all()


def test_dpm_grid_and_model_call_count():
    grid = flow.dpm_sigma_grid(50, 10.0)
    assert grid[0] == pytest.approx(0.99990, abs=1e-5) and grid[-1] == 0.0
    assert grid[-2] == pytest.approx(0.169, abs=1e-3)   # the official DPM grid at 50 steps, shift 10: 0.99990, 0.99786, ..., 0.169, 0
    assert grid[1] == pytest.approx(0.99786, abs=1e-5)
    for solver, steps in (("dpm", 7), ("euler", 7), ("midpoint", 8)):
        calls = []
        flow.sample(lambda x, t: calls.append(t) or torch.zeros_like(x), torch.zeros(2, 3), steps, solver=solver)
        assert len(calls) == steps
        assert all(c.shape == (2,) and 0 <= c.min() and c.max() <= 1 for c in calls)


def test_steps_are_model_evaluations_and_reproduce_the_official_ode_grid():
    # The official --num_sampling_steps N for euler / midpoint is N grid points: t = linspace(0, 1, N),
    # shifted by t / (t + s(1 - t)) (transport/integrators.py), N - 1 intervals. Ours counts evaluations.
    N, s = 7, 6.0
    t = torch.linspace(0, 1, N, dtype=torch.float64)
    grid = (t / (t + s * (1 - t))).tolist()
    midpoints = [a + (b - a) / 2 for a, b in zip(grid, grid[1:])]
    expected = {"euler": (N - 1, grid[:-1]),
                "midpoint": (2 * (N - 1), [x for pair in zip(grid[:-1], midpoints) for x in pair])}
    for solver, (steps, times) in expected.items():
        calls = []
        flow.sample(lambda x, t: calls.append(t[0].item()) or torch.ones_like(x), torch.zeros(1, 2), steps,
                    solver=solver, shift=s)
        assert calls == pytest.approx(times, abs=1e-6), solver
    for odd in (1, 5):      # a midpoint interval costs two evaluations: an odd count cannot be honoured
        with pytest.raises(ValueError, match="even"):
            flow.sample(lambda x, t: x, torch.zeros(1, 2), odd, solver="midpoint")


# ----- Timesteps and shift ----------------------------------------------------------------------------

def test_resolution_shift_has_the_spec_values():
    assert math.log(flow.resolution_shift(256)) == pytest.approx(0.5)
    assert math.log(flow.resolution_shift(4096)) == pytest.approx(1.15)
    assert flow.resolution_shift(256) == pytest.approx(1.649, abs=1e-3)
    assert flow.resolution_shift(1024) == pytest.approx(1.878, abs=1e-3)
    assert flow.resolution_shift(4096) == pytest.approx(3.158, abs=1e-3)


def test_shift_timesteps_matches_the_official_formula():
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    mu = 0.63
    official = 1 - math.exp(mu) / (math.exp(mu) + (1 / (1 - t) - 1))
    shifted = flow.shift_timesteps(t, math.exp(mu))
    assert torch.allclose(shifted, official, atol=1e-12)
    assert (shifted < t).all()                                   # towards noise (t = 0)
    ends = flow.shift_timesteps(torch.tensor([0.0, 1.0], dtype=torch.float64), 3.0)
    assert ends.tolist() == [0.0, 1.0]


def test_timestep_sampler_statistics():
    gen = torch.Generator().manual_seed(0)
    t = flow.sample_timesteps(20000, generator=gen, mode="lognorm")
    logit = torch.log(t / (1 - t))
    assert ((0 < t) & (t < 1)).all()
    assert abs(logit.mean().item()) < 0.03 and abs(logit.std().item() - 1) < 0.03
    t_mu = flow.sample_timesteps(20000, generator=gen, mode="lognorm", mu=0.5)
    assert abs(torch.log(t_mu / (1 - t_mu)).mean().item() - 0.5) < 0.03
    u = flow.sample_timesteps(20000, generator=gen, mode="uniform")
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.003
    a = flow.sample_timesteps(5, generator=torch.Generator().manual_seed(7))
    b = flow.sample_timesteps(5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="lognorm"):
        flow.sample_timesteps(3, mode="cosine")


# ----- Path, loss, noise ------------------------------------------------------------------------------

def test_path_target_and_loss():
    gen = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(3, 4, 2, 5, generator=gen), torch.randn(3, 4, 2, 5, generator=gen)
    t = torch.tensor([0.0, 0.25, 1.0])
    xt = flow.interpolate(x0, x1, t)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[2], x1[2])    # t = 0 is noise, 1 is data
    assert torch.allclose(xt[1], 0.25 * x1[1] + 0.75 * x0[1])
    v = torch.randn(3, 4, 2, 5, generator=gen)
    loss = flow.training_loss(v, x0, x1)
    assert loss.shape == (3,)
    assert torch.allclose(loss[1], ((v[1] - (x1[1] - x0[1])) ** 2).mean())


def test_seeded_noise_is_reproducible_and_height_first():
    a = flow.seeded_noise(2, 5, 3, 7, seed=11)
    assert a.shape == (2, 5, 3, 7)
    assert torch.equal(a, flow.seeded_noise(2, 5, 3, 7, seed=11))
    assert not torch.equal(a, flow.seeded_noise(2, 5, 3, 7, seed=12))


# ----- Classifier-free guidance -----------------------------------------------------------------------

def test_cfg_plain_and_renorm():
    gen = torch.Generator().manual_seed(0)
    v_c, v_u = torch.randn(16, 4, 3, 5, generator=gen), torch.randn(16, 4, 3, 5, generator=gen)
    plain = flow.cfg_velocity(v_c, v_u, 4.0, renorm=False)
    assert torch.allclose(plain, v_u + 4.0 * (v_c - v_u))
    for scale in (0.0, 1.0, 2.0, 4.0, 10.0):
        guided = flow.cfg_velocity(v_c, v_u, scale, renorm=True)
        norms, cond_norms = guided.flatten(1).norm(dim=1), v_c.flatten(1).norm(dim=1)
        assert (norms <= cond_norms * (1 + 1e-6)).all()
        # Renorm only rescales: the direction is the plain CFG direction.
        plain = flow.cfg_velocity(v_c, v_u, scale, renorm=False)
        cos = torch.nn.functional.cosine_similarity(guided.flatten(1), plain.flatten(1), dim=1)
        assert torch.allclose(cos, torch.ones(16), atol=1e-5)
    # A guided velocity already shorter than the conditional one is left alone.
    assert torch.equal(flow.cfg_velocity(v_c, v_c, 3.0), v_c)


# ----- A tiny NextDiT learns ---------------------------------------------------------------------------

def test_tiny_model_loss_falls_on_toy_data():
    torch.manual_seed(0)
    net = M.NextDiT(**M.NEXTDIT_CONFIGS["tiny"])
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(4, 16, 4, 4, generator=gen)                   # four fixed "latents" ...
    caps = torch.randn(4, 6, 32, generator=gen)                      # ... each with its own caption
    mask = torch.arange(6)[None] < torch.tensor([6, 4, 5, 3])[:, None]
    # A fixed held-out draw of (noise, t) measures the loss without minibatch noise.
    eval_noise = torch.randn(4, *data.shape, generator=gen)
    eval_t = flow.sample_timesteps(16, generator=gen).view(4, 4)

    def eval_loss():
        with torch.no_grad():
            return sum(flow.training_loss(net(flow.interpolate(n, data, t), t, caps, mask), n, data).mean()
                       for n, t in zip(eval_noise, eval_t)).item() / 4

    before = eval_loss()
    opt = torch.optim.AdamW(net.parameters(), lr=5e-3, betas=(0.9, 0.95), weight_decay=0.0)
    for _ in range(80):
        noise = torch.randn(data.shape, generator=gen)
        t = flow.sample_timesteps(4, generator=gen)
        loss = flow.training_loss(net(flow.interpolate(noise, data, t), t, caps, mask), noise, data).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    print(f"toy held-out loss {before:.3f} -> {after:.3f}")
    assert after < 0.75 * before
