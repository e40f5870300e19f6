"""GRU (Keras `reset_after=True`) over a whole window with a hand-written backward pass.

Same scheme as `trainer.kernels.lstm`: the forward loop saves the gates, every derivative the
reverse recurrence needs is computed once for the whole window, the backward loop carries only
dh, and dW_h / db_h are one matmul / one reduction after the loop. The gradient of every gate's
pre-activation is linear in dh, so a backward step is [dh, dh, dh] times a precomputed scale.
"""

from __future__ import annotations

import tensorflow as tf

from trainer.kernels.lstm import cast, tensor_arrays, zeros_if_none


def _forward(x_tm: tf.Tensor, h0: tf.Tensor, w_c: tf.Tensor, b_h: tf.Tensor) -> tuple[tf.Tensor, ...]:
    """Time-major: (hs, h_{t-1} in w_c's dtype [T, B, H], z and r [T, B, 2H], n, hz_n [T, B, H])."""
    steps, batch, units = x_tm.shape[0], h0.shape[0], h0.shape[-1]

    def body(t: tf.Tensor, h: tf.Tensor, *arrays: tf.TensorArray) -> tuple:
        x_t, h_c = x_tm[t], cast(h, w_c.dtype)
        hz = cast(tf.matmul(h_c, w_c), tf.float32) + b_h
        zr = tf.sigmoid(x_t[:, :2 * units] + hz[:, :2 * units])
        z, r = tf.split(zr, 2, axis=-1)
        hz_n = hz[:, 2 * units:]
        n = tf.tanh(x_t[:, 2 * units:] + r * hz_n)
        h = n + z * (h - n)
        return (t + 1, h, *(a.write(t, v) for a, v in zip(arrays, (h, h_c, zr, n, hz_n), strict=True)))

    arrays = tensor_arrays(steps, batch, [(units, tf.float32), (units, w_c.dtype), (2 * units, tf.float32),
                                          (units, tf.float32), (units, tf.float32)])
    _, _, *arrays = tf.while_loop(lambda t, *_: t < steps, body, (tf.constant(0), h0, *arrays),
                                  maximum_iterations=steps)
    return tuple(a.stack() for a in arrays)


def _backward(dhs: tf.Tensor, dh_T: tf.Tensor, h0: tf.Tensor, hs: tf.Tensor, zr: tf.Tensor, n: tf.Tensor,
              hz_n: tf.Tensor, w_c: tf.Tensor) -> tuple[tf.Tensor, ...]:
    """Reverse loop: (dx [T, B, 3H], dhz f32 and in w_c's dtype [T, B, 3H], dh0)."""
    steps, batch, units = hs.shape[0], dh_T.shape[0], dh_T.shape[-1]
    z, r = tf.split(zr, 2, axis=-1)
    h_prev = tf.concat([h0[None], hs[:-1]], axis=0)
    dz_pre = (h_prev - n) * z * (1.0 - z)
    dn_pre = (1.0 - z) * (1.0 - tf.square(n))
    dr_pre = dn_pre * hz_n * r * (1.0 - r)
    # d(x_proj) = dh * x_scale and d(h @ w_h + b_h) = dh * hz_scale, per gate block (z, r, n).
    x_scale = tf.concat([dz_pre, dr_pre, dn_pre], axis=-1)
    hz_scale = tf.concat([dz_pre, dr_pre, dn_pre * r], axis=-1)
    w_t = tf.transpose(w_c)

    def body(t: tf.Tensor, dh_next: tf.Tensor, *arrays: tf.TensorArray) -> tuple:
        dh = dhs[t] + dh_next
        dh3 = tf.concat([dh, dh, dh], axis=-1)
        dhz = dh3 * hz_scale[t]
        dhz_c = cast(dhz, w_c.dtype)
        dh_prev = dh * z[t] + cast(tf.matmul(dhz_c, w_t), tf.float32)
        values = (dh3 * x_scale[t], dhz, dhz_c)
        return (t - 1, dh_prev, *(a.write(t, v) for a, v in zip(arrays, values, strict=True)))

    arrays = tensor_arrays(steps, batch, [(3 * units, tf.float32), (3 * units, tf.float32),
                                          (3 * units, w_c.dtype)])
    _, dh0, *arrays = tf.while_loop(lambda t, *_: t >= 0, body, (tf.constant(steps - 1), dh_T, *arrays),
                                    maximum_iterations=steps)
    dxs, dhzs, dhzs_c = (a.stack() for a in arrays)
    return dxs, dhzs, dhzs_c, dh0


def gru_sequence_fast(
    x_proj: tf.Tensor, h0: tf.Tensor, w_h: tf.Tensor, b_h: tf.Tensor, *,
    compute_dtype: tf.DType = tf.float32,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Same contract as `gru_sequence_reference`, with the hand-written gradient."""
    w_h, b_h = tf.convert_to_tensor(w_h), tf.convert_to_tensor(b_h)

    @tf.custom_gradient
    def run(x_proj: tf.Tensor, h0: tf.Tensor, w_h: tf.Tensor, b_h: tf.Tensor):  # noqa: ANN202
        w_c = cast(w_h, compute_dtype)
        hs, h_prev, zr, n, hz_n = _forward(tf.transpose(x_proj, [1, 0, 2]), h0, w_c, b_h)
        outputs = tf.transpose(hs, [1, 0, 2])

        def grad(d_out: tf.Tensor | None, dh_T: tf.Tensor | None):  # noqa: ANN202
            dhs = tf.transpose(zeros_if_none(d_out, outputs), [1, 0, 2])
            dxs, dhzs, dhzs_c, dh0 = _backward(dhs, zeros_if_none(dh_T, h0), h0, hs, zr, n, hz_n, w_c)
            units = h0.shape[-1]
            # The whole window's recurrent weight gradient in one matmul: [H, T*B] @ [T*B, 3H].
            dw_h = tf.matmul(tf.reshape(h_prev, [-1, units]), tf.reshape(dhzs_c, [-1, 3 * units]),
                             transpose_a=True)
            db_h = tf.reduce_sum(dhzs, axis=[0, 1])
            return tf.transpose(dxs, [1, 0, 2]), dh0, cast(dw_h, tf.float32), db_h

        return (outputs, hs[-1]), grad

    return run(x_proj, h0, w_h, b_h)
