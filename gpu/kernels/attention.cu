// Attention. Head dims 40/64/80/160 (the UNet's and whisper's) run in flash_attention below,
// fused, its key splits joined by flash_attention_join. Others (the VAE's single 512-wide head)
// run as two batched cuBLASLt GEMMs (scores = q kᵀ / sqrt(d), out = p v) around this row
// softmax, in place over the fp16 scores, fp32 arithmetic, one warp per row.
#include <cuda_fp16.h>

// A row lives in registers as PAIRS half2 values per lane (64 * PAIRS columns at most): read
// once, written once. Instantiated for 1024 (the UNet's and the VAE's 32x32 tokens) and 1536
// (whisper's 1500 frames) columns; cols must be even.
template <int PAIRS>
__device__ void softmax_row(__half2* __restrict__ r, int pairs, int lane) {
  float2 v[PAIRS];
  float m = -3.402823466e+38f;  // -FLT_MAX: NVRTC has no math.h INFINITY
#pragma unroll
  for (int j = 0; j < PAIRS; ++j) {
    const int i = lane + 32 * j;
    v[j] = i < pairs ? __half22float2(r[i]) : make_float2(-3.402823466e+38f, -3.402823466e+38f);
    m = fmaxf(m, fmaxf(v[j].x, v[j].y));
  }
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, off));
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < PAIRS; ++j) {
    const bool in = lane + 32 * j < pairs;
    v[j].x = in ? __expf(v[j].x - m) : 0.f;
    v[j].y = in ? __expf(v[j].y - m) : 0.f;
    sum += v[j].x + v[j].y;
  }
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, off);
  const float inv = 1.f / sum;
#pragma unroll
  for (int j = 0; j < PAIRS; ++j) {
    const int i = lane + 32 * j;
    if (i < pairs) r[i] = __floats2half2_rn(v[j].x * inv, v[j].y * inv);
  }
}

extern "C" __global__ void softmax_rows_f16x2_1024(__half2* __restrict__ x, long rows, int cols) {
  LS_PDL_ENTER();
  const long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  if (row >= rows) return;
  softmax_row<16>(x + row * (cols / 2), cols / 2, threadIdx.x & 31);
}

extern "C" __global__ void softmax_rows_f16x2_1536(__half2* __restrict__ x, long rows, int cols) {
  LS_PDL_ENTER();
  const long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  if (row >= rows) return;
  softmax_row<24>(x + row * (cols / 2), cols / 2, threadIdx.x & 31);
}

// Any width, three passes over the row (odd widths).
extern "C" __global__ void softmax_rows_f16(__half* __restrict__ x, long rows, int cols) {
  LS_PDL_ENTER();
  const long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  __half* r = x + row * cols;
  float m = -3.402823466e+38f;
  for (int i = lane; i < cols; i += 32) m = fmaxf(m, __half2float(r[i]));
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, off));
  float sum = 0.f;
  for (int i = lane; i < cols; i += 32) sum += __expf(__half2float(r[i]) - m);
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, off);
  const float inv = 1.f / sum;
  for (int i = lane; i < cols; i += 32) r[i] = __float2half(__expf(__half2float(r[i]) - m) * inv);
}

// Fused attention (flash style): o = softmax(q kᵀ · scale) v for every (image, head, query)
// without writing the scores anywhere. q [B, Lq, H*D], k and v [B, Lk, H*D], o [B, Lq, H*D],
// token-major exactly as the projections write them, so no head-major copies are needed.
//
// A block is warps of 16 x MT queries each (the launcher uses 4); it walks the keys in tiles of 64
// held in shared memory, copied asynchronously (cp.async) one tile ahead. Products are m16n8k16
// tensor-core MMAs with fp32 accumulation (V's fragments read transposed by ldmatrix); the
// softmax is online (running row max, in log2 units, and sum in fp32; only a split's last
// tile is masked), and the score accumulators are reused
// as the second product's A operand without leaving registers. D is the head dim (a multiple
// of 8), DP it rounded up to the MMA's k of 16 (zero padded).
#define FA_MAX_WARPS 4
#define FA_KEYS 64

