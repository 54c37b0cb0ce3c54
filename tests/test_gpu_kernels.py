"""`scripts/gpu_kernels.py`: its HLO kernel count against a hand-counted module, and a run that
compiles the sampler (for this CPU: the suite has no CUDA plugin) and reports every field."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'scripts'))

import gpu_kernels  # pylint: disable=g-import-not-at-top,wrong-import-position

# Two loops: a small one (random bits) and the scan, whose body launches a Triton matmul, two
# fusions of one kind, a copy and a library call; bitcasts, tuples and parameters launch nothing.
HLO = """HloModule jit_f, is_scheduled=true

%small_body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]) parameter(0)
  %loop_add_fusion = f32[4]{0} fusion(%p), kind=kLoop, calls=%fused_add
  ROOT %t = (s32[], f32[4]) tuple(%p, %loop_add_fusion)
}

%scan_body.12 (p.1: (s32[], f32[10,256])) -> (s32[], f32[10,256]) {
  %p.1 = (s32[], f32[10,256]) parameter(0)
  %gte = f32[10,256]{1,0} get-tuple-element(%p.1), index=1
  %gemm_fusion_dot.8 = f32[10,256]{1,0} fusion(%gte), kind=kCustom, calls=%gemm_fusion_dot.8_computation
  %loop_add_fusion.3 = f32[10,256]{1,0} fusion(%gemm_fusion_dot.8), kind=kLoop, calls=%fused_add.3
  %loop_add_fusion.4 = f32[10,256]{1,0} fusion(%loop_add_fusion.3), kind=kLoop, calls=%fused_add.4
  %copy.1 = f32[10,256]{0,1} copy(%loop_add_fusion.4)
  %bitcast.1 = f32[2560]{0} bitcast(%copy.1)
  %custom-call.2 = f32[10,256]{1,0} custom-call(%copy.1), custom_call_target="__cublas$gemm"
  ROOT %t.1 = (s32[], f32[10,256]) tuple(%p.1, %custom-call.2)
}

ENTRY %main.20 (x: f32[10,256]) -> f32[10,256] {
  %x = f32[10,256]{1,0} parameter(0)
  %while.1 = (s32[], f32[4]) while(%x), condition=%cond, body=%small_body
  %while.2 = (s32[], f32[10,256]) while(%x), condition=%cond.1, body=%scan_body.12
  ROOT %r = f32[10,256]{1,0} get-tuple-element(%while.2), index=1
}
"""


def test_counts_the_largest_loops_kernels_by_kind():
  body = gpu_kernels.loop_body_kernels(HLO)
  assert body == {'gemm_fusion_dot': 1, 'fused_add': 2, 'copy': 1, 'custom-call': 1}
  assert not gpu_kernels.outside_loops_kernels(HLO)  # while loops are control flow


def test_quick_run_on_cpu_reports_every_field():
  run = subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'gpu_kernels.py'),
                        '--target', 'cpu', '--quick'],
                       check=True, capture_output=True, text=True, timeout=600)
  report = json.loads(run.stdout)
  assert report['target'] == 'cpu' and report['num_inference_steps'] > 0
  for batch in ('batch1', 'batch2'):
    counts = report[batch]
    assert counts['loop_body_kernels'] > 0 and counts['outside_loops_kernels'] > 0, counts
    for part in ('loop_body', 'outside_loops'):
      assert sum(counts[f'{part}_by_kind'].values()) == counts[f'{part}_kernels']
