"""A train step's backward pass run stage by stage, one module's at a time.

TensorFlow's graph executor starts every op whose inputs are ready. In
SOLOv2's backward pass the gradients of the instance head's two towers, of
the mask-feature branch and of the FPN's levels become ready together, so
their backward passes run at once and their temporaries (Winograd tiles of
the 128² maps, GroupNorm gradients of all grid levels) are alive together.
PyTorch's autograd runs one op after another. `BackwardStages` records the
forward pass as a sequence of stages, each under its own `GradientTape`,
and differentiates them in reverse order, each stage only once the previous
one has finished (a control edge). Inside a stage the executor keeps its
parallelism, so small ops still overlap.

`SOLOv2._staged_gradients` says where it lowers the peak (and where not).

The gradients equal those of one tape over the whole forward pass, up to
the order in which a tensor used by two stages sums its two gradients.
"""

import tensorflow as tf


class BackwardStages:
    """Forward pass in stages, backward pass in reverse, one stage at a time.

    `run(fn, *args)` calls `fn(*args)` under a tape that watches the
    floating-point tensors of `args` (and, as any tape, the trainable
    variables `fn` reads). `gradients(target, variables)` then
    differentiates `target` (computed by the last stage) and runs each
    earlier stage's backward pass after the later one's has finished,
    passing on the gradients of the tensors the stages share (a stage's
    inputs that no earlier stage made get none).

    Example:
    >>> import tensorflow as tf
    >>> w = tf.Variable(2.0)
    >>> stages = BackwardStages()
    >>> y = stages.run(lambda x: w * x, tf.constant(3.0))
    >>> z = stages.run(lambda y: w * y * y, y)
    >>> [float(g) for g in stages.gradients(z, [w])]  # z = w³·9
    [108.0]
    """

    def __init__(self):
        self._stages = []  # (tape, watched inputs, flat outputs)

    def run(self, fn, *args):
        """`fn(*args)`, recorded as the next stage. Returns `fn`'s result."""
        # Once each: the gradient for a source is its total over all its uses.
        inputs = list({id(t): t for t in tf.nest.flatten(args) if _differentiable(t)}.values())
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            result = fn(*args)
        outputs = [t for t in tf.nest.flatten(result) if _differentiable(t)]
        self._stages.append((tape, inputs, outputs))
        return result

    def gradients(self, target, variables):
        """Gradients of the scalar `target` (a last stage's result) for `variables`.

        Returns:
            A list as `variables`: each variable's gradient summed over the
            stages that read it, `None` where none did.
        """
        if not self._stages:
            raise ValueError("BackwardStages.gradients: no stage was run.")
        variables = list(variables)
        count = len(variables)
        totals = [None] * count
        pending = {}  # id(tensor) → its gradient so far, from later stages
        done = []  # the gradients the previous stage computed
        # An input no earlier stage made (e.g. the images) needs no gradient.
        maker = {}  # id(tensor) → the first stage that returned it
        for i, (_, _, outputs) in enumerate(self._stages):
            for t in outputs:
                maker.setdefault(id(t), i)
        for index, (tape, inputs, outputs) in enumerate(reversed(self._stages)):
            position = len(self._stages) - 1 - index
            inputs = [t for t in inputs if maker.get(id(t), position) < position]
            if index == 0:
                targets, upstream = [target], None
            else:
                pairs = [(t, pending.pop(id(t))) for t in outputs if id(t) in pending]
                if not pairs:
                    continue
                targets = [t for t, _ in pairs]
                upstream = _after([g for _, g in pairs], done)
            grads = tape.gradient(targets, variables + inputs, output_gradients=upstream)
            for i, g in enumerate(grads[:count]):
                totals[i] = _sum(totals[i], g)
            for t, g in zip(inputs, grads[count:]):
                if g is not None:
                    pending[id(t)] = _sum(pending.get(id(t)), g)
            done = [g for g in grads if g is not None] or done
        return totals


def _differentiable(t):
    return tf.is_tensor(t) and t.dtype.is_floating


def _sum(a, b):
    if a is None or b is None:
        return b if a is None else a
    return tf.convert_to_tensor(a) + tf.convert_to_tensor(b)  # IndexedSlices too


def _after(tensors, dependencies):
    """`tensors`, available only once every tensor of `dependencies` exists."""
    if not dependencies:
        return tensors
    with tf.control_dependencies([tf.group(*dependencies)]):
        return [tf.identity(t) for t in tensors]
