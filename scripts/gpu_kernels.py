"""Kernels per denoising step of `predict_action` as XLA compiles it for an H100 — without a GPU.

    python scripts/gpu_kernels.py                          # H100, DDPM-100, batch 1 and 28
    python scripts/gpu_kernels.py --pallas-decoder         # the decoder on Pallas kernels
    python scripts/gpu_kernels.py --target cpu --quick     # this CPU, tiny config (the tests)
    python scripts/gpu_kernels.py --pallas-decoder --ptxas /usr/local/cuda/bin/ptxas
                                                           # + each kernel's register spills

Batch-1 sampling on a GPU is bound by the chain of small dependent kernels in each denoising
step (an H200 took ≈ 0.27 ms per step for ≈ 200 kernels, all in one CUDA graph:
docs/performance.md), so the number of kernels in the sampler's loop body is the figure to
work on between the sessions that have a GPU. With XLA_FLAGS=--xla_dump_to=DIR the compiler
also writes its launch plan (*.thunk_sequence_after_thunk_passes.txt: which kernels share a
CUDA graph).

XLA compiles for a described GPU without one (deviceless compilation) through JAX's CUDA
plugin, which needs neither CUDA libraries nor a driver; install it in an environment of its
own (it warns on every JAX import where no GPU is):

    python3 -m venv /tmp/gpu-compile
    /tmp/gpu-compile/bin/pip install -r requirements.txt -r requirements-gpu-compile.txt
    /tmp/gpu-compile/bin/python scripts/gpu_kernels.py

Prints JSON: per batch size, the kernels of the loop body (one denoising step) and of the
rest of the program (once per call: encoders, condition memory, the first noise), by kind
(fusions by their computation's name: gemm_fusion_dot = a Triton matmul, triton_softmax = a
fused softmax or LayerNorm, ...), and the launches the host makes for them from the compiler's
launch plan (`*_launches`, by thunk kind: kCommandBuffer = one CUDA graph of many kernels,
kConvolution = a cuDNN call, kCustomKernel = a kernel launched alone; GPU targets only, XLA:CPU
writes no launch plan). Outside the loop the launches are what costs: XLA records a run of
kernels between two cuDNN calls into a CUDA graph only if the run holds at least
`--xla_gpu_graph_min_graph_size` (5) kernels, so fewer kernels can mean more launches
(docs/performance.md, session 23). Counts only; nothing runs.

With --ptxas, the PTX of every kernel (XLA's dump of each compiled program) also goes through
that ptxas (CUDA ≥ 12, for the PTX's own target), and the report names the kernels that spill
registers to local memory, with their registers and spilled bytes per thread: a kernel that
spills moves those bytes through L1 and L2 on every launch (docs/performance.md, session 21).
"""

import argparse
import collections
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# XLA's description of an NVIDIA H100 80GB HBM3 (SXM) for deviceless compilation
# (xla/stream_executor/device_description.proto, as `DeviceDescription` reports it).
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 8 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

