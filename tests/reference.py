"""Float64 NumPy references of the algorithms, written from ALGORITHMS.md.

These are deliberately *not* ports of the JAX code: they use dense Kronecker
products (``np.kron``) and explicit inverses where the package uses mode
products and eigenbasis arithmetic, so that an agreement between the two is
evidence that both follow the specification.

Conventions of ALGORITHMS.md §0: a tensor of shape ``(d_1, …, d_K)``; mode-k
unfolding ``G_(k)`` (``d_k × n_k``) with the remaining modes in their original
order (C order), so that ``G_(k) (A_1 ⊗ … ⊗ A_K without k) G_(k)ᵀ`` pairs
``np.kron`` of the remaining matrices in that order with the unfolding.
"""

from __future__ import annotations

import functools

import numpy as np


def unfold(x: np.ndarray, k: int) -> np.ndarray:
  return np.moveaxis(x, k, 0).reshape(x.shape[k], -1)


def kron_all(mats) -> np.ndarray:
  return functools.reduce(np.kron, mats, np.ones((1, 1)))


def kron_vec(vecs) -> np.ndarray:
  return functools.reduce(np.kron, vecs, np.ones(1))


def eigh_descending(s: np.ndarray):
  w, v = np.linalg.eigh(0.5 * (s + s.T))
  return w[::-1], v[:, ::-1]


def start_from_moments(rule, g, moments, order):
  """The named starting eigenvalue rules given marginal second moments ``moments``."""
  ms = float(np.mean(np.asarray(g, np.float64) ** 2))
  if rule == "rms":
    return [np.full(len(w), ms ** (1.0 / order)) for w in moments]
  assert rule == "spectrum", rule
  return [0.5 * (np.maximum(w, 0.0) + ms) * ms ** (1.0 / order - 1.0) for w in moments]


