"""Device A/B (session 12, H200): the decoder on gpu_kernels (Pallas) vs XLA ops, predict_action.

Run on a lent GPU from the repo root, with ml_collections on PYTHONPATH (docs/benchmarks.md):
    OUT=/some/dir python3 scripts/gpu_decoder_ab.py
Writes $OUT/gpu_ab.json. The sweep and trace cases did not finish inside the 330 s limit there.
"""
import glob, json, os, shutil, statistics, sys, time, traceback
sys.path.insert(0, '.'); sys.path.insert(0, 'scripts')
import jax, jax.numpy as jnp, numpy as np, ml_collections
import benchmark as bm
from configs import lift
from dpjax.data.shape_meta import ShapeMeta
from dpjax.diffusion.policy import DiffusionPolicy
from dpjax.models import gpu_kernels

OUT = os.environ.get('OUT', '/tmp/out')
R = {'devices': [str(d) for d in jax.devices()], 'jax': jax.__version__}
def save():
  json.dump(R, open(f'{OUT}/gpu_ab.json', 'w'), indent=1)
def log(*a):
  print(f'[{time.strftime("%H:%M:%S")}]', *a, flush=True)

def make(sampler='ddpm', steps=100, dtype='float32'):
  config = lift.get_config('default'); config.model.compute_dtype = dtype
  config.diffusion.sampler = sampler; config.diffusion.num_inference_steps = steps
  shape_meta = ShapeMeta.from_config(config.task.shape_meta)
  policy = DiffusionPolicy(config, shape_meta, bm._synthetic_normalizer(shape_meta))
  return policy, policy.init(jax.random.key(0)), shape_meta

def timed(policy, variables, shape_meta, batch=1, repeats=30):
  t0 = time.perf_counter()
  sv = jax.block_until_ready(policy.sampling_variables(variables))
  obs = jax.device_put(bm._synthetic_obs(shape_meta, batch, 2)); key = jax.random.key(1)
  t1 = time.perf_counter()
  out = jax.block_until_ready(policy.predict_action_jit(sv, obs, key))
  compile_s = time.perf_counter() - t1
  times = []
  for _ in range(repeats):
    s = time.perf_counter(); jax.block_until_ready(policy.predict_action_jit(sv, obs, key))
    times.append(time.perf_counter() - s)
  return dict(median_ms=1e3 * statistics.median(times), min_ms=1e3 * min(times),
              compile_s=compile_s, sv_s=t1 - t0), np.asarray(out['action_pred']), (sv, obs, key)

def case(name, fn):
  log('start', name)
  try:
    R[name] = fn(); log(name, R[name])
  except Exception as e:  # keep going: report the failure
    R[name] = {'error': f'{type(e).__name__}: {e}'[:3000]}; traceback.print_exc()
  save()

acts = {}
def ab(dtype, batch, sampler='ddpm', steps=100, variants=('pallas', 'xla')):
  res = {}
  policy, variables, sm = make(sampler, steps, dtype)
  for v in variants:
    ctx = gpu_kernels.disabled() if v == 'xla' else _null()
    with ctx:
      res[v], acts[(dtype, batch, sampler, v)], _ = timed(policy, variables, sm, batch)
  if len(variants) == 2:
    a, b = acts[(dtype, batch, sampler, 'pallas')], acts[(dtype, batch, sampler, 'xla')]
    res['max_abs_diff'] = float(np.abs(a - b).max()); res['max_abs'] = float(np.abs(b).max())
  return res

import contextlib
_null = contextlib.nullcontext

def step_diff():
  from dpjax.models import transformer as T
  res = {}
  for dtype in ('float32', 'bfloat16'):
    policy, variables, sm = make(dtype=dtype)
    model = policy.network.noise_model
    params = variables['params']['noise_model']
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 10, 7)), jnp.float32)
    cond = jnp.asarray(rng.normal(size=(3, 2, model.cond_dim)), jnp.float32)
    outs = {}
    for v in ('pallas', 'xla'):
      with (gpu_kernels.disabled() if v == 'xla' else _null()):
        f = jax.jit(lambda p, x, c: [T.cached_denoise(model, p, k, T.observation_kv(model, p, k, c), x, jnp.int32(s))
                                     for k in [T.decoder_constants(model, p, jnp.arange(100)[::-1])] for s in (0, 50, 99)])
        outs[v] = np.asarray(f(params, x, cond))
    ref = np.asarray(jax.jit(lambda p, x, c: model.apply({'params': p}, x, jnp.full((3,), 49), c))(params, x, cond))
    res[dtype] = dict(max_abs_diff=float(np.abs(outs['pallas'] - outs['xla']).max()),
                      max_abs=float(np.abs(outs['xla']).max()),
                      xla_vs_module_t49=float(np.abs(outs['xla'][1] - ref).max()))
  return res
case('step_diff', step_diff)
case('f32_b1_ddpm100', lambda: ab('float32', 1))
case('bf16_b1_ddpm100', lambda: ab('bfloat16', 1))
case('f32_b1_ddim16', lambda: ab('float32', 1, 'ddim', 16))
case('f32_b28_ddpm100', lambda: ab('float32', 28))
case('bf16_b28_ddpm100', lambda: ab('bfloat16', 28, variants=('pallas',)))

def sweep():
  res = {}
  policy, variables, sm = make()
  base = dict(_NUM_WARPS=gpu_kernels._NUM_WARPS, _NUM_STAGES=gpu_kernels._NUM_STAGES,
              _K_CHUNK=gpu_kernels._K_CHUNK, _FFN_IN_BLOCK=gpu_kernels._FFN_IN_BLOCK,
              _FFN_OUT_BLOCK=gpu_kernels._FFN_OUT_BLOCK)
  for var in [dict(_NUM_WARPS=2), dict(_NUM_WARPS=8), dict(_NUM_STAGES=1), dict(_K_CHUNK=128),
              dict(_FFN_IN_BLOCK=128, _FFN_OUT_BLOCK=64), dict(_FFN_IN_BLOCK=32, _FFN_OUT_BLOCK=16)]:
    key = ','.join(f'{k}={v}' for k, v in var.items())
    try:
      for k, v in var.items(): setattr(gpu_kernels, k, v)
      jax.clear_caches()
      res[key], a, _ = timed(policy, variables, sm, 1, repeats=15)
      res[key]['max_abs_diff_vs_xla'] = float(np.abs(a - acts[('float32', 1, 'ddpm', 'xla')]).max())
    except Exception as e:
      res[key] = {'error': f'{type(e).__name__}: {e}'[:1500]}
    finally:
      for k, v in base.items(): setattr(gpu_kernels, k, v)
    log(key, res[key]); R['sweep'] = res; save()
  jax.clear_caches()
  return res
case('sweep', sweep)

def trace():
  policy, variables, sm = make()
  got = {}
  for v in ('pallas', 'xla'):
    ctx = gpu_kernels.disabled() if v == 'xla' else _null()
    with ctx:
      _, _, (sv, obs, key) = timed(policy, variables, sm, 1, repeats=2)
      d = f'/tmp/trace_{v}'
      with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(2):
          jax.block_until_ready(policy.predict_action_jit(sv, obs, key))
      files = glob.glob(f'{d}/**/*.trace.json.gz', recursive=True)
      if files:
        shutil.copy(files[0], f'{OUT}/trace_{v}.json.gz'); got[v] = os.path.getsize(files[0])
  return got
case('trace', trace)
log('done')
