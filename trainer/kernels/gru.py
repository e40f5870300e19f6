"""GRU (Keras `reset_after=True`) over a whole window with a hand-written backward pass.

Same scheme as `trainer.kernels.lstm`: the forward loop saves the gates, every derivative the
reverse recurrence needs is computed once for the whole window, the backward loop carries only
dh, and dW_h / db_h are one matmul / one reduction after the loop. The gradient of every gate's
pre-activation is linear in dh, so a backward step is [dh, dh, dh] times a precomputed scale.
"""

from __future__ import annotations

import tensorflow as tf

from trainer.kernels.lstm import blocks, cast, tensor_arrays, unblocks, unroll_factor, zeros_if_none


def _forward(x_tm: tf.Tensor, h0: tf.Tensor, w_c: tf.Tensor, b_h: tf.Tensor) -> tuple[tf.Tensor, ...]:
    """Time-major: (hs [T, B, H], z and r [T, B, 2H], n, hz_n [T, B, H])."""
    steps, batch, units = x_tm.shape[0], h0.shape[0], h0.shape[-1]
    k = unroll_factor(steps)
    x_blocks = blocks(x_tm, k)

    def body(t: tf.Tensor, h: tf.Tensor, *arrays: tf.TensorArray) -> tuple:
        saved = []
        for x_t in tf.unstack(x_blocks[t], num=k):
            hz = cast(tf.matmul(cast(h, w_c.dtype), w_c), tf.float32) + b_h
            zr = tf.sigmoid(x_t[:, :2 * units] + hz[:, :2 * units])
            z, r = tf.split(zr, 2, axis=-1)
            hz_n = hz[:, 2 * units:]
            n = tf.tanh(x_t[:, 2 * units:] + r * hz_n)
            h = n + z * (h - n)
            saved.append((h, zr, n, hz_n))
        values = (tf.stack(block) for block in zip(*saved, strict=True))
        return (t + 1, h, *(a.write(t, v) for a, v in zip(arrays, values, strict=True)))

    arrays = tensor_arrays(steps // k, [k, batch], [(units, tf.float32), (2 * units, tf.float32),
                                                    (units, tf.float32), (units, tf.float32)])
    _, _, *arrays = tf.while_loop(lambda t, *_: t < steps // k, body, (tf.constant(0), h0, *arrays),
                                  maximum_iterations=steps // k)
    return tuple(unblocks(a.stack()) for a in arrays)


def _backward(dhs: tf.Tensor, dh_T: tf.Tensor, h_prev: tf.Tensor, zr: tf.Tensor, n: tf.Tensor,
              hz_n: tf.Tensor, w_c: tf.Tensor) -> tuple[tf.Tensor, ...]:
    """Reverse loop: (dx [T, B, 3H], dhz [T, B, 3H], dh0)."""
    steps, batch, units = zr.shape[0], dh_T.shape[0], dh_T.shape[-1]
    k = unroll_factor(steps)
    z, r = tf.split(zr, 2, axis=-1)
    dz_pre = (h_prev - n) * z * (1.0 - z)
    dn_pre = (1.0 - z) * (1.0 - tf.square(n))
    dr_pre = dn_pre * hz_n * r * (1.0 - r)
    # d(x_proj) = dh * x_scale and d(h @ w_h + b_h) = dh * hz_scale, per gate block (z, r, n).
    x_scale = tf.concat([dz_pre, dr_pre, dn_pre], axis=-1)
    hz_scale = tf.concat([dz_pre, dr_pre, dn_pre * r], axis=-1)
    per_step = [blocks(x, k) for x in (dhs, hz_scale, z)]
    w_t = tf.transpose(w_c)

    def body(t: tf.Tensor, dh_next: tf.Tensor, dh_blocks: tf.TensorArray) -> tuple:
        dh_totals = []
        steps_of_block = zip(*(tf.unstack(x[t], num=k) for x in per_step), strict=True)
        for dh_out, scale, z_t in reversed(list(steps_of_block)):
            dh = dh_out + dh_next
            dhz = tf.concat([dh, dh, dh], axis=-1) * scale
            dh_next = dh * z_t + cast(tf.matmul(cast(dhz, w_c.dtype), w_t), tf.float32)
            dh_totals.append(dh)
        return t - 1, dh_next, dh_blocks.write(t, tf.stack(dh_totals[::-1]))

    dh_blocks = tensor_arrays(steps // k, [k, batch], [(units, tf.float32)])[0]
    _, dh0, dh_blocks = tf.while_loop(lambda t, *_: t >= 0, body,
                                      (tf.constant(steps // k - 1), dh_T, dh_blocks),
                                      maximum_iterations=steps // k)
    # Every gate gradient is linear in the step's total dh: computed for the whole window at once.
    dh3 = tf.tile(unblocks(dh_blocks.stack()), [1, 1, 3])
    return dh3 * x_scale, dh3 * hz_scale, dh0


def gru_sequence_fast(
    x_proj: tf.Tensor, h0: tf.Tensor, w_h: tf.Tensor, b_h: tf.Tensor, *,
    compute_dtype: tf.DType = tf.float32,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Same contract as `gru_sequence_reference`, with the hand-written gradient."""
    w_h, b_h = tf.convert_to_tensor(w_h), tf.convert_to_tensor(b_h)

    @tf.custom_gradient
    def run(x_proj: tf.Tensor, h0: tf.Tensor, w_h: tf.Tensor, b_h: tf.Tensor):  # noqa: ANN202
        w_c = cast(w_h, compute_dtype)
        hs, zr, n, hz_n = _forward(tf.transpose(x_proj, [1, 0, 2]), h0, w_c, b_h)
        outputs = tf.transpose(hs, [1, 0, 2])

        def grad(d_out: tf.Tensor | None, dh_T: tf.Tensor | None):  # noqa: ANN202
            dhs = tf.transpose(zeros_if_none(d_out, outputs), [1, 0, 2])
            h_prev = tf.concat([h0[None], hs[:-1]], axis=0)
            dxs, dhzs, dh0 = _backward(dhs, zeros_if_none(dh_T, h0), h_prev, zr, n, hz_n, w_c)
            units = h0.shape[-1]
            # The whole window's recurrent weight gradient in one matmul: [H, T*B] @ [T*B, 3H], with
            # the inputs the forward matmuls saw (h_{t-1} in the compute dtype).
            dw_h = tf.matmul(tf.reshape(cast(h_prev, w_c.dtype), [-1, units]),
                             tf.reshape(cast(dhzs, w_c.dtype), [-1, 3 * units]), transpose_a=True)
            db_h = tf.reduce_sum(dhzs, axis=[0, 1])
            return tf.transpose(dxs, [1, 0, 2]), dh0, cast(dw_h, tf.float32), db_h

        return (outputs, hs[-1]), grad

    return run(x_proj, h0, w_h, b_h)
