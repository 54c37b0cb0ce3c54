"""Speed and memory of every hot path: sampling, the training step, the input pipeline, the envs.

    python scripts/benchmark.py                       # all but precision, torch_reference
    python scripts/benchmark.py --only predict,train  # a selection
    python scripts/benchmark.py --quick               # tiny sizes, seconds (run by the tests)
    python scripts/benchmark.py --only predict --compute-dtype bfloat16  # mixed precision
    python scripts/benchmark.py --only precision  # bfloat16 vs float32 loss over 100 steps
    python scripts/benchmark.py --only predict --pallas-decoder  # GPU: the Pallas decoder
    python scripts/benchmark.py --only predict --trace DIR  # + one profiled call per figure
    python scripts/benchmark.py --only torch_reference  # the same work in PyTorch, this machine
    make benchmark ARGS="--only predict,train"        # as `make train` runs: on tcmalloc

Prints one JSON document and writes it to `--output` (default `benchmark.json`). Each time is
the median of `--repeats` timed runs after a warm-up call; compilation is timed separately.
FLOPs come from XLA's cost analysis of the compiled program; peak memory from XLA's memory
analysis (and the device allocator where it reports one). With `--trace DIR`, one more call of
each `predict_action` figure runs under `jax.profiler.trace` (files under DIR/<figure>), and the
figure's `trace` holds `scripts/trace_summary.py`'s account of the device's kernels in it.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import lift  # pylint: disable=g-import-not-at-top
from dpjax.atomic_write import write_text_atomic
from dpjax.data.normalizer import Normalizer
from dpjax.data.shape_meta import ShapeMeta
from dpjax.diffusion.policy import DiffusionPolicy, PolicyNetwork
from dpjax.errors import report_user_errors
from dpjax.models import cpu_kernels, pallas_decoder
import trace_summary  # pylint: disable=g-import-not-at-top  # scripts/trace_summary.py

FIGURES = ('predict', 'train', 'encoder', 'pipeline', 'env', 'precision', 'torch_reference')
# precision trains 200 steps of the paper-sized network (minutes on a CPU); torch_reference
# needs torch (requirements-test.txt).
DEFAULT_FIGURES = FIGURES[:5]


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
  """Median wall time of `fn()` (blocked until ready) over `repeats` runs, and all runs."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def _cost_flops(cost) -> float | None:
  """The FLOPs of an XLA cost analysis (a list of one per program on older JAX); None for 0."""
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', 0.0)) or None