def initial_eigenvalues(init_factor, g):
  """λ_k at t = 0: a constant, or ``"rms"`` / ``"spectrum"`` from the first gradient."""
  g = np.asarray(g, np.float64)
  if not isinstance(init_factor, str):
    return [np.full(d, float(init_factor)) for d in g.shape]
  n = g.size
  moments = [np.linalg.eigvalsh(unfold(g, k) @ unfold(g, k).T / (n // g.shape[k]))[::-1]
             for k in range(g.ndim)]
  return start_from_moments(init_factor, g, moments, g.ndim)


class KLShampooReference:
  """KL-Shampoo, ALGORITHMS.md §1, with decoupled weight decay and a learning rate.

  ``step(w, g)`` returns the new parameters ``w − lr (U + wd w)``.
  """

  def __init__(
      self,
      shape,
      *,
      lr,
      b1=0.9,
      b2=0.98,
      eps=1e-8,
      weight_decay=0.01,
      precondition_frequency=10,
      init_factor="spectrum",
      max_clamp=4000,
      damping=0.0,
      normalize_update=False,
      update_order="jacobi",
  ):
    self.shape = tuple(shape)
    self.K = len(shape)
    self.N = int(np.prod(shape))
    self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
    self.wd, self.freq = weight_decay, precondition_frequency
    self.init_factor, self.max_clamp = init_factor, max_clamp
    self.damping, self.normalize_update, self.update_order = damping, normalize_update, update_order
    self.t = None  # None until the initialization step ran
    self.S = self.Q = self.lam = self.m = None
    self.last_update = None

  def n(self, k):
    return self.N // self.shape[k]

  def set_bases(self, state_q, state_s):
    """Replaces the factors and bases after the initialization step.

    The specification does not determine the basis of a rank-deficient factor's
    null space (a rectangular matrix at t = 0); tests share it this way.
    """
    self.Q = [np.array(q, np.float64) for q in state_q]
    self.S = [np.array(x, np.float64) for x in state_s]

  def direction(self, m):
    qk = kron_all(self.Q)
    d = np.sqrt(kron_vec(self.lam)) + self.eps
    return (qk @ ((qk.T @ m.reshape(-1)) / d)).reshape(self.shape)

  def increment(self, g, k, lams):
    """``G_(k) (⊗_{j≠k} Ŝ_j⁻¹) G_(k)ᵀ / n_k`` with the current Q and the given λ."""
    s_inv = [q @ np.diag(1.0 / l) @ q.T for q, l in zip(self.Q, lams)]
    others = kron_all([s_inv[j] for j in range(self.K) if j != k])
    gk = unfold(g, k)
    return gk @ others @ gk.T / self.n(k)

  def increments(self, g):
    return [self.increment(g, k, self.lam) for k in range(self.K)]

  def new_eigenvalues(self, k, inc):
    """``max(b2 λ_k + (1 − b2)(diag(Q_kᵀ inc Q_k) + damping term), floor)`` (old λ_k)."""
    delta = np.diag(self.Q[k].T @ inc @ self.Q[k])
    if self.damping:
      delta = delta + self.damping * np.prod(
          [np.mean(1.0 / self.lam[j]) for j in range(self.K) if j != k])
    lam = self.b2 * self.lam[k] + (1 - self.b2) * delta
    if self.max_clamp is None:
      return lam
    c = max(10.0, min(self.shape[k], self.max_clamp))
    return np.maximum(lam, 1.0 / c**2)

  def statistics(self, g):
    if self.update_order == "authors" and self.K == 3:
      return self.authors_order_statistics(g)
    incs = self.increments(g)
    new_lam = [self.new_eigenvalues(k, incs[k]) for k in range(self.K)]
    self.S = [self.b2 * s + (1 - self.b2) * inc for s, inc in zip(self.S, incs)]
    self.lam = new_lam

  def authors_order_statistics(self, g):
    """The authors' order for 3-D tensors: λ_3 from old, λ_2 from new λ_3, S_1/λ_1 from new λ_2."""
    old = list(self.lam)
    inc3, inc2 = self.increment(g, 2, old), self.increment(g, 1, old)
    lam3 = self.new_eigenvalues(2, inc3)
    lam2 = self.new_eigenvalues(1, self.increment(g, 1, [old[0], old[1], lam3]))
    inc1 = self.increment(g, 0, [old[0], lam2, old[2]])
    lam1 = self.new_eigenvalues(0, inc1)
    self.S = [self.b2 * s + (1 - self.b2) * inc for s, inc in zip(self.S, (inc1, inc2, inc3))]
    self.lam = [lam1, lam2, lam3]

  def refresh(self):
    self.Q = [np.linalg.qr(s @ q)[0] for s, q in zip(self.S, self.Q)]

  def initialize(self, g):
    self.S = [(1 - self.b2) / self.n(k) * unfold(g, k) @ unfold(g, k).T for k in range(self.K)]
    self.Q = [eigh_descending(s)[1] for s in self.S]
    self.lam = initial_eigenvalues(self.init_factor, g)
    self.m = np.zeros(self.shape)
    self.t = 0

  def precondition(self, g):
    """The preconditioned update ``U`` for gradient ``g`` (advances the state)."""
    g = np.asarray(g, np.float64)
    if self.t is None:
      self.initialize(g)
      return np.zeros(self.shape)
    self.t += 1
    self.m = self.b1 * self.m + (1 - self.b1) * g
    u = self.direction(self.m)
    self.statistics(g)
    if self.t % self.freq == 0:
      self.refresh()
    if self.normalize_update:
      u = u / (1e-30 + np.sqrt(np.mean(u**2)))
    return u

  def step(self, w, g):
    u = self.precondition(g)
    self.last_update = u
    return w - self.lr * (u + self.wd * w)


def _vec(x):
  return np.asarray(x, np.float64).reshape(-1)


class _EigenbasisReference:
  """Shared pieces of the references below: factors, bases, the step counter."""

  def __init__(self, shape, *, lr, weight_decay, precondition_frequency):
    self.shape = tuple(shape)
    self.K = len(shape)
    self.N = int(np.prod(shape))
    self.lr, self.wd, self.freq = lr, weight_decay, precondition_frequency
    self.t = None
    self.last_update = None

  def gram(self, g, k):
    return unfold(g, k) @ unfold(g, k).T

  def qkron(self):
    return kron_all(self.Q)

  def step(self, w, g):
    g = np.asarray(g, np.float64)
    if self.t is None:
      self.initialize(g)
      u = np.zeros(self.shape)
    else:
      self.t += 1
      u = self.update(g)
    self.last_update = u
    return w - self.lr * (u + self.wd * w)

  set_bases = KLShampooReference.set_bases


class KLSOAPReference(_EigenbasisReference):
  """KL-SOAP, ALGORITHMS.md §2 (statistics and refresh of §1)."""

  def __init__(self, shape, *, lr, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.01,
               precondition_frequency=10, init_factor=0.1, max_clamp=4000, damping=0.0,
               normalize_update=False, update_order="jacobi"):
    super().__init__(shape, lr=lr, weight_decay=weight_decay,
                     precondition_frequency=precondition_frequency)
    self.kl = KLShampooReference(shape, lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                                 precondition_frequency=precondition_frequency,
                                 init_factor=init_factor, max_clamp=max_clamp, damping=damping,
                                 update_order=update_order)
    self.normalize_update = normalize_update
    self.b1, self.b2, self.eps = b1, b2, eps

  @property
  def Q(self):
    return self.kl.Q

  @Q.setter
  def Q(self, value):
    self.kl.Q = value

  @property
  def S(self):
    return self.kl.S

  @S.setter
  def S(self, value):
    self.kl.S = value

  def initialize(self, g):
    self.kl.initialize(g)
    self.t = 0
    self.m = np.zeros(self.N)
    self.v = np.zeros(self.N)

  def update(self, g):
    gt = self.qkron().T @ _vec(g)
    self.m = self.b1 * self.m + (1 - self.b1) * gt
    self.v = self.b2 * self.v + (1 - self.b2) * gt**2
    u = (self.qkron() @ (self.m / (np.sqrt(self.v) + self.eps))).reshape(self.shape)
    self.kl.statistics(g)
    if self.t % self.freq == 0:
      old = self.qkron()
      self.kl.refresh()
      self.m = self.qkron().T @ (old @ self.m)
    if self.normalize_update:
      u = u / (1e-30 + np.sqrt(np.mean(u**2)))
    return u


class SOAPReference(_EigenbasisReference):
  """SOAP, ALGORITHMS.md §3 (sorted QR refresh, bias correction in step-size form)."""

  def __init__(self, shape, *, lr, b1=0.95, b2=0.95, eps=1e-8, weight_decay=0.01,
               precondition_frequency=10):
    super().__init__(shape, lr=lr, weight_decay=weight_decay,
                     precondition_frequency=precondition_frequency)
    self.b1, self.b2, self.eps = b1, b2, eps

  def initialize(self, g):
    self.S = [(1 - self.b2) * self.gram(g, k) for k in range(self.K)]
    self.Q = [eigh_descending(s)[1] for s in self.S]
    self.m = np.zeros(self.N)
    self.v = np.zeros(self.N)
    self.t = 0

  def update(self, g):
    gt = self.qkron().T @ _vec(g)
    self.m = self.b1 * self.m + (1 - self.b1) * gt
    self.v = self.b2 * self.v + (1 - self.b2) * gt**2
    scale = np.sqrt(1 - self.b2**self.t) / (1 - self.b1**self.t)
    u = scale * (self.qkron() @ (self.m / (np.sqrt(self.v) + self.eps))).reshape(self.shape)
    self.S = [self.b2 * s + (1 - self.b2) * self.gram(g, k) for k, s in enumerate(self.S)]
    if self.t % self.freq == 0:
      old = self.qkron()
      v = self.v.reshape(self.shape)
      for k in range(self.K):
        order = np.argsort(-np.diag(self.Q[k].T @ self.S[k] @ self.Q[k]), kind="stable")
        self.Q[k] = self.Q[k][:, order]
        v = np.take(v, order, axis=k)
        self.Q[k] = np.linalg.qr(self.S[k] @ self.Q[k])[0]
      self.v = v.reshape(-1)
      self.m = self.qkron().T @ (old @ self.m)
    return u


class ShampooReference(_EigenbasisReference):
  """Shampoo with Adam grafting, ALGORITHMS.md §3."""

  def __init__(self, shape, *, lr, b1=0.9, b2=0.99, eps=1e-12, graft_eps=1e-8,
               weight_decay=0.01, precondition_frequency=10):
    super().__init__(shape, lr=lr, weight_decay=weight_decay,
                     precondition_frequency=precondition_frequency)
    self.b1, self.b2, self.eps, self.graft_eps = b1, b2, eps, graft_eps

  def decompose(self):
    out = [np.linalg.eigh(0.5 * (s + s.T)) for s in self.S]
    self.lam = [np.maximum(w, 0.0) for w, _ in out]
    self.Q = [v for _, v in out]

  def initialize(self, g):
    self.S = [(1 - self.b2) * self.gram(g, k) for k in range(self.K)]
    self.decompose()
    self.m = np.zeros(self.shape)
    self.nu = np.zeros(self.shape)
    self.t = 0

  def update(self, g):
    p = 1.0 / (2 * self.K)
    roots = [q @ np.diag((l + self.eps) ** -p) @ q.T for q, l in zip(self.Q, self.lam)]
    d = (kron_all(roots) @ _vec(g)).reshape(self.shape)
    self.nu = self.b2 * self.nu + (1 - self.b2) * g**2
    adam = g / (np.sqrt(self.nu / (1 - self.b2**self.t)) + self.graft_eps)
    d = d * np.linalg.norm(adam) / np.linalg.norm(d)
    self.m = self.b1 * self.m + (1 - self.b1) * d
    u = self.m / (1 - self.b1**self.t)
    self.S = [self.b2 * s + (1 - self.b2) * self.gram(g, k) for k, s in enumerate(self.S)]
    if self.t % self.freq == 0:
      self.decompose()
    return u


class EShampooReference(_EigenbasisReference):
  """Eigenvalue-corrected Shampoo with the adaptive refresh of ALGORITHMS.md §3–4."""

  def __init__(self, shape, *, lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01,
               precondition_frequency=10, tolerance=0.01, max_iters=1):
    super().__init__(shape, lr=lr, weight_decay=weight_decay,
                     precondition_frequency=precondition_frequency)
    self.b1, self.b2, self.eps = b1, b2, eps
    self.tolerance, self.max_iters = tolerance, max_iters
    self.refreshes = np.zeros(self.K, int)

  def initialize(self, g):
    self.S = [(1 - self.b2) * self.gram(g, k) for k in range(self.K)]
    self.Q = [eigh_descending(s)[1] for s in self.S]
    self.m = np.zeros(self.N)
    self.d = np.zeros(self.N)
    self.t = 0

  @staticmethod
  def converged(b, tolerance):
    off = np.sqrt(max(np.sum(b**2) - np.sum(np.diag(b) ** 2), 0.0))
    return off <= tolerance * np.linalg.norm(b)

  def update(self, g):
    qk = self.qkron()
    self.m = self.b1 * self.m + (1 - self.b1) * _vec(g)
    m_hat = self.m / (1 - self.b1**self.t)
    self.d = self.b2 * self.d + (1 - self.b2) * (qk.T @ _vec(g)) ** 2
    d_hat = self.d / (1 - self.b2**self.t)
    u = (qk @ ((qk.T @ m_hat) / (np.sqrt(d_hat) + self.eps))).reshape(self.shape)
    self.S = [self.b2 * s + (1 - self.b2) * self.gram(g, k) for k, s in enumerate(self.S)]
    if self.t % self.freq == 0:
      for k in range(self.K):
        b = self.Q[k].T @ self.S[k] @ self.Q[k]
        iters = 0
        while iters < self.max_iters and not self.converged(b, self.tolerance):
          qi, ri = np.linalg.qr(b)
          b = ri @ qi
          self.Q[k] = self.Q[k] @ qi
          iters += 1
        self.refreshes[k] += iters > 0
    return u


MUON = (3.4445, -4.7750, 2.0315)


def newton_schulz(x, coefficients=MUON, steps=5, eps=1e-7):
  """ALGORITHMS.md §6 in float64: normalize, wide orientation, odd quintic steps."""
  x = np.asarray(x, np.float64)
  tall = x.shape[0] > x.shape[1]
  y = x.T if tall else x
  y = y / (np.linalg.norm(y) + eps)
  a, b, c = coefficients
  for _ in range(steps):
    gram = y @ y.T
    y = a * y + (b * gram + c * gram @ gram) @ y
  return y.T if tall else y


def polar(x):
  u, _, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
  return u @ vt


class ProKLShampooReference:
  """Pro-KLShampoo, ALGORITHMS.md §5, with dense n×n matrices and explicit inverses.

  The restricted factor is built as a dense ``R̂`` and inverted with
  ``np.linalg.inv``; λ and σ are re-expressed after a subspace refresh as
  ``diag(U_newᵀ R̂ U_new)`` and ``tr((I − U_new U_newᵀ) R̂)/(n − r)``.
  """

  def __init__(self, shape, *, lr, rank, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.01,
               precondition_frequency=10, init_factor=0.1, max_clamp=4000,
               complement_scale=None, ns_steps=5, ns_coefficients=MUON,
               restricted_side="larger", accumulate=True):
    self.shape = tuple(shape)
    m0, n0 = shape
    if restricted_side == "larger":
      self.transpose = m0 > n0
    else:
      assert restricted_side == "smaller"
      self.transpose = n0 > m0
    self.m, self.n = (n0, m0) if self.transpose else (m0, n0)
    self.r = rank
    self.lr, self.b1, self.b2, self.eps, self.wd = lr, b1, b2, eps, weight_decay
    self.freq, self.init_factor, self.max_clamp = precondition_frequency, init_factor, max_clamp
    self.kappa = np.sqrt(self.n) if complement_scale is None else complement_scale
    self.ns_steps, self.ns_coefficients = ns_steps, ns_coefficients
    self.accumulate = accumulate
    self.t = None
    self.last_update = None

  def floor(self, d):
    if self.max_clamp is None:
      return 0.0
    c = max(10.0, min(d, self.max_clamp))
    return 1.0 / c**2

  def r_hat(self, u=None, lam=None, sigma=None):
    u = self.U if u is None else u
    lam = self.lam if lam is None else lam
    sigma = self.sigma if sigma is None else sigma
    return u @ np.diag(lam) @ u.T + sigma * (np.eye(self.n) - u @ u.T)

  def orient(self, x):
    return x.T if self.transpose else x

  def set_bases(self, state_q, state_s):
    """Adopts the dense factor and basis after the initialization step (see KLShampooReference)."""
    # The restricted mode holds a one-row placeholder; the dense mode is square.
    (q,) = [x for x in state_q if x.shape[0] == x.shape[1]]
    (s,) = [x for x in state_s if x.shape[0] == x.shape[1]]
    self.Q, self.S = np.array(q, np.float64), np.array(s, np.float64)

  def initialize(self, g):
    m, n = self.m, self.n
    self.S = (1 - self.b2) / n * g @ g.T
    self.Q = eigh_descending(self.S)[1]
    self.U = eigh_descending(g.T @ g / m)[1][:, : self.r]
    if isinstance(self.init_factor, str):
      s2 = np.zeros(m)
      sv = np.linalg.svd(g, compute_uv=False) ** 2
      s2[: len(sv)] = sv
      top = np.concatenate([s2, np.zeros(max(0, self.r - m))])[: self.r]
      flat = (s2.sum() - top.sum()) / (m * (n - self.r))
      self.lam_a, self.lam, (self.sigma,) = start_from_moments(
          self.init_factor, g, [s2 / n, top / m, np.array([flat])], 2)
    else:
      self.lam_a = np.full(m, float(self.init_factor))
      self.lam = np.full(self.r, float(self.init_factor))
      self.sigma = float(self.init_factor)
    self.Y = self.U * self.lam
    self.N = np.zeros((m, n))
    self.t = 0

  def direction(self):
    c = self.N @ self.U
    x = self.N - c @ self.U.T
    d = np.sqrt(np.outer(self.lam_a, self.lam)) + self.eps
    par = self.Q @ ((self.Q.T @ c) / d) @ self.U.T
    perp = self.kappa * newton_schulz(x, self.ns_coefficients, self.ns_steps)
    perp = perp - perp @ self.U @ self.U.T
    return par + perp

  def statistics(self, g):
    m, n, r = self.m, self.n, self.r
    inc = g @ np.linalg.inv(self.r_hat()) @ g.T / n
    delta_a = np.diag(self.Q.T @ inc @ self.Q)
    w = np.diag(self.lam_a**-0.5) @ self.Q.T @ g
    sample = w.T @ w / m  # one-sample right factor
    spike = np.diag(self.U.T @ sample @ self.U)
    flat = (np.trace(sample) - spike.sum()) / (n - r)
    power = sample @ self.U
    self.S = self.b2 * self.S + (1 - self.b2) * inc
    self.lam_a = np.maximum(self.b2 * self.lam_a + (1 - self.b2) * delta_a, self.floor(m))
    if self.accumulate:
      self.Y = self.b2 * self.Y + (1 - self.b2) * power
    else:
      self.Y = self.b2 * self.U * self.lam + (1 - self.b2) * power
    self.lam = np.maximum(self.b2 * self.lam + (1 - self.b2) * spike, self.floor(n))
    self.sigma = max(self.b2 * self.sigma + (1 - self.b2) * flat, self.floor(n))

  def refresh(self):
    u_new = np.linalg.qr(self.Y)[0]
    dense = self.r_hat()
    lam = np.diag(u_new.T @ dense @ u_new)
    sigma = np.trace((np.eye(self.n) - u_new @ u_new.T) @ dense) / (self.n - self.r)
    self.U = u_new
    self.lam = np.maximum(lam, self.floor(self.n))
    self.sigma = max(sigma, self.floor(self.n))
    self.Y = self.U * self.lam
    self.Q = np.linalg.qr(self.S @ self.Q)[0]

  def step(self, w, g):
    g = self.orient(np.asarray(g, np.float64))
    if self.t is None:
      self.initialize(g)
      u = np.zeros((self.m, self.n))
    else:
      self.t += 1
      self.N = self.b1 * self.N + (1 - self.b1) * g
      u = self.direction()
      self.statistics(g)
      if self.t % self.freq == 0:
        self.refresh()
    u = self.orient(u)
    self.last_update = u
    return w - self.lr * (u + self.wd * w)


# The float64 reference of every recipe in kl_optax.RECIPES (test_family_reference checks
# that none is missing).
REFERENCES = {
    "kl_shampoo": KLShampooReference,
    "kl_soap": KLSOAPReference,
    "pro_kl_shampoo": ProKLShampooReference,
    "soap": SOAPReference,
    "shampoo": ShampooReference,
    "eshampoo": EShampooReference,
}
