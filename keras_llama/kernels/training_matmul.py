"""TEMPORARY shim (replaced by the kernels branch)."""

import functools

from keras import ops


@functools.cache
def _make_matmul():
    import jax

    @jax.custom_vjp
    def mm(x, kernel):
        return x @ kernel

    def forward(x, kernel):
        return x @ kernel, (x, kernel)

    def backward(residuals, dy):
        x, kernel = residuals
        return dy @ kernel.T, x.T @ dy

    mm.defvjp(forward, backward)
    return mm


@functools.cache
def _make_matmul_transposed():
    import jax

    @jax.custom_vjp
    def mm(x, table):
        return x @ table.T

    def forward(x, table):
        return x @ table.T, (x, table)

    def backward(residuals, dy):
        x, table = residuals
        return dy @ table, dy.T @ x

    mm.defvjp(forward, backward)
    return mm


def matmul(x, kernel):
    lead = tuple(x.shape[:-1])
    y = _make_matmul()(ops.reshape(x, (-1, x.shape[-1])), kernel)
    return ops.reshape(y, (*lead, kernel.shape[-1]))


def matmul_transposed(x, table):
    lead = tuple(x.shape[:-1])
    y = _make_matmul_transposed()(ops.reshape(x, (-1, x.shape[-1])), table)
    return ops.reshape(y, (*lead, table.shape[0]))
