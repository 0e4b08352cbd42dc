"""Flow matching for SVG-T2I: the probability path, the training loss, and the samplers.

Training draws a flow time t, mixes a normalised DINOv3 latent with Gaussian noise along a straight line,
and regresses NextDiT's output onto the line's constant velocity. Sampling integrates the learned
velocity field from noise (t = 0) to data (t = 1) with an ODE solver, under classifier-free guidance.
The official code is KlingTeam/SVG-T2I `svg_t2i/transport/` (path.py, transport.py, dpm_solver.py) and
`forward_with_cfg` in `svg_t2i/models/model_dino.py`.

WARNING, the direction of time. Here, as in the official code, t = 0 is NOISE and t = 1 is DATA. minRF, SD3
and diffusers' FlowMatchEulerDiscreteScheduler use the reverse (x_t = (1 − t)·x_data + t·noise; their velocity,
noise − data, is minus ours): a formula carried over from one flips t -> 1 − t and the sign of v. Conventions:
  * t is the DATA time: t = 0 is pure noise, t = 1 is data. NextDiT receives t itself, not 1000·t.
  * σ = 1 − t is the NOISE LEVEL (DPM-Solver's τ). A "shift" s > 1 moves time towards noise:
        σ' = s·σ / (1 + (s − 1)·σ)           (the same formula in training and in every sampler)
  * x0 is noise, x1 is data:   x_t = t·x1 + (1 − t)·x0,   target velocity u = x1 − x0. The official code
    calls this path ICPlan (`svg_t2i/transport/path.py`, from SiT; "Linear Coupling Plan"): a coupling plan
    pairs noise with data (here independently: each image with fresh noise) and joins them, here by a line.
  * velocity_fn(x, t) is called with x [B, ...] float32 and t a [B] float32 tensor in [0, 1].
"""
import math

import torch
from tqdm import tqdm

# ----- Official sampling defaults (svg_t2i/scripts/sample.sh, svg_t2i/eval/generation/svg_generate.py) -----
DEFAULT_SOLVER = "dpm"      # DPM-Solver++ 2M, "time_uniform_flow" grid
DEFAULT_STEPS = 50          # model evaluations
DEFAULT_CFG = 4.0           # guidance scale
DEFAULT_RENORM = True       # "renorm" CFG: guided velocity never longer than the conditional one
DEFAULT_SHIFT = 10.0        # --time_shifting_factor used with the dpm solver
DPM_SIGMA_MAX = 0.999       # the DPM grid starts at noise level shift(0.999), not 1: dpm_sigma_grid says why
# The released model's sampler settings, as a stage's config.json carries them (train.py writes, sample.py reads).
RELEASE_SAMPLER = dict(steps=DEFAULT_STEPS, cfg=DEFAULT_CFG, solver=DEFAULT_SOLVER, shift=DEFAULT_SHIFT)

# ----- Training defaults (svg_t2i/train_svg_t2i.py and svg_t2i/transport/transport.py) ---------------
LOGNORM_MU = 0.0            # --mu 0.0: t = sigmoid(N(0, 1))
SHIFT_TOKENS = (256, 4096)  # the resolution shift interpolates μ linearly between these token counts ...
SHIFT_MU = (0.5, 1.15)      # ... and these values (256 tokens: s = 1.65; 1024: 1.88; 4096: 3.16)


def _per_sample(t, like):
    """[B] -> [B, 1, 1, ...] broadcastable against `like` [B, ...]."""
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


# ----- Path and loss ----------------------------------------------------------------------------------

def interpolate(x0_noise, x1_data, t):
    """x_t = t·x1 + (1 − t)·x0 for x0, x1 [B, ...] and t [B] (the official ICPlan, `transport/path.py`)."""
    t = _per_sample(t, x1_data)
    return t * x1_data + (1 - t) * x0_noise


def velocity_target(x0_noise, x1_data):
    """The path's velocity d x_t / dt = x1 − x0 (constant along each straight line)."""
    return x1_data - x0_noise


def training_loss(v_pred, x0_noise, x1_data):
    """Per-sample mean squared error to the velocity target, [B, ...] -> [B]; no weighting, as the official
    `Transport.training_losses`. At init NextDiT predicts v = 0, so the first loss is the mean of (x1 − x0)²,
    ≈ 1 + 1 = 2 for per-channel normalised latents and unit noise."""
    target = velocity_target(x0_noise, x1_data)
    return (v_pred.float() - target.float()).square().flatten(1).mean(1)


