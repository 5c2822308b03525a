"""Training-step throughput, model-FLOPs utilisation, compile time and memory.

Usage::

    python -m benchmarks                      # the suite of this backend (gpu or cpu)
    python -m benchmarks --suite cpu --peers  # tiny sizes, with the PyTorch peers
    python -m benchmarks --only resnet50 lstm_2x1024 --steps 50 --windows 5 \\
        --json results.json --plot results.png

What is measured, per workload (`benchmarks.specs`): the TRAINING step of a `jaxmodels` model
on a synthetic batch held on the device, with no input pipeline in the timed loop. The state
comes from `jaxmodels.training.create_train_state` on a data-parallel mesh (``--devices``: one
device by default, or all), the step from `jaxmodels.training.compile_train_step` (jit, state
donated). Each workload runs in a fresh process (so peak memory is its own); ``--in-process``
runs them all in this one. SIGTERM or Ctrl-C stops the run: the running workload's process
is killed (with ``--in-process``, the running workload ends first), the table and files get
what was measured (rows ``stopped`` for the rest), and the process then ends by that signal.

Columns of the table (and keys of the ``--json`` rows):

* ``first step s``: wall time of the first step, compilation included (the state exists);
  ``compile s``: the XLA compilation inside it (JAX's compile events; the JSON rows also
  have ``trace_lower_s``, tracing and lowering to MLIR);
* ``step ms``: after warm-up, R windows of K steps each, each ended by
  ``jax.block_until_ready``; the median over windows of window time / K (the JSON rows have
  each window's as ``window_ms``; a row whose slowest window is 1.5x its fastest says
  "unsteady" in its note);
* ``items/s`` = batch / step time; ``tokens/s`` = batch x sequence length / step time;
* ``TFLOP/s`` = model FLOPs per step / step time, where model FLOPs = 3 x the forward FLOPs
  counted from the forward pass's jaxpr (`benchmarks.flops`), the same count for the peers;
* ``MFU %`` = TFLOP/s / the device's peak at the row's precision (`benchmarks.specs`; blank
  for an unknown device unless ``--peak-tflops`` is given, and for TF32 rows); the JSON rows
  have that peak as ``peak_tflops``, the metadata the peaks of the run;
* ``peak mem GiB``: ``peak_bytes_in_use`` of the device allocator (blank where the backend
  does not report it, e.g. on CPU);
* ``ours/peer`` (peer rows): our best items/s for the workload over the peer's.

``--peers`` times the same workloads in PyTorch in a separate process (`benchmarks.peers`).
Families not built yet appear as skipped rows with the reason. ``--set KEY=VALUE`` changes a
model setting of our runs, ``--batch N`` the batch of every run, ``--impls`` picks our
implementations, ``--xla-flags`` adds XLA flags to our workload processes. ``--profile DIR``
adds, per workload, where the step's time goes (`benchmarks.profile`; a profile that fails
leaves the row's timings and says so in its note). Output paths (``--json``, ``--plot`` with
an image ending such as ``.png``, ``--profile``) are checked before anything is measured.

Without a GPU, ``python -m benchmarks.compiled --target h200`` compiles the steps for one
(`benchmarks.compiled`: kernels, kernel I/O, matmul FLOPs and memory of the compiled step).

Modules: `specs` (workloads, sizes, peak FLOP/s), `workloads` (JAX builders), `flops` (FLOP
counter), `timing` (protocol and derived numbers), `measure` (one JAX run), `profile` (trace
and attribution), `peers` (PyTorch), `report` (table, JSON, plot), `cli`, `compiled`
(compile-only analysis for a GPU target). Only JAX, Flax,
Optax, NumPy and `jaxmodels` are imported at module level; PyTorch, torchvision and
matplotlib only when used.
"""
