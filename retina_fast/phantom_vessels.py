"""Retinal vessel trees for the phantom: growth on the retina (millimetres) and rasterisation (pixels).

Growth
------
Arterial and venous trees are grown independently from the optic disc centre, four main vessels each
(superior/inferior x temporal/nasal) plus a few small papillomacular vessels. A vessel is a polyline
grown in steps of ``STEP_MM``; its heading follows a steering field plus tortuosity:

    h <- h + k * wrap(target(p) - h) + w,    w <- rho * w + sigma * n,   n ~ N(0, 1)

``target`` depends on the vessel's role: temporal *arcades* follow the tangent of the ellipses
((x - fx) / q)^2 + (y - fy)^2 = const around the fovea (so they leave the disc vertically and arch
around the macula), nasal vessels run radially away from the disc, peripheral branches away from the
fovea and macular branches towards it (stopping at the foveal avascular zone). ``w`` is an AR(1)
process, so tortuosity is smooth rather than jagged. Diameters taper slowly along a vessel and split at
bifurcations by Murray's law, d0^3 = d1^3 + d2^3, with the branch angles that minimise the work of
flow (Murray 1926):

    cos(theta_1) = (d0^4 + d1^4 - d2^4) / (2 d0^2 d1^2)    (and symmetrically for theta_2)

Growth stops below ``MIN_DIAMETER_UM``, outside the field of view, inside the foveal avascular zone or
at the temporal raphe. Geometry is in millimetres on the retina and independent of the image size, so
one seed gives the same eye at every resolution.

Rasterisation
-------------
Every segment is rasterised only inside its bounding box; all (segment, pixel) pairs of all segments
are produced at once (``np.repeat`` over box sizes) so the work is a handful of vectorised passes. A
vessel is a cylinder: the blood path through it at distance ``r`` from the axis is 2 sqrt(R^2 - r^2).
To stay anti-aliased at low resolution the profile is widened to R_e = sqrt(R^2 + s^2) (s: the camera
point-spread, ~0.6 px) while its integral (the blood per unit length, pi R^2) is kept. Overlapping
segments of the same tree combine by maximum; arteries and veins go to separate maps and add where
they cross.

Choroidal vessels
-----------------
The large choroidal vessels lie under the RPE and are only seen as a texture: :func:`choroid_pattern`
builds it from band-limited noise (:func:`smooth_noise`, a random grid interpolated by two small
matrix products) rather than from explicit trees.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["VesselSegments", "grow_trees", "rasterize", "choroid_pattern", "smooth_noise", "STEP_MM",
           "MIN_DIAMETER_UM"]

STEP_MM = 0.14            # growth step on the retina
MIN_DIAMETER_UM = 28.0    # thinner vessels are capillary-sized and not drawn
MAX_STEPS = 2600          # budget for all trees of one eye (keeps the render time bounded)
PSF_PX = 0.6              # camera point-spread (sigma, pixels) used to widen thin vessels

ARTERY, VEIN = 0, 1
_ARCADE, _FROM_DISC, _FROM_FOVEA, _TO_FOVEA = 0, 1, 2, 3
_STEER = {_ARCADE: 0.3, _FROM_DISC: 0.12, _FROM_FOVEA: 0.12, _TO_FOVEA: 0.2}


@dataclass
class VesselSegments:
    """Vessel centreline segments (all arrays of length n); coordinates in mm, diameters in µm."""

    x0: np.ndarray
    y0: np.ndarray
    x1: np.ndarray
    y1: np.ndarray
    d0: np.ndarray
    d1: np.ndarray
    kind: np.ndarray        # ARTERY (0) or VEIN (1)
    vessel: np.ndarray      # index of the vessel (unbranched polyline) the segment belongs to
    generation: np.ndarray  # 0 for the vessels leaving the disc, +1 per bifurcation

    def __len__(self) -> int:
        return len(self.x0)


def _murray(d0: float, alpha: float) -> tuple[float, float, float, float]:
    """Daughter diameters (d1 >= d2 = alpha * d1) and optimal branch angles for parent ``d0``."""
    d1 = d0 / (1.0 + alpha ** 3) ** (1.0 / 3.0)
    d2 = alpha * d1
    c1 = (d0 ** 4 + d1 ** 4 - d2 ** 4) / (2.0 * d0 ** 2 * d1 ** 2)
    c2 = (d0 ** 4 + d2 ** 4 - d1 ** 4) / (2.0 * d0 ** 2 * d2 ** 2)
    return d1, d2, math.acos(max(-1.0, min(1.0, c1))), math.acos(max(-1.0, min(1.0, c2)))


def grow_trees(
    rng: np.random.Generator,
    *,
    fovea: tuple[float, float],
    disc: tuple[float, float],
    disc_radius: float,
    nasal_sign: int,
    fov_center: tuple[float, float],
    fov_radius: float,
    artery_um: float,
    vein_um: float,
    tortuosity: float,
    arcade_q: float = 1.6,
) -> VesselSegments:
    """Grow the arterial and venous trees of one eye (see the module docstring for the model).

    ``nasal_sign`` is +1 when the nasal side (the disc) is on the image's right (a right eye, OD) and
    -1 for a left eye. Image coordinates: x to the right, y downwards, in mm.
    """
    fx, fy = fovea
    dx, dy = disc
    cx, cy = fov_center
    temporal = -float(nasal_sign)
    r_faz = rng.uniform(0.3, 0.5)
    # Pre-drawn normals: one call instead of one per step (a Python-level loop of ~2000 steps).
    # Python floats, not NumPy scalars: scalar maths on NumPy types is several times slower.
    noise = rng.standard_normal(MAX_STEPS + 1).tolist()
    uni = rng.random(4 * MAX_STEPS + 64).tolist()
    ni = ui = 0

    # Root vessels leave the disc centre: (x offset, kind, heading, diameter, mode, arcade q).
    # In each arcade the artery and the vein start side by side (which one is nasal is drawn per
    # arcade) and the nasal one follows the outer ellipse, so the pair runs parallel without
    # overlapping; crossings come from branches crossing the other arcade at steep angles.
    up, down = -math.pi / 2, math.pi / 2
    sep = 0.2 * disc_radius * nasal_sign           # x offset of the nasal starter
    roots = []
    arcade = []
    for heading_sign in (-1.0, 1.0):              # superior, inferior
        artery_nasal = rng.random() < 0.5
        sp = rng.uniform(0.06, 0.14)
        for kind in (ARTERY, VEIN):
            nasal_one = (kind == ARTERY) == artery_nasal
            arcade.append((kind, heading_sign, sep if nasal_one else -sep,
                           arcade_q * (1.0 - sp if nasal_one else 1.0 + sp)))
    for kind, d_main in ((ARTERY, artery_um), (VEIN, vein_um)):
        jitter = lambda: rng.uniform(-0.15, 0.15)  # noqa: E731 - small per-vessel randomness
        tilt_t = math.radians(rng.uniform(8, 28)) * temporal
        tilt_n = math.radians(rng.uniform(20, 50)) * nasal_sign
        off = sep * (1.0 if kind == ARTERY else -1.0)   # elsewhere the vein is temporal
        for k, hs, x_off, q in arcade:
            if k == kind:
                h = (up - tilt_t) if hs < 0 else (down + tilt_t)
                roots.append((x_off, kind, h, d_main * (1 + jitter()), _ARCADE, q))
        roots += [
            (off, kind, up + tilt_n, 0.8 * d_main * (1 + jitter()), _FROM_DISC, arcade_q),
            (off, kind, down - tilt_n, 0.8 * d_main * (1 + jitter()), _FROM_DISC, arcade_q),
        ]
        for _ in range(int(rng.integers(1, 3))):  # small papillomacular vessels
            h = (0.0 if temporal > 0 else math.pi) + rng.uniform(-0.35, 0.35)
            roots.append((off, kind, h, 0.45 * d_main * (1 + jitter()), _TO_FOVEA, arcade_q))
    queue = []
    for x_off, kind, h, d, mode, q in roots:
        px = dx + x_off + disc_radius * rng.uniform(-0.05, 0.05)
        queue.append((px, dy + disc_radius * rng.uniform(-0.1, 0.1), h, d, kind, mode, 0, q * q))

    out = []  # one tuple per segment: x0, y0, x1, y1, d0, d1, kind, vessel, generation
    steps = 0
    vessel_id = 0
    rho = 0.75
    sigma = tortuosity * math.sqrt(1.0 - rho * rho)
    taper = math.exp(-STEP_MM / 50.0)   # ~50 mm taper length between bifurcations
    taper_fovea = math.exp(-STEP_MM / 5.0)
    cos, sin, atan2, hypot, pi = math.cos, math.sin, math.atan2, math.hypot, math.pi
    fov_r2, faz_r2 = fov_radius * fov_radius, r_faz * r_faz
    qi = 0
    while qi < len(queue) and steps < MAX_STEPS:
        x, y, h, d, kind, mode, gen, q2 = queue[qi]
        qi += 1
        k = _STEER[mode]
        # Macular branches taper fast (they end as capillaries around the avascular zone).
        tp = taper_fovea if mode == _TO_FOVEA else taper
        w = 0.0
        travelled = 0.0
        next_branch = (disc_radius if gen == 0 else 0.0) + 0.45 + 0.9 * uni[ui]
        ui += 1
        while steps < MAX_STEPS:
            if mode == _ARCADE:
                gx, gy = (x - fx) / q2, (y - fy)
                tx, ty = -gy, gx
                if tx * cos(h) + ty * sin(h) < 0.0:
                    tx, ty = gy, -gx
                gn = hypot(gx, gy) + 1e-9
                tn = hypot(tx, ty) + 1e-9
                tx, ty = tx / tn + 0.06 * gx / gn, ty / tn + 0.06 * gy / gn  # arcades open slowly
            elif mode == _FROM_DISC:
                tx, ty = x - dx, y - dy
            elif mode == _FROM_FOVEA:
                tx, ty = x - fx, y - fy
            else:
                tx, ty = fx - x, fy - y
            delta = (atan2(ty, tx) - h + pi) % (2.0 * pi) - pi
            w = rho * w + sigma * noise[ni]
            ni += 1
            h += k * delta + w
            nx, ny = x + STEP_MM * cos(h), y + STEP_MM * sin(h)
            nd = d * tp
            out.append((x, y, nx, ny, d, nd, kind, vessel_id, gen))
            steps += 1
            x, y, d = nx, ny, nd
            travelled += STEP_MM
            if (x - cx) ** 2 + (y - cy) ** 2 > fov_r2 or d < MIN_DIAMETER_UM:
                break
            if (x - fx) ** 2 + (y - fy) ** 2 < faz_r2:
                break
            if mode == _ARCADE and (x - fx) * temporal > 0.5 and abs(y - fy) < 0.35:
                break  # temporal vessels do not cross the horizontal raphe
            if travelled >= next_branch:
                alpha = 0.25 + 0.65 * uni[ui] ** 1.5  # mostly small side branches
                side = 1.0 if uni[ui + 1] < 0.5 else -1.0
                d1, d2, a1, a2 = _murray(d, alpha)
                if d2 >= MIN_DIAMETER_UM:
                    hc = h + side * a2
                    child_mode = mode
                    if mode in (_ARCADE, _FROM_FOVEA):
                        toward = cos(hc) * (fx - x) + sin(hc) * (fy - y) > 0.0
                        child_mode = _TO_FOVEA if toward else _FROM_FOVEA
                    queue.append((x, y, hc, d2, kind, child_mode, gen + 1, q2))
                    h -= side * a1
                    d = d1
                next_branch = travelled + (0.3 + 0.6 * uni[ui + 2]) * math.sqrt(d / 80.0)
                ui += 3
        vessel_id += 1

    arr = np.asarray(out, dtype=np.float64).reshape(-1, 9)
    return VesselSegments(
        arr[:, 0].copy(), arr[:, 1].copy(), arr[:, 2].copy(), arr[:, 3].copy(),
        arr[:, 4].copy(), arr[:, 5].copy(), arr[:, 6].astype(np.int8),
        arr[:, 7].astype(np.int32), arr[:, 8].astype(np.int16),
    )


def rasterize(
    seg: VesselSegments, size: int, field_mm: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Blood path maps and masks of arteries and veins on a ``size`` x ``size`` image.

    The image spans ``field_mm`` on the retina, centred on (0, 0) mm; pixel (i, j) has its centre at
    x = ((j + 0.5) / size - 0.5) * field_mm (y likewise with i).

    Returns ``(path_artery, path_vein, mask_artery, mask_vein)``: float32 (H, W) blood path lengths
    in µm (the chord through the vessel, widened by the point-spread as described above) and bool
    (H, W) masks of pixels within max(R, 0.71 px) of a centreline (0.71 px keeps one-pixel vessels
    8-connected). Masks are exclusive: a crossing pixel belongs to the vessel with more blood in it.
    """
    hw = size * size
    path = np.zeros(2 * hw, dtype=np.float32)
    cover = np.zeros(2 * hw, dtype=bool)
    if len(seg) == 0:
        z = path.reshape(2, size, size)
        return z[0], z[1], np.zeros((size, size), bool), np.zeros((size, size), bool)
    px_per_mm = size / field_mm
    um_per_px = 1000.0 / px_per_mm
    to_px = lambda v: (v / field_mm + 0.5) * size - 0.5  # noqa: E731
    x0, y0, x1, y1 = to_px(seg.x0), to_px(seg.y0), to_px(seg.x1), to_px(seg.y1)
    r0 = seg.d0 * 0.5 / um_per_px
    r1 = seg.d1 * 0.5 / um_per_px
    pad = np.sqrt(np.maximum(r0, r1) ** 2 + PSF_PX ** 2) + 0.75
    bx0 = np.clip(np.floor(np.minimum(x0, x1) - pad), 0, size).astype(np.int64)
    bx1 = np.clip(np.ceil(np.maximum(x0, x1) + pad), -1, size - 1).astype(np.int64)
    by0 = np.clip(np.floor(np.minimum(y0, y1) - pad), 0, size).astype(np.int64)
    by1 = np.clip(np.ceil(np.maximum(y0, y1) + pad), -1, size - 1).astype(np.int64)
    nx = np.maximum(bx1 - bx0 + 1, 0).astype(np.int32)
    ny = np.maximum(by1 - by0 + 1, 0).astype(np.int32)
    counts = nx * ny
    total = int(counts.sum())
    if total == 0:
        z = path.reshape(2, size, size)
        return z[0], z[1], np.zeros((size, size), bool), np.zeros((size, size), bool)

    # (segment, pixel) pairs, segment-major then row-major inside each box, built with np.repeat
    # only (gathers and integer division are several times slower on ~1e5 elements).
    f32 = np.float32
    vx, vy = (x1 - x0).astype(f32), (y1 - y0).astype(f32)
    inv_l2 = (1.0 / (vx * vx + vy * vy + 1e-12)).astype(f32)
    # Row level: one entry per (segment, box row).
    row_y = np.repeat(by0.astype(np.int32), ny)
    row_y += np.arange(len(row_y), dtype=np.int32) - np.repeat(np.cumsum(ny) - ny, ny).astype(np.int32)
    row_nx = np.repeat(nx, ny)
    uy_row = row_y.astype(f32) - np.repeat(y0.astype(f32), ny)
    # Pixel level.
    rep = lambda v: np.repeat(v, counts)  # noqa: E731 - per-segment value for every pair
    px = np.arange(total, dtype=np.int32) - np.repeat(np.cumsum(row_nx) - row_nx, row_nx).astype(np.int32)
    px += np.repeat(np.repeat(bx0.astype(np.int32), ny), row_nx)
    uy = np.repeat(uy_row, row_nx)
    ux = px.astype(f32) - rep(x0.astype(f32))
    vxp, vyp = rep(vx), rep(vy)
    t = (ux * vxp + uy * vyp) * rep(inv_l2)
    np.clip(t, 0.0, 1.0, out=t)
    ux -= t * vxp
    uy -= t * vyp
    dist2 = ux * ux + uy * uy
    r = rep(r0.astype(f32)) + t * rep((r1 - r0).astype(f32))
    r2 = r * r
    re2 = r2 + f32(PSF_PX ** 2)
    # Chord through the widened cylinder, scaled to keep pi R^2 of blood per unit length (µm).
    chord = re2 - dist2
    np.maximum(chord, 0.0, out=chord)
    np.sqrt(chord, out=chord)
    chord *= (f32(2.0 * um_per_px) * r2) / re2
    flat = np.repeat(row_y, row_nx) * np.int32(size) + px
    flat += rep(seg.kind.astype(np.int32) * np.int32(hw))
    np.maximum.at(path, flat, chord)
    inside = dist2 <= np.maximum(r2, f32(0.71 ** 2))
    cover[flat[inside]] = True

    path = path.reshape(2, size, size)
    cover = cover.reshape(2, size, size)
    mask_a = cover[0] & ~(cover[1] & (path[1] > path[0]))
    mask_v = cover[1] & ~(cover[0] & (path[0] >= path[1]))
    return path[0], path[1], mask_a, mask_v


