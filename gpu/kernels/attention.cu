// Multi-head attention, fp16 in/out, fp32 softmax: softmax(q k^T * scale) v per head.
// q [B, Lq, C], k [B, Lk, C], v [B, Lk, Cv]; head h takes channels [h*d, (h+1)*d).
// One warp per (image, head, query row), an online softmax over the keys, the output row held in
// registers (head dims up to 512: the VAE's single head). The correct baseline every faster
// (tensor-core, tiled) attention is checked against.
#include <cuda_fp16.h>

#define MAX_PER_LANE 16  // 512 / 32

extern "C" __global__ void attention_rowwise_f16(
    const __half* __restrict__ q, const __half* __restrict__ k, const __half* __restrict__ v,
    __half* __restrict__ o, int batch, int lq, int lk, int heads, int c, int cv, float scale) {
  const long warp = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (warp >= (long)batch * heads * lq) return;
  const int row = warp % lq;
  const int h = (warp / lq) % heads;
  const int b = warp / ((long)lq * heads);
  const int d = c / heads, dv = cv / heads;

  float qr[MAX_PER_LANE], acc[MAX_PER_LANE];
  const __half* qp = q + ((long)b * lq + row) * c + h * d;
#pragma unroll
  for (int j = 0; j < MAX_PER_LANE; ++j) {
    const int i = lane + 32 * j;
    qr[j] = i < d ? __half2float(qp[i]) * scale : 0.f;
    acc[j] = 0.f;
  }
  float m = -3.402823466e+38f, l = 0.f;  // -FLT_MAX: NVRTC has no math.h INFINITY
  for (int t = 0; t < lk; ++t) {
    const __half* kp = k + ((long)b * lk + t) * c + h * d;
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < MAX_PER_LANE; ++j) {
      const int i = lane + 32 * j;
      if (i < d) s += qr[j] * __half2float(kp[i]);
    }
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffff, s, off);
    const float m_new = fmaxf(m, s);
    const float corr = __expf(m - m_new);
    const float p = __expf(s - m_new);
    l = l * corr + p;
    const __half* vp = v + ((long)b * lk + t) * cv + h * dv;
#pragma unroll
    for (int j = 0; j < MAX_PER_LANE; ++j) {
      const int i = lane + 32 * j;
      if (i < dv) acc[j] = acc[j] * corr + p * __half2float(vp[i]);
    }
    m = m_new;
  }
  __half* op = o + ((long)b * lq + row) * cv + h * dv;
  const float inv = 1.f / l;
#pragma unroll
  for (int j = 0; j < MAX_PER_LANE; ++j) {
    const int i = lane + 32 * j;
    if (i < dv) op[i] = __float2half(acc[j] * inv);
  }
}
