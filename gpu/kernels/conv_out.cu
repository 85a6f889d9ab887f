// 3x3 convolutions (stride 1, padding 1, NHWC fp16) to 8 output channels: the VAE's conv_out to
// RGB and the UNet's to its 4 latent channels, both padded to 8. A library convolution tiles
// the output channels 64 wide or more, so here most of its work is padding (cuDNN ran the VAE's
// at 4x the time its input read needs); this kernel maps them onto the tensor cores' smallest
// shape instead: mma.sync m16n8k16, 16 pixels of a row x 8 outputs x 16 channels a step, fp32
// sums.
//
// One warp per 16 pixels of `rows` (1 or 2) output rows of one image. With two, each input row
// it loads serves both output rows it lies under (4 rows read for 2 written, not 6): at large
// images the loads are what bound this kernel, not the MMAs; at small ones one row a warp keeps
// more warps in flight, so the engine build times both. The 16 k-slots of a step need not be 16 consecutive channels, only
// the same channels in A (pixels x channels) and B (channels x outputs): lane t loads channels
// 8k..8k+7 (k = t, t + 4, ...) of its pixels and of its output's filter as one 16-byte vector,
// which feeds two steps, channels 8k..8k+3 as slots (2t, 2t+1, 2t+8, 2t+9) of the first and
// 8k+4..8k+7 of the second. The three column taps' loads of a k are issued together, so a warp
// has many loads in flight instead of one tap's at a time.
#include <cuda_fp16.h>

// x [n, h, wd, c] (c a multiple of 32), w [8][3][3][c], bias [8] or null, y [n, h, wd, 8];
// `tiles` = n * ceil(h / rows) * ceil(wd / 16) warps, 4 a block.
extern "C" __global__ void __launch_bounds__(128) conv3x3_out8_nhwc_f16(const __half* __restrict__ x,
                                                                       const __half* __restrict__ w,
                                                                       const __half* __restrict__ bias,
                                                                       __half* __restrict__ y, int tiles, int h,
                                                                       int wd, int c, int rows) {
  LS_PDL_ENTER();
  const int tile = blockIdx.x * 4 + threadIdx.x / 32;
  if (tile >= tiles) return;  // the whole warp: no barrier follows
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int tiles_row = (wd + 15) / 16, groups = (h + rows - 1) / rows;
  const int x0 = (tile % tiles_row) * 16, rest = tile / tiles_row;
  const long image_row = (long)(rest / groups) * h;  // the image's first row
  const int py0 = (rest % groups) * rows;            // this warp's first output row
  const bool second = rows == 2 && py0 + 1 < h;      // an odd image height leaves it out
  const int xa = x0 + g, xb = x0 + g + 8;           // this lane's two pixels (A rows g and g + 8)
  const int c8 = c / 8;
  float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
  const uint4 zero = make_uint4(0, 0, 0, 0);
  bool va[3], vb[3];
#pragma unroll
  for (int dx = 0; dx < 3; ++dx) {
    va[dx] = xa + dx - 1 >= 0 && xa + dx - 1 < wd;
    vb[dx] = xb + dx - 1 >= 0 && xb + dx - 1 < wd;
  }
  // Filter of output g: tap (dy, dx) at w + (g * 9 + dy * 3 + dx) * c.
  const uint4* wg = reinterpret_cast<const uint4*>(w + (long)g * 9 * c);
  for (int i = 0; i < rows + 2; ++i) {  // input rows py0 - 1 .. py0 + rows
    const int yy = py0 + i - 1;
    if (yy < 0 || yy >= h) continue;  // the same for the whole warp
    // Output row j sees this input row through filter row i - j.
    const bool use0 = i <= 2, use1 = second && i >= 1;
    const uint4* src = reinterpret_cast<const uint4*>(x + (image_row + yy) * wd * (long)c);
    for (int k = t; k < c8; k += 4) {
      uint4 av[3], bv[3];
#pragma unroll
      for (int dx = 0; dx < 3; ++dx) {
        av[dx] = va[dx] ? src[(long)(xa + dx - 1) * c8 + k] : zero;
        bv[dx] = vb[dx] ? src[(long)(xb + dx - 1) * c8 + k] : zero;
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        if (!(j == 0 ? use0 : use1)) continue;
        const uint4* wt = wg + (long)(i - j) * 3 * c8 + k;
#pragma unroll
        for (int dx = 0; dx < 3; ++dx) {
          const uint4 wv = wt[(long)dx * c8];
          mma16816(acc[j], av[dx].x, bv[dx].x, av[dx].y, bv[dx].y, wv.x, wv.y);
          mma16816(acc[j], av[dx].z, bv[dx].z, av[dx].w, bv[dx].w, wv.z, wv.w);
        }
      }
    }
  }
  // C rows g and g + 8 (pixels xa, xb), columns 2t, 2t + 1 (outputs).
  const float b0 = bias ? __half2float(bias[2 * t]) : 0.f;
  const float b1 = bias ? __half2float(bias[2 * t + 1]) : 0.f;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    if (j == 1 && !second) break;
    __half2* out = reinterpret_cast<__half2*>(y + (image_row + py0 + j) * wd * 8L);
    if (xa < wd) out[xa * 4 + t] = __floats2half2_rn(acc[j][0] + b0, acc[j][1] + b1);
    if (xb < wd) out[xb * 4 + t] = __floats2half2_rn(acc[j][2] + b0, acc[j][3] + b1);
  }
}