# HLO instructions that launch work of their own (a fusion is one kernel, a custom call one
# library call); the rest of a compiled GPU module is bitcasts, tuples, parameters and control
# flow.
_LAUNCHING = re.compile(r'\s(fusion|custom-call|copy|copy-start|sort|scatter|gather|reduce|dot|'
                        r'convolution|all-reduce)\(')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%([\w.\-]+) \(.*\{$')


def computations(hlo_text: str) -> dict[str, list[str]]:
  """Compiled HLO text → {computation name: its instruction lines}."""
  result, current = {}, None
  for line in hlo_text.splitlines():
    match = _COMPUTATION.match(line)
    if match:
      current = result[match.group(1)] = []
    elif line.strip() == '}':
      current = None
    elif current is not None and ' = ' in line:
      current.append(line.strip())
  return result


def kernels(instructions: list[str]) -> collections.Counter:
  """Launching instructions by kind: a fusion by its computation's name without the number."""
  kinds = collections.Counter()
  for instruction in instructions:
    match = _LAUNCHING.search(instruction.split(' = ', 1)[1])
    if match:
      called = re.search(r'calls=%([\w.\-]+)', instruction)
      kinds[re.sub(r'_computation|[.\-]\d+', '', called.group(1))
            if match.group(1) == 'fusion' and called else match.group(1)] += 1
  return kinds


def loop_body_kernels(hlo_text: str) -> collections.Counter:
  """The kernels of the body of the reverse process's scan: the program's largest while loop
  (XLA:CPU also loops for the random bits)."""
  bodies = computations(hlo_text)
  names = re.findall(r'\swhile\(.*?body=%([\w.\-]+)', hlo_text)
  if not names:
    raise ValueError('gpu_kernels: the compiled program has no while loop')
  return max((kernels(bodies[name]) for name in names), key=lambda kinds: sum(kinds.values()))


def outside_loops_kernels(hlo_text: str) -> collections.Counter:
  """The kernels the program launches once per call: its entry computation's (a while loop's
  body and the ops inside fusions are not counted)."""
  entry = re.search(r'^ENTRY %([\w.\-]+) ', hlo_text, re.MULTILINE)
  return kernels(computations(hlo_text)[entry.group(1)])


_THUNK = re.compile(r'^( *)\d+: (k\w+)')


def launch_plan(thunk_text: str) -> tuple[collections.Counter, collections.Counter]:
  """XLA:GPU's launch plan (a *.thunk_sequence_after_thunk_passes.txt of its dump) → the
  program's top-level thunks by kind, its while loops aside (the host's launches per call), and
  those of the loop bodies (the launches per iteration; a command buffer is one)."""
  once, per_step, section = collections.Counter(), collections.Counter(), None
  for line in thunk_text.splitlines():
    if line.strip() in ('condition:', 'body:'):
      section = line.strip()
      continue
    match = _THUNK.match(line)
    if not match:
      continue
    indent, kind = len(match.group(1)), match.group(2)
    if indent == 0:
      section = None
      if kind != 'kWhile':
        once[kind] += 1
    elif section == 'body:' and indent == 4:
      per_step[kind] += 1
  return once, per_step


def _launches(dump: str) -> dict[str, Any]:
  """`launch_plan` of the one program compiled into `dump`, as report fields; none where the
  backend writes no launch plan (XLA:CPU)."""
  plans = glob.glob(os.path.join(dump, '*thunk_sequence_after_thunk_passes.txt'))
  if not plans:
    return {}
  with open(plans[0]) as plan:
    once, per_step = launch_plan(plan.read())
  return {'loop_body_launches': sum(per_step.values()),
          'loop_body_launches_by_kind': dict(per_step.most_common()),
          'outside_loops_launches': sum(once.values()),
          'outside_loops_launches_by_kind': dict(once.most_common())}


def _gpu_sharding():
  """A sharding onto one described H100 (no device behind it)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    topology = topologies.get_topology_desc(platform='cuda', topology='1x1x1',
                                            target_config=H100_TARGET_CONFIG)
  except Exception as error:  # pylint: disable=broad-except  # Say what to install.
    raise SystemExit(f'gpu_kernels: no deviceless CUDA compilation here ({error}); install '
                     'requirements-gpu-compile.txt (see this script\'s docstring)') from error
  mesh = topologies.make_mesh(topology, (1,), ('data',))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


_PTXAS_ENTRY = re.compile(r"Compiling entry function '([\w.$]+)'")
_PTXAS_SPILLS = re.compile(r'(\d+) bytes spill stores, (\d+) bytes spill loads')
_PTXAS_REGISTERS = re.compile(r'Used (\d+) registers')


def _keep_worst(usage: dict[str, dict[str, int]], kernel: str, figures: dict[str, int]) -> None:
  """usage[kernel] = figures if they spill more bytes than what it holds (or as many, with more
  registers)."""
  def badness(entry):
    return entry['spill_stores'] + entry['spill_loads'], entry['registers']
  if kernel not in usage or badness(figures) > badness(usage[kernel]):
    usage[kernel] = figures


def ptxas_usage(ptxas_output: str) -> dict[str, dict[str, int]]:
  """`ptxas -v` output → {kernel: registers, spill_stores, spill_loads (bytes per thread)}.
  Numbered copies of one kernel (Pallas names a layer's kernels `name__3`) count as one: their
  worst."""
  usage = {}
  parts = _PTXAS_ENTRY.split(ptxas_output)[1:]  # name, its lines, name, its lines, …
  for name, info in zip(parts[::2], parts[1::2]):
    spills, registers = _PTXAS_SPILLS.search(info), _PTXAS_REGISTERS.search(info)
    if not spills or not registers:
      raise ValueError(f'gpu_kernels: no register or spill figures for {name} in ptxas\'s '
                       f'output: {info.strip()[:300]!r}')
    _keep_worst(usage, re.sub(r'__\d+$', '', name),
                {'registers': int(registers.group(1)), 'spill_stores': int(spills.group(1)),
                 'spill_loads': int(spills.group(2))})
  return usage


def register_spills(ptx_dir: str, ptxas: str) -> dict[str, Any]:
  """Every kernel's PTX in XLA's dump `ptx_dir` through `ptxas -v` → how many kernels there
  are and which of them spill registers (`ptxas_usage`'s figures)."""
  usage = {}
  for path in sorted(glob.glob(os.path.join(ptx_dir, '*.ptx'))):
    with open(path) as ptx:
      target = re.search(r'^\.target (sm_\w+)', ptx.read(), re.MULTILINE)
    run = subprocess.run([ptxas, '-v', '--gpu-name', target.group(1), path, '-o', os.devnull],
                         capture_output=True, text=True, check=False)
    if run.returncode:
      raise SystemExit(f'gpu_kernels: {ptxas} failed on {path}: {run.stderr.strip()[-500:]}')
    for kernel, figures in ptxas_usage(run.stdout + run.stderr).items():
      _keep_worst(usage, kernel, figures)
  return {'kernels': len(usage),
          'spilling': {kernel: figures for kernel, figures in sorted(usage.items())
                       if figures['spill_stores'] or figures['spill_loads']}}


def count(target: str, quick: bool, compute_dtype: str, pallas: bool,
          ptxas: Optional[str] = None) -> dict[str, Any]:
  """Compiles `predict_action` (DDPM-100; the smoke config if `quick`) for `target` and counts
  its kernels per batch size; with `ptxas`, also which of them spill registers."""
  # JAX and the library are imported here, after main() has set the environment for the target.
  import jax  # pylint: disable=g-import-not-at-top
  from unittest import mock  # pylint: disable=g-import-not-at-top
  import benchmark  # pylint: disable=g-import-not-at-top  # scripts/benchmark.py
  from configs import lift  # pylint: disable=g-import-not-at-top
  from dpjax.data.shape_meta import ShapeMeta  # pylint: disable=g-import-not-at-top
  from dpjax.diffusion.policy import DiffusionPolicy  # pylint: disable=g-import-not-at-top
  from dpjax.models import cpu_kernels  # pylint: disable=g-import-not-at-top

  config = lift.get_config('smoke' if quick else 'default')
  config.model.compute_dtype = compute_dtype
  config.model.pallas_decoder = pallas
  sharding = _gpu_sharding() if target == 'h100' else None
  result = {'config': config.name, 'compute_dtype': compute_dtype, 'pallas_decoder': pallas,
            'sampler': config.diffusion.sampler,
            'num_inference_steps': config.diffusion.num_inference_steps, 'jax': jax.__version__}
  # The library picks its formulation by the backend it compiles for (C++ kernels and CPU
  # convolution forms on CPU, XLA's ops or Pallas kernels elsewhere); a GPU target is not this
  # process's default backend, so the library is told.
  backend = (mock.patch.object(jax, 'default_backend', return_value='gpu') if sharding
             else cpu_kernels.disabled())
  with backend:
    shape_meta = ShapeMeta.from_config(config.task.shape_meta)
    policy = DiffusionPolicy(config, shape_meta, benchmark._synthetic_normalizer(shape_meta))  # pylint: disable=protected-access
    variables = policy.init(jax.random.key(0))
    sampling_variables = jax.eval_shape(policy.sampling_variables, variables)
    for batch in (1, 2) if quick else (1, 28):
      obs = benchmark._synthetic_obs(shape_meta, (batch, int(config.task.n_obs_steps)))  # pylint: disable=protected-access
      args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          (sampling_variables, obs, jax.random.key(1)))
      with tempfile.TemporaryDirectory(prefix='gpu_kernels_') as dump:
        text = policy.predict_action_jit.lower(*args).compile({'xla_dump_to': dump}).as_text()
        launches = _launches(dump)
        spills = register_spills(dump, ptxas) if ptxas else None
      body, once = loop_body_kernels(text), outside_loops_kernels(text)
      result[f'batch{batch}'] = {'loop_body_kernels': sum(body.values()),
                                 'loop_body_by_kind': dict(body.most_common()),
                                 'outside_loops_kernels': sum(once.values()),
                                 'outside_loops_by_kind': dict(once.most_common()),
                                 **launches,
                                 **({'ptxas': spills} if ptxas else {})}
  return result


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--target', default='h100', choices=('h100', 'cpu'),
                      help='h100: deviceless CUDA compilation; cpu: XLA:CPU without the C++ '
                      'kernels (to check this script)')
  parser.add_argument('--quick', action='store_true', help='the smoke config, batch 1 and 2')
  parser.add_argument('--compute-dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--pallas-decoder', action='store_true',
                      help='config.model.pallas_decoder=True (for the h100 target)')
  parser.add_argument('--ptxas', help='a ptxas (CUDA ≥ 12) to report the kernels that spill '
                      'registers (h100 target)')
  args = parser.parse_args(argv)
  if args.ptxas and args.target == 'cpu':
    parser.error('--ptxas needs the h100 target (XLA:CPU writes no PTX)')
  if args.ptxas and not shutil.which(args.ptxas):
    parser.error(f'--ptxas {args.ptxas}: no such executable (CUDA\'s bin/ptxas, or the '
                 'nvidia-cuda-nvcc wheel\'s nvidia/cu13/bin/ptxas)')
  if args.target != 'cpu':
    # The CUDA plugin's version check looks for CUDA libraries, which compiling does not use.
    os.environ.setdefault('JAX_PLATFORMS', 'cpu,cuda')
    os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')
  report = {'target': args.target,
            **count(args.target, args.quick, args.compute_dtype, args.pallas_decoder,
                    args.ptxas)}
  print(json.dumps(report, indent=2))
  return report


if __name__ == '__main__':
  main()
