"""LSTM over a whole window with a hand-written backward pass.

Why not autodiff of a scan: it accumulates the recurrent weight gradient inside the loop, one
small [H, 4H] matmul and add per step (in bfloat16 when the matmul is bfloat16, losing ~1e-2 of
accuracy). Here the forward loop saves the gate pre-activations and cell states; the backward
loop runs in reverse carrying only (dh, dc); and dW_h is ONE large matmul of the stacked previous
states with the stacked gate gradients after the loop (oneDNN accumulates it in float32 even for
bfloat16 inputs).

Why the backward loop is so short: on a 2-core CPU each small op costs ~10-50 us of dispatch, so
per-step elementwise work, not FLOPs, is what separates a recurrence from PyTorch's fused kernel.
Everything the reverse recurrence multiplies by (sigmoid/tanh derivatives) depends only on the
forward pass, so it is computed once, vectorised over the whole window, before the loop; a step
is then an add, two multiplies, a concat and the matmul.
"""

from __future__ import annotations

import tensorflow as tf


def zeros_if_none(grad: tf.Tensor | None, like: tf.Tensor) -> tf.Tensor:
    # Unconnected outputs (e.g. a final state nobody reads) arrive as None in eager mode.
    return tf.zeros_like(like) if grad is None else grad


def cast(x: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    return x if x.dtype == dtype else tf.cast(x, dtype)


def tensor_arrays(size: int, leading: list[int], widths_and_dtypes: list[tuple[int, tf.DType]],
                  ) -> list[tf.TensorArray]:
    return [tf.TensorArray(dtype, size=size, element_shape=[*leading, width])
            for width, dtype in widths_and_dtypes]


def unroll_factor(steps: int) -> int:
    """Time steps per while-loop iteration: the largest of 8, 4, 2, 1 that divides the window.
    Each iteration costs a fixed set of loop-control ops per loop variable on top of the cell's;
    running several steps per iteration, and writing their results as one block, cuts that."""
    return next(k for k in (8, 4, 2, 1) if steps % k == 0)


def blocks(x: tf.Tensor, k: int) -> tf.Tensor:
    """[T, ...] -> [T // k, k, ...]: one block per loop iteration (the batch may be unknown)."""
    dims = tf.shape(x)
    out = tf.reshape(x, tf.concat([[dims[0] // k, k], dims[1:]], axis=0))
    out.set_shape([x.shape[0] // k, k, *x.shape[1:]])
    return out


def unblocks(x: tf.Tensor) -> tf.Tensor:
    """[T // k, k, ...] -> [T, ...]."""
    dims = tf.shape(x)
    out = tf.reshape(x, tf.concat([[dims[0] * dims[1]], dims[2:]], axis=0))
    out.set_shape([x.shape[0] * x.shape[1], *x.shape[2:]])
    return out


def _forward(x_tm: tf.Tensor, h0: tf.Tensor, c0: tf.Tensor, w_c: tf.Tensor,
             ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Time-major forward: (hs, cs [T, B, H], pre-activations zs [T, B, 4H])."""
    steps, batch, units = x_tm.shape[0], h0.shape[0], h0.shape[-1]
    k = unroll_factor(steps)
    x_blocks = blocks(x_tm, k)

    def body(t: tf.Tensor, h: tf.Tensor, c: tf.Tensor, *arrays: tf.TensorArray) -> tuple:
        hs, cs, zs = [], [], []
        for x_t in tf.unstack(x_blocks[t], num=k):
            z = x_t + cast(tf.matmul(cast(h, w_c.dtype), w_c), tf.float32)
            i, f, _, o = tf.split(tf.sigmoid(z), 4, axis=-1)
            c = f * c + i * tf.tanh(z[:, 2 * units:3 * units])
            h = o * tf.tanh(c)
            hs.append(h), cs.append(c), zs.append(z)
        values = (tf.stack(hs), tf.stack(cs), tf.stack(zs))
        return (t + 1, h, c, *(a.write(t, v) for a, v in zip(arrays, values, strict=True)))

    arrays = tensor_arrays(steps // k, [k, batch], [(units, tf.float32), (units, tf.float32),
                                                    (4 * units, tf.float32)])
    _, _, _, *arrays = tf.while_loop(lambda t, *_: t < steps // k, body, (tf.constant(0), h0, c0, *arrays),
                                     maximum_iterations=steps // k)
    hs, cs, zs = (unblocks(a.stack()) for a in arrays)
    return hs, cs, zs


def _backward(dhs: tf.Tensor, dh_T: tf.Tensor, dc_T: tf.Tensor, zs: tf.Tensor, cs: tf.Tensor,
              c0: tf.Tensor, w_c: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Reverse loop: (dz [T, B, 4H] f32, dh0, dc0)."""
    steps, batch, units = zs.shape[0], dh_T.shape[0], dh_T.shape[-1]
    k = unroll_factor(steps)
    i, f, _, o = tf.split(tf.sigmoid(zs), 4, axis=-1)
    g = tf.tanh(zs[..., 2 * units:3 * units])
    tanh_c = tf.tanh(cs)
    c_prev = tf.concat([c0[None], cs[:-1]], axis=0)
    dc_per_dh = o * (1.0 - tf.square(tanh_c))
    # dz = [dc, dc, dc, dh] * gate_scale: the derivative of each gate's pre-activation.
    gate_scale = tf.concat([g * i * (1.0 - i), c_prev * f * (1.0 - f), i * (1.0 - tf.square(g)),
                            tanh_c * o * (1.0 - o)], axis=-1)
    per_step = [blocks(x, k) for x in (dhs, dc_per_dh, gate_scale, f)]
    w_t = tf.transpose(w_c)

    def body(t: tf.Tensor, dh_next: tf.Tensor, dc_next: tf.Tensor, dz_blocks: tf.TensorArray) -> tuple:
        dzs = []
        steps_of_block = zip(*(tf.unstack(x[t], num=k) for x in per_step), strict=True)
        for dh_out, dc_dh, scale, f_t in reversed(list(steps_of_block)):
            dh = dh_out + dh_next
            dc = dc_next + dh * dc_dh
            dz = tf.concat([dc, dc, dc, dh], axis=-1) * scale
            dh_next = cast(tf.matmul(cast(dz, w_c.dtype), w_t), tf.float32)
            dc_next = dc * f_t
            dzs.append(dz)
        return t - 1, dh_next, dc_next, dz_blocks.write(t, tf.stack(dzs[::-1]))

    dz_blocks = tensor_arrays(steps // k, [k, batch], [(4 * units, tf.float32)])[0]
    _, dh0, dc0, dz_blocks = tf.while_loop(lambda t, *_: t >= 0, body,
                                           (tf.constant(steps // k - 1), dh_T, dc_T, dz_blocks),
                                           maximum_iterations=steps // k)
    return unblocks(dz_blocks.stack()), dh0, dc0


def lstm_sequence_fast(
    x_proj: tf.Tensor, h0: tf.Tensor, c0: tf.Tensor, w_h: tf.Tensor, *,
    compute_dtype: tf.DType = tf.float32,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Same contract as `lstm_sequence_reference`, with the hand-written gradient."""
    w_h = tf.convert_to_tensor(w_h)

    @tf.custom_gradient
    def run(x_proj: tf.Tensor, h0: tf.Tensor, c0: tf.Tensor, w_h: tf.Tensor):  # noqa: ANN202
        w_c = cast(w_h, compute_dtype)
        hs, cs, zs = _forward(tf.transpose(x_proj, [1, 0, 2]), h0, c0, w_c)
        outputs = tf.transpose(hs, [1, 0, 2])

        def grad(d_out: tf.Tensor | None, dh_T: tf.Tensor | None, dc_T: tf.Tensor | None):  # noqa: ANN202
            dhs = tf.transpose(zeros_if_none(d_out, outputs), [1, 0, 2])
            dzs, dh0, dc0 = _backward(dhs, zeros_if_none(dh_T, h0), zeros_if_none(dc_T, c0), zs, cs, c0, w_c)
            units = h0.shape[-1]
            # The whole window's recurrent weight gradient in one matmul: [H, T*B] @ [T*B, 4H], with
            # the inputs the forward matmuls saw (h_{t-1} in the compute dtype).
            h_prev = cast(tf.concat([h0[None], hs[:-1]], axis=0), w_c.dtype)
            dz_c = cast(dzs, w_c.dtype)
            dw_h = tf.matmul(tf.reshape(h_prev, [-1, units]), tf.reshape(dz_c, [-1, 4 * units]),
                             transpose_a=True)
            return tf.transpose(dzs, [1, 0, 2]), dh0, dc0, cast(dw_h, tf.float32)

        return (outputs, hs[-1], cs[-1]), grad

    return run(x_proj, h0, c0, w_h)
