"""How TensorFlow runs the train step's ops: `compile(step_executor=...)`.

TensorFlow's default executor (`"parallel"`) starts every op whose inputs are
ready, on its inter-op threads, so independent ops and their temporaries are
alive together (in float32 on the CPU the step's modules differentiate one
after another, `SOLOv2._staged_gradients`, but the ops within one still
overlap). On a CPU each op already runs on every core (intra-op threads);
`"sequential"` runs them one at a time in a fixed order, as PyTorch's eager
mode does, which lowers the step's memory peak, at a cost in time where the
ops are small. Batch 2, float32, peak RSS after 12 steps, against one pass
with the default executor: R50 at 512² 2.79–2.86 against 3.06–3.10 GB for
14–19 % more time, light R18 at 800×1344 3.88 against 4.24 GB at the same
time; R50 at 512² under `mixed_bfloat16` 0.08–0.19 GB less for up to 22 %
more time; the demo's light R18 at 8 × 128² 42 % more time for nothing. It
runs no micro-batches (the `tf.while_loop` is far slower on that executor),
so for float32 images of 512² and more, which `compile`'s default
`micro_batch_size="auto"` runs one at a time (2.68–2.79 GB in both cases),
the default uses less (README, "Training with less memory").

TensorFlow has no public per-function switch for this (the public one,
`tf.config.threading.set_inter_op_parallelism_threads(1)`, is process-wide
and must be set before TensorFlow runs anything). Its single-threaded executor
is selected per `tf.function` call through the eager context's function-call
options, the mechanism behind TensorFlow's own
`context.function_executor_type`. That executor refuses reference-typed
tensors, which Grappler's memory optimiser creates when it rewrites a sum of
gradients into an accumulator (`AddN` → `TemporaryVariable`), so that rewrite
is off for these calls. Where these internals are missing (another
TensorFlow), the step runs with the default executor and a warning says so.
"""

import contextlib
import copy
import warnings

import tensorflow as tf

STEP_EXECUTORS = ("parallel", "sequential")


def check_step_executor(value, strategy, jit_compile=False, micro_batch_size=None, steps_per_execution=1):
    """`value` if it names a step executor that can run here, else a
    `ValueError` naming the field and why.

    `"sequential"` is for a step on the CPU alone: `tf.distribute` replicas
    (and accelerators' streams) must run at once; an XLA-compiled step is one
    op to the executor; and TensorFlow runs `tf.while_loop` bodies far
    slower on that executor, hence no micro-batches (R50 float32 4.1 against
    2.5 s per step) and no `steps_per_execution` > 1 (a tiny model's epoch of
    16 steps: 1 s in parallel, not done after 9 minutes).

    >>> check_step_executor("sequential", tf.distribute.get_strategy())
    'sequential'
    """
    if value not in STEP_EXECUTORS:
        raise ValueError(f"step_executor must be one of {', '.join(map(repr, STEP_EXECUTORS))}, got {value!r}.")
    if value == "parallel":
        return value
    why = None
    if strategy.num_replicas_in_sync > 1:
        why = f"the step has {strategy.num_replicas_in_sync} tf.distribute replicas, which must run at once"
    elif tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"):
        why = "a GPU or TPU is visible"
    elif jit_compile is True:
        why = "under jit_compile=True XLA compiles the step into one op"
    elif micro_batch_size is not None:
        why = ("TensorFlow runs the micro-batch loop (a tf.while_loop) far slower on that executor; for both, "
               "set tf.config.threading.set_inter_op_parallelism_threads(1) before TensorFlow starts")
    elif steps_per_execution not in (None, 1):
        why = (f"steps_per_execution={steps_per_execution} runs the steps in a tf.while_loop, which TensorFlow "
               "runs far slower on that executor")
    if why:
        raise ValueError(f"step_executor='sequential' runs the step's ops one at a time on the CPU alone, but {why}.")
    return value


_warned = []


def _eager_context():
    """The eager context, and its config proto with Grappler's memory
    optimiser off (TensorFlow internals: `AttributeError`/`ImportError`
    where they differ)."""
    from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
    from tensorflow.python.eager import context

    ctx = context.context()
    config = config_pb2.ConfigProto.FromString(ctx.function_call_options.config_proto_serialized)
    config.graph_options.rewrite_options.memory_optimization = rewriter_config_pb2.RewriterConfig.NO_MEM_OPT
    return ctx, config


@contextlib.contextmanager
def sequential_function_calls():
    """`tf.function` calls made inside (and the calls traced inside) run
    their ops one at a time, each still on all intra-op threads.

    Example:
    >>> f = tf.function(lambda x: tf.reduce_sum(tf.square(x)))
    >>> with sequential_function_calls():
    ...     float(f(tf.ones((2, 3))))
    6.0
    """
    try:
        ctx, config = _eager_context()
        saved = copy.copy(ctx.function_call_options)
    except (ImportError, AttributeError, TypeError) as error:
        if not _warned:
            _warned.append(True)
            warnings.warn(
                f"keras_solov2: this TensorFlow ({tf.__version__}) has no per-call executor option "
                f"({error}); the train step runs with the default executor (more memory, same "
                "results). compile(step_executor='parallel') silences this.",
                stacklevel=3,
            )
        yield
        return
    # Thread-local: other threads' calls keep their own options.
    ctx.function_call_options.executor_type = "SINGLE_THREADED_EXECUTOR"
    ctx.function_call_options.config_proto_serialized = config
    try:
        yield
    finally:
        ctx.function_call_options = saved


def sequential(function):
    """`function` (a Keras train function) called under `sequential_function_calls`."""

    def call(*args, **kwargs):
        with sequential_function_calls():
            return function(*args, **kwargs)

    call.runs_sequentially = True
    return call