// 16 bytes global -> shared without passing through registers; src_bytes 0 zero-fills.
__device__ __forceinline__ void cp_async16(__half* smem, const __half* gmem, int src_bytes) {
  const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned& b0, unsigned& b1, unsigned& b2,
                                                  unsigned& b3, const __half* row) {
  const unsigned a = (unsigned)__cvta_generic_to_shared(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(b0), "=r"(b1), "=r"(b2), "=r"(b3)
               : "r"(a));
}

// The B fragment (k16 x n8, column-major) of a row-major [k][n] tile: two 8x8 matrices read
// transposed. `row` is this lane's row address: rows k0 + (lane & 15) of the 8 columns.
__device__ __forceinline__ void ldmatrix_x2_trans(unsigned& b0, unsigned& b1, const __half* row) {
  const unsigned a = (unsigned)__cvta_generic_to_shared(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(b0), "=r"(b1)
               : "r"(a));
}

// 2^x in one SFU instruction. exp2f without fast math also handles denormal results, which
// costs a few more instructions per score; every exponent here is <= 0 and a result below 2^-126
// weighs nothing against the row's largest term, which is 1.
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ unsigned pack_half2(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}

// K and V fragments come through four-matrix ldmatrix: one instruction per two n8 tiles, where
// two 32-bit loads per K tile and a two-matrix ldmatrix per V tile measured 0.1-0.9 % slower on
// avatar batches of 16 and 24 and 3-6 % slower on whisper's 16 windows (H100, 2026-12-07).
template <int D, int MT>
__device__ void flash_attention(const __half* __restrict__ q, const __half* __restrict__ k,
                                const __half* __restrict__ v, __half* __restrict__ o, int lq,
                                int lk, int heads, int ldq, int ldkv, float scale_log2,
                                int splits, float* __restrict__ part) {
  constexpr int DP = (D + 15) / 16 * 16;
  // K and V tiles row-major [key][DP + 8] (the padding keeps both fragment reads conflict-free),
  // double-buffered where two stages fit in the 48 KB of static shared memory (all but D 160):
  // the next tile's copy runs while this one is multiplied.
  constexpr int KS = DP + 8;
  constexpr int STAGES = 2 * 2 * FA_KEYS * KS * 2 <= 48 * 1024 ? 2 : 1;
  __shared__ __align__(16) __half ks[STAGES][FA_KEYS * KS];
  __shared__ __align__(16) __half vs[STAGES][FA_KEYS * KS];
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  // With splits > 1, block z = image * splits + split walks only its split's run of key tiles
  // (the launcher makes every run non-empty) and leaves its unnormalised state in `part`.
  const int head = blockIdx.y, image = blockIdx.z / splits, split = blockIdx.z % splits;
  const int tiles = (lk + FA_KEYS - 1) / FA_KEYS, per_split = (tiles + splits - 1) / splits;
  const int key_begin = split * per_split * FA_KEYS;
  const int key_end = min(lk, key_begin + per_split * FA_KEYS);
  // o's rows hold the heads side by side; q's and k/v's rows may be wider (ldq, ldkv): one
  // projection GEMM wrote q, k and v (or k and v) side by side in each token's row.
  const long ld = (long)heads * D;
  const __half* qb = q + (long)image * lq * ldq + head * D;
  const __half* kb = k + (long)image * lk * ldkv + head * D;
  const __half* vb = v + (long)image * lk * ldkv + head * D;
  __half* ob = o + (long)image * lq * ld + head * D;
  // Each warp owns MT tiles of 16 query rows: every K and V fragment it reads from shared
  // memory feeds MT products (two halve the shared-memory reads per product, at the cost of
  // registers: the head dims up to 80 take two).
  const int row0 = (blockIdx.x * (blockDim.x / 32) + warp) * 16 * MT;

  // The K tiles' padding columns (D..DP) are never copied into: zero, so the products over DP
  // see only q's zero padding times zero. (The copies below never touch them; the first
  // __syncthreads of the loop orders these stores before any read.)
  for (int i = threadIdx.x; i < STAGES * FA_KEYS * (KS - D); i += blockDim.x) {
    const int st = i / (FA_KEYS * (KS - D)), r = i % (FA_KEYS * (KS - D));
    ks[st][(r / (KS - D)) * KS + D + r % (KS - D)] = __float2half(0.f);
  }

  // This warp's query rows as MMA A fragments, one per 16 columns of the head.
  unsigned qa[MT][DP / 16][4];
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int c = 0; c < DP / 16; ++c) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int row = row0 + m * 16 + g + (r & 1) * 8;
        const int col = c * 16 + (r >> 1) * 8 + 2 * t;
        unsigned val = 0;
        if (row < lq && col < D) val = *reinterpret_cast<const unsigned*>(qb + (long)row * ldq + col);
        qa[m][c][r] = val;
      }
    }
  }

  float acc[MT][D / 8][4];
  // Per tile m: the running max of rows g and g + 8 (in log2 units, scale applied) and sums.
  float mx[MT][2], l[MT][2];
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int j = 0; j < D / 8; ++j) acc[m][j][0] = acc[m][j][1] = acc[m][j][2] = acc[m][j][3] = 0.f;
    mx[m][0] = mx[m][1] = -1e30f;
    l[m][0] = l[m][1] = 0.f;
  }

  // Tile `tile` of this split's keys into stage `st`: 16-byte copies, keys past the split's end
  // zero-filled (their scores are masked; zero V rows keep 0 x garbage out of the sums).
  auto load = [&](int tile, int st) {
    const int key0 = key_begin + tile * FA_KEYS;
    constexpr int CHUNKS = FA_KEYS * D / 8;
    for (int i = threadIdx.x; i < CHUNKS; i += blockDim.x) {
      const int key = i / (D / 8), col = (i % (D / 8)) * 8;
      const bool in = key0 + key < key_end;
      const long at = in ? (long)(key0 + key) * ldkv + col : 0;
      cp_async16(ks[st] + key * KS + col, kb + at, in ? 16 : 0);
      cp_async16(vs[st] + key * KS + col, vb + at, in ? 16 : 0);
    }
    cp_async_commit();
  };
  const int ntiles = (key_end - key_begin + FA_KEYS - 1) / FA_KEYS;
  load(0, 0);
  for (int tile = 0; tile < ntiles; ++tile) {
    const int key0 = key_begin + tile * FA_KEYS, st = tile % STAGES;
    // One stage: this tile's copy waits for the previous tile's products (the loop's last
    // __syncthreads). Two: the next tile's copy goes out before this one's is waited for.
    if (STAGES == 1 && tile > 0) load(tile, 0);
    if (STAGES == 2 && tile + 1 < ntiles) {
      load(tile + 1, (tile + 1) % STAGES);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const __half* kt = ks[st];
    const __half* vt = vs[st];

    // Scores for 16 MT queries x 64 keys: 8 tiles of 8 keys, each K fragment read once.
    float s[MT][FA_KEYS / 8][4];
#pragma unroll
    for (int n = 0; n < FA_KEYS / 8; ++n) {
#pragma unroll
      for (int m = 0; m < MT; ++m) s[m][n][0] = s[m][n][1] = s[m][n][2] = s[m][n][3] = 0.f;
    }
    // Per pair of n8 key tiles, every k16 chunk's fragments first, then their products: the
    // loads' latencies overlap instead of each stalling the product that needs it.
#pragma unroll
    for (int n = 0; n < FA_KEYS / 8; n += 2) {
      unsigned kf[DP / 16][4];
#pragma unroll
      for (int c = 0; c < DP / 16; ++c)
        ldmatrix_x4(kf[c][0], kf[c][1], kf[c][2], kf[c][3],
                    kt + ((n + (lane >> 4)) * 8 + (lane & 7)) * KS + c * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
      for (int c = 0; c < DP / 16; ++c) {
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          mma16816(s[m][n], qa[m][c], kf[c][0], kf[c][1]);
          mma16816(s[m][n + 1], qa[m][c], kf[c][2], kf[c][3]);
        }
      }
    }
    // Only the split's last tile can reach past its keys.
    if (key0 + FA_KEYS > key_end) {
#pragma unroll
      for (int n = 0; n < FA_KEYS / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (key0 + n * 8 + 2 * t + (e & 1) >= key_end) {
#pragma unroll
            for (int m = 0; m < MT; ++m) s[m][n][e] = -1e30f;
          }
        }
      }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      // Online softmax in log2 units: rows g (values 0, 1) and g + 8 (values 2, 3). The scale
      // is positive, so the tile's raw maximum is scaled once instead of every score.
      float r0 = -1e30f, r1 = -1e30f;
#pragma unroll
      for (int n = 0; n < FA_KEYS / 8; ++n) {
        r0 = fmaxf(r0, fmaxf(s[m][n][0], s[m][n][1]));
        r1 = fmaxf(r1, fmaxf(s[m][n][2], s[m][n][3]));
      }
#pragma unroll
      for (int off = 1; off < 4; off <<= 1) {
        r0 = fmaxf(r0, __shfl_xor_sync(0xffffffff, r0, off));
        r1 = fmaxf(r1, __shfl_xor_sync(0xffffffff, r1, off));
      }
      const float m0 = fmaxf(mx[m][0], r0 * scale_log2), m1 = fmaxf(mx[m][1], r1 * scale_log2);
      const float c0 = ex2(mx[m][0] - m0), c1 = ex2(mx[m][1] - m1);
      mx[m][0] = m0;
      mx[m][1] = m1;
      l[m][0] *= c0;
      l[m][1] *= c1;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        acc[m][j][0] *= c0;
        acc[m][j][1] *= c0;
        acc[m][j][2] *= c1;
        acc[m][j][3] *= c1;
      }
#pragma unroll
      for (int n = 0; n < FA_KEYS / 8; ++n) {
        s[m][n][0] = ex2(fmaf(s[m][n][0], scale_log2, -m0));
        s[m][n][1] = ex2(fmaf(s[m][n][1], scale_log2, -m0));
        s[m][n][2] = ex2(fmaf(s[m][n][2], scale_log2, -m1));
        s[m][n][3] = ex2(fmaf(s[m][n][3], scale_log2, -m1));
        l[m][0] += s[m][n][0] + s[m][n][1];
        l[m][1] += s[m][n][2] + s[m][n][3];
      }
    }
    // acc += p v, 16 keys at a time; p's A fragment is two adjacent score tiles, each V
    // fragment read once for the MT tiles.
