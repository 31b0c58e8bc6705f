"""Compiled loops of the descriptor (:mod:`otfml.descriptor`): harmonics, radial basis,
expansion, power spectrum, and both gradient paths."""

from __future__ import annotations

import math

import numpy as np
from numba import njit

#: half-width (Å) of the inner switch of a descriptor with ``inner_cutoff``
INNER = 0.5


@njit(cache=True, nogil=True, fastmath=False)
def _solid_harmonics(x, y, z, l_max, norm, Y, dY):
    """Real solid harmonics R_lm(x, y, z) and their Cartesian gradients.

    ``R_lm`` is a homogeneous polynomial of degree l; on the unit sphere it is
    the orthonormal real spherical harmonic Y_lm.  Index ``l*l + l + m``.
    """
    rr = x * x + y * y + z * z
    L1 = l_max + 1
    # Q[l, m](z, rr) and its partial derivatives in z and rr
    Q = np.zeros((L1, L1))
    Qz = np.zeros((L1, L1))
    Qr = np.zeros((L1, L1))
    for m in range(L1):
        dfact = 1.0
        for k in range(1, 2 * m, 2):
            dfact *= k
        Q[m, m] = dfact
        if m + 1 <= l_max:
            Q[m + 1, m] = (2 * m + 1) * z * dfact
            Qz[m + 1, m] = (2 * m + 1) * dfact
        for l in range(m + 2, L1):
            a = 2 * l - 1
            b = l + m - 1
            d = l - m
            Q[l, m] = (a * z * Q[l - 1, m] - b * rr * Q[l - 2, m]) / d
            Qz[l, m] = (a * (Q[l - 1, m] + z * Qz[l - 1, m]) - b * rr * Qz[l - 2, m]) / d
            Qr[l, m] = (a * z * Qr[l - 1, m] - b * (Q[l - 2, m] + rr * Qr[l - 2, m])) / d
    # C_m + i S_m = (x + i y)^m
    C = np.zeros(L1)
    S = np.zeros(L1)
    C[0] = 1.0
    for m in range(1, L1):
        C[m] = x * C[m - 1] - y * S[m - 1]
        S[m] = x * S[m - 1] + y * C[m - 1]
    for l in range(L1):
        for m in range(l + 1):
            q = Q[l, m]
            # gradient of Q(z, rr(x, y, z))
            gqx = Qr[l, m] * 2.0 * x
            gqy = Qr[l, m] * 2.0 * y
            gqz = Qz[l, m] + Qr[l, m] * 2.0 * z
            nlm = norm[l * l + l + m]
            if m == 0:
                k = l * l + l
                Y[k] = nlm * q
                dY[k, 0] = nlm * gqx
                dY[k, 1] = nlm * gqy
                dY[k, 2] = nlm * gqz
            else:
                cm = C[m]
                sm = S[m]
                dcx = m * C[m - 1]
                dcy = -m * S[m - 1]
                dsx = m * S[m - 1]
                dsy = m * C[m - 1]
                kp = l * l + l + m
                km = l * l + l - m
                Y[kp] = nlm * q * cm
                dY[kp, 0] = nlm * (gqx * cm + q * dcx)
                dY[kp, 1] = nlm * (gqy * cm + q * dcy)
                dY[kp, 2] = nlm * gqz * cm
                Y[km] = nlm * q * sm
                dY[km, 0] = nlm * (gqx * sm + q * dsx)
                dY[km, 1] = nlm * (gqy * sm + q * dsy)
                dY[km, 2] = nlm * gqz * sm


@njit(cache=True, nogil=True)
def _pair_basis(D, r_c, mu, width, l_max, norm, r0, m, ri, B, dB):
    """Basis values B[n, lm] = g_n f_c w s Y_lm of one pair vector and dB/dD.

    ``w = 1 / (1 + (r / r0)^m)`` is the radial scaling (1 where ``r0 <= 0``); ``s`` the
    inner switch, rising from 0 at ``ri - INNER`` to 1 at ``ri + INNER`` (1 where ``ri <= 0``).
    B has shape (n_max, L); dB has shape (n_max, L, 3).
    """
    r = math.sqrt(D[0] * D[0] + D[1] * D[1] + D[2] * D[2])
    ux = D[0] / r
    uy = D[1] / r
    uz = D[2] / r
    L = (l_max + 1) * (l_max + 1)
    Y = np.empty(L)
    dYh = np.empty((L, 3))
    _solid_harmonics(ux, uy, uz, l_max, norm, Y, dYh)
    # gradient of Y(u(D)) = (grad_hom - l Y u) / r  (Euler: u . grad_hom = l Y)
    dY = np.empty((L, 3))
    for l in range(l_max + 1):
        for k in range(l * l, (l + 1) * (l + 1)):
            dY[k, 0] = (dYh[k, 0] - l * Y[k] * ux) / r
            dY[k, 1] = (dYh[k, 1] - l * Y[k] * uy) / r
            dY[k, 2] = (dYh[k, 2] - l * Y[k] * uz) / r
    fc = 0.5 * (math.cos(math.pi * r / r_c) + 1.0)
    dfc = -0.5 * math.pi / r_c * math.sin(math.pi * r / r_c)
    if r0 > 0.0:
        x = (r / r0) ** m
        w = 1.0 / (1.0 + x)
        dfc = dfc * w - fc * w * w * m * x / r
        fc = fc * w
    if ri > 0.0 and r < ri + INNER:
        t = math.pi * (r - ri + INNER) / (2.0 * INNER)
        sw = 0.5 * (1.0 - math.cos(t)) if t > 0.0 else 0.0
        dsw = 0.25 * math.pi / INNER * math.sin(t) if t > 0.0 else 0.0
        dfc = dfc * sw + fc * dsw
        fc = fc * sw
    inv_w2 = 1.0 / (width * width)
    for n in range(mu.shape[0]):
        t = r - mu[n]
        g = math.exp(-0.5 * t * t * inv_w2)
        dg = -t * inv_w2 * g
        rad = g * fc
        drad = dg * fc + g * dfc
        for k in range(L):
            B[n, k] = rad * Y[k]
            dB[n, k, 0] = drad * ux * Y[k] + rad * dY[k, 0]
            dB[n, k, 1] = drad * uy * Y[k] + rad * dY[k, 1]
            dB[n, k, 2] = drad * uz * Y[k] + rad * dY[k, 2]