def flow_matching_loss(velocity_fn, x1_data, generators, shift, *cond):
    """The whole training loss of one micro-batch (paper §3.3), a scalar: per sample a flow time t (logit-normal,
    shifted towards noise by `shift`) and Gaussian noise x0, the mix x_t = t·x1 + (1 − t)·x0, the model's
    velocity there regressed onto x1 − x0; each sample's MSE, averaged over the batch. x1_data [B, C, h, w]
    (normalised latents); generators: one CPU torch.Generator per sample, which draws its t and then its x0, so
    the draws depend on the sample's generator alone (train.py keys each by the sample's place in the global
    batch); velocity_fn(x_t, t, *cond) -> v [B, C, h, w], `cond` the caption features."""
    t = shift_timesteps(torch.cat([sample_timesteps(1, generator=g) for g in generators]), shift)   # [B]
    x0 = torch.stack([torch.randn(x1_data.shape[1:], generator=g) for g in generators])             # [B, C, h, w]
    # Host-to-device copies are non_blocking: the host queues them and goes on (from pinned memory on CUDA).
    x0, t = x0.to(x1_data.device, non_blocking=True), t.to(x1_data.device, non_blocking=True)
    v = velocity_fn(interpolate(x0, x1_data, t), t, *cond)
    return training_loss(v.float(), x0, x1_data).mean()


# ----- Timestep sampling and the resolution shift -----------------------------------------------------

def sample_timesteps(n, generator=None, mode="lognorm", mu=LOGNORM_MU, device=None):
    """n training times t in (0, 1) -> [n] float32: 'lognorm' t = sigmoid(N(mu, 1)) (every official training
    script), 'uniform' U(0, 1) (the argparse default); drawn on the generator's device (CPU by default, for
    reproducibility), then moved to `device`.

    Why logit-normal: SD3 (Esser et al., arXiv 2403.03206, §3.1; best of the t samplers it compared) argues
    the middle of the path is the hard part. At t = 0, x_t = x0 is known and the best velocity is E[x1] − x0;
    at t = 1, x_t = x1 and it is x1 − E[x0] = x1: a mean plus what x_t shows. In between the model has to
    tell which image and which noise were mixed. sigmoid(N(0, 1)) has its mode at t = 0.5, puts 68% of
    draws in (0.27, 0.73), 95% in (0.12, 0.88), and 1.4% below 0.1 (as many above 0.9), where uniform puts 10%."""
    gen_device = generator.device if generator is not None else "cpu"
    if mode == "lognorm":
        t = torch.sigmoid(torch.randn(n, generator=generator, device=gen_device) + mu)
    elif mode == "uniform":
        t = torch.rand(n, generator=generator, device=gen_device)
    else:
        raise ValueError(f"sample_timesteps: mode must be 'lognorm' or 'uniform', got {mode!r}")
    return t.to(device) if device is not None else t


def resolution_shift(num_tokens):
    """Training shift s = e^μ, μ linear in the image-token count: 256 -> 0.5, 4096 -> 1.15 (the official
    `Transport.sample`, svg_t2i/transport/transport.py). Official training uses a fixed count per stage,
    (resolution / 16)²: 256 px -> s = 1.649, 512 -> 1.878, 1024 -> 3.158.

    Why: neighbouring tokens are strongly correlated, so noise averages away over them: a flat region of n
    tokens keeps its mean colour to within σ/√n, so at one σ a 1024-px image (4096 tokens) has 4x less noise
    on each such mean than a 256-px one: the same σ destroys less of a big image, and unshifted training would
    spend many steps on noise levels that are easy at high resolution. The shift moves the drawn times toward
    noise, more for more tokens: the median draw, σ = 0.5, becomes σ' = 0.62 at 256 px and 0.76 at 1024 px.
    (SD3, arXiv 2403.03206, "resolution-dependent shifting of timestep schedules", derives a shift of
    √(4096/256) = 4 from the same argument; the official formula is gentler.)"""
    (n0, n1), (mu0, mu1) = SHIFT_TOKENS, SHIFT_MU
    mu = mu0 + (mu1 - mu0) * (num_tokens - n0) / (n1 - n0)
    return math.exp(mu)


def shift_sigma(sigma, s):
    """Shift a NOISE LEVEL σ = 1 − t: σ' = s·σ / (1 + (s − 1)·σ); s > 1 raises σ; σ = 0, 1 stay fixed."""
    return s * sigma / (1 + (s - 1) * sigma)


def shift_timesteps(t, s):
    """Shift DATA times t (0 = noise) towards noise: t' = 1 − shift_sigma(1 − t, s) ≤ t for s > 1; the official
    training shift t <- 1 − e^μ / (e^μ + (1/(1 − t) − 1)) with s = e^μ, written in σ."""
    return 1 - shift_sigma(1 - t, s)


