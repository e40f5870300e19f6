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


def tensor_arrays(steps: int, batch: int, widths_and_dtypes: list[tuple[int, tf.DType]],
                  ) -> list[tf.TensorArray]:
    return [tf.TensorArray(dtype, size=steps, element_shape=[batch, width])
            for width, dtype in widths_and_dtypes]


def _forward(x_tm: tf.Tensor, h0: tf.Tensor, c0: tf.Tensor, w_c: tf.Tensor,
             ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Time-major forward: (hs, cs [T, B, H], pre-activations zs [T, B, 4H], h_{t-1} in w_c's dtype)."""
    steps, batch, units = x_tm.shape[0], h0.shape[0], h0.shape[-1]

    def body(t: tf.Tensor, h: tf.Tensor, c: tf.Tensor, *arrays: tf.TensorArray) -> tuple:
        h_c = cast(h, w_c.dtype)
        z = x_tm[t] + cast(tf.matmul(h_c, w_c), tf.float32)
        i, f, _, o = tf.split(tf.sigmoid(z), 4, axis=-1)
        c = f * c + i * tf.tanh(z[:, 2 * units:3 * units])
        h = o * tf.tanh(c)
        return (t + 1, h, c, *(a.write(t, v) for a, v in zip(arrays, (h, c, z, h_c), strict=True)))

    arrays = tensor_arrays(steps, batch, [(units, tf.float32), (units, tf.float32),
                                          (4 * units, tf.float32), (units, w_c.dtype)])
    _, _, _, *arrays = tf.while_loop(lambda t, *_: t < steps, body, (tf.constant(0), h0, c0, *arrays),
                                     maximum_iterations=steps)
    hs, cs, zs, h_prev = (a.stack() for a in arrays)
    return hs, cs, zs, h_prev


def _backward(dhs: tf.Tensor, dh_T: tf.Tensor, dc_T: tf.Tensor, zs: tf.Tensor, cs: tf.Tensor,
              c0: tf.Tensor, w_c: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Reverse loop: (dz [T, B, 4H] f32, dz in w_c's dtype, dh0, dc0)."""
    steps, batch, units = zs.shape[0], dh_T.shape[0], dh_T.shape[-1]
    i, f, _, o = tf.split(tf.sigmoid(zs), 4, axis=-1)
    g = tf.tanh(zs[..., 2 * units:3 * units])
    tanh_c = tf.tanh(cs)
    c_prev = tf.concat([c0[None], cs[:-1]], axis=0)
    dc_per_dh = o * (1.0 - tf.square(tanh_c))
    # dz = [dc, dc, dc, dh] * gate_scale: the derivative of each gate's pre-activation.
    gate_scale = tf.concat([g * i * (1.0 - i), c_prev * f * (1.0 - f), i * (1.0 - tf.square(g)),
                            tanh_c * o * (1.0 - o)], axis=-1)
    w_t = tf.transpose(w_c)

    def body(t: tf.Tensor, dh_next: tf.Tensor, dc_next: tf.Tensor, *arrays: tf.TensorArray) -> tuple:
        dh = dhs[t] + dh_next
        dc = dc_next + dh * dc_per_dh[t]
        dz = tf.concat([dc, dc, dc, dh], axis=-1) * gate_scale[t]
        dz_c = cast(dz, w_c.dtype)
        dh_prev = cast(tf.matmul(dz_c, w_t), tf.float32)
        return (t - 1, dh_prev, dc * f[t], *(a.write(t, v) for a, v in zip(arrays, (dz, dz_c), strict=True)))

    arrays = tensor_arrays(steps, batch, [(4 * units, tf.float32), (4 * units, w_c.dtype)])
    _, dh0, dc0, *arrays = tf.while_loop(lambda t, *_: t >= 0, body,
                                         (tf.constant(steps - 1), dh_T, dc_T, *arrays),
                                         maximum_iterations=steps)
    dzs, dzs_c = (a.stack() for a in arrays)
    return dzs, dzs_c, dh0, dc0


def lstm_sequence_fast(
    x_proj: tf.Tensor, h0: tf.Tensor, c0: tf.Tensor, w_h: tf.Tensor, *,
    compute_dtype: tf.DType = tf.float32,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Same contract as `lstm_sequence_reference`, with the hand-written gradient."""
    w_h = tf.convert_to_tensor(w_h)

    @tf.custom_gradient
    def run(x_proj: tf.Tensor, h0: tf.Tensor, c0: tf.Tensor, w_h: tf.Tensor):  # noqa: ANN202
        w_c = cast(w_h, compute_dtype)
        hs, cs, zs, h_prev = _forward(tf.transpose(x_proj, [1, 0, 2]), h0, c0, w_c)
        outputs = tf.transpose(hs, [1, 0, 2])

        def grad(d_out: tf.Tensor | None, dh_T: tf.Tensor | None, dc_T: tf.Tensor | None):  # noqa: ANN202
            dhs = tf.transpose(zeros_if_none(d_out, outputs), [1, 0, 2])
            dzs, dzs_c, dh0, dc0 = _backward(dhs, zeros_if_none(dh_T, h0), zeros_if_none(dc_T, c0),
                                             zs, cs, c0, w_c)
            units = h0.shape[-1]
            # The whole window's recurrent weight gradient in one matmul: [H, T*B] @ [T*B, 4H].
            dw_h = tf.matmul(tf.reshape(h_prev, [-1, units]), tf.reshape(dzs_c, [-1, 4 * units]),
                             transpose_a=True)
            return tf.transpose(dzs, [1, 0, 2]), dh0, dc0, cast(dw_h, tf.float32)

        return (outputs, hs[-1], cs[-1]), grad

    return run(x_proj, h0, c0, w_h)
