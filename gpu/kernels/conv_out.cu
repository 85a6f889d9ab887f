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

// The same convolution of a group norm's output (+ SiLU), computed from the norm's input: the
// norm's statistics come from its two-pass form, and this kernel normalises each input element
// once, on its way into shared memory, so the normalised image is never written and read back
// (at the VAE's 256x256 x 128 channels that pass moved 2 x 400 MB at 24 images). The padding
// stays zero: it pads the convolution's input, the normalised image.
//
// One block of 4 warps per NO_ROWS output rows x NO_PIX pixels of one image; each warp owns 16
// pixels of every one of those rows. The input rows and pixels around the tile are staged
// NO_CH channels at a time; every staged A fragment (16 pixels x 16 channels, one ldmatrix)
// feeds the products of each output row it lies under.
#define NO_ROWS 6
#define NO_PIX 64
#define NO_CH 32
#define NO_THREADS 128
// Halves a staged pixel takes: its NO_CH channels and 8 of padding, so that the 8 pixels one
// ldmatrix matrix reads (80 bytes apart) fall in 8 distinct groups of 4 banks.
#define NO_PS 40
#define NO_ROWS_IN (NO_ROWS + 2)
#define NO_PIX_IN (NO_PIX + 2)

// SiLU as v sigmoid(v) = h + h tanh(h), h = v / 2, two channels at a time: one MUFU
// instruction for both (tanh.approx.f16x2) instead of an exponential and a division each.
// The result is fp16 either way; the approximation's error is of the order of its rounding.
__device__ __forceinline__ __half2 silu_tanh2(float a, float b) {
  const __half2 h = __floats2half2_rn(0.5f * a, 0.5f * b);
  unsigned th;
  asm("tanh.approx.f16x2 %0, %1;" : "=r"(th) : "r"(*reinterpret_cast<const unsigned*>(&h)));
  return __hfma2(h, *reinterpret_cast<const __half2*>(&th), h);
}

// x [n, h, wd, c] the norm's input (c a multiple of 32), stats [n, groups] (mean, 1/std) as
// group_norm_nhwc_finalize leaves them, gamma and beta [c], w [8][3][3][c], bias [8] or null,
// y [n, h, wd, 8]. Grid (ceil(wd / NO_PIX), ceil(h / NO_ROWS), n).
extern "C" __global__ void __launch_bounds__(NO_THREADS) conv3x3_out8_normed_nhwc_f16(
    const __half* __restrict__ x, const float2* __restrict__ stats, const __half* __restrict__ gamma,
    const __half* __restrict__ beta, const __half* __restrict__ w, const __half* __restrict__ bias,
    __half* __restrict__ y, int h, int wd, int c, int groups, int silu) {
  LS_PDL_ENTER();
  __shared__ __align__(16) __half tile[NO_ROWS_IN * NO_PIX_IN * NO_PS];
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int image = blockIdx.z, py0 = blockIdx.y * NO_ROWS, px0 = blockIdx.x * NO_PIX;
  const int cg = c / groups;
  float acc[NO_ROWS][4];
#pragma unroll
  for (int r = 0; r < NO_ROWS; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = 0.f;
  const __half* xi = x + (long)image * h * wd * c;
  const float2* st = stats + (long)image * groups;
  // Staged 16-byte vectors: (row, pixel, channel octet q), q fastest. The thread stride is a
  // multiple of the octets a pixel holds, so a thread always stages the same 8 channels of a
  // chunk: their scale and shift sit in registers.
  constexpr int OCTETS = NO_CH / 8, VECS = NO_ROWS_IN * NO_PIX_IN * OCTETS, BATCH = 4;
  static_assert(NO_THREADS % OCTETS == 0, "a thread keeps its channel octet");
  const int q = threadIdx.x % OCTETS;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int c0 = 0; c0 < c; c0 += NO_CH) {
    // The norm as one multiply-add per channel: this thread's 8.
    float scale[8], shift[8];
    {
      const int ch0 = c0 + q * 8;
      const uint4 gv = *reinterpret_cast<const uint4*>(gamma + ch0);
      const uint4 bv = *reinterpret_cast<const uint4*>(beta + ch0);
      const __half* gh = reinterpret_cast<const __half*>(&gv);
      const __half* bh = reinterpret_cast<const __half*>(&bv);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float2 s = st[(ch0 + j) / cg];
        scale[j] = s.y * __half2float(gh[j]);
        shift[j] = __half2float(bh[j]) - s.x * scale[j];
      }
    }
    // Every warp is done with the last stage's products.
    __syncthreads();
    for (int v0 = threadIdx.x; v0 < VECS; v0 += BATCH * NO_THREADS) {
      uint4 raw[BATCH];
      bool in[BATCH];
#pragma unroll
      for (int u = 0; u < BATCH; ++u) {
        const int v = v0 + u * NO_THREADS;
        const int p = (v / OCTETS) % NO_PIX_IN, r = v / (OCTETS * NO_PIX_IN);
        const int yy = py0 + r - 1, xx = px0 + p - 1;
        in[u] = v < VECS && yy >= 0 && yy < h && xx >= 0 && xx < wd;
        raw[u] = in[u] ? *reinterpret_cast<const uint4*>(xi + ((long)yy * wd + xx) * c + c0 + q * 8) : zero;
      }
#pragma unroll
      for (int u = 0; u < BATCH; ++u) {
        const int v = v0 + u * NO_THREADS;
        if (v >= VECS) break;
        if (in[u]) {
          __half2* hv = reinterpret_cast<__half2*>(&raw[u]);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const float2 f = __half22float2(hv[j]);
            const float a = fmaf(f.x, scale[2 * j], shift[2 * j]);
            const float b = fmaf(f.y, scale[2 * j + 1], shift[2 * j + 1]);
            hv[j] = silu ? silu_tanh2(a, b) : __floats2half2_rn(a, b);
          }
        }
        // v / OCTETS is the staged pixel, row-major over (row, pixel).
        *reinterpret_cast<uint4*>(tile + (v / OCTETS) * NO_PS + q * 8) = raw[u];
      }
    }
    // B fragments of this stage's channels: output g's filter, taps (dy, dx), two k16 steps.
    unsigned b[9][2][2];
    const __half* wg = w + (long)g * 9 * c + c0 + 2 * t;
