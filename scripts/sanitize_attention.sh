#!/usr/bin/env bash
# compute-sanitizer over the native CUDA attention kernels, for a machine with a GPU and lmkern
# built with CUDA (LMKERN_BUILD_CUDA=1 pip install --no-build-isolation -e .): a few small
# cases of the forward, backward and decoding (with split-K and its combine, and a sequence
# that overflows its cache) under memcheck (out-of-bounds and misaligned accesses), racecheck
# (shared-memory hazards: cp.async, ldmatrix and the barriers between them), synccheck (barrier
# misuse) and initcheck (reads of uninitialised global memory). torch's caching allocator is
# turned off so that memcheck sees each tensor's own bounds. Exits non-zero if any tool reports.
#
#   scripts/sanitize_attention.sh [OUT]     logs in OUT (default build/sanitize-attention)
set -uo pipefail
out=$(mkdir -p "${1:-build/sanitize-attention}" && cd "${1:-build/sanitize-attention}" && pwd)
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
sanitizer=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}

cases=$(cat <<'EOF'
import torch

import lmkern._C  # noqa: F401  (registers torch.ops.lmkern.*)

torch.manual_seed(0)
ops = torch.ops.lmkern
for dtype, head_dim, (batch, heads, kv_heads, seqlen_q, seqlen_k), causal in [
    (torch.float16, 64, (2, 4, 2, 17, 70), True),
    (torch.bfloat16, 128, (2, 2, 1, 65, 129), False),
    (torch.float16, 128, (1, 2, 2, 130, 40), True),
]:
    q = torch.randn(batch, heads, seqlen_q, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(batch, kv_heads, seqlen_k, head_dim, device="cuda", dtype=dtype)
    v = torch.randn(batch, kv_heads, seqlen_k, head_dim, device="cuda", dtype=dtype)
    keep = torch.rand(batch, seqlen_k, device="cuda") > 0.3
    keep[-1] = False  # a fully padded sequence
    mask = keep[:, None, None, :].expand(batch, heads, seqlen_q, seqlen_k)
    out, lse = ops.attention_fwd(q, k, v, mask, causal, 0, head_dim**-0.5, 0.0, 0)
    ops.attention_bwd(torch.randn_like(out), q, k, v, out, lse, mask, causal, 0, head_dim**-0.5, 0.0, 0)

# Decoding: 2 splits of the 600-key caches (on any GPU with 7 or more multiprocessors), so the
# combine runs; one sequence that fits exactly, one that does not; then with rotary caches.
for head_dim in (64, 128):
    q = torch.randn(3, 4, 1, head_dim, device="cuda", dtype=torch.float16)
    k_cache = torch.randn(3, 2, 600, head_dim, device="cuda", dtype=torch.float16)
    v_cache = torch.randn_like(k_cache)
    k_new = torch.randn(3, 2, 1, head_dim, device="cuda", dtype=torch.float16)
    v_new = torch.randn_like(k_new)
    lengths = torch.tensor([599, 600, 37], dtype=torch.int32, device="cuda")
    ops.attention_with_kv_cache_fwd(q, k_cache, v_cache, lengths, k_new, v_new, head_dim**-0.5)
    # Rotary fused (partial, both layouts, two speculative tokens): caches of 500 positions,
    # so sequence 0's positions run past them (NaN, no read out of bounds).
    cos, sin = torch.randn(2, 500, head_dim // 4, device="cuda")
    q3, k3, v3 = (torch.randn(3, n, 2, head_dim, device="cuda", dtype=torch.float16) for n in (4, 2, 2))
    for interleaved in (False, True):
        ops.attention_with_kv_cache_fwd(q3, k_cache, v_cache, torch.tensor([590, 17, 0], dtype=torch.int32,
                                        device="cuda"), k3, v3, head_dim**-0.5, cos, sin, interleaved)
torch.cuda.synchronize()
print("cases ran")
EOF
)

status=0
for tool in memcheck racecheck synccheck initcheck; do
  echo "== $tool"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" --error-exitcode 1 \
    --kernel-name kns=attention "$python" -c "$cases" >"$out/$tool.log" 2>&1
  code=$?
  tail -n 5 "$out/$tool.log"
  if [ "$code" -ne 0 ]; then
    echo "$tool reported errors (exit $code): see $out/$tool.log" >&2
    status=1
  fi
done
exit "$status"
