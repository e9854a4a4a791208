"""Absorption spectra of the fundus absorbers, tabulated for the phantom (450-920 nm).

Sources (numbers only; nothing here is code from elsewhere):

* Haemoglobin: molar extinction coefficients of oxy- (HbO2) and deoxyhaemoglobin (Hb), in
  cm^-1/M (decadic), from S. Prahl's compilation of W. B. Gratzer and N. Kollias (Oregon Medical
  Laser Center, https://omlc.org/spectra/hemoglobin/summary.html). Prahl tabulates every 2 nm; the
  5-nm grid below takes his values where the grid meets his, and the mean of the two neighbouring
  2-nm entries (linear interpolation) at the odd multiples of 5 nm.
* Melanin: absorption coefficient of the melanosome interior, mu_a = 6.6e11 * lambda^-3.33 cm^-1
  (lambda in nm; S. Jacques, OMLC "Optical absorption of melanin"): ~965 cm^-1 at 450 nm, ~94 at 905.
* Macular pigment (lutein + zeaxanthin): relative optical density (1 at the 457 nm peak), the CIE
  170-1:2006 template (a sum of Gaussians fitted to the Stockman & Sharpe / CVRL data), evaluated every
  5 nm; zero beyond 560 nm.

Whole-blood absorption for haemoglobin concentration ``c`` (g/L) and oxygen saturation ``S``::

    mu_a(lambda, S) = ln(10) * c / 64500 * (S * eps_HbO2(lambda) + (1 - S) * eps_Hb(lambda))   [cm^-1]

With c = 150 g/L this reproduces the whole-blood values of Prahl's compilation (Oregon Medical Laser Center,
"Optical absorption of hemoglobin", 1999; e.g. 178 / 220 cm^-1 at 560 nm for S = 0.97 / 0.60,
19 / 42 at 600 nm, 6.3 / 5.5 at 900 nm). Isosbestic points of the table (eps_HbO2 = eps_Hb) lie near
452, 500, 529, 545, 570, 584 and 797 nm.

Every function takes wavelengths in nm (any sequence) and returns float64 NumPy arrays; wavelengths
outside 450-920 nm raise ``ValueError`` rather than extrapolate.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = [
    "WAVELENGTH_RANGE",
    "HB_MOLAR_MASS",
    "hb_extinction",
    "blood_absorption",
    "melanin_absorption",
    "macular_pigment_density",
    "ISOSBESTIC_NM",
]

WAVELENGTH_RANGE = (450.0, 920.0)
HB_MOLAR_MASS = 64500.0  # g/mol, haemoglobin tetramer (the value Prahl uses)
ISOSBESTIC_NM = (452.0, 500.0, 529.0, 545.0, 570.0, 584.0, 797.0)

# (nm, eps_HbO2, eps_Hb) in cm^-1/M, Prahl (Gratzer & Kollias), 5-nm grid as described above.
_HB_TABLE = np.array([
    (450, 62816, 103292), (455, 51524, 33434.4), (460, 44480, 23388.8), (465, 38440.2, 18701.6),
    (470, 33209.2, 16156.4), (475, 29482.2, 14920.6), (480, 26629.2, 14550), (485, 24925, 15378),
    (490, 23684.4, 16684), (495, 22154, 18648.4), (500, 20932.8, 20862), (505, 20182, 23289),
    (510, 20035.2, 25773.6), (515, 20715.4, 28681.6), (520, 24202.4, 31589.6), (525, 30882.8, 35170.8),
    (530, 39956.8, 39036.4), (535, 48338, 42840), (540, 53236, 46592), (545, 50982, 50488),
    (550, 43016, 53412), (555, 35646, 54530), (560, 32613.2, 53788), (565, 35205.4, 49700),
    (570, 44496, 45072), (575, 54424, 40904), (580, 50104, 37020), (585, 30620, 33592.2),
    (590, 14400.8, 28324.4), (595, 6681.2, 21187.4), (600, 3200, 14677.2), (605, 1958.6, 12040.4),
    (610, 1506, 9443.6), (615, 1166.4, 7553.4), (620, 942, 6509.6), (625, 740.8, 5763.4),
    (630, 610, 5148.8), (635, 495.6, 4666.6), (640, 442, 4345.2), (645, 397.8, 4026.7),
    (650, 368, 3750.1), (655, 340.4, 3481.4), (660, 319.6, 3226.6), (665, 305.6, 3010.8),
    (670, 294, 2795.1), (675, 283.8, 2591), (680, 277.6, 2407.9), (685, 273.6, 2224.9),
    (690, 276, 2052), (695, 280.6, 1923.3), (700, 290, 1794.3), (705, 300.4, 1661.1),
    (710, 314, 1540.5), (715, 328.6, 1432.8), (720, 348, 1325.9), (725, 368.2, 1224.1),
    (730, 390, 1102.2), (735, 413.2, 1102), (740, 446, 1115.9), (745, 480.4, 1236.7),
    (750, 518, 1405.2), (755, 555.2, 1551.1), (760, 586, 1548.5), (765, 616.4, 1435),
    (770, 650, 1311.9), (775, 683.2, 1188.3), (780, 710, 1075.4), (785, 735.4, 977),
    (790, 756, 890.8), (795, 779.2, 815.9), (800, 816, 761.7), (805, 840, 733.7),
    (810, 864, 717.1), (815, 883.6, 704), (820, 916, 693.8), (825, 950.6, 693.4),
    (830, 974, 693), (835, 996.4, 692.7), (840, 1022, 692.4), (845, 1046.4, 691.9),
    (850, 1058, 691.3), (855, 1069.4, 690.8), (860, 1092, 694.3), (865, 1114.8, 699),
    (870, 1128, 705.8), (875, 1140.2, 716.1), (880, 1154, 726.4), (885, 1167.6, 734.9),
    (890, 1178, 743.6), (895, 1188, 752.7), (900, 1198, 761.8), (905, 1207.6, 768.6),
    (910, 1214, 774.6), (915, 1219.8, 778.2), (920, 1224, 777.4),
], dtype=np.float64)

# Macular pigment relative optical density (CIE 170-1 template, peak 1.0 at 457 nm), 450-560 nm.
_MP_NM = np.arange(450.0, 561.0, 5.0)
_MP_REL = np.array([
    0.9487, 0.9968, 0.9840, 0.9193, 0.8545, 0.8221, 0.8085, 0.7824, 0.7244, 0.6338, 0.5217, 0.4035,
    0.2933, 0.2004, 0.1287, 0.0777, 0.0441, 0.0236, 0.0119, 0.0056, 0.0025, 0.0010, 0.0004,
])


def _as_nm(wavelengths: Sequence[float] | np.ndarray) -> np.ndarray:
    wl = np.atleast_1d(np.asarray(wavelengths, dtype=np.float64))
    lo, hi = WAVELENGTH_RANGE
    if wl.size and (wl.min() < lo or wl.max() > hi or not np.isfinite(wl).all()):
        raise ValueError(
            f"wavelengths must lie in {lo:g}-{hi:g} nm (the tabulated range), got "
            f"{wl.min():g}-{wl.max():g} nm"
        )
    return wl


def hb_extinction(wavelengths: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Molar extinction (decadic, cm^-1/M) of (HbO2, Hb) at ``wavelengths``, linear in the 5-nm table."""
    wl = _as_nm(wavelengths)
    t = _HB_TABLE
    return np.interp(wl, t[:, 0], t[:, 1]), np.interp(wl, t[:, 0], t[:, 2])


