"""A fully connected network over buffers allocated once.

`DenseStack` is a stack of dense layers: hidden layers are dense -> ReLU
(-> batch norm, if asked), the last layer is dense -> tanh or dense alone
(logits). Forward and backward call the Cython kernels on preallocated
arrays; the training loop allocates nothing.

Memory layout. All trainable parameters live in one flat array `flat_params`
and their gradients in `flat_grads`, with the same layout; `params` and
`grads` map names to views of them ("dense0.weight" of shape (d_in, d_out),
"dense0.bias", "bn0.weight", "bn0.bias"), so one Adam call updates a whole
network and the named arrays are the very memory the kernels update.
Batch-norm running statistics live in `flat_buffers` ("bn0.running_mean",
"bn0.running_var").
"""
from __future__ import annotations

import math

import numpy as np

from . import _kernels as K
from .parallel import blas_threads

OUTPUTS = ("tanh", "linear")


def _own_gemm_pays(crew) -> bool:
    """The AVX-512 kernel runs on one thread: use it in a helper session
    (BLAS is on one thread there too) or when BLAS has only one thread, and
    leave wide products to BLAS's own threads otherwise (GAN(parallel=False))."""
    return crew is not None or blas_threads() == 1


class _Views:
    """The activation and gradient buffers cut to rows start..stop-1 (views, made once)."""

    def __init__(self, stack: "DenseStack", start: int, stop: int):
        self.n = stop - start
        self.pre = [a[start:stop] for a in stack._pre]
        self.post = [a[start:stop] for a in stack._post]
        self.gpre = [a[start:stop] for a in stack._gpre]
        self.gpost = [a[start:stop] for a in stack._gpost]
        self.ginput = stack._ginput[start:stop] if stack._ginput is not None else None


