"""Optimizers from scratch, as the notes build them (d2l style, the notes' chapter
"优化算法", the ``sgd`` / ``train_ch7`` code and section 72 of
the notes), runnable without the d2l package.

Two kinds of functions live here:

* The notes' functions, as the notes wrote them: ``sgd``, ``sgd_momentum``, ``adagrad``,
  ``rmsprop``, ``adadelta``, ``adam``, each ``fn(params, states, hyperparams)`` with an
  ``init_*_states(feature_dim)`` beside it, for the linear-regression model of ``train_ch7``
  (``params = [w, b]``, ``w``: (feature_dim, 1), ``b``: (1,)). The notes' "优化算法" chapter keeps
  only the prose and the ``sgd`` code of the book it follows (Dive-into-DL-PyTorch, chapter 7,
  "7.4 动量法" .. "7.8 Adam算法"); the other five functions are that book's from-scratch code for
  the sections the notes summarize. Their conventions are not torch's: eps inside the square root
  for AdaGrad/RMSProp, the learning rate inside the momentum velocity, hard-coded betas and eps.
* ``sgd_step_``, ``adam_step_``, ``adagrad_step_``, ``rmsprop_step_``, ``adadelta_step_``: one step
  of ``torch.optim.<X>(foreach=False)`` (its ``_single_tensor_*`` formulas) over lists of tensors,
  with exactly the positional signatures and semantics of the ``pyfastdl::*_step_`` op schemas in
  ``csrc/ops.cpp``. Plain per-tensor torch ops, float32 math for float16/bfloat16/float32 params
  (float64 for float64), in place. They are the ``reference`` backend of ``pyfastdl.optim`` and the
  oracle of the kernels' tests.

Polyak 1964 (momentum); Duchi et al. 2011 (AdaGrad); Tieleman & Hinton 2012 (RMSProp);
Zeiler 2012 (AdaDelta); Kingma & Ba 2014 (Adam); Loshchilov & Hutter 2019 (AdamW).
"""
import torch

__all__ = [
    "sgd",
    "init_momentum_states", "sgd_momentum",
    "init_adagrad_states", "adagrad",
    "init_rmsprop_states", "rmsprop",
    "init_adadelta_states", "adadelta",
    "init_adam_states", "adam",
    "sgd_step_", "adam_step_", "adagrad_step_", "rmsprop_step_", "adadelta_step_",
]


# ---- the notes' functions ---------------------------------------------------------------------------
# Modernized only where the book's code no longer runs on its own: its init_*_states() read a
# global `features` (from d2l.get_data_ch7()); here they take feature_dim (as d2l 2.0 does) and a
# dtype (default the book's float32) so the tests can run them in float64. The update math and the
# in-place idioms (p.data -= ..., s[:] = ..., v.data = ...) are the book's.

def sgd(params, states, hyperparams):
    """The notes' minibatch SGD (``002_*.txt``, "Stochastic Gradient Descent"; book 7.3):
    p -= lr * grad. No division by the batch size: ``train_ch7`` backpropagates the *mean* loss.
    ``states`` is unused (None). hyperparams: {'lr'}."""
    for p in params:
        p.data -= hyperparams['lr'] * p.grad.data


def init_momentum_states(feature_dim, dtype=torch.float32):
    """Velocities (v_w: (feature_dim, 1), v_b: (1,)), zeros. Notes "动量法" (book 7.4.3)."""
    v_w = torch.zeros((feature_dim, 1), dtype=dtype)
    v_b = torch.zeros(1, dtype=dtype)
    return (v_w, v_b)


def sgd_momentum(params, states, hyperparams):
    """The notes' momentum (``003_*.txt`` "动量法", section 72.5 of the notes; book 7.4.3):
    v = momentum * v + lr * grad; p -= v. hyperparams: {'lr', 'momentum'}.
    Unlike torch.optim.SGD the learning rate sits inside the velocity (torch: buf = momentum * buf +
    (1 - dampening) * g, p -= lr * buf); with a constant lr and dampening=0 the two are equal."""
    for p, v in zip(params, states):
        v.data = hyperparams['momentum'] * v.data + hyperparams['lr'] * p.grad.data
        p.data -= v.data