def _compiled_stats(compiled) -> dict[str, Any]:
  """FLOPs and memory of one compiled program (None where the backend does not say)."""
  out: dict[str, Any] = {'flops': None, 'temp_bytes': None, 'argument_bytes': None,
                         'output_bytes': None}
  try:
    out['flops'] = _cost_flops(compiled.cost_analysis())
  except Exception:  # pylint: disable=broad-except  # Not every backend implements it.
    pass
  try:
    memory = compiled.memory_analysis()
    out['temp_bytes'] = int(memory.temp_size_in_bytes)
    out['argument_bytes'] = int(memory.argument_size_in_bytes)
    out['output_bytes'] = int(memory.output_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    pass
  return out


def _count_kernel_flops(stats: dict[str, Any], jitted, args: tuple, median_s: float) -> None:
  """Where the CPU kernels run, XLA's cost analysis of the compiled program misses their FLOPs:
  count those of the same computation traced with XLA ops (from `args`, which hold no operands
  packed for the kernels), and keep the compiled program's own count as `xla_program_flops`."""
  if not cpu_kernels.enabled(jnp.float32):
    return
  with cpu_kernels.disabled():
    cost = jitted.lower(*args).cost_analysis()
  stats['xla_program_flops'] = stats['flops']
  stats['flops'] = _cost_flops(cost)
  stats['flops_per_s'] = stats['flops'] / median_s if stats['flops'] else None


def _traced_call(fn: Callable[[], Any], trace_dir: str) -> dict[str, Any]:
  """One call of `fn` under the profiler, its trace written below `trace_dir`: its wall time
  and `trace_summary.summarize` of the trace. A profiler that fails (a device without CUPTI,
  say) is reported in the figure's `trace` as `error`, and the figure's timings are kept."""
  try:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      start = time.perf_counter()
      jax.block_until_ready(fn())
      call_s = time.perf_counter() - start
    return dict(trace_summary.summarize(trace_dir), call_s=call_s)
  except Exception as error:  # pylint: disable=broad-except  # A diagnostic, not a figure.
    print(f'benchmark: no trace in {trace_dir}: {error!r}', file=sys.stderr, flush=True)
    return {'error': repr(error)}


def _timed_program(jitted, args: tuple, repeats: int, flops_args: tuple | None = None,
                   trace_dir: str | None = None, threads_state: bool = False) -> dict[str, Any]:
  """Compile time, then the median run time, FLOPs and achieved FLOP/s of `jitted(*args)`;
  `flops_args`: the same computation's arguments before packing for the kernels, if `args`
  hold packed operands; `trace_dir`: also one profiled call (`_traced_call`); `threads_state`:
  `jitted` is a step `(state, *rest) -> (state, out)`, each call taking the state the one before
  returned (a training step donates its state: the buffers passed in are gone after it)."""
  # Under the profiler XLA:GPU would run its CUDA graphs' kernels one launch at a time; the
  # traced call is to launch them as the timed calls do. (The option acts only while tracing.)
  options = {'xla_enable_command_buffers_during_profiling': True} if trace_dir else None
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile(options)
  compile_s = time.perf_counter() - start
  current = list(args)

  def call():
    if not threads_state:
      return compiled(*current)
    current[0], out = compiled(*current)
    return out

  # The warm-up call's own time (first touch of its buffers) stays out of the timed ones.
  jax.block_until_ready(call())
  median_s, times = _median_time(call, repeats)
  stats = _compiled_stats(compiled)
  stats['flops_per_s'] = stats['flops'] / median_s if stats['flops'] else None
  _count_kernel_flops(stats, jitted, flops_args or tuple(current), median_s)
  if trace_dir:
    stats['trace'] = _traced_call(call, trace_dir)
  return dict(stats, compile_s=compile_s, median_s=median_s, times_s=times)


def _synthetic_normalizer(shape_meta: ShapeMeta) -> Normalizer:
  """Stats of random data in the dataset's ranges: timing does not depend on their values."""
  rng = np.random.default_rng(0)
  arrays = _synthetic_obs(shape_meta, (4,), rng)
  arrays['action'] = rng.uniform(-1, 1, (4, shape_meta.action_dim)).astype(np.float32)
  return Normalizer.fit(arrays, shape_meta)


def _synthetic_obs(shape_meta: ShapeMeta, leading: tuple[int, ...],
                   seed: int | np.random.Generator = 0) -> dict[str, np.ndarray]:
  """Random observations of shape `leading + s.shape`: images uint8 as the cameras give them,
  low-dimensional keys in [-1, 1); `seed` may be a generator the caller draws more from."""
  rng = np.random.default_rng(seed)  # A generator passes through unchanged.
  return {s.key: (rng.integers(0, 256, leading + s.shape, dtype=np.uint8) if s.kind == 'rgb'
                  else rng.uniform(-1, 1, leading + s.shape).astype(np.float32))
          for s in shape_meta.obs}


def _synthetic_batch(config, shape_meta: ShapeMeta, batch: int, seed: int = 0):
  """A training batch as the pipeline yields it: images already cropped."""
  crop = tuple(config.data.crop_shape)
  meta = ShapeMeta(obs=tuple(
      s if s.kind != 'rgb' else type(s)(s.key, s.kind, crop + (3,)) for s in shape_meta.obs),
                   action_dim=shape_meta.action_dim)
  obs = _synthetic_obs(meta, (batch, int(config.task.n_obs_steps)), seed)
  action = np.random.default_rng(seed).uniform(
      -1, 1, (batch, int(config.task.horizon), shape_meta.action_dim)).astype(np.float32)
  return {'obs': obs, 'action': action}


def _variant(name: str, args) -> ml_collections.ConfigDict:
  config = lift.get_config('smoke' if args.quick else name)
  config.model.compute_dtype = args.compute_dtype
  config.model.pallas_decoder = args.pallas_decoder
  return config


def _denoise_step_flops(policy: DiffusionPolicy, variables, batch: int) -> float:
  """XLA's FLOPs for one network evaluation of the reverse process at this batch size."""
  x = jnp.zeros((batch,) + policy.trajectory_shape, jnp.float32)
  t = jnp.zeros((batch,), jnp.int32)
  cond = (jnp.zeros((batch, policy.n_obs_steps, policy.obs_feature_dim), jnp.float32)
          if policy.obs_as_cond else None)
  denoise = jax.jit(lambda v, x, t, c: policy.network.apply(v, x, t, c, False,
                                                            method=PolicyNetwork.denoise))
  # With bfloat16 compute the Dense layers run on the CPU kernels even from plain variables.
  with cpu_kernels.disabled():
    return _compiled_stats(denoise.lower(variables, x, t, cond).compile())['flops'] or 0.0


def bench_predict(args) -> dict[str, Any]:
  """`predict_action` latency (encoders included) per batch size and sampler, from the
  policy's `sampling_variables` (built once per sampler, timed with its compilation as
  `sampling_variables_s`), as evaluation rollouts call it; at batch 1 also from the plain
  variables (`..._plain_variables`). With `--trace`, the figures from sampling variables also
  hold a profiled call's `trace`.

  XLA's cost analysis counts a loop body once, so the FLOPs of a call are the program's count
  (traced with XLA ops where the CPU kernels run: see `_count_kernel_flops`) plus
  (num_inference_steps - 1) network evaluations (an upper bound: the sampler's own step reuses
  the step-invariant cross-attention memory, its projections folded in).
  """
  config = _variant('default', args)
  shape_meta = ShapeMeta.from_config(config.task.shape_meta)
  normalizer = _synthetic_normalizer(shape_meta)
  samplers = (('ddpm', 4), ('ddim', 2)) if args.quick else (('ddpm', 100), ('ddim', 16))
  batches = (1, 2) if args.quick else (1, 28)
  results, sampling_variables_s = {}, {}
  for sampler, steps in samplers:
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.diffusion.sampler = sampler
    cfg.diffusion.num_inference_steps = steps
    policy = DiffusionPolicy(cfg, shape_meta, normalizer)
    variables = policy.init(jax.random.key(0))
    start = time.perf_counter()
    sampling_variables = jax.block_until_ready(policy.sampling_variables(variables))
    sampling_variables_s[f'{sampler}{steps}'] = time.perf_counter() - start
    jitted = policy.predict_action_jit
    for batch in batches:
      obs = jax.device_put(_synthetic_obs(shape_meta, (batch, int(cfg.task.n_obs_steps))))
      key = jax.random.key(1)
      # At batch 1 also from the plain variables: the packing and the timestep table in
      # every call, as a caller that never makes sampling variables sees it.
      runs = [('', sampling_variables)]
      if batch == batches[0]:
        runs.append(('_plain_variables', variables))
      step_flops = None  # The same for both variable sets: counted once per batch size.
      for suffix, call_variables in runs:
        figure = f'{sampler}{steps}_batch{batch}{suffix}'
        trace_dir = os.path.join(args.trace, figure) if args.trace and not suffix else None
        timing = _timed_program(jitted, (call_variables, obs, key), args.repeats,
                                flops_args=(variables, obs, key), trace_dir=trace_dir)
        if timing['flops']:
          if step_flops is None:
            step_flops = _denoise_step_flops(policy, variables, batch)
          timing.setdefault('xla_program_flops', timing['flops'])
          timing['flops'] += (steps - 1) * step_flops
          timing['flops_per_s'] = timing['flops'] / timing['median_s']
        results[figure] = dict(
            timing, sampler=sampler, num_inference_steps=steps, batch_size=batch,
            variables='plain' if suffix else 'sampling')
  return {'config': config.name, 'results': results,
          'sampling_variables_s': sampling_variables_s}


def _train_setup(policy: DiffusionPolicy, config, mesh, params, total_steps: int):
  """(state, step): a fresh train state of `params` replicated over `mesh` and the jitted
  training step (AdamW + EMA), as the trainer builds them."""
  from dpjax.training import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from dpjax.training import parallel
  from dpjax.training.train_state import create_train_state

  tx = optimizer_lib.make_optimizer(config.optimizer, total_steps=total_steps)
  state = jax.jit(lambda p, key: create_train_state(p, tx, key),
                  out_shardings=parallel.replicated(mesh))(params, jax.random.key(1))
  step = parallel.make_train_step(
      lambda p, batch, rng: policy.compute_loss({'params': p}, batch, rng, train=True), tx,
      mesh, ema_config=config.ema)
  return state, step


def bench_train(args) -> dict[str, Any]:
  """One full training step (two encoders + transformer + AdamW + EMA) at batch 64."""
  from dpjax.training import parallel  # pylint: disable=g-import-not-at-top

  batch_size = 4 if args.quick else 64
  device_counts = sorted({1, jax.device_count()})
  variants = ('smoke',) if args.quick else ('default', 'cpu')
  results = {}
  for variant in variants:
    config = _variant(variant, args)
    shape_meta = ShapeMeta.from_config(config.task.shape_meta)
    policy = DiffusionPolicy(config, shape_meta, _synthetic_normalizer(shape_meta))
    batch_np = _synthetic_batch(config, shape_meta, batch_size)
    for num_devices in device_counts:
      if batch_size % num_devices:
        continue
      mesh = parallel.make_mesh(jax.devices()[:num_devices])
      state, step = _train_setup(policy, config, mesh, policy.init(jax.random.key(0))['params'],
                                 total_steps=1000)
      timing = _timed_program(step, (state, parallel.shard_batch(batch_np, mesh)), args.repeats,
                              threads_state=True)
      results[f'{variant}_devices{num_devices}'] = dict(
          timing, samples_per_s=batch_size / timing['median_s'], batch_size=batch_size,
          num_devices=num_devices)
  return {'results': results}


def bench_precision(args) -> dict[str, Any]:
  """What bfloat16 compute does to training: the default config's loss over 100 AdamW steps at
  batch 64 (warmup, then the cosine decay to 0), in float32 and with bfloat16 compute, from the
  same float32 parameters on the same batches and keys, so the two curves agree step by step up
  to rounding (tests/test_training_precision.py checks the same at smoke size). Reports both
  curves, the relative differences per step and each precision's wall time for the steps (one
  device; compilation apart)."""
  from dpjax.training import parallel  # pylint: disable=g-import-not-at-top

  steps, batch_size = (4, 4) if args.quick else (100, 64)
  mesh = parallel.make_mesh(jax.devices()[:1])
  losses, results, params = {}, {}, None
  for dtype in ('float32', 'bfloat16'):
    config = lift.get_config('smoke' if args.quick else 'default')
    config.model.compute_dtype = dtype
    shape_meta = ShapeMeta.from_config(config.task.shape_meta)
    policy = DiffusionPolicy(config, shape_meta, _synthetic_normalizer(shape_meta))
    if params is None:  # Float32 parameters in both runs.
      params = jax.device_get(policy.init(jax.random.key(0))['params'])
    batches = [parallel.shard_batch(_synthetic_batch(config, shape_meta, batch_size, seed), mesh)
               for seed in range(4)]
    state, step = _train_setup(policy, config, mesh, params, total_steps=steps)
    start = time.perf_counter()
    compiled = step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    step_losses = []
    for i in range(steps):
      state, metrics = compiled(state, batches[i % len(batches)])
      step_losses.append(metrics['loss'])
    losses[dtype] = np.asarray(jax.device_get(step_losses), np.float64)
    results[dtype] = {'compile_s': compile_s, 'steps_s': time.perf_counter() - start,
                      'losses': losses[dtype].tolist()}
  relative = np.abs(losses['bfloat16'] / losses['float32'] - 1)
  return {'config': 'smoke' if args.quick else 'default', 'steps': steps,
          'batch_size': batch_size, 'results': results,
          'max_relative_difference': float(relative.max()),
          'mean_relative_difference': float(relative.mean()),
          'float32_first_last_10': [float(losses['float32'][:10].mean()),
                                    float(losses['float32'][-10:].mean())]}


def bench_encoder(args) -> dict[str, Any]:
  """One camera's ResNet-18 trunk, forward and forward+backward (parameter gradients), on the
  images of a batch-64 training step (128 crops): the part of the step that dominates on CPU."""
  from dpjax.models.resnet import ResNet18  # pylint: disable=g-import-not-at-top
  config = _variant('default', args)
  images = 8 if args.quick else 128
  width = int(config.model.resnet_width)
  x = jax.random.uniform(jax.random.key(0), (images,) + tuple(config.data.crop_shape) + (3,))
  model = ResNet18(width, dtype=jnp.dtype(config.model.compute_dtype))
  variables = jax.jit(model.init)(jax.random.key(1), x[:1])
  loss = lambda v, x: jnp.sum(jnp.square(model.apply(v, x)))
  return {'images': images, 'resnet_width': width,
          'forward': _timed_program(jax.jit(model.apply), (variables, x), args.repeats),
          'forward_backward': _timed_program(jax.jit(jax.grad(loss)), (variables, x),
                                             args.repeats)}


def _synthetic_store(shape_meta: ShapeMeta, num_episodes: int, length: int):
  """An in-memory episode store of random data shaped like the Lift demos."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from dpjax.data.pipeline import EpisodeStore
  rng = np.random.default_rng(0)
  steps = num_episodes * length
  obs = {k: tf.constant(v) for k, v in _synthetic_obs(shape_meta, (steps,), rng).items()}
  actions = tf.constant(rng.uniform(-1, 1, (steps, shape_meta.action_dim)).astype(np.float32))
  lengths = np.full((num_episodes,), length, np.int64)
  return EpisodeStore(names=tuple(f'demo_{i}' for i in range(num_episodes)), lengths=lengths,
                      offsets=np.arange(num_episodes, dtype=np.int64) * length, obs=obs,
                      actions=actions, shape_meta=shape_meta)


def bench_pipeline(args) -> dict[str, Any]:
  """Train-mode batches/s of the tf.data window pipeline (batch 64)."""
  from dpjax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = lift.get_config('default')
  shape_meta = ShapeMeta.from_config(config.task.shape_meta)
  if args.dataset:
    source, source_name = args.dataset, args.dataset
  else:
    episodes, length = (4, 20) if args.quick else (200, 60)
    source = _synthetic_store(shape_meta, episodes, length)
    source_name = f'synthetic: {episodes} episodes x {length} steps'
  batch_size = 8 if args.quick else 64
  num_batches = 5 if args.quick else 100
  result = pipeline.measure_throughput(source, shape_meta, batch_size=batch_size,
                                       num_batches=num_batches, warmup_batches=2,
                                       repeats=args.repeats)
  return dict(result, source=source_name)


def bench_env(args) -> dict[str, Any]:
  """Env steps/s of the vector env (cameras on, zero actions, workers in parallel)."""
  from dpjax.evaluation import vector_env  # pylint: disable=g-import-not-at-top
  num_envs = 1 if args.quick else vector_env.default_num_envs()
  chunks = 2 if args.quick else 10
  n_action_steps = 8
  spec = vector_env.WrapperSpec(n_obs_steps=2, n_action_steps=n_action_steps, max_steps=400,
                                terminate_on_success=False)
  factory = vector_env.LiftEnvFactory(image_size=84)
  zeros = np.zeros((n_action_steps, 7), np.float32)
  start = time.perf_counter()
  with vector_env.VectorEnv(factory, num_envs, spec) as envs:
    startup_s = time.perf_counter() - start
    envs.run({slot: ('reset', (slot, None, ())) for slot in range(num_envs)})
    start = time.perf_counter()
    for _ in range(chunks):
      replies = envs.run({slot: ('step', zeros) for slot in range(num_envs)})
      crashed = [r for r in replies.values() if isinstance(r, vector_env.WorkerCrash)]
      if crashed:
        raise RuntimeError(f'benchmark env worker crashed: {crashed[0].reason}')
    elapsed = time.perf_counter() - start
  steps = num_envs * chunks * n_action_steps
  return {'num_envs': num_envs, 'env_steps': steps, 'env_steps_per_s': steps / elapsed,
          'startup_s': startup_s}


def bench_torch_reference(args) -> dict[str, Any]:
  """The reference's predict_action (DDPM-100) and training step in PyTorch (torch_reference.py),
  on all cores: the comparison the speed targets are stated against, measured here."""
  import torch_reference  # pylint: disable=g-import-not-at-top  # torch: requirements-test.txt
  config = _variant('default', args)
  return torch_reference.benchmark(
      config, predict_batches=(1, 2) if args.quick else (1, 28),
      predict_steps=int(config.diffusion.num_train_timesteps), train_batch=4 if args.quick else 64,
      repeats=args.repeats, threads=os.cpu_count() or 1)


def host_allocator() -> str | None:
  """The malloc this process runs on (`make` preloads tcmalloc), from its mapped libraries;
  None where /proc is missing."""
  try:
    with open('/proc/self/maps') as maps:
      libraries = maps.read()
  except OSError:
    return None
  for name in ('tcmalloc', 'jemalloc'):
    if f'lib{name}' in libraries:
      return name
  return 'system'


def cpu_model() -> str:
  """The host CPU as /proc/cpuinfo names it, with its family and model numbers (the same
  'AMD EPYC' name covers several generations); the architecture where /proc is missing."""
  try:
    with open('/proc/cpuinfo') as cpuinfo:
      lines = cpuinfo.read().splitlines()
  except OSError:
    return platform.machine()
  fields = {}
  for line in lines:
    key, _, value = line.partition(':')
    fields.setdefault(key.strip(), value.strip())
  name = fields.get('model name', platform.machine())
  if 'cpu family' in fields and 'model' in fields:
    name += f" (family {fields['cpu family']}, model {fields['model']})"
  return name


def system_info() -> dict[str, Any]:
  device = jax.devices()[0]
  import jaxlib  # pylint: disable=g-import-not-at-top
  info = {
      'device_kind': device.device_kind, 'platform': device.platform,
      'device_count': jax.device_count(), 'process_count': jax.process_count(),
      'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
      'python': platform.python_version(), 'cpu': cpu_model(), 'cpu_count': os.cpu_count(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'threads': {k: os.environ.get(k) for k in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS',
                                                 'TF_NUM_INTRAOP_THREADS')},
      'host_allocator': host_allocator(),
      'date': time.strftime('%Y-%m-%d'),
      'cpu_kernels': cpu_kernels.enabled(jnp.float32),
  }
  try:
    info['xla_backend_version'] = jax.extend.backend.get_backend().platform_version
  except Exception:  # pylint: disable=broad-except
    info['xla_backend_version'] = None
  return info


def peak_memory() -> dict[str, Any]:
  out = {'host_max_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
  stats = jax.devices()[0].memory_stats() or {}
  out['device_peak_bytes_in_use'] = stats.get('peak_bytes_in_use')
  return out


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--only', default=','.join(DEFAULT_FIGURES),
                      help=f'comma-separated subset of {FIGURES} (default: {DEFAULT_FIGURES})')
  parser.add_argument('--quick', action='store_true', help='tiny sizes: a smoke run')
  parser.add_argument('--repeats', type=int, default=None,
                      help='timed repetitions per figure (default 5, quick 2)')
  parser.add_argument('--dataset', default=None,
                      help='prepared TFDS dataset dir for the pipeline figure (default: '
                      'synthetic in-memory episodes)')
  # Hyphens and underscores both: the config field and the other scripts' flags use underscores.
  parser.add_argument('--compute-dtype', '--compute_dtype', default='float32',
                      choices=('float32', 'bfloat16'),
                      help="the model's compute dtype (config.model.compute_dtype) for the "
                      'predict, train and encoder figures; parameters stay float32')
  parser.add_argument('--pallas-decoder', '--pallas_decoder', action='store_true',
                      help='sample with config.model.pallas_decoder=True (its kernels run on a '
                      'single GPU; elsewhere sampling runs as without it)')
  parser.add_argument('--trace', default=None, metavar='DIR',
                      help='predict figures: also profile one call each, traces under DIR '
                      '(see scripts/trace_summary.py)')
  parser.add_argument('--output', default='benchmark.json',
                      help='JSON file the report (also printed) is written to; default: '
                      'benchmark.json')
  args = parser.parse_args(argv)
  if args.repeats is None:
    args.repeats = 2 if args.quick else 5
  elif args.repeats < 1:
    parser.error(f'--repeats: must be >= 1, got {args.repeats}')
  selected = [f.strip() for f in args.only.split(',') if f.strip()]
  unknown = sorted(set(selected) - set(FIGURES))
  if unknown:
    parser.error(f'--only: unknown figure(s) {unknown}; choose from {FIGURES}')
  if not selected:
    parser.error(f'--only: no figure named; choose from {FIGURES}')
  # Checked before the figures run: the pipeline figure reads --dataset, and --output is
  # written, only after the others have run for many minutes.
  if args.dataset and not os.path.isfile(os.path.join(args.dataset, 'dataset_info.json')):
    parser.error(f'--dataset {args.dataset}: not a prepared TFDS dataset directory (no '
                 'dataset_info.json); expected e.g. data/tfds/robomimic_rlds/<name>/1.0.0')
  if os.path.isdir(args.output):
    parser.error(f'--output {args.output}: is a folder; expected the path of the JSON file')
  folder = os.path.dirname(os.path.abspath(args.output))
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    parser.error(f'--output {args.output}: {folder} cannot be made a folder ({e.strerror})')
  if not os.access(folder, os.W_OK):
    parser.error(f'--output {args.output}: folder {folder} is not writable')

  benches = {'predict': bench_predict, 'train': bench_train, 'encoder': bench_encoder,
             'pipeline': bench_pipeline, 'env': bench_env, 'precision': bench_precision,
             'torch_reference': bench_torch_reference}
  report: dict[str, Any] = {'system': system_info(), 'quick': args.quick,
                            'repeats': args.repeats, 'compute_dtype': args.compute_dtype,
                            'pallas_decoder': args.pallas_decoder and pallas_decoder.runs_here()}
  for name in selected:
    print(f'benchmark: {name} ...', file=sys.stderr, flush=True)
    report[name] = benches[name](args)
    print(f'benchmark: {name}: {json.dumps(report[name])}', file=sys.stderr, flush=True)
  report['memory'] = peak_memory()
  text = json.dumps(report, indent=2)
  print(text)
  write_text_atomic(args.output, text)
  return report


if __name__ == '__main__':
  report_user_errors(main)()