@njit(cache=True, nogil=True)
def _pair_bases(D, r_c, mu, width, l_max, norm, r0, m, ri):
    """Basis values of every pair (n_pairs, n_max, L) and their gradients (n_pairs, n_max, L, 3)."""
    n_max = mu.shape[0]
    L = (l_max + 1) * (l_max + 1)
    B = np.empty((D.shape[0], n_max, L))
    dB = np.empty((D.shape[0], n_max, L, 3))
    for q in range(D.shape[0]):
        _pair_basis(D[q], r_c, mu, width, l_max, norm, r0, m, ri, B[q], dB[q])
    return B, dB


@njit(cache=True, nogil=True)
def _expansion(n_atoms, n_species, pi, sj, B, centre):
    """Density coefficients c[i, s*n_max + n, lm] (n_atoms, K, L): pair bases summed per centre.

    With ``centre > 0`` a last channel ``K`` holds the centre's own term: ``centre`` at
    l = 0, zero elsewhere (shape (n_atoms, K + 1, L)).
    """
    n_max = B.shape[1]
    L = B.shape[2]
    K = n_species * n_max
    c = np.zeros((n_atoms, K + 1 if centre > 0.0 else K, L))
    if centre > 0.0:
        c[:, K, 0] = centre
    for q in range(pi.shape[0]):
        i = pi[q]
        off = sj[q] * n_max
        for n in range(n_max):
            for k in range(L):
                c[i, off + n, k] += B[q, n, k]
    return c


@njit(cache=True, nogil=True)
def _power(c, fl, fa, fb, fw):
    """Power spectrum p[i, f] = fw[f] sum_m c[i, fa[f], l m] c[i, fb[f], l m], l = fl[f]."""
    n_atoms = c.shape[0]
    F = fl.shape[0]
    p = np.zeros((n_atoms, F))
    for i in range(n_atoms):
        for f in range(F):
            a = fa[f]
            b = fb[f]
            l = fl[f]
            s = 0.0
            for k in range(l * l, (l + 1) * (l + 1)):
                s += c[i, a, k] * c[i, b, k]
            p[i, f] = fw[f] * s
    return p


@njit(cache=True, nogil=True)
def _backprop(gp, c, dBq, pi, pj, sj, n_max, fl, fa, fb, fw):
    """Forces -dE/dr given gp = dE/dp (n_atoms, F) (adjoint pass)."""
    n_atoms, K, L = c.shape
    F = fl.shape[0]
    # dE/dc[i, a, lm]
    gc = np.zeros((n_atoms, K, L))
    for i in range(n_atoms):
        for f in range(F):
            g = gp[i, f] * fw[f]
            if g == 0.0:
                continue
            a = fa[f]
            b = fb[f]
            l = fl[f]
            for k in range(l * l, (l + 1) * (l + 1)):
                gc[i, a, k] += g * c[i, b, k]
                gc[i, b, k] += g * c[i, a, k]
    forces = np.zeros((n_atoms, 3))
    for q in range(pi.shape[0]):
        dB = dBq[q]
        i = pi[q]
        j = pj[q]
        off = sj[q] * n_max
        fx = 0.0
        fy = 0.0
        fz = 0.0
        for n in range(n_max):
            for k in range(L):
                g = gc[i, off + n, k]
                fx += g * dB[n, k, 0]
                fy += g * dB[n, k, 1]
                fz += g * dB[n, k, 2]
        # D = r_j - r_i, so dE/dr_j = dE/dD and dE/dr_i = -dE/dD
        forces[j, 0] -= fx
        forces[j, 1] -= fy
        forces[j, 2] -= fz
        forces[i, 0] += fx
        forces[i, 1] += fy
        forces[i, 2] += fz
    return forces


@njit(cache=True, nogil=True)
def _gradient(c, dBq, pi, sj, n_max, fl, fa, fb, fw):
    """dp_i/dD_ij for every pair: array (n_pairs, 3, F)."""
    F = fl.shape[0]
    G = np.zeros((pi.shape[0], 3, F))
    for q in range(pi.shape[0]):
        dB = dBq[q]
        i = pi[q]
        off = sj[q] * n_max
        for f in range(F):
            a = fa[f]
            b = fb[f]
            l = fl[f]
            a_in = a >= off and a < off + n_max
            b_in = b >= off and b < off + n_max
            if not (a_in or b_in):
                continue
            gx = 0.0
            gy = 0.0
            gz = 0.0
            for k in range(l * l, (l + 1) * (l + 1)):
                if a_in:
                    cb = c[i, b, k]
                    gx += dB[a - off, k, 0] * cb
                    gy += dB[a - off, k, 1] * cb
                    gz += dB[a - off, k, 2] * cb
                if b_in:
                    ca = c[i, a, k]
                    gx += dB[b - off, k, 0] * ca
                    gy += dB[b - off, k, 1] * ca
                    gz += dB[b - off, k, 2] * ca
            G[q, 0, f] = fw[f] * gx
            G[q, 1, f] = fw[f] * gy
            G[q, 2, f] = fw[f] * gz
    return G