# ----- Samplers ---------------------------------------------------------------------------------------
# All three take `steps` = model evaluations (the cost you pay) and return the final latent in float32. The
# official `--num_sampling_steps N` counts grid points for euler / midpoint (same grids), so an official run
# is steps = N − 1 (euler), 2·(N − 1) (midpoint), N (dpm), with shift = its --t_shift / --time_shifting_factor.
#
# Why sampling uses shift 10 when training used 1.65-3.16: training's shift decides which noise levels the
# model practises on; the sampler's only where a fixed budget of steps goes on a velocity field defined at
# every t. The layout of an image -- what goes where -- is decided at high noise, so the official sampler
# (svg_t2i/scripts/sample.sh) spends most steps there: of 50 DPM steps, 25 run at σ > 0.5 with shift 1, 38
# with the 1024-px training shift 3.16, and 46 with shift 10 (36 of them at σ > 0.8).

def _call(velocity_fn, x, t_value):
    """Evaluate velocity_fn at a scalar time, broadcast to a [B] float32 tensor; output in float32."""
    t = torch.full((x.shape[0],), float(t_value), device=x.device, dtype=torch.float32)
    return velocity_fn(x, t).float()


def euler_midpoint_grid(intervals, shift):
    """Data-time grid 0 = t_0 < ... < t_n = 1, uniform in σ, shifted (official `ode`, transport/integrators.py)."""
    sigma = 1 - torch.linspace(0, 1, intervals + 1, dtype=torch.float64)
    return (1 - shift_sigma(sigma, shift)).tolist()


def dpm_sigma_grid(steps, shift):
    """DPM-Solver "time_uniform_flow" noise levels σ_k = shift(0.999·(N − k)/N), k = 0..N, ending at 0.

    Why 0.999, not 1: DPM-Solver steps in λ = log(α/σ) = log((1 − σ)/σ), −∞ at σ = 1 (α = 0), so its grid
    cannot start there. The official `DPM_Solver.sample` (svg_t2i/transport/dpm_solver.py) keeps its usual end
    time t_0 = 1/total_N = 1/1000 (a 1000-step discrete model's first time) and the flow grid spaces 1 − t over
    [t_0, 1]: the first level is 1 − 0.001, σ = 0.9999 after shift 10 (pure noise treated as 0.01% data)."""
    u = DPM_SIGMA_MAX * (steps - torch.arange(steps + 1, dtype=torch.float64)) / steps
    return shift_sigma(u, shift).tolist()


def sample_euler(velocity_fn, x, steps, shift, progress=False):
    """Explicit Euler from t = 0 to 1 on the shifted grid: `steps` intervals, one evaluation each."""
    grid = euler_midpoint_grid(steps, shift)
    for t, t_next in tqdm(list(zip(grid[:-1], grid[1:])), disable=not progress, desc="euler"):
        x = x + (t_next - t) * _call(velocity_fn, x, t)
    return x


