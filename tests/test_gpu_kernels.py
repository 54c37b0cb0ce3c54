"""`scripts/gpu_kernels.py`: its HLO kernel count against a hand-counted module, its reading of
a launch plan and of ptxas's register report, and a run that compiles the sampler (for this CPU:
the suite has no CUDA plugin) and reports every field."""

import json
import os
import subprocess
import sys

import pytest

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


# `ptxas -v` (CUDA 13.0) on the PTX of two Pallas kernels, one of them a layer's numbered copy,
# and of an XLA fusion, as one output.
PTXAS_OUTPUT = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ffn_out_kernel__3' for 'sm_90a'
ptxas info    : Function properties for _ffn_out_kernel__3
    3288 bytes stack frame, 3632 bytes spill stores, 3632 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 3288 bytes cumulative stack size
ptxas info    : Compile time = 521.648 ms
ptxas info    : Compiling entry function '_ffn_out_kernel' for 'sm_90a'
ptxas info    : Function properties for _ffn_out_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 48 registers, used 1 barriers
ptxas info    : Compiling entry function 'loop_add_fusion_1' for 'sm_90a'
ptxas info    : Function properties for loop_add_fusion_1
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 0 barriers
"""


def test_reads_each_kernels_registers_and_spills_keeping_the_worst_copy():
  assert gpu_kernels.ptxas_usage(PTXAS_OUTPUT) == {
      '_ffn_out_kernel': {'registers': 32, 'spill_stores': 3632, 'spill_loads': 3632},
      'loop_add_fusion_1': {'registers': 10, 'spill_stores': 0, 'spill_loads': 0}}
  with pytest.raises(ValueError, match='no register or spill figures for broken'):
    gpu_kernels.ptxas_usage("ptxas info    : Compiling entry function 'broken' for 'sm_90a'\n")


# The shape of XLA:GPU's *.thunk_sequence_after_thunk_passes.txt: at the top level a cuDNN call,
# a CUDA graph of two kernels, a kernel alone, the while loop (its condition's kernel and a body
# of one graph of two kernels) and a copy.
THUNK_SEQUENCE = """001: kConvolution    [source        | next=000 (1)] cudnn-conv
000: kCommandBuffer  [prev=001 (1)  | next=004 (1)] 
    002: kCustomKernel [source       | next=003 (1)] input_reduce_fusion_14 grid: [2, 1, 1]
    003: kCustomKernel [prev=002 (1) | sink        ] loop_maximum_fusion grid: [361, 1, 1]
004: kCustomKernel   [prev=000 (1)  | next=005 (1)] loop_slice_fusion_9 grid: [100, 1, 1]
005: kWhile         [prev=004 (1) | next=009 (1)]   
condition:
    006: kCustomKernel [source | sink] loop_compare_fusion grid: [1, 1, 1]
  body:
    000: kCommandBuffer [source | sink] 
        007: kCustomKernel [source        | next=008 (1)] gemm_fusion_dot_16 grid: [32, 1, 1]
        008: kCustomKernel [prev=007 (1)  | sink] fusion_965 grid: [80, 1, 1]
009: kCopy           [prev=005 (1)  | sink] copy
"""


def test_reads_the_hosts_launches_from_the_launch_plan():
  once, per_step = gpu_kernels.launch_plan(THUNK_SEQUENCE)
  assert once == {'kConvolution': 1, 'kCommandBuffer': 1, 'kCustomKernel': 1, 'kCopy': 1}
  assert per_step == {'kCommandBuffer': 1}


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
