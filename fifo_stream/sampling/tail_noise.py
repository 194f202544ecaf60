"""Sources of the fresh noise latents that enter the FIFO queue's tail.

Every source is seeded, returns one (b, c, h, w) latent per call, and round-trips
its whole state through ``state_dict`` so a resumed run draws the same noise.
"""

from __future__ import annotations

import torch


class IIDNoise:
    """Independent standard normal noise per tail latent (the FIFO-Diffusion reference)."""

    def __init__(self, shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu"):
        self.shape = tuple(shape)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.device = torch.device(device)

    def __call__(self) -> torch.Tensor:
        return torch.randn(self.shape, generator=self.generator, device=self.device)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class MixedNoise(IIDNoise):
    """PYoCo mixed noise: eps_i = sqrt(a) eps_shared + sqrt(1 - a) eps_ind; lag-1 correlation a."""

    def __init__(self, shape: tuple[int, ...], seed: int, alpha: float, device: torch.device | str = "cpu"):
        super().__init__(shape, seed, device)
        self.alpha = float(alpha)
        self.shared = super().__call__()

    def __call__(self) -> torch.Tensor:
        return self.alpha**0.5 * self.shared + (1 - self.alpha) ** 0.5 * super().__call__()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "shared": self.shared.cpu()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.shared = state["shared"].to(self.device)


class ProgressiveNoise(IIDNoise):
    """PYoCo progressive noise: eps_i = sqrt(a) eps_(i-1) + sqrt(1 - a) eps_ind; lag-1 correlation sqrt(a)."""

    def __init__(self, shape: tuple[int, ...], seed: int, alpha: float, device: torch.device | str = "cpu"):
        super().__init__(shape, seed, device)
        self.alpha = float(alpha)
        self.previous = super().__call__()

    def __call__(self) -> torch.Tensor:
        self.previous = self.alpha**0.5 * self.previous + (1 - self.alpha) ** 0.5 * super().__call__()
        return self.previous

    def state_dict(self) -> dict:
        return {**super().state_dict(), "previous": self.previous.cpu()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.previous = state["previous"].to(self.device)


class CoherentNoise(ProgressiveNoise):
    """Coherent tail: the low spatial frequencies of the previous tail latent, the high ones fresh.

    The split is an ideal radial mask in the 2-D Fourier domain, so the two parts are orthogonal
    projections of white noise and the sum stays white with unit variance; the lag-1
    correlation equals the fraction of frequencies kept (``cutoff`` is a fraction of Nyquist).
    """

    def __init__(self, shape: tuple[int, ...], seed: int, cutoff: float, device: torch.device | str = "cpu"):
        super().__init__(shape, seed, alpha=0.0, device=device)
        h, w = shape[-2:]
        fy, fx = torch.fft.fftfreq(h, device=device)[:, None], torch.fft.fftfreq(w, device=device)[None, :]
        self.low = ((fy**2 + fx**2).sqrt() <= cutoff * 0.5).to(torch.float32)

    def __call__(self) -> torch.Tensor:
        fresh = torch.randn(self.shape, generator=self.generator, device=self.device)
        low = torch.fft.ifft2(torch.fft.fft2(self.previous) * self.low).real
        high = torch.fft.ifft2(torch.fft.fft2(fresh) * (1 - self.low)).real
        self.previous = low + high
        return self.previous


class DependencyNoise(ProgressiveNoise):
    """Dependency noise (ZS^2): eps_i = sqrt(a) eps_(i-1) + sqrt(1 - a) eps~, chosen by a two-stage search.

    1. Random search: of ``candidates`` fresh normal draws, eps~ is the one whose mix at the
       nominal a = ``alpha`` looks most like a standard normal sample: the smallest
       KL(N(m, s^2) || N(0, 1)) of the mix's empirical mean m and variance s^2.
    2. Line search: a in [0, 1] is bisected until the cosine similarity of eps_i and eps_(i-1)
       is sqrt(alpha) (it grows monotonically with a).
    The lag-1 correlation is sqrt(alpha), as with progressive noise, but held for every latent
    rather than on average, and the chain's sample statistics are kept near N(0, 1).
    """

    def __init__(self, shape: tuple[int, ...], seed: int, alpha: float, candidates: int = 8, device: torch.device | str = "cpu"):
        super().__init__(shape, seed, alpha, device)
        self.candidates = int(candidates)

    def __call__(self) -> torch.Tensor:
        p = self.previous.double().flatten()
        z = torch.randn((self.candidates, *self.shape), generator=self.generator, device=self.device).double().flatten(1)
        a = self.alpha
        mixes = a**0.5 * p + (1 - a) ** 0.5 * z
        fresh = z[int(_gaussian_kl(mixes.mean(1), mixes.var(1, correction=0)).argmin())]
        a = _line_search(float(p @ p), float(fresh @ fresh), float(p @ fresh), self.alpha**0.5)
        self.previous = (a**0.5 * p + (1 - a) ** 0.5 * fresh).float().reshape(self.shape)
        return self.previous


def _gaussian_kl(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, var) || N(0, 1))."""
    return 0.5 * (var + mean**2 - 1 - var.log())


def _line_search(pp: float, zz: float, pz: float, target: float, steps: int = 50) -> float:
    """The a in [0, 1] at which sqrt(a) p + sqrt(1 - a) z has cosine similarity ``target`` with p.

    Only the dot products pp = <p, p>, zz = <z, z>, pz = <p, z> are needed; the similarity
    increases with a (from cos(p, z) at a = 0 to 1 at a = 1), so bisection finds it.
    """

    def similarity(a: float) -> float:
        u, v = a**0.5, (1 - a) ** 0.5
        return (u * pp + v * pz) / (pp * (u * u * pp + v * v * zz + 2 * u * v * pz)) ** 0.5

    lo, hi = 0.0, 1.0
    if similarity(lo) >= target:
        return lo
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if similarity(mid) < target else (lo, mid)
    return (lo + hi) / 2


def make_noise(
    kind: str, shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu", alpha: float = 0.5, cutoff: float = 0.25, candidates: int = 8
):
    """The tail noise source named by ``sampling.tail_noise`` (iid, mixed, progressive, coherent or dependency)."""
    make = {
        "iid": lambda: IIDNoise(shape, seed, device),
        "mixed": lambda: MixedNoise(shape, seed, alpha, device),
        "progressive": lambda: ProgressiveNoise(shape, seed, alpha, device),
        "coherent": lambda: CoherentNoise(shape, seed, cutoff, device),
        "dependency": lambda: DependencyNoise(shape, seed, alpha, candidates, device),
    }
    return make[kind]()