def sample_midpoint(velocity_fn, x, steps, shift, progress=False):
    """Explicit midpoint (torchdiffeq 'midpoint'): two evaluations per interval, so steps / 2 intervals."""
    grid = euler_midpoint_grid(steps // 2, shift)
    for t, t_next in tqdm(list(zip(grid[:-1], grid[1:])), disable=not progress, desc="midpoint"):
        h = t_next - t
        x_mid = x + 0.5 * h * _call(velocity_fn, x, t)
        x = x + h * _call(velocity_fn, x_mid, t + 0.5 * h)
    return x


def sample_dpm(velocity_fn, x, steps, shift, progress=False):
    """DPM-Solver++ 2M (Lu et al., arXiv 2211.01095: data prediction, multistep, order 2) as the official
    `Sampler.sample_dpm` runs it (svg_t2i/transport/dpm_solver.py: "time_uniform_flow", lower_order_final).

    Schedule in the noise level τ: α = 1 − τ, σ = τ, λ = log(α/σ). The model's velocity becomes a data
    prediction x̂1 = x + τ·v(x, t = 1 − τ). From τ_{k−1} to τ_k, with h_k = λ_k − λ_{k−1} and
    r_k = h_{k−1}/h_k, the update (the paper's multistep second-order solver, Algorithm 2) is

        x_k = (τ_k / τ_{k−1})·x_{k−1} − (1 − τ_k)·(e^{−h_k} − 1)·D_k,
        D_k = x̂1_{k−1} + (x̂1_{k−1} − x̂1_{k−2}) / (2·r_k)      (D_k = x̂1_{k−1} on a first-order step)

    The first step is first order (no history yet), so is the last (to τ = 0, λ = ∞: x lands on the last x̂1).

    Why the default, when Euler gives the same picture at 8 steps on the demo (README, exercise 3): it is
    the official sampler (svg_t2i/scripts/sample.sh), the one the released model's images were made with;
    its global error falls as h² where Euler's falls as h, which matters where paths bend -- the demo's are
    nearly straight, the 2B model's at 1024 px under CFG 4 need not be (not measured: it needs a GPU). The
    paper recommends 2M for guided sampling, since higher orders become unstable at large guidance scales."""
    taus = dpm_sigma_grid(steps, shift)
    lam = [math.log((1 - tau) / tau) if tau > 0 else math.inf for tau in taus]

    def data_pred(x, tau):
        return x + tau * _call(velocity_fn, x, 1 - tau)

    pred_prev, pred = None, data_pred(x, taus[0])
    for k in tqdm(range(1, steps + 1), disable=not progress, desc="dpm++2m"):
        tau_s, tau_t = taus[k - 1], taus[k]
        if tau_t == 0:
            x = pred                                                   # first order to τ = 0: x = x̂1
        else:
            h = lam[k] - lam[k - 1]
            phi = math.expm1(-h)                                       # e^{-h} − 1 (negative)
            x = (tau_t / tau_s) * x - (1 - tau_t) * phi * pred
            if pred_prev is not None:                                  # second-order correction
                r = (lam[k - 1] - lam[k - 2]) / h
                x = x - 0.5 * (1 - tau_t) * phi * (pred - pred_prev) / r
        if k < steps:
            pred_prev, pred = pred, data_pred(x, tau_t)
    return x


SOLVERS = {"euler": sample_euler, "midpoint": sample_midpoint, "dpm": sample_dpm}


def sample(velocity_fn, noise, steps=DEFAULT_STEPS, solver=DEFAULT_SOLVER, shift=None, progress=False):
    """Integrate the flow from `noise` (t = 0) to data (t = 1) with `steps` model evaluations of velocity_fn(x, t)
    -> v like x. solver: 'dpm', 'euler' or 'midpoint'; shift: the time shift s (None = 1), one for every solver
    (README, differences table: the official --t_shift 6 for euler / midpoint). Float32, as the official sampler."""
    check_sampler(steps, solver, shift)
    with torch.no_grad():
        return SOLVERS[solver](velocity_fn, noise.float(), steps, 1.0 if shift is None else float(shift), progress)


# ----- Classifier-free guidance (the official `forward_with_cfg`, svg_t2i/models/model_dino.py) --------

def cfg_velocity(v_cond, v_uncond, scale, renorm=DEFAULT_RENORM):
    """Guided velocity v = v_u + scale·(v_c − v_u). What renorm fixes: v = v_c + (scale − 1)·(v_c − v_u) pushes
    past the conditional velocity, longer than any the model learnt; integrated, the latent overshoots and the
    image comes out over-saturated and over-contrasted. On the demo (128 px, 20 steps) ‖v‖ averages 1.25x ‖v_c‖
    at its scale 3 (up to 2.6x), 1.39x at the official 4 (up to 3.5x), 2.05x at 8 (up to 7.2x). `renorm` (the
    official default) scales each sample's v by min(1, ‖v_c‖ / ‖v‖) (L2 norms over the whole latent): the
    direction guidance chose is kept, only the length is clipped."""
    v = v_uncond + scale * (v_cond - v_uncond)
    if renorm:
        cond_norm = v_cond.flatten(1).norm(dim=1)                     # [B]
        ratio = (cond_norm / (v.flatten(1).norm(dim=1) + 1e-12)).clamp(max=1.0)
        v = v * ratio.view(-1, *([1] * (v.dim() - 1)))
    return v


# ----- Seeded noise -----------------------------------------------------------------------------------

def seeded_noise(batch, channels, height, width, seed=None, generator=None, device="cpu", dtype=torch.float32):
    """Standard normal noise [batch, channels, height, width] (latent sizes, height FIRST: the official sampler
    transposed non-square sizes), drawn on the CPU from `seed` (or `generator`): a seed is one image on any device."""
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(batch, channels, height, width, generator=generator)
    return noise.to(device=device, dtype=dtype)


# ======================================================================================================
# The sampler's argument checks. A first reading can skip everything below: one ValueError per bad
# solver, step count or shift, before any model evaluation.
# ======================================================================================================

def check_sampler(steps, solver, shift):
    """Raise a ValueError that says what to pass unless `solver` can run `steps` model evaluations at time
    shift `shift` (None = no shift). sample() calls it first; sample.py calls it before it samples at all."""
    if solver not in SOLVERS:
        raise ValueError(f"solver (--solver) must be one of {sorted(SOLVERS)}, got {solver!r}")
    if steps < 1:
        raise ValueError(f"steps (--steps) must be >= 1, got {steps}")
    if solver == "midpoint" and steps % 2:
        raise ValueError(f"{steps} steps with the midpoint solver: it makes two model evaluations per interval, "
                         f"so steps (--steps) must be even, e.g. {max(2, steps - 1)}")
    if shift is not None and not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift (--shift) must be a finite number > 0, got {shift}")