def init_adagrad_states(feature_dim, dtype=torch.float32):
    """Sums of squared gradients (s_w: (feature_dim, 1), s_b: (1,)), zeros. Notes "AdaGrad算法"
    (book 7.5.3)."""
    s_w = torch.zeros((feature_dim, 1), dtype=dtype)
    s_b = torch.zeros(1, dtype=dtype)
    return (s_w, s_b)


def adagrad(params, states, hyperparams):
    """The notes' AdaGrad (``003_*.txt`` "AdaGrad算法"; book 7.5.3): s += grad^2;
    p -= lr * grad / sqrt(s + eps), eps = 1e-6 *inside* the square root (torch.optim.Adagrad:
    sqrt(s) + eps, eps=1e-10, plus lr_decay). hyperparams: {'lr'}."""
    eps = 1e-6
    for p, s in zip(params, states):
        s.data += (p.grad.data**2)
        p.data -= hyperparams['lr'] * p.grad.data / torch.sqrt(s + eps)


def init_rmsprop_states(feature_dim, dtype=torch.float32):
    """Moving averages of squared gradients (s_w: (feature_dim, 1), s_b: (1,)), zeros.
    Notes "RMSProp" (book 7.6.2)."""
    s_w = torch.zeros((feature_dim, 1), dtype=dtype)
    s_b = torch.zeros(1, dtype=dtype)
    return (s_w, s_b)


def rmsprop(params, states, hyperparams):
    """The notes' RMSProp (``003_*.txt`` "RMSProp"; book 7.6.2): s = gamma * s + (1 - gamma) *
    grad^2; p -= lr * grad / sqrt(s + eps), eps = 1e-6 inside the square root (torch.optim.RMSprop:
    sqrt(s) + eps, eps=1e-8; its `alpha` is the notes' `gamma`). hyperparams: {'lr', 'gamma'}."""
    gamma, eps = hyperparams['gamma'], 1e-6
    for p, s in zip(params, states):
        s.data = gamma * s.data + (1 - gamma) * (p.grad.data)**2
        p.data -= hyperparams['lr'] * p.grad.data / torch.sqrt(s + eps)


def init_adadelta_states(feature_dim, dtype=torch.float32):
    """((s_w, delta_w), (s_b, delta_b)): moving averages of squared gradients and of squared
    updates, zeros; w-shaped (feature_dim, 1), b-shaped (1,). Notes "AdaDelta" (book 7.7.2)."""
    s_w, s_b = torch.zeros((feature_dim, 1), dtype=dtype), torch.zeros(1, dtype=dtype)
    delta_w, delta_b = torch.zeros((feature_dim, 1), dtype=dtype), torch.zeros(1, dtype=dtype)
    return ((s_w, delta_w), (s_b, delta_b))


def adadelta(params, states, hyperparams):
    """The notes' AdaDelta (``003_*.txt`` "AdaDelta"; book 7.7.2), no learning rate:
    s = rho * s + (1 - rho) * grad^2; g' = grad * sqrt((delta + eps) / (s + eps)); p -= g';
    delta = rho * delta + (1 - rho) * g'^2, eps = 1e-5. The same math as torch.optim.Adadelta with
    lr=1.0, eps=1e-5 (torch's defaults: lr=1.0, eps=1e-6). hyperparams: {'rho'}."""
    rho, eps = hyperparams['rho'], 1e-5
    for p, (s, delta) in zip(params, states):
        s[:] = rho * s + (1 - rho) * (p.grad.data**2)
        g = p.grad.data * torch.sqrt((delta + eps) / (s + eps))
        p.data -= g
        delta[:] = rho * delta + (1 - rho) * g * g


