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
      init_factor=0.1,
      max_clamp=4000,
  ):
    self.shape = tuple(shape)
    self.K = len(shape)
    self.N = int(np.prod(shape))
    self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
    self.wd, self.freq = weight_decay, precondition_frequency
    self.init_factor, self.max_clamp = init_factor, max_clamp
    self.t = None  # None until the initialization step ran
    self.S = self.Q = self.lam = self.m = None
    self.last_update = None

  def n(self, k):
    return self.N // self.shape[k]

  def set_state(self, S, Q, lam, m, t):
    """Starts from a given state (for tests that must share an initial basis)."""
    self.S = [np.array(x, np.float64) for x in S]
    self.Q = [np.array(x, np.float64) for x in Q]
    self.lam = [np.array(x, np.float64) for x in lam]
    self.m = np.array(m, np.float64)
    self.t = int(t)

  def direction(self, m):
    qk = kron_all(self.Q)
    d = np.sqrt(kron_vec(self.lam)) + self.eps
    return (qk @ ((qk.T @ m.reshape(-1)) / d)).reshape(self.shape)

  def increments(self, g):
    """``G_(k) (⊗_{j≠k} Ŝ_j⁻¹) G_(k)ᵀ / n_k`` with the current Q and λ."""
    s_inv = [q @ np.diag(1.0 / l) @ q.T for q, l in zip(self.Q, self.lam)]
    incs = []
    for k in range(self.K):
      others = kron_all([s_inv[j] for j in range(self.K) if j != k])
      gk = unfold(g, k)
      incs.append(gk @ others @ gk.T / self.n(k))
    return incs

  def statistics(self, g):
    incs = self.increments(g)
    new_lam = []
    for k in range(self.K):
      delta = np.diag(self.Q[k].T @ incs[k] @ self.Q[k])
      lam = self.b2 * self.lam[k] + (1 - self.b2) * delta
      c = max(10.0, min(self.shape[k], self.max_clamp))
      new_lam.append(np.maximum(lam, 1.0 / c**2))
    self.S = [self.b2 * s + (1 - self.b2) * inc for s, inc in zip(self.S, incs)]
    self.lam = new_lam

  def refresh(self):
    self.Q = [np.linalg.qr(s @ q)[0] for s, q in zip(self.S, self.Q)]

  def initialize(self, g):
    self.S = [(1 - self.b2) / self.n(k) * unfold(g, k) @ unfold(g, k).T for k in range(self.K)]
    self.Q = [eigh_descending(s)[1] for s in self.S]
    self.lam = [np.full(d, float(self.init_factor)) for d in self.shape]
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
    return u

  def step(self, w, g):
    u = self.precondition(g)
    self.last_update = u
    return w - self.lr * (u + self.wd * w)