#pragma unroll
    for (int c = 0; c < FA_KEYS / 16; ++c) {
      unsigned pa[MT][4];
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        pa[m][0] = pack_half2(s[m][2 * c][0], s[m][2 * c][1]);
        pa[m][1] = pack_half2(s[m][2 * c][2], s[m][2 * c][3]);
        pa[m][2] = pack_half2(s[m][2 * c + 1][0], s[m][2 * c + 1][1]);
        pa[m][3] = pack_half2(s[m][2 * c + 1][2], s[m][2 * c + 1][3]);
      }
      // Groups of four n8 column tiles: their fragments first (two tiles an instruction), then
      // their products.
      constexpr int NJ = D / 8, JG = 4;
#pragma unroll
      for (int j0 = 0; j0 < NJ; j0 += JG) {
        unsigned vf[JG][2];
#pragma unroll
        for (int jj = 0; jj < JG; jj += 2) {
          const int j = j0 + jj;
          const __half* vr = vt + (c * 16 + (lane & 15)) * KS;
          if (j + 1 < NJ)
            ldmatrix_x4_trans(vf[jj][0], vf[jj][1], vf[jj + 1][0], vf[jj + 1][1],
                              vr + (j + (lane >> 4)) * 8);
          else if (j < NJ)
            ldmatrix_x2_trans(vf[jj][0], vf[jj][1], vr + j * 8);
        }
#pragma unroll
        for (int jj = 0; jj < JG; ++jj) {
          if (j0 + jj < NJ) {
#pragma unroll
            for (int m = 0; m < MT; ++m) mma16816(acc[m][j0 + jj], pa[m], vf[jj][0], vf[jj][1]);
          }
        }
      }
    }
    // Every warp is done with stage st before a later load overwrites it.
    __syncthreads();
  }

