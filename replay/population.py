"""A stimulus-driven model of mouse visual-cortex units (linear-nonlinear-Poisson).

Each unit has a spatial receptive field on the screen, a temporal kernel, a static nonlinearity,
a response latency and a spontaneous rate; spikes are Bernoulli draws on a fine time grid with a
refractory period, modulated by a slow gain shared by the population (trial-to-trial variability
that is correlated across units, as in real recordings).

Receptive-field kinds:
  - simple:    half-wave rectified Gabor (orientation, phase, spatial frequency);
  - complex:   energy of a quadrature pair of Gabors (phase invariant);
  - luminance: ON or OFF centre-surround (difference of Gaussians), which keeps local brightness
               linearly decodable, the way pixel-level reconstructions need it.
RF centres tile the screen evenly in every area, at several scales (sizes spread log-normally
around the area's median), so that a ridge regression from counts can recover the image.

Per-area numbers (unit counts, latencies, RF sizes, rates) follow DESIGN.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AREAS = ("VISp", "VISl", "VISrl", "VISal", "VISpm", "VISam")  # hierarchy order
FIELD_HEIGHT_DEG = 95.0   # vertical extent of the Allen stimulus monitor seen by the mouse
WORK_HEIGHT = 64          # receptive fields are evaluated on frames downsampled to <= this height
REFRACTORY_S = 0.002
SIMPLE, COMPLEX, LUMINANCE = 0, 1, 2
KIND_NAMES = ("simple", "complex", "luminance")


@dataclass(frozen=True)
class AreaProfile:
    """Typical numbers for one visual area (medians; units scatter around them)."""

    n_units: int
    latency_s: float
    rf_sigma_deg: float
    baseline_hz: float
    peak_hz: float
    kind_mix: tuple[float, float, float]  # fractions simple / complex / luminance


AREA_PROFILES: dict[str, AreaProfile] = {
    # units per session and median first-spike latency from DESIGN.md; RFs grow and simple
    # cells get rarer along the hierarchy.
    "VISp": AreaProfile(100, 0.061, 6.0, 3.0, 45.0, (0.45, 0.35, 0.20)),
    "VISl": AreaProfile(64, 0.064, 7.5, 3.5, 42.0, (0.35, 0.45, 0.20)),
    "VISrl": AreaProfile(52, 0.067, 10.0, 4.0, 36.0, (0.30, 0.50, 0.20)),
    "VISal": AreaProfile(78, 0.065, 9.0, 4.0, 40.0, (0.30, 0.50, 0.20)),
    "VISpm": AreaProfile(58, 0.073, 12.0, 3.0, 34.0, (0.25, 0.55, 0.20)),
    "VISam": AreaProfile(65, 0.072, 13.0, 3.0, 32.0, (0.25, 0.55, 0.20)),
}

# Temporal kernels over movie frames (30 Hz), mixed per unit: sustained vs transient (sum 0).
SUSTAINED_KERNEL = np.array([0.6, 0.3, 0.1])
TRANSIENT_KERNEL = np.array([1.0, -0.5, -0.35, -0.15])


def area_latency(area: str) -> float:
    """Median first-spike latency (s) of an area; unknown areas get the slowest known one."""
    profile = AREA_PROFILES.get(area)
    return profile.latency_s if profile else max(p.latency_s for p in AREA_PROFILES.values())


@dataclass
class Population:
    """Parameters of every unit (one array entry per unit)."""

    area: np.ndarray        # str
    kind: np.ndarray        # int: SIMPLE / COMPLEX / LUMINANCE
    centre_y: np.ndarray    # RF centre, in frame heights from the top
    centre_x: np.ndarray    # RF centre, in frame heights from the left
    sigma: np.ndarray       # RF envelope sigma, in frame heights
    freq: np.ndarray        # Gabor carrier, cycles per frame height
    theta: np.ndarray       # orientation (rad)
    phase: np.ndarray       # Gabor phase (rad); luminance units: 0 ON, pi OFF
    latency_s: np.ndarray
    baseline_hz: np.ndarray
    peak_hz: np.ndarray
    threshold: np.ndarray   # in z units of the unit's drive
    exponent: np.ndarray
    transient: np.ndarray   # 0 sustained .. 1 transient
    gain_coupling: np.ndarray

    @property
    def n_units(self) -> int:
        return len(self.area)

    @classmethod
    def sample(cls, aspect: float = 2.0, units_scale: float = 1.0, seed: int = 0) -> "Population":
        """Draw a population with DESIGN.md's unit counts times `units_scale`."""
        rng = np.random.default_rng(seed)
        cols: dict[str, list] = {k: [] for k in cls.__dataclass_fields__}
        for area in AREAS:
            p = AREA_PROFILES[area]
            n = max(1, int(round(p.n_units * units_scale)))
            kind = rng.choice(3, size=n, p=p.kind_mix)
            cy, cx = _tiling(n, aspect, rng)
            sigma = p.rf_sigma_deg / FIELD_HEIGHT_DEG * np.exp(rng.normal(0.0, 0.45, n))
            sigma = np.where(kind == LUMINANCE, sigma * 1.3, sigma)
            freq = rng.uniform(0.25, 0.55, n) / sigma
            phase = np.where(kind == LUMINANCE, rng.choice([0.0, np.pi], n),
                             rng.uniform(0, 2 * np.pi, n))
            cols["area"].append(np.full(n, area))
            cols["kind"].append(kind)
            cols["centre_y"].append(cy)
            cols["centre_x"].append(cx)
            cols["sigma"].append(sigma)
            cols["freq"].append(freq)
            cols["theta"].append(rng.uniform(0, np.pi, n))
            cols["phase"].append(phase)
            cols["latency_s"].append(np.clip(p.latency_s + rng.normal(0, 0.008, n), 0.035, 0.12))
            cols["baseline_hz"].append(p.baseline_hz * np.exp(rng.normal(0, 0.6, n)))
            # Many units respond only weakly to natural movies: ~40% get a small fraction of the
            # area's peak rate.
            weak = rng.random(n) < 0.4
            drive = np.where(weak, rng.uniform(0.05, 0.3, n), np.exp(rng.normal(0, 0.4, n)))
            cols["peak_hz"].append(p.peak_hz * drive)
            cols["threshold"].append(rng.uniform(0.0, 1.0, n))
            cols["exponent"].append(rng.uniform(1.2, 2.0, n))
            cols["transient"].append(rng.uniform(0.0, 0.8, n))
            cols["gain_coupling"].append(rng.uniform(0.5, 1.5, n))
        return cls(**{k: np.concatenate(v) for k, v in cols.items()})

    # ---- stimulus drive -------------------------------------------------------------------

    def spatial_filters(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Filters [K, height*width] (float32) and, per filter, the unit it belongs to.

        Complex units own two rows (a quadrature pair); the others own one.
        """
        y = (np.arange(height) + 0.5) / height
        x = (np.arange(width) + 0.5) / height
        rows, owners = [], []
        for u in range(self.n_units):
            dy = y[:, None] - self.centre_y[u]
            dx = x[None, :] - self.centre_x[u]
            r2 = dx**2 + dy**2
            s = self.sigma[u]
            if self.kind[u] == LUMINANCE:
                dog = np.exp(-r2 / (2 * s**2)) - 0.6 * np.exp(-r2 / (2 * (2.5 * s)**2)) / 2.5**2
                sign = 1.0 if self.phase[u] == 0.0 else -1.0
                rows.append(sign * dog / np.linalg.norm(dog))
                owners.append(u)
                continue
            env = np.exp(-r2 / (2 * s**2))
            along = dx * np.cos(self.theta[u]) + dy * np.sin(self.theta[u])
            phases = [self.phase[u]] + ([self.phase[u] + np.pi / 2] if self.kind[u] == COMPLEX else [])
            for ph in phases:
                g = env * np.cos(2 * np.pi * self.freq[u] * along + ph)
                g -= env * (g.sum() / env.sum())  # zero mean: no response to uniform light
                rows.append(g / max(np.linalg.norm(g), 1e-9))
                owners.append(u)
        return np.asarray(rows, dtype=np.float32).reshape(len(rows), -1), np.asarray(owners)

    def linear_responses(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Filter outputs [K, F] for movie frames uint8 [F, H, W] (contrast around mid grey)."""
        work = _downsample(frames)
        filters, owners = self.spatial_filters(work.shape[1], work.shape[2])
        x = work.reshape(len(work), -1) - 0.5
        return (filters @ x.T).astype(np.float32), owners

    def temporal_kernels(self) -> np.ndarray:
        """Per-unit temporal kernel over frames [U, 4]: sustained/transient mix."""
        sus = np.pad(SUSTAINED_KERNEL, (0, len(TRANSIENT_KERNEL) - len(SUSTAINED_KERNEL)))
        w = self.transient[:, None]
        return (1 - w) * sus[None, :] + w * TRANSIENT_KERNEL[None, :]

    def drive(self, linear: np.ndarray, owners: np.ndarray, units: np.ndarray) -> np.ndarray:
        """Unnormalised drive [len(units), T] from temporally filtered filter outputs [K, T]."""
        out = np.zeros((len(units), linear.shape[1]), dtype=np.float32)
        for i, u in enumerate(units):
            rows = linear[owners == u]
            if self.kind[u] == COMPLEX:
                out[i] = np.sqrt((rows**2).sum(axis=0))
            elif self.kind[u] == SIMPLE:
                out[i] = np.maximum(rows[0], 0.0)
            else:
                out[i] = rows[0]
        return out

    def rates(self, drive_z: np.ndarray, units: np.ndarray) -> np.ndarray:
        """Static nonlinearity: spontaneous rate + peak * rectified power of the z-scored drive."""
        thr = self.threshold[units, None]
        expo = self.exponent[units, None]
        scale = (3.0 - thr) ** expo  # reaches the peak rate at z = 3
        evoked = np.maximum(drive_z - thr, 0.0) ** expo / scale
        return (self.baseline_hz[units, None] + self.peak_hz[units, None] * evoked).astype(np.float32)


def _tiling(n: int, aspect: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """RF centres that cover the screen evenly: a randomly shifted R2 low-discrepancy sequence."""
    g = 1.32471795724474602596  # plastic number: the 2-D golden ratio
    alpha = np.array([1 / g, 1 / g**2])
    pts = (rng.random(2) + np.arange(1, n + 1)[:, None] * alpha[None, :]) % 1.0
    margin = 0.04
    cy = margin + pts[:, 0] * (1 - 2 * margin)
    cx = (margin + pts[:, 1] * (1 - 2 * margin)) * aspect
    return cy, cx


def _downsample(frames: np.ndarray) -> np.ndarray:
    """uint8 [F, H, W] -> float32 in [0, 1], block-averaged to a height <= WORK_HEIGHT."""
    f = int(np.ceil(frames.shape[1] / WORK_HEIGHT))
    x = frames.astype(np.float32) / 255.0
    if f > 1:
        h, w = (frames.shape[1] // f) * f, (frames.shape[2] // f) * f
        x = x[:, :h, :w].reshape(len(x), h // f, f, w // f, f).mean(axis=(2, 4))
    return x
