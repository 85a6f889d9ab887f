// 3x3 convolutions (stride 1, padding 1, NHWC fp16) from at most 3 input channels: the VAE
// encoder's conv_in on RGB crops. A library convolution pads such thin inputs to its tensor
// cores' channel granularity and runs at several times the time its output write needs (cuDNN
// took 0.78 ms for 32 images to 128 channels on an H100, where writing them takes ~0.18); here
// the whole 3x3 x cin window of a pixel is one row of an im2col matrix with K = 9 * cin <= 27,
// padded to 32, kept in registers: mma.sync m16n8k16, 16 pixels of a row x 8 outputs x 16 slots
// a step, two steps a tile of outputs, fp32 sums.
//
// One warp per 16 pixels of a row at a time (grid-stride over tiles): it gathers its pixels'
// windows once into the A fragments of both k steps (lane t holds slots 2t, 2t+1, 2t+8, 2t+9 of
// each step for pixels g and g + 8), then walks every 8-output tile of the filter, which the
// block keeps in shared memory (rows padded to 40 halves, so a warp's B-fragment loads hit 32
// distinct banks).
#include <cuda_fp16.h>

#define CONV_IN_KS 40

// x [n, h, wd, cin] (cin 1..3), w [o][3][3][cin], bias [o] or null, y [n, h, wd, o] (o a
// multiple of 8); `tiles` = n * h * ceil(wd / 16); dynamic shared memory o * (CONV_IN_KS + 1)
// halves.
extern "C" __global__ void __launch_bounds__(128) conv3x3_in_nhwc_f16(const __half* __restrict__ x,
                                                                     const __half* __restrict__ w,
                                                                     const __half* __restrict__ bias,
                                                                     __half* __restrict__ y, int tiles, int h,
                                                                     int wd, int cin, int o) {
  LS_PDL_ENTER();
  extern __shared__ __half conv_in_smem[];
  __half* ws = conv_in_smem;                   // [o][CONV_IN_KS], slots past 9 * cin zero
  __half* bs = conv_in_smem + o * CONV_IN_KS;  // [o]
  const int kk = 9 * cin;
  const __half zero = __float2half(0.f);
  for (int i = threadIdx.x; i < o * CONV_IN_KS; i += blockDim.x) {
    const int n = i / CONV_IN_KS, k = i - n * CONV_IN_KS;
    ws[i] = k < kk ? w[n * kk + k] : zero;
  }
  for (int i = threadIdx.x; i < o; i += blockDim.x) bs[i] = bias ? bias[i] : zero;
  __syncthreads();
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int tiles_row = (wd + 15) / 16;
  for (int tile = blockIdx.x * 4 + threadIdx.x / 32; tile < tiles; tile += gridDim.x * 4) {
    const long row = tile / tiles_row;  // image * h + output row
    const int py = (int)(row % h), x0 = (tile % tiles_row) * 16;
    // A fragments: a[s][r] holds, for k step s, pixel g (r even) or g + 8 (r odd) at slots
    // 16s + 2t (+1) (r < 2) or 16s + 2t + 8 (+1) (r >= 2).
    unsigned a[2][4];
#pragma unroll
    for (int s = 0; s < 2; ++s) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int px = x0 + g + ((r & 1) ? 8 : 0);
        const int k0 = 16 * s + 2 * t + ((r & 2) ? 8 : 0);
        __half v[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int k = k0 + e;
          v[e] = zero;
          if (k < kk && px < wd) {
            const int tap = k / cin, ci = k - tap * cin;
            const int dy = tap / 3, dx = tap - dy * 3;
            const int yy = py + dy - 1, xx = px + dx - 1;
            if (yy >= 0 && yy < h && xx >= 0 && xx < wd) {
              v[e] = x[((row + dy - 1) * wd + xx) * cin + ci];
            }
          }
        }
        a[s][r] = (unsigned)__half_as_ushort(v[0]) | ((unsigned)__half_as_ushort(v[1]) << 16);
      }
    }
    const int pa = x0 + g, pb = x0 + g + 8;
    __half* ya = y + (row * wd + pa) * (long)o;
    __half* yb = y + (row * wd + pb) * (long)o;
    for (int nt = 0; nt < o / 8; ++nt) {
      float c[4] = {0.f, 0.f, 0.f, 0.f};
      const __half* bcol = ws + (nt * 8 + g) * CONV_IN_KS + 2 * t;
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        const unsigned b0 = *reinterpret_cast<const unsigned*>(bcol + 16 * s);
        const unsigned b1 = *reinterpret_cast<const unsigned*>(bcol + 16 * s + 8);
        mma16816(c, a[s], b0, b1);
      }
      // C rows g and g + 8 (pixels pa, pb), columns 2t, 2t + 1 of this 8-output tile.
      const int oc = nt * 8 + 2 * t;
      const float b0 = __half2float(bs[oc]), b1 = __half2float(bs[oc + 1]);
      if (pa < wd) *reinterpret_cast<__half2*>(ya + oc) = __floats2half2_rn(c[0] + b0, c[1] + b1);
      if (pb < wd) *reinterpret_cast<__half2*>(yb + oc) = __floats2half2_rn(c[2] + b0, c[3] + b1);
    }
  }
}