def init_adam_states(feature_dim, dtype=torch.float32):
    """((v_w, s_w), (v_b, s_b)): first and second moments, zeros; w-shaped (feature_dim, 1),
    b-shaped (1,). Notes "Adam算法" (book 7.8.2)."""
    v_w, v_b = torch.zeros((feature_dim, 1), dtype=dtype), torch.zeros(1, dtype=dtype)
    s_w, s_b = torch.zeros((feature_dim, 1), dtype=dtype), torch.zeros(1, dtype=dtype)
    return ((v_w, s_w), (v_b, s_b))


def adam(params, states, hyperparams):
    """The notes' Adam (``003_*.txt`` "Adam算法", section 72.6 of the notes; book 7.8.2):
    v = beta1 * v + (1 - beta1) * grad; s = beta2 * s + (1 - beta2) * grad^2; bias corrections by
    1 - beta^t; p -= lr * v_hat / (sqrt(s_hat) + eps), beta1=0.9, beta2=0.999, eps=1e-6 (outside
    the root, after the bias correction: torch.optim.Adam's math with eps=1e-6; torch's default eps
    is 1e-8). The time step comes in hyperparams['t'] (start it at 1) and is incremented here after
    the update of all params. hyperparams: {'lr', 't'}."""
    beta1, beta2, eps = 0.9, 0.999, 1e-6
    for p, (v, s) in zip(params, states):
        v[:] = beta1 * v + (1 - beta1) * p.grad.data
        s[:] = beta2 * s + (1 - beta2) * p.grad.data**2
        v_bias_corr = v / (1 - beta1 ** hyperparams['t'])
        s_bias_corr = s / (1 - beta2 ** hyperparams['t'])
        p.data -= hyperparams['lr'] * v_bias_corr / (torch.sqrt(s_bias_corr) + eps)
    hyperparams['t'] += 1


# ---- like torch: one step of torch.optim.<X>(foreach=False) over lists --------------------------------
# Contract (csrc/ops.cpp, "fused optimizers"): list i of every argument describes params[i]; all
# params share one device and one dtype (float16/bfloat16/float32/float64); grads have the params'
# dtype and shapes and are read-only; state tensors have params[i]'s shape, float32 for
# float16/bfloat16 params and the params' dtype otherwise; an absent state is an empty list;
# state_steps are 0-dim float32/float64 tensors (CPU or the params' device), incremented here before
# use; grad_scale / found_inf are None or 1-element float32 tensors on the params' device:
# found_inf != 0 writes nothing, otherwise every gradient is divided by grad_scale. Every check
# below runs before the first write.

