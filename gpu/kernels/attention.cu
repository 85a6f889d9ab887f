// Attention runs as two batched cuBLASLt GEMMs per layer (scores = q kᵀ / sqrt(d), out = p v)
// around this row softmax, in place over the fp16 scores, fp32 arithmetic. One warp per row.
#include <cuda_fp16.h>

extern "C" __global__ void softmax_rows_f16(__half* __restrict__ x, long rows, int cols) {
  const long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  __half* r = x + row * cols;
  float m = -3.402823466e+38f;  // -FLT_MAX: NVRTC has no math.h INFINITY
  for (int i = lane; i < cols; i += 32) m = fmaxf(m, __half2float(r[i]));
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, off));
  float sum = 0.f;
  for (int i = lane; i < cols; i += 32) sum += __expf(__half2float(r[i]) - m);
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, off);
  const float inv = 1.f / sum;
  for (int i = lane; i < cols; i += 32) r[i] = __float2half(__expf(__half2float(r[i]) - m) * inv);
}