#pragma unroll
  for (int m = 0; m < MT; ++m) {
    float l0 = l[m][0], l1 = l[m][1];
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      l0 += __shfl_xor_sync(0xffffffff, l0, off);
      l1 += __shfl_xor_sync(0xffffffff, l1, off);
    }
    const int r0 = row0 + m * 16 + g, r1 = r0 + 8;
    if (splits > 1) {
      // part: o [splits, B, lq, heads*D] then (max, sum) [splits, B, heads, lq, 2], fp32; the
      // max in units of the scores (the join scales it).
      const long nb = gridDim.z / splits;
      const long at = (long)split * nb + image;
      float* po = part + at * lq * ld + head * D;
      float* pml = part + (long)splits * nb * lq * ld + (at * heads + head) * lq * 2;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        const int col = j * 8 + 2 * t;
        if (r0 < lq) *reinterpret_cast<float2*>(po + r0 * ld + col) = make_float2(acc[m][j][0], acc[m][j][1]);
        if (r1 < lq) *reinterpret_cast<float2*>(po + r1 * ld + col) = make_float2(acc[m][j][2], acc[m][j][3]);
      }
      if (t == 0) {
        if (r0 < lq) *reinterpret_cast<float2*>(pml + r0 * 2) = make_float2(mx[m][0] / scale_log2, l0);
        if (r1 < lq) *reinterpret_cast<float2*>(pml + r1 * 2) = make_float2(mx[m][1] / scale_log2, l1);
      }
      continue;
    }
    const float i0 = 1.f / l0, i1 = 1.f / l1;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      const int col = j * 8 + 2 * t;
      if (r0 < lq)
        *reinterpret_cast<__half2*>(ob + r0 * ld + col) =
            __floats2half2_rn(acc[m][j][0] * i0, acc[m][j][1] * i0);
      if (r1 < lq)
        *reinterpret_cast<__half2*>(ob + r1 * ld + col) =
            __floats2half2_rn(acc[m][j][2] * i1, acc[m][j][3] * i1);
    }
  }
}