_LOW = (torch.float16, torch.bfloat16)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _opmath(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_params_grads(op, params, grads):
    n = len(params)
    if len(grads) != n:
        raise RuntimeError(f"{op}: grads has {len(grads)} tensors, expected {n} (one per param)")
    if n == 0:
        return
    dtype, device = params[0].dtype, params[0].device
    if dtype not in _FLOATS:
        raise RuntimeError(f"{op}: params must be float16, bfloat16, float32 or float64, got {dtype}")
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.dtype != dtype or p.device != device:
            raise RuntimeError(f"{op}: params[{i}] is {p.dtype} on {p.device}; all params must share "
                             f"params[0]'s dtype {dtype} and device {device}")
        if g.shape != p.shape:
            raise RuntimeError(f"{op}: grads[{i}] has shape {tuple(g.shape)}, expected params[{i}]'s "
                             f"shape {tuple(p.shape)}")
        if g.dtype != dtype or g.device != device:
            raise RuntimeError(f"{op}: grads[{i}] is {g.dtype} on {g.device}, expected the params' "
                             f"{dtype} on {device}")
        if g.layout != torch.strided:
            raise RuntimeError(f"{op}: grads[{i}] is {g.layout}; only dense gradients are supported")


def _check_state(op, name, tensors, params, present, absent_reason=""):
    """present: the state must hold one tensor per param; else it must be empty."""
    if not present:
        if len(tensors) != 0:
            raise RuntimeError(f"{op}: {name} must be empty ({absent_reason}), got {len(tensors)} tensors")
        return
    if len(tensors) != len(params):
        raise RuntimeError(f"{op}: {name} has {len(tensors)} tensors, expected {len(params)} (one per param)")
    for i, (s, p) in enumerate(zip(tensors, params)):
        sdtype = torch.float32 if p.dtype in _LOW else p.dtype
        if s.shape != p.shape:
            raise RuntimeError(f"{op}: {name}[{i}] has shape {tuple(s.shape)}, expected params[{i}]'s "
                             f"shape {tuple(p.shape)}")
        if s.dtype != sdtype or s.device != p.device:
            raise RuntimeError(f"{op}: {name}[{i}] is {s.dtype} on {s.device}, expected {sdtype} on "
                             f"{p.device} for {p.dtype} params")


def _check_steps(op, state_steps, params):
    if len(state_steps) != len(params):
        raise RuntimeError(f"{op}: state_steps has {len(state_steps)} tensors, expected {len(params)} "
                         f"(one per param)")
    for i, (s, p) in enumerate(zip(state_steps, params)):
        if s.dim() != 0 or s.dtype not in (torch.float32, torch.float64):
            raise RuntimeError(f"{op}: state_steps[{i}] must be a 0-dim float32/float64 tensor, got "
                             f"{s.dtype} of shape {tuple(s.shape)}")
        if s.device.type != "cpu" and s.device != p.device:
            raise RuntimeError(f"{op}: state_steps[{i}] is on {s.device}, expected the CPU or the "
                             f"params' device {p.device}")


def _check_amp(op, grad_scale, found_inf, params):
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is None:
            continue
        if t.numel() != 1 or t.dtype != torch.float32:
            raise RuntimeError(f"{op}: {name} must be a 1-element float32 tensor, got {t.dtype} with "
                             f"{t.numel()} elements")
        if params and t.device != params[0].device:
            raise RuntimeError(f"{op}: {name} is on {t.device}, expected the params' device "
                             f"{params[0].device}")


def _skip(found_inf):
    return found_inf is not None and found_inf.item() != 0


def _grad(grad, grad_scale, maximize, opmath):
    """The gradient in opmath precision, unscaled and negated for maximize, never grad itself
    modified (the callers use only out-of-place ops on it)."""
    g = grad.to(opmath)
    if grad_scale is not None:
        g = g / grad_scale.item()
    return -g if maximize else g


def sgd_step_(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov,
              maximize, first_step, grad_scale, found_inf):
    """torch.optim.SGD's step (``_single_tensor_sgd``) over lists, in place.
    params, grads, momentum_buffers: lists of tensors of params[i]'s shape (momentum_buffers empty
    when momentum == 0; with first_step=True their content is ignored and set to g).
    g = (maximize ? -grad : grad) + weight_decay * p; momentum: buf = first_step ? g :
    momentum * buf + (1 - dampening) * g, g = nesterov ? g + momentum * buf : buf; p -= lr * g."""
    op = "sgd_step_"
    _check_params_grads(op, params, grads)
    _check_state(op, "momentum_buffers", momentum_buffers, params, momentum != 0, "momentum == 0")
    _check_amp(op, grad_scale, found_inf, params)
    if not params or _skip(found_inf):
        return
    opmath = _opmath(params[0].dtype)
    with torch.no_grad():
        for i, param in enumerate(params):
            p = param.to(opmath)  # param itself for float32/float64
            g = _grad(grads[i], grad_scale, maximize, opmath)
            if weight_decay != 0:
                g = g.add(p, alpha=weight_decay)
            if momentum != 0:
                buf = momentum_buffers[i]
                if first_step:
                    buf.copy_(g)
                else:
                    buf.mul_(momentum).add_(g, alpha=1 - dampening)
                g = g.add(buf, alpha=momentum) if nesterov else buf
            p.add_(g, alpha=-lr)
            if p is not param:
                param.copy_(p)


def adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params,
               lr, beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay,
               grad_scale, found_inf):
    """torch.optim.Adam / AdamW's step (``_single_tensor_adam``) over lists, in place.
    exp_avgs, exp_avg_sqs, max_exp_avg_sqs (empty unless amsgrad): params[i]'s shape.
    state_steps: 0-dim, incremented first; t = the new value. master_params: empty, or one float32
    tensor per float16/bfloat16 param, updated in float32 and rounded into params (whose own values
    are then not read). decoupled_weight_decay (AdamW): p *= 1 - lr * weight_decay, else
    g += weight_decay * p. m = lerp(m, g, 1 - beta1); v = beta2 * v + (1 - beta2) * g^2;
    vmax = max(vmax, v); p -= lr / (1 - beta1^t) * m / (sqrt(v or vmax) / sqrt(1 - beta2^t) + eps)."""
    op = "adam_step_"
    _check_params_grads(op, params, grads)
    _check_state(op, "exp_avgs", exp_avgs, params, True)
    _check_state(op, "exp_avg_sqs", exp_avg_sqs, params, True)
    _check_state(op, "max_exp_avg_sqs", max_exp_avg_sqs, params, amsgrad, "amsgrad=False")
    _check_steps(op, state_steps, params)
    if len(master_params) != 0:
        _check_state(op, "master_params", master_params, params, True)
        if params[0].dtype not in _LOW:
            raise RuntimeError(f"{op}: master_params must be empty for {params[0].dtype} params "
                             f"(they are for float16/bfloat16 params)")
    _check_amp(op, grad_scale, found_inf, params)
    if not params or _skip(found_inf):
        return
    opmath = _opmath(params[0].dtype)
    with torch.no_grad():
        for i, param in enumerate(params):
            p = master_params[i] if master_params else param.to(opmath)
            g = _grad(grads[i], grad_scale, maximize, opmath)
            exp_avg, exp_avg_sq = exp_avgs[i], exp_avg_sqs[i]
            state_steps[i] += 1
            step = state_steps[i].item()
            if weight_decay != 0:
                if decoupled_weight_decay:
                    p.mul_(1 - lr * weight_decay)
                else:
                    g = g.add(p, alpha=weight_decay)
            exp_avg.lerp_(g, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            step_size = lr / bias_correction1
            bias_correction2_sqrt = bias_correction2**0.5
            if amsgrad:
                torch.maximum(max_exp_avg_sqs[i], exp_avg_sq, out=max_exp_avg_sqs[i])
                denom = (max_exp_avg_sqs[i].sqrt() / bias_correction2_sqrt).add_(eps)
            else:
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            p.addcdiv_(exp_avg, denom, value=-step_size)
            if p is not param:
                param.copy_(p)


def adagrad_step_(params, grads, state_sums, state_steps, lr, lr_decay, weight_decay, eps, maximize,
                  grad_scale, found_inf):
    """torch.optim.Adagrad's step (``_single_tensor_adagrad``, dense) over lists, in place.
    state_sums: params[i]'s shape. t = step after the increment; clr = lr / (1 + (t - 1) * lr_decay);
    sum += g^2; p -= clr * g / (sqrt(sum) + eps)."""
    op = "adagrad_step_"
    _check_params_grads(op, params, grads)
    _check_state(op, "state_sums", state_sums, params, True)
    _check_steps(op, state_steps, params)
    _check_amp(op, grad_scale, found_inf, params)
    if not params or _skip(found_inf):
        return
    opmath = _opmath(params[0].dtype)
    with torch.no_grad():
        for i, param in enumerate(params):
            p = param.to(opmath)
            g = _grad(grads[i], grad_scale, maximize, opmath)
            state_steps[i] += 1
            step = state_steps[i].item()
            if weight_decay != 0:
                g = g.add(p, alpha=weight_decay)
            clr = lr / (1 + (step - 1) * lr_decay)
            state_sums[i].addcmul_(g, g, value=1)
            std = state_sums[i].sqrt().add_(eps)
            p.addcdiv_(g, std, value=-clr)
            if p is not param:
                param.copy_(p)


def rmsprop_step_(params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, lr, alpha,
                  eps, weight_decay, momentum, centered, maximize, grad_scale, found_inf):
    """torch.optim.RMSprop's step (``_single_tensor_rmsprop``) over lists, in place.
    square_avgs; grad_avgs (empty unless centered); momentum_buffers (empty unless momentum > 0):
    params[i]'s shape. sq = alpha * sq + (1 - alpha) * g^2; centered: ga = lerp(ga, g, 1 - alpha),
    avg = sqrt(sq - ga^2) + eps, else avg = sqrt(sq) + eps; momentum > 0: buf = momentum * buf +
    g / avg, p -= lr * buf; else p -= lr * g / avg."""
    op = "rmsprop_step_"
    _check_params_grads(op, params, grads)
    _check_state(op, "square_avgs", square_avgs, params, True)
    _check_state(op, "grad_avgs", grad_avgs, params, centered, "centered=False")
    _check_state(op, "momentum_buffers", momentum_buffers, params, momentum > 0, "momentum == 0")
    _check_steps(op, state_steps, params)
    _check_amp(op, grad_scale, found_inf, params)
    if not params or _skip(found_inf):
        return
    opmath = _opmath(params[0].dtype)
    with torch.no_grad():
        for i, param in enumerate(params):
            p = param.to(opmath)
            g = _grad(grads[i], grad_scale, maximize, opmath)
            square_avg = square_avgs[i]
            state_steps[i] += 1
            if weight_decay != 0:
                g = g.add(p, alpha=weight_decay)
            square_avg.mul_(alpha).addcmul_(g, g, value=1 - alpha)
            if centered:
                grad_avg = grad_avgs[i]
                grad_avg.lerp_(g, 1 - alpha)
                avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
            else:
                avg = square_avg.sqrt()
            avg = avg.add_(eps)
            if momentum > 0:
                buf = momentum_buffers[i]
                buf.mul_(momentum).addcdiv_(g, avg)
                p.add_(buf, alpha=-lr)
            else:
                p.addcdiv_(g, avg, value=-lr)
            if p is not param:
                param.copy_(p)


def adadelta_step_(params, grads, square_avgs, acc_deltas, state_steps, lr, rho, eps, weight_decay,
                   maximize, grad_scale, found_inf):
    """torch.optim.Adadelta's step (``_single_tensor_adadelta``) over lists, in place.
    square_avgs, acc_deltas: params[i]'s shape. sq = rho * sq + (1 - rho) * g^2;
    delta = sqrt(acc + eps) / sqrt(sq + eps) * g; acc = rho * acc + (1 - rho) * delta^2;
    p -= lr * delta."""
    op = "adadelta_step_"
    _check_params_grads(op, params, grads)
    _check_state(op, "square_avgs", square_avgs, params, True)
    _check_state(op, "acc_deltas", acc_deltas, params, True)
    _check_steps(op, state_steps, params)
    _check_amp(op, grad_scale, found_inf, params)
    if not params or _skip(found_inf):
        return
    opmath = _opmath(params[0].dtype)
    with torch.no_grad():
        for i, param in enumerate(params):
            p = param.to(opmath)
            g = _grad(grads[i], grad_scale, maximize, opmath)
            square_avg, acc_delta = square_avgs[i], acc_deltas[i]
            state_steps[i] += 1
            if weight_decay != 0:
                g = g.add(p, alpha=weight_decay)
            square_avg.mul_(rho).addcmul_(g, g, value=1 - rho)
            std = square_avg.add(eps).sqrt_()
            delta = acc_delta.add(eps).sqrt_()
            delta.div_(std).mul_(g)
            acc_delta.mul_(rho).addcmul_(delta, delta, value=1 - rho)
            p.add_(delta, alpha=-lr)
            if p is not param:
                param.copy_(p)