class DenseStack:
    """Fully connected network with every buffer preallocated.

    sizes: layer widths, input first, e.g. [100, 128, 256, 512, 1024, 784].
    hidden_batchnorm: batch norm after each hidden ReLU.
    output: "tanh" or "linear" (logits).
    max_batch: the largest number of rows a forward pass may take.
    input_grad: allocate a buffer for the gradient w.r.t. the input
        (a discriminator needs it to pass gradients to the generator).
    bn_groups: the most groups a training forward may split its rows into,
        each normalised with its own batch statistics (see forward).
    rng: numpy Generator used for the initialisation (PyTorch's nn.Linear
        default: weight and bias uniform in +-1/sqrt(fan_in)).
    """

    def __init__(self, sizes, *, hidden_batchnorm: bool, output: str, max_batch: int,
                 dtype="float32", rng: np.random.Generator, input_grad: bool = False,
                 bn_momentum: float = 0.1, bn_eps: float = 1e-5, bn_groups: int = 1,
                 name: str = "net"):
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"sizes must list at least 2 positive widths, got {sizes}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if bn_groups < 1:
            raise ValueError(f"bn_groups must be >= 1, got {bn_groups}")
        self.bn_groups = int(bn_groups)
        self.name = name
        self.sizes = sizes
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {self.dtype}")
        self.hidden_batchnorm = bool(hidden_batchnorm)
        self.output = output
        self.max_batch = int(max_batch)
        self.bn_momentum = float(bn_momentum)
        self.bn_eps = float(bn_eps)
        self.n_layers = len(sizes) - 1
        self.adam_steps = 0

        self._allocate_parameters()
        self._init_parameters(rng)
        self._allocate_activations(input_grad)
        self._views: dict[tuple, _Views] = {}
        self._plans: dict[tuple, tuple] = {}
        #: Extra keyword arguments for the BackwardPlans (benchmarks tune block_bytes).
        self.plan_options: dict = {}
        self._forward_plans: dict[tuple, tuple] = {}
        self._last_input = None
        self._last_n = 0
        self._last_groups = 1
        self._last_train = False

    # -- allocation ---------------------------------------------------------

    def _param_shapes(self):
        shapes = []
        for i, (d_in, d_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            shapes.append((f"dense{i}.weight", (d_in, d_out)))
            shapes.append((f"dense{i}.bias", (d_out,)))
            if self.hidden_batchnorm and i < self.n_layers - 1:
                shapes.append((f"bn{i}.weight", (d_out,)))
                shapes.append((f"bn{i}.bias", (d_out,)))
        return shapes

    def _allocate_parameters(self):
        shapes = self._param_shapes()
        total = sum(math.prod(s) for _, s in shapes)
        self.flat_params = np.zeros(total, self.dtype)
        self.flat_grads = np.zeros(total, self.dtype)
        self.adam_m = np.zeros(total, self.dtype)
        self.adam_v = np.zeros(total, self.dtype)
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        offset = 0
        for name, shape in shapes:
            size = math.prod(shape)
            self.params[name] = self.flat_params[offset:offset + size].reshape(shape)
            self.grads[name] = self.flat_grads[offset:offset + size].reshape(shape)
            offset += size

        n_bn = self.n_layers - 1 if self.hidden_batchnorm else 0
        bn_sizes = self.sizes[1:1 + n_bn]
        self.flat_buffers = np.zeros(2 * sum(bn_sizes), self.dtype)
        self.buffers: dict[str, np.ndarray] = {}
        offset = 0
        for i, d in enumerate(bn_sizes):
            for stat in ("running_mean", "running_var"):
                self.buffers[f"bn{i}.{stat}"] = self.flat_buffers[offset:offset + d]
                offset += d

        # Each layer's parameters (dense{i}.*, then bn{i}.*) are one slice of
        # the flat arrays: (start, size) per layer, for a per-layer Adam step.
        self._layer_slices = []
        offset = 0
        for i in range(self.n_layers):
            size = sum(math.prod(s) for name, s in shapes if name.startswith((f"dense{i}.", f"bn{i}.")))
            self._layer_slices.append((offset, size))
            offset += size
        L = self.n_layers
        self.W = [self.params[f"dense{i}.weight"] for i in range(L)]
        self.b = [self.params[f"dense{i}.bias"] for i in range(L)]
        self.dW = [self.grads[f"dense{i}.weight"] for i in range(L)]
        self.db = [self.grads[f"dense{i}.bias"] for i in range(L)]
        self.gamma = [self.params[f"bn{i}.weight"] for i in range(n_bn)]
        self.beta = [self.params[f"bn{i}.bias"] for i in range(n_bn)]
        self.dgamma = [self.grads[f"bn{i}.weight"] for i in range(n_bn)]
        self.dbeta = [self.grads[f"bn{i}.bias"] for i in range(n_bn)]
        self.running_mean = [self.buffers[f"bn{i}.running_mean"] for i in range(n_bn)]
        self.running_var = [self.buffers[f"bn{i}.running_var"] for i in range(n_bn)]
        # Batch statistics of the last training forward, one row per group,
        # for the backward.
        self._batch_mean = [np.zeros((self.bn_groups, d), self.dtype) for d in bn_sizes]
        self._batch_invstd = [np.zeros((self.bn_groups, d), self.dtype) for d in bn_sizes]

    def _init_parameters(self, rng: np.random.Generator):
        """PyTorch nn.Linear default; batch norm gamma 1, beta 0, var 1."""
        for i, (d_in, d_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            bound = 1.0 / math.sqrt(d_in)
            # Drawn in float64 and rounded, so float32 and float64 networks
            # from one seed start from the same point.
            self.W[i][...] = rng.uniform(-bound, bound, size=(d_in, d_out))
            self.b[i][...] = rng.uniform(-bound, bound, size=d_out)
        for g in self.gamma:
            g[...] = 1
        for rv in self.running_var:
            rv[...] = 1

    def _allocate_activations(self, input_grad: bool):
        B = self.max_batch
        outs = self.sizes[1:]
        last = self.n_layers - 1
        self._pre = [np.zeros((B, d), self.dtype) for d in outs]
        # Without batch norm a layer's output is its (ReLU'd) pre-activation.
        self._post = [np.zeros((B, d), self.dtype) if self.hidden_batchnorm and i < last
                      else self._pre[i] for i, d in enumerate(outs)]
        self._gpre = [np.zeros((B, d), self.dtype) for d in outs]
        self._gpost = [np.zeros((B, d), self.dtype) if self.hidden_batchnorm and i < last
                       else self._gpre[i] for i, d in enumerate(outs)]
        if self.output == "tanh":
            self._gpost[last] = np.zeros((B, outs[last]), self.dtype)
        self._ginput = np.zeros((B, self.sizes[0]), self.dtype) if input_grad else None

    def views(self, n: int, start: int = 0) -> _Views:
        """Buffers cut to rows start..start+n-1; made on first use, then reused."""
        v = self._views.get((start, n))
        if v is None:
            if not 1 <= n <= self.max_batch - start:
                raise ValueError(f"{self.name}: batch of {n} rows, allowed 1..{self.max_batch}")
            v = self._views[(start, n)] = _Views(self, start, start + n)
        return v

    # -- forward and backward ----------------------------------------------

    def forward(self, x: np.ndarray, *, train: bool = True, update_running: bool = True,
                groups: int = 1, crew=None):
        """Run the network on x (n, sizes[0]); returns the output view (n, sizes[-1]).

        train=True uses batch statistics in batch norm (and, with
        update_running, moves the running statistics); train=False uses the
        running statistics. groups=k (training only) splits the rows into k
        equal groups normalised each with its own statistics, the running
        statistics moved group after group: exactly k forwards of n/k rows,
        with larger GEMMs. The returned array is an internal buffer,
        overwritten by the next forward. The pass runs as one ForwardPlan;
        with a crew (mnistgan.parallel.helper_session) it is shared with the
        helper thread, half of every layer each, with the same result.
        """
        n = x.shape[0] if x.ndim == 2 else -1
        v = self.views(n) if n >= 1 else None
        if v is None or x.shape[1:] != (self.sizes[0],):
            raise ValueError(f"{self.name}: input has shape {x.shape}, expected (n, {self.sizes[0]})")
        if not 1 <= groups <= self.bn_groups or n % groups:
            raise ValueError(f"{self.name}: groups={groups} must divide the {n} rows and be "
                             f"at most bn_groups={self.bn_groups}")
        if train and self.hidden_batchnorm and n // groups < 2:
            raise ValueError(f"{self.name}: batch norm in training mode needs at least 2 rows "
                             f"per group, got {n // groups}")
        last = self.n_layers - 1
        plan = self._forward_plan(x, n, groups, update_running, train)
        plan.start(own_gemm=_own_gemm_pays(crew))
        plan.run(crew)
        self._last_input = x
        self._last_n = n
        self._last_groups = groups
        self._last_train = train
        return v.pre[last]

    def _forward_plan(self, x: np.ndarray, n: int, groups: int, update_running: bool,
                      train: bool) -> K.ForwardPlan:
        """The forward plan for input x (n rows), made on first use and kept
        while the input stays the same array object (the GAN's buffers do)."""
        train = train or not self.hidden_batchnorm  # without batch norm: one kind of pass
        key = (n, groups, update_running, train)
        hit = self._forward_plans.get(key)
        if hit is not None and hit[0] is x:
            return hit[1]
        v = self.views(n)
        last = self.n_layers - 1
        layers = []
        for i in range(self.n_layers):
            act = ("relu_bn" if self.hidden_batchnorm else "relu") if i < last else self.output
            spec = dict(x=x if i == 0 else v.post[i - 1], w=self.W[i], b=self.b[i], y=v.pre[i], act=act)
            if act == "relu_bn":
                spec.update(post=v.post[i], gamma=self.gamma[i], beta=self.beta[i],
                            running_mean=self.running_mean[i], running_var=self.running_var[i])
                if train:
                    spec.update(mean=self._batch_mean[i][:groups], invstd=self._batch_invstd[i][:groups])
            layers.append(spec)
        plan = K.ForwardPlan(layers, groups=groups, momentum=self.bn_momentum, eps=self.bn_eps,
                             update_running=update_running, training=train)
        self._forward_plans[key] = (x, plan)
        return plan

    def grad_output(self, n: int) -> np.ndarray:
        """The buffer (n, sizes[-1]) in which to write dLoss/dOutput before backward."""
        return self.views(n).gpost[self.n_layers - 1]

    def _plan(self, n: int, group: int, *, param_grads: bool, input_grad: bool,
              adam: bool) -> K.BackwardPlan:
        """The backward plan for the n rows of one group of the last forward,
        made on first use and kept while the forward's input stays the same
        array (the GAN's buffers always do)."""
        x_all = self._last_input
        key = (n, group, param_grads, input_grad, adam)
        hit = self._plans.get(key)
        if hit is not None and hit[0] is x_all:
            return hit[1]
        start = group * n
        v = self.views(n, start)
        x = x_all[start:start + n]
        last = self.n_layers - 1
        layers = []
        for i in range(self.n_layers):
            if i < last:
                act = "relu_bn" if self.hidden_batchnorm else "relu"
            else:
                act = self.output
            spec = dict(x=x if i == 0 else v.post[i - 1], w=self.W[i], y=v.pre[i], gout=v.gpost[i],
                        gpre=v.gpre[i], act=act, dw=self.dW[i], db=self.db[i],
                        gx=v.gpost[i - 1] if i > 0 else (v.ginput if input_grad else None),
                        p_lo=self._layer_slices[i][0], p_size=self._layer_slices[i][1])
            if act == "relu_bn":
                spec.update(mean=self._batch_mean[i][group], invstd=self._batch_invstd[i][group],
                            gamma=self.gamma[i], dgamma=self.dgamma[i], dbeta=self.dbeta[i])
            layers.append(spec)
        plan = K.BackwardPlan(layers, param_grads=param_grads, **self.plan_options,
                              adam=(self.flat_params, self.flat_grads, self.adam_m, self.adam_v) if adam else None)
        self._plans[key] = (x_all, plan)
        return plan

    def _start_backward(self, grad_out: np.ndarray, group: int) -> tuple[int, int]:
        """(rows, start row) of the group to backpropagate, grad_out in its buffer."""
        if self._last_n == 0 or self._last_input is None:
            raise RuntimeError(f"{self.name}: backward called before forward")
        if self.hidden_batchnorm and not self._last_train:
            raise RuntimeError(f"{self.name}: backward needs a forward with train=True")
        if not 0 <= group < self._last_groups:
            raise ValueError(f"{self.name}: group {group} of a forward in {self._last_groups} group(s)")
        n = self._last_n // self._last_groups
        gout = self.views(n, group * n).gpost[self.n_layers - 1]
        if grad_out is not gout:
            if getattr(grad_out, "shape", None) != gout.shape:
                raise ValueError(f"{self.name}: grad_out has shape {getattr(grad_out, 'shape', None)}, "
                                 f"expected {gout.shape}")
            np.copyto(gout, grad_out)
        return n, group * n

    def backward(self, grad_out: np.ndarray, *, param_grads: bool = True, input_grad: bool = True,
                 group: int = 0, crew=None):
        """Backpropagate grad_out (n, sizes[-1]) through the last forward pass.

        param_grads=True writes every parameter gradient into `grads`
        (overwriting, not accumulating). param_grads=False computes only what
        the input gradient needs (the gradients in `grads` are then stale).
        After a forward in groups, `group` picks the rows to backpropagate
        (n = rows per group); the other groups take no part.
        Returns the input gradient (n, sizes[0]) if the network has an input
        gradient buffer and input_grad is set, else None. With a crew
        (mnistgan.parallel.helper_session) the helper thread takes the weight
        gradients, or without them half of each input gradient.
        """
        n, start = self._start_backward(grad_out, group)
        want_input = input_grad and self._ginput is not None
        plan = self._plan(n, group, param_grads=param_grads, input_grad=want_input, adam=False)
        plan.start(own_gemm=_own_gemm_pays(crew))
        plan.run(crew)
        return self.views(n, start).ginput if want_input else None

    def backward_and_update(self, grad_out: np.ndarray, lr: float, beta1: float, beta2: float,
                            eps: float, *, crew=None, group: int = 0):
        """backward(grad_out, group=group) and then adam_update(...), as one pass.

        Each layer's Adam step runs as soon as its gradients are final and
        the backward no longer reads its weights. With a crew
        (mnistgan.parallel.helper_session) the helper thread takes the weight
        gradients and Adam steps as the chain makes them possible. The result
        is the same either way, bit for bit.
        The input gradient is not computed.
        """
        n, _ = self._start_backward(grad_out, group)
        plan = self._plan(n, group, param_grads=True, input_grad=False, adam=True)
        plan.start(lr=lr, beta1=beta1, beta2=beta2, eps=eps, step=self.adam_steps + 1,
                   own_gemm=_own_gemm_pays(crew))
        self.adam_steps += 1
        plan.run(crew)

    # -- optimizer ----------------------------------------------------------

    def adam_update(self, lr: float, beta1: float, beta2: float, eps: float):
        """One Adam step of every parameter from the gradients in `grads`."""
        self.adam_steps += 1
        K.adam_step(self.flat_params, self.flat_grads, self.adam_m, self.adam_v,
                    lr=lr, beta1=beta1, beta2=beta2, eps=eps, step=self.adam_steps)

    # -- state --------------------------------------------------------------

    def state(self) -> dict[str, np.ndarray]:
        """Every array that defines this network's training state (views, not copies)."""
        return {"params": self.flat_params, "buffers": self.flat_buffers,
                "adam_m": self.adam_m, "adam_v": self.adam_v,
                "adam_steps": np.array(self.adam_steps, np.int64)}

    def load_state(self, state: dict[str, np.ndarray]):
        """Copy a state() dict back in, checking every shape and dtype."""
        for key in ("params", "buffers", "adam_m", "adam_v"):
            src = np.asarray(state[key])
            dst = getattr(self, "flat_" + key if key in ("params", "buffers") else key)
            if src.shape != dst.shape:
                raise ValueError(f"{self.name}.{key}: shape {src.shape} does not match {dst.shape}")
            if src.dtype != dst.dtype:
                raise ValueError(f"{self.name}.{key}: dtype {src.dtype} does not match {dst.dtype}")
            dst[...] = src
        self.adam_steps = int(state["adam_steps"])

    @property
    def n_params(self) -> int:
        return self.flat_params.size