#define FLASH(D, MT, NAME)                                                                            \
  extern "C" __global__ void __launch_bounds__(FA_MAX_WARPS * 32)                                     \
      NAME(const __half* q, const __half* k, const __half* v, __half* o, int lq, int lk, int heads,   \
           int ldq, int ldkv, float scale_log2, int splits, float* part) {                            \
    LS_PDL_ENTER();                                                                                   \
    flash_attention<D, MT>(q, k, v, o, lq, lk, heads, ldq, ldkv, scale_log2, splits, part);           \
  }
// The one-argument __launch_bounds__ on purpose: with an explicit minimum of 1 block, ptxas let
// flash_attention_64 grow from 96 to 134 registers (scripts/kernel_sass.sh), a block per SM fewer.
// Capping the registers at the old blocks per SM instead (`__launch_bounds__(128, 5)` at d64)
// measured 0-0.5 % slower on avatar batches than leaving them free (H100, 2026-12-07).
FLASH(40, 1, flash_attention_40)
FLASH(64, 1, flash_attention_64)
FLASH(80, 1, flash_attention_80)
FLASH(160, 1, flash_attention_160)
FLASH(40, 2, flash_attention_40_x2)
FLASH(64, 2, flash_attention_64_x2)
FLASH(80, 2, flash_attention_80_x2)

// Joins the key splits of flash_attention: o = sum_s 2^((m_s - M) c) acc_s / sum_s 2^((m_s - M) c)
// l_s with M the largest m_s and c = scale_log2. One thread per pair of output columns; `part`
// as flash_attention leaves it.
extern "C" __global__ void flash_attention_join(const float* __restrict__ part,
                                                __half* __restrict__ o, int batch, int lq,
                                                int heads, int d, int splits, float scale_log2) {
  LS_PDL_ENTER();
  const long ld = (long)heads * d;
  const long pairs = (long)batch * lq * ld / 2;
  const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= pairs) return;
  const long e = 2 * i;  // o's element index: ((image * lq + row) * heads + head) * d + col
  const int head = (int)((e % ld) / d);
  const long image_row = e / ld;
  const int row = (int)(image_row % lq), image = (int)(image_row / lq);
  const float* pml = part + (long)splits * batch * lq * ld;
  float mx = -3.402823466e+38f;
  for (int s = 0; s < splits; ++s)
    mx = fmaxf(mx, pml[((((long)s * batch + image) * heads + head) * lq + row) * 2]);
  float sum = 0.f, x = 0.f, y = 0.f;
  for (int s = 0; s < splits; ++s) {
    const float* ml = pml + ((((long)s * batch + image) * heads + head) * lq + row) * 2;
    const float w = exp2f((ml[0] - mx) * scale_log2);
    const float2 a = *reinterpret_cast<const float2*>(part + (long)s * batch * lq * ld + e);
    sum += w * ml[1];
    x += w * a.x;
    y += w * a.y;
  }
  const float inv = 1.f / sum;
  reinterpret_cast<__half2*>(o)[i] = __floats2half2_rn(x * inv, y * inv);
}