#pragma unroll
    for (int tap = 0; tap < 9; ++tap) {
#pragma unroll
      for (int ks = 0; ks < 2; ++ks) {
        b[tap][ks][0] = *reinterpret_cast<const unsigned*>(wg + (long)tap * c + ks * 16);
        b[tap][ks][1] = *reinterpret_cast<const unsigned*>(wg + (long)tap * c + ks * 16 + 8);
      }
    }
    __syncthreads();
    // Staged row i (input row py0 + i - 1) lies under output rows i - 2 .. i, through filter
    // row dy = i - r.
#pragma unroll
    for (int i = 0; i < NO_ROWS_IN; ++i) {
#pragma unroll
      for (int dx = 0; dx < 3; ++dx) {
#pragma unroll
        for (int ks = 0; ks < 2; ++ks) {
          unsigned a0, a1, a2, a3;
          ldmatrix_x4(a0, a1, a2, a3,
                      tile + (i * NO_PIX_IN + warp * 16 + dx + (lane & 15)) * NO_PS + ks * 16 + (lane >> 4) * 8);
#pragma unroll
          for (int r = 0; r < NO_ROWS; ++r) {
            const int dy = i - r;
            if (dy >= 0 && dy <= 2) mma16816(acc[r], a0, a1, a2, a3, b[dy * 3 + dx][ks][0], b[dy * 3 + dx][ks][1]);
          }
        }
      }
    }
  }
  // C rows g and g + 8 (pixels), columns 2t, 2t + 1 (outputs).
  const float b0 = bias ? __half2float(bias[2 * t]) : 0.f;
  const float b1 = bias ? __half2float(bias[2 * t + 1]) : 0.f;
  const int xa = px0 + warp * 16 + g, xb = xa + 8;
#pragma unroll
  for (int r = 0; r < NO_ROWS; ++r) {
    if (py0 + r >= h) break;
    __half2* out = reinterpret_cast<__half2*>(y + (((long)image * h + py0 + r) * wd) * 8);
    if (xa < wd) out[xa * 4 + t] = __floats2half2_rn(acc[r][0] + b0, acc[r][1] + b1);
    if (xb < wd) out[xb * 4 + t] = __floats2half2_rn(acc[r][2] + b0, acc[r][3] + b1);
  }
}
