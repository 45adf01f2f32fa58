"""A Brownian tree: the noise of the SDE samplers, fixed by a seed for every step size at once.

The SDE samplers (DPM++ SDE, DPM++ 2M SDE) need, at each step sigma -> sigma_next, the increment W(sigma_next) -
W(sigma) of one Brownian motion W over [sigma_min, sigma_max]. Independent randn draws per step give a valid
sample too, but a *different* path for every step count; a Brownian tree (Gaines & Lyons 1997; Li et al. 2020,
"Scalable Gradients for Stochastic Differential Equations"; torchsde's BrownianInterval, Kidger et al. 2021,
"Efficient and Accurate Gradients for Neural SDEs") fixes the path by its seed, so 20 and 40 steps of the same
seed walk the same path and converge to one image. k-diffusion
(A1111) and diffusers' DPMSolverSDEScheduler both use torchsde's tree; this is that algorithm, reimplemented
number for number (tested equal to torchsde bit for bit), so minisd needs no torchsde.

The algorithm (torchsde `BrownianInterval` with halfway_tree=True, tol=1e-6, pool_size=24, no Levy area):
  the root is [t0, t1] with W = randn(seed_W) sqrt(t1 - t0);
  a node [s, e] with increment W splits at its midpoint m (every time is rounded to 6 decimals, tol = 1e-6), and
  its left child's increment is drawn from the Brownian bridge,
      W_left = (m - s) / (e - s) W + sqrt((m - s)(e - m) / (e - s)) z,     W_right = W - W_left,
  with z = randn from a torch.Generator seeded by numpy's SeedSequence(seed, spawn_key=(key, depth)): the node's
  position in the tree (key = 2 key_parent + 0 for left / 1 for right) picks its random numbers, so a value does
  not depend on the order of queries;
  W over [ta, tb] is the sum, left to right, of the tree nodes that tile it (descending from the root).
"""
import math

import numpy as np
import torch


class BrownianTree:
    """W(tb) - W(ta) for t0 <= ta <= tb <= t1, of a Brownian motion fixed by `seed` (torchsde.BrownianTree)."""

    def __init__(self, seed, shape, t0, t1, dtype=torch.float32, tol=1e-6, pool_size=24):
        self.seed, self.shape, self.dtype, self.pool_size = int(seed), tuple(shape), dtype, pool_size
        self.digits = -int(math.log10(tol))
        self.start, self.end = self.round(t0), self.round(t1)
        w_seed = np.random.SeedSequence(self.seed, pool_size=pool_size).generate_state(3)[0]
        self.w = self.randn(w_seed) * math.sqrt(float(t1) - float(t0))

    def round(self, t):
        return round(float(t), self.digits)

    def randn(self, seed):
        return torch.randn(self.shape, generator=torch.Generator().manual_seed(int(seed)), dtype=self.dtype)

    def children(self, s, e, w, key, depth):
        """Split node [s, e] (increment w) at its midpoint: (m, w_left, w_right), the Brownian bridge."""
        m = self.round(0.5 * (e + s))
        z_seed = np.random.SeedSequence(self.seed, spawn_key=(key, depth), pool_size=self.pool_size).generate_state(4)
        left = (m - s) * w * (1 / (e - s)) + math.sqrt((m - s) * (e - m) * (1 / (e - s))) * self.randn(z_seed[0])
        return m, left, w - left

    def __call__(self, ta, tb):
        ta, tb = (min(max(self.round(t), self.start), self.end) for t in (ta, tb))
        if ta == tb:
            return torch.zeros(self.shape, dtype=self.dtype)
        pieces, stack = [], [(self.start, self.end, self.w, 0, 0, ta, tb)]
        while stack:                          # depth first, left child first: the pieces come out left to right
            s, e, w, key, depth, a, b = stack.pop()
            if (a, b) == (s, e):
                pieces.append(w)
                continue
            m, w_left, w_right = self.children(s, e, w, key, depth)
            if b > m:
                stack.append((m, e, w_right, 2 * key + 1, depth + 1, max(a, m), b))
            if a < m:
                stack.append((s, m, w_left, 2 * key, depth + 1, a, min(b, m)))
        total = pieces[0]
        for w in pieces[1:]:                  # summed in torchsde's order, for equal rounding
            total = total + w
        return total


def brownian_noise(seed, shape, sigma_min, sigma_max, device="cpu", dtype=torch.float32):
    """The SDE samplers' noise source from a Brownian tree on [sigma_min, sigma_max] seeded with `seed`:
    noise(sigma, sigma_next) = (W(sigma) - W(sigma_next)) / sqrt(sigma - sigma_next), N(0, I) for each step,
    correlated across step counts. k-diffusion's BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed) and
    diffusers' DPMSolverSDEScheduler(noise_sampler_seed=seed) for a float32 x on the CPU (they draw on x's device
    in x's dtype; minisd draws on the CPU in float32 (float64 for a float64 x), as for the initial noise, so every
    device gets these numbers).

    The tree rounds query times to 1e-6. A library that computes sigma in float32 (diffusers' scheduler; k-diffusion
    on float32 sigmas, whose DPM++ SDE also queries at exp(-(-log sigma)), a float32 round trip) can land a query one
    grid point away, which moves that step's noise by ~sqrt(1e-6 / |sigma - sigma_next|), ~1e-3: the same seed
    then gives images equal to ~1e-3, not to rounding. In float64 the references agree with this bit for bit.
    """
    tree = BrownianTree(seed, shape, sigma_min, sigma_max, torch.float64 if dtype == torch.float64 else torch.float32)
    pinned = torch.device(device).type == "cuda"

    def noise(sigma, sigma_next):
        # k-diffusion's sign: the increment from the lower to the higher sigma, negated for a step downwards
        lo, hi, sign = (sigma, sigma_next, 1) if sigma < sigma_next else (sigma_next, sigma, -1)
        w = tree(lo, hi) * sign / torch.as_tensor(abs(sigma_next - sigma), dtype=torch.float64).sqrt()
        return (w.pin_memory() if pinned else w).to(device, dtype, non_blocking=pinned)

    return noise