# ------------------------------------------------------------------ choroidal vessels (a texture)
@functools.lru_cache(maxsize=16)
def _interp_matrix(size: int, cells: int) -> np.ndarray:
    """(size, cells) Gaussian interpolation weights: a cells x cells random grid -> size x size."""
    pos = (np.arange(size) + 0.5) / size * (cells - 1)
    w = np.exp(-0.5 * ((pos[:, None] - np.arange(cells)[None, :]) / 0.6) ** 2)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Band-limited noise, zero mean / unit variance, (size, size) float32; the grid values come from
    ``rng`` alone, so the pattern is the same at every size."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    m = _interp_matrix(size, cells)
    n = m @ grid @ m.T
    return (n - n.mean()) / (n.std() + 1e-6)


def choroid_pattern(rng: np.random.Generator, size: int) -> np.ndarray:
    """(H, W) in [0, 1]: large choroidal vessels (1 on a vessel, 0 in the pigmented spaces between).

    "Ridged" noise: the zero set of band-limited noise is a connected web of curves; |n| small
    around it gives broad (~0.2-0.4 mm), tortuous, branching and rejoining ribbons like the vessels of
    Haller's layer. Two octaves: large vessels and the finer ones between them."""
    coarse = np.clip(1.0 - np.abs(smooth_noise(rng, size, 15)) / 0.7, 0.0, 1.0)
    fine = np.clip(1.0 - np.abs(smooth_noise(rng, size, 27)) / 0.7, 0.0, 1.0)
    chor = np.maximum(coarse, 0.8 * fine)
    return chor * chor