def blood_absorption(
    wavelengths: Sequence[float], saturation: float | np.ndarray, hb_g_per_l: float = 150.0
) -> np.ndarray:
    """Whole-blood absorption coefficient mu_a (cm^-1) at oxygen saturation ``saturation`` in [0, 1].

    ``saturation`` may be an array; the result then has shape ``saturation.shape + (n_wavelengths,)``.
    """
    oxy, deoxy = hb_extinction(wavelengths)
    s = np.asarray(saturation, dtype=np.float64)[..., None]
    if np.any((s < 0) | (s > 1)):
        raise ValueError("saturation must lie in [0, 1]")
    molar = hb_g_per_l / HB_MOLAR_MASS
    return np.log(10.0) * molar * (s * oxy + (1.0 - s) * deoxy)


def melanin_absorption(wavelengths: Sequence[float]) -> np.ndarray:
    """Melanosome absorption coefficient mu_a = 6.6e11 * lambda^-3.33 (cm^-1, lambda in nm)."""
    wl = _as_nm(wavelengths)
    return 6.6e11 * wl ** -3.33


def macular_pigment_density(wavelengths: Sequence[float]) -> np.ndarray:
    """Relative macular pigment optical density (1.0 at the 457 nm peak, 0 beyond 560 nm)."""
    wl = _as_nm(wavelengths)
    return np.interp(wl, _MP_NM, _MP_REL, left=_MP_REL[0], right=0.0)
