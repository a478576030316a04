// Direct 'same' convolutions for networks with few channels per layer (selfscale.direct).
//
// oneDNN's convolutions have a per-layer floor for 1-8 channels: a 1->1 5x5 layer costs almost
// as much as a 5->5 one. These kernels hold 16-float strips of up to 8 output channels (and of
// two rows, for up to 3 channels) in registers and stream the input taps through them, so their
// cost follows the channel count. For 1-2 output channels (kernels 3 and 5) on narrow images the
// forward pass runs down the rows instead, each input row shifted once for all K rows it feeds
// (with one channel the shifts, not the multiply-adds, were the bound; with K = 5 the sums
// stay in a ring of registers, stream_ring5, which also takes wider images and inference's
// bands: see ss_conv), and so does the weight gradient of one output channel.
//
// Buffers are planar float32. A *padded* buffer has planes of (H + K - 1) rows of
// Wp = ceil16(W) + K - 1 floats and is zero outside its interior [p, p + H) x [p, p + W),
// p = K / 2. Every result is a fixed-order sum: the forward pass gives every output to one
// thread; the weight gradient splits rows into `threads` contiguous ranges and adds the partial
// sums in thread order, so one thread count gives one result.
#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
static inline v16 ld(const float* p) { return *(const v16u*)p; }
// A padded buffer's row: W rounded up to whole strips, plus K - 1 (see the header).
static inline long padded_row(int W, int K) { return (W + 15) / 16 * 16 + K - 1; }
static inline void st(float* p, v16 v) { *(v16u*)p = v; }
static inline v16 ld_n(const float* p, int n) {   // n <= 16 floats, the rest 0
  if (n == 16) return ld(p);
  v16 v = {};
  std::memcpy(&v, p, 4 * n);
  return v;
}

// Floats s .. s + 15 of the 32 in (a, b), 0 <= s < 16: a strip shifted right by s columns,
// made from two loaded strips instead of loaded across a cache line (s is a constant once the
// tap loops are unrolled). With D > 0, b is not the next strip but the row's last 16 floats,
// the row ending K - 1 = 16 - D floats after a: float 16 + m of (a, next strip) is b[m + D].
typedef int v16i __attribute__((vector_size(64)));
#define SS_L(j) (S + j < 16 ? S + j : S + j + D)
template <int S, int D>
static inline v16 shifted_c(v16 a, v16 b) {
#if defined(__clang__)
  return __builtin_shufflevector(a, b, SS_L(0), SS_L(1), SS_L(2), SS_L(3), SS_L(4), SS_L(5),
                                 SS_L(6), SS_L(7), SS_L(8), SS_L(9), SS_L(10), SS_L(11),
                                 SS_L(12), SS_L(13), SS_L(14), SS_L(15));
#else
  return __builtin_shuffle(a, b, (v16i){SS_L(0), SS_L(1), SS_L(2), SS_L(3), SS_L(4), SS_L(5),
                                        SS_L(6), SS_L(7), SS_L(8), SS_L(9), SS_L(10), SS_L(11),
                                        SS_L(12), SS_L(13), SS_L(14), SS_L(15)});
#endif
}
#undef SS_L
template <int D>
static inline v16 shifted_by(v16 a, v16 b, int s) {
  switch (s) {
    case 0: return a;
    case 1: return shifted_c<1, D>(a, b);
    case 2: return shifted_c<2, D>(a, b);
    case 3: return shifted_c<3, D>(a, b);
    case 4: return shifted_c<4, D>(a, b);
    case 5: return shifted_c<5, D>(a, b);
    default: return shifted_c<6, D>(a, b);
  }
}
static inline v16 shifted(v16 a, v16 b, int s) { return shifted_by<0>(a, b, s); }
template <int K>   // a row's last strip a and the row's last 16 floats t
static inline v16 shifted_end(v16 a, v16 t, int s) { return shifted_by<17 - K>(a, t, s); }

struct Geo {                      // where plane c, row r, column x of a buffer lies
  long plane, row, off;           // floats per plane, per row; offset of (0, 0)
  inline long at(long c, long r) const { return c * plane + r * row + off; }
};

// out[co, r + j, x] = epilogue(b[co] + sum_{ci, ky, kx} w[co, ci, ky, kx] in[ci, r + j + ky, x + kx])
// for XB strips of 16 columns from x0 of RB rows r + j of one image; `in` is padded (off = 0).
// mode 0: plain, 1: relu, 2: zero where ref <= 0 (ReLU's gradient), ref laid out like out.
// RB x XB x CO independent accumulators hide the FMA latency when CO is small, and the RB rows
// share each input row's loads. Every output sums over ci, then ky, then kx, in that order,
// whatever RB and XB are. KC > 0: the kernel size, known at compile time (loops unrolled).
template <int CO, int XB, int RB, int KC>
static inline void fwd_strips(const float* in, Geo gi, const float* w, const float* b,
                              float* out, Geo go, const float* ref, int mode, const int* cos,
                              const int* cis, int nci, int Cin, int Kr, int W, int r, int x0) {
  const int K = KC ? KC : Kr;
  const long wco = (long)Cin * K * K;
  const int Wr = (W + 15) / 16 * 16;
  const bool at_end = x0 + 16 * XB >= Wr;   // the row ends K - 1 floats after these strips
  // one output channel: a strip shifted by kx is made from two loaded ones (a shuffle) rather
  // than loaded across a cache line, the loads being the bound; more channels bind on the FMAs
  constexpr bool shift = KC > 0 && CO == 1;
  static_assert(!shift || KC <= 7, "shifted() covers shifts up to 6");
  v16 acc[RB][XB][CO];
  for (int c = 0; c < CO; c++) {
    const float bias = b ? b[cos[c]] : 0.f;
    for (int j = 0; j < RB; j++)
      for (int s = 0; s < XB; s++) acc[j][s][c] = (v16){} + bias;
  }
  for (int i = 0; i < nci; i++) {
    const int ci = cis[i];
    const float* base = in + gi.at(ci, r) + x0;
    const float* wb = w + (long)ci * K * K;
    for (int ir = 0; ir < K + RB - 1; ir++) {     // input row r + ir: tap ky = ir - j of row j
      const float* row = base + (long)ir * gi.row;
      v16 ch[XB + 1];
      if (shift) {
        for (int s = 0; s < XB; s++) ch[s] = ld(row + 16 * s);
        ch[XB] = at_end ? ld(row + Wr - x0 + K - 17) : ld(row + 16 * XB);
      }
      for (int kx = 0; kx < K; kx++) {
        v16 v[XB];
        if (shift) {
          for (int s = 0; s < XB - 1; s++) v[s] = shifted(ch[s], ch[s + 1], kx);
          v[XB - 1] = at_end ? shifted_end<KC ? KC : 1>(ch[XB - 1], ch[XB], kx)
                             : shifted(ch[XB - 1], ch[XB], kx);
        } else {
          for (int s = 0; s < XB; s++) v[s] = ld(row + kx + 16 * s);
        }
        for (int j = 0; j < RB; j++) {
          const int ky = ir - j;
          if (ky < 0 || ky >= K) continue;
          const int t = ky * K + kx;
          for (int s = 0; s < XB; s++)
            for (int c = 0; c < CO; c++) acc[j][s][c] += v[s] * wb[cos[c] * wco + t];
        }
      }
    }
  }
  for (int j = 0; j < RB; j++)
    for (int s = 0; s < XB; s++) {
      const int xs = x0 + 16 * s, n = std::min(16, W - xs);
      for (int c = 0; c < CO; c++) {
        v16 v = acc[j][s][c];
        const long o = go.at(cos[c], r + j) + xs;
        if (mode == 1) { const v16 z = {}; v = v < z ? z : v; }   // NaN passes, as in torch
        if (mode == 2) { const v16 z = {}; v = ld_n(ref + o, n) <= z ? z : v; }
        if (n == 16) st(out + o, v); else std::memcpy(out + o, &v, 4 * n);
      }
    }
}

template <int CO, int RB, int KC>
static void fwd_rows_k(const float* in, Geo gi, const float* w, const float* b, float* out,
                       Geo go, const float* ref, int mode, const int* cos, const int* cis,
                       int nci, int Cin, int K, int W, int r) {
  constexpr int XB = CO <= 2 || (CO == 3 && RB == 2) ? 4 : 2;   // 8-24 accumulators
  int x0 = 0;
  for (; x0 + 16 * (XB - 1) < W; x0 += 16 * XB)
    fwd_strips<CO, XB, RB, KC>(in, gi, w, b, out, go, ref, mode, cos, cis, nci, Cin, K, W, r,
                               x0);
  for (; x0 < W; x0 += 16)
    fwd_strips<CO, 1, RB, KC>(in, gi, w, b, out, go, ref, mode, cos, cis, nci, Cin, K, W, r,
                              x0);
}

template <int CO, int RB>
static void fwd_rows(const float* in, Geo gi, const float* w, const float* b, float* out,
                     Geo go, const float* ref, int mode, const int* cos, const int* cis, int nci,
                     int Cin, int K, int W, int r) {
  if (K == 5)
    fwd_rows_k<CO, RB, 5>(in, gi, w, b, out, go, ref, mode, cos, cis, nci, Cin, K, W, r);
  else if (K == 3)
    fwd_rows_k<CO, RB, 3>(in, gi, w, b, out, go, ref, mode, cos, cis, nci, Cin, K, W, r);
  else
    fwd_rows_k<CO, RB, 0>(in, gi, w, b, out, go, ref, mode, cos, cis, nci, Cin, K, W, r);
}

// Rows r and r + 1 (`rows` = 2) or row r alone: two rows a pass for up to 3 channels. With 4,
// one row a pass (8 accumulators, not 16) ran a 4/4/1 network's forward 1.26-1.41x faster on 4
// images of 512² (AVX-512 Xeon, 2026, alternating with the two-row build in one process).
template <int CO>
static void fwd_row(const float* in, Geo gi, const float* w, const float* b, float* out,
                    Geo go, const float* ref, int mode, const int* cos, const int* cis, int nci,
                    int Cin, int K, int W, int r, int rows) {
  if (CO <= 3 && rows == 2) {
    fwd_rows<CO, 2>(in, gi, w, b, out, go, ref, mode, cos, cis, nci, Cin, K, W, r);
    return;
  }
  for (int j = 0; j < rows; j++)
    fwd_rows<CO, 1>(in, gi, w, b, out, go, ref, mode, cos, cis, nci, Cin, K, W, r + j);
}

// Streaming, for 1-2 output channels and a kernel size known at compile time: one block of XB
// strips of columns from x0 runs down rows y0 .. y1 - 1 of one image, input plane after input
// plane. Input row i holds tap ky = i - y of the K outputs y = i - K + 1 .. i, whose sums stay
// in registers (acc[j]: output i - K + 1 + j; they move down one as a row is done): each shifted
// strip of an input row is made once for K output rows instead of once per row pass, which is
// what bounds one channel. Every output still sums bias, then ci, ky, kx in that order (between
// two input planes the partial sums wait in `out`, exactly), the same bits as fwd_strips.
template <int CO, int XB, int K, bool END>
static void stream_block(const float* in, Geo gi, const float* w, const float* b, float* out,
                         Geo go, const float* ref, int mode, const int* cos, const int* cis,
                         int nci, int Cin, int W, int y0, int y1, int x0) {
  const long wco = (long)Cin * K * K;
  const int rows = y1 - y0, Wr = (W + 15) / 16 * 16;
  v16 acc[K][CO][XB];
  for (int j = 0; j < K; j++)
    for (int c = 0; c < CO; c++)
      for (int s = 0; s < XB; s++) acc[j][c][s] = (v16){};
  for (int i = 0; i < nci; i++) {
    const bool first = i == 0, last = i == nci - 1;
    const float* wp[CO];
    float bias[CO];
    for (int c = 0; c < CO; c++) {
      wp[c] = w + cos[c] * wco + (long)cis[i] * K * K;
      bias[c] = b ? b[cos[c]] : 0.f;
    }
    const float* plane = in + gi.plane * cis[i] + x0;
    for (int q = 0; q < rows + K - 1; q++) {
      if (q < rows) {                      // output y0 + q starts: bias, or its partial sum
        for (int c = 0; c < CO; c++)
          for (int s = 0; s < XB; s++) {
            const int xs = x0 + 16 * s;
            acc[K - 1][c][s] = first ? (v16){} + bias[c]
                                     : ld_n(out + go.at(cos[c], y0 + q) + xs, std::min(16, W - xs));
          }
      }
      const float* r = plane + (long)(y0 + q) * gi.row;
      v16 ch[XB + 1];
      for (int s = 0; s < XB; s++) ch[s] = ld(r + 16 * s);
      ch[XB] = END ? ld(r + Wr - x0 + K - 17) : ld(r + 16 * XB);
#pragma GCC unroll 8
      for (int kx = 0; kx < K; kx++) {
        v16 v[XB];
        for (int s = 0; s < XB - 1; s++) v[s] = shifted(ch[s], ch[s + 1], kx);
        v[XB - 1] = END ? shifted_end<K>(ch[XB - 1], ch[XB], kx) : shifted(ch[XB - 1], ch[XB], kx);
#pragma GCC unroll 8
        for (int j = 0; j < K; j++)        // outputs out of [y0, y1) sum what is never stored
          for (int s = 0; s < XB; s++)
            for (int c = 0; c < CO; c++) acc[j][c][s] += v[s] * wp[c][(K - 1 - j) * K + kx];
      }
      if (q >= K - 1) {                    // output y0 + q - K + 1 is complete
        const int y = y0 + q - K + 1;
        for (int c = 0; c < CO; c++)
          for (int s = 0; s < XB; s++) {
            const int xs = x0 + 16 * s, n = std::min(16, W - xs);
            v16 v = acc[0][c][s];
            const long o = go.at(cos[c], y) + xs;
            if (last && mode == 1) { const v16 z = {}; v = v < z ? z : v; }   // NaN passes
            if (last && mode == 2) { const v16 z = {}; v = ld_n(ref + o, n) <= z ? z : v; }
            if (n == 16) st(out + o, v); else std::memcpy(out + o, &v, 4 * n);
          }
      }
      for (int j = 0; j < K - 1; j++)
        for (int c = 0; c < CO; c++)
          for (int s = 0; s < XB; s++) acc[j][c][s] = acc[j + 1][c][s];
    }
  }
}

// Rows y0 .. y1 - 1 of one image, CO (1 or 2) channels, K 3 or 5: blocks of XB strips (and of
// one for what is left), the one whose row ends after it made with `shifted_end`.
template <int CO, int XB, int K>
static void stream_block_at(const float* in, Geo gi, const float* w, const float* b, float* out,
                            Geo go, const float* ref, int mode, const int* cos, const int* cis,
                            int nci, int Cin, int W, int y0, int y1, int x0) {
  const bool end = x0 + 16 * XB >= (W + 15) / 16 * 16;
  (end ? stream_block<CO, XB, K, true> : stream_block<CO, XB, K, false>)(
      in, gi, w, b, out, go, ref, mode, cos, cis, nci, Cin, W, y0, y1, x0);
}

// One or two output channels, K = 5, whole blocks (32 columns of one channel, 16 of two):
// stream_block with its ten sums in a ring of named registers. Slot j holds the sums of output
// row i - 4 + j of input row i, which feeds it tap row 4 - j; each row the loop passes the
// slots rotated by one instead of moving the sums down (stream_block moves them through memory,
// and its strips shifted by shuffles share a port with the multiply-adds), and reads the
// weights again rather than holding them in registers. 1.33x stream_block for a 1->1 layer on
// 12 images of 64², 1.12x a 2/2/1 network's retrains (AVX-512 Xeon, 2026); with K = 3 the same
// ring ran 0.91-0.98x, so K = 3 keeps stream_block. The same sums in the same order as
// stream_block: the same bits.
#define SS_AI __attribute__((always_inline))
// A slot is two sums: of two strips of one channel (CO = 1: u, v and one weight w0), or of one
// strip of two channels (CO = 2: u alone, weights w0 and w1).
template <int K, int CO, int J = 0, class... S>
static inline SS_AI void ring_taps(v16 u, v16 v, const float* w0, const float* w1, int kx,
                                   v16& s0, v16& s1, S&... rest) {
  const int t = (K - 1 - J) * K + kx;
  s0 += u * w0[t];
  if (CO == 1) s1 += v * w0[t]; else s1 += u * w1[t];
  if constexpr (sizeof...(rest) > 0) ring_taps<K, CO, J + 1>(u, v, w0, w1, kx, rest...);
}

template <int K, int CO, class... S>
static inline SS_AI void ring_row(const float* r, const float* w0, const float* w1,
                                  S&... slots) {
  __asm__("" : "+r"(w0), "+r"(w1));   // opaque: the weights are loaded in the row, not hoisted
#pragma GCC unroll 7
  for (int kx = 0; kx < K; kx++)
    ring_taps<K, CO>(ld(r + kx), CO == 1 ? ld(r + 16 + kx) : (v16){}, w0, w1, kx, slots...);
}

template <int CO>
static void stream_ring5(const float* in, Geo gi, const float* w, const float* b, float* out,
                         Geo go, const float* ref, int mode, const int* cos, const int* cis,
                         int nci, int Cin, int y0, int y1, int x0) {
  constexpr int K = 5;
  const long wco = (long)Cin * K * K;
  const int rows = y1 - y0, total = rows + K - 1;
  v16 a0 = {}, a1 = {}, b0 = {}, b1 = {}, c0 = {}, c1 = {}, d0 = {}, d1 = {}, e0 = {}, e1 = {};
  // the slot's second sum: the next strip of channel 0, or the same strip of channel 1
  const int c1i = CO == 1 ? 0 : 1;
  const long second = CO == 1 ? 16 : (long)(cos[c1i] - cos[0]) * go.plane;
  float* o = out + go.at(cos[0], y0) + x0;                      // output row y0, column x0
  const float* f = ref ? ref + go.at(cos[0], y0) + x0 : nullptr;
  for (int i = 0; i < nci; i++) {
    const bool first = i == 0, last = i == nci - 1;
    const float* w0 = w + cos[0] * wco + (long)cis[i] * K * K;
    const float* w1 = w + cos[c1i] * wco + (long)cis[i] * K * K;
    const float bias0 = b ? b[cos[0]] : 0.f, bias1 = b ? b[cos[c1i]] : 0.f;
    const float* in0 = in + gi.plane * cis[i] + x0 + (long)y0 * gi.row;
    // input row q (from y0): output y0 + q starts in slot K - 1, output y0 + q - K + 1 ends
    // in slot 0 (outputs out of [y0, y1) sum what is never stored, as in stream_block)
    auto step = [&](int q, v16& n0, v16& n1, auto&&... row) SS_AI {
      if (q < rows) {
        n0 = first ? (v16){} + bias0 : ld(o + (long)q * go.row);
        n1 = first ? (v16){} + bias1 : ld(o + (long)q * go.row + second);
      }
      ring_row<K, CO>(in0 + (long)q * gi.row, w0, w1, row...);
    };
    auto done = [&](int q, v16 s0, v16 s1) SS_AI {
      if (q < K - 1) return;
      const long at = (long)(q - K + 1) * go.row;
      const v16 z = {};
      if (last && mode == 1) { s0 = s0 < z ? z : s0; s1 = s1 < z ? z : s1; }   // NaN passes
      if (last && mode == 2) {
        s0 = ld(f + at) <= z ? z : s0;
        s1 = ld(f + at + second) <= z ? z : s1;
      }
      st(o + at, s0);
      st(o + at + second, s1);
    };
    for (int q = 0; q < total; q += 5) {   // five rows a pass: each slot back where it started
      step(q, e0, e1, a0, a1, b0, b1, c0, c1, d0, d1, e0, e1); done(q, a0, a1);
      if (q + 1 >= total) break;
      step(q + 1, a0, a1, b0, b1, c0, c1, d0, d1, e0, e1, a0, a1); done(q + 1, b0, b1);
      if (q + 2 >= total) break;
      step(q + 2, b0, b1, c0, c1, d0, d1, e0, e1, a0, a1, b0, b1); done(q + 2, c0, c1);
      if (q + 3 >= total) break;
      step(q + 3, c0, c1, d0, d1, e0, e1, a0, a1, b0, b1, c0, c1); done(q + 3, d0, d1);
      if (q + 4 >= total) break;
      step(q + 4, d0, d1, e0, e1, a0, a1, b0, b1, c0, c1, d0, d1); done(q + 4, e0, e1);
    }
  }
}

template <int CO, int K>
static void fwd_stream(const float* in, Geo gi, const float* w, const float* b, float* out,
                       Geo go, const float* ref, int mode, const int* cos, const int* cis,
                       int nci, int Cin, int W, int y0, int y1) {
  constexpr int XB = CO == 1 ? 2 : 1;
  int x0 = 0;
  if (K == 5)   // whole blocks: 32 columns of one channel, 16 of two
    for (; x0 + 32 / CO <= W; x0 += 32 / CO)
      stream_ring5<CO>(in, gi, w, b, out, go, ref, mode, cos, cis, nci, Cin, y0, y1, x0);
  for (; x0 + 16 * (XB - 1) < W; x0 += 16 * XB)
    stream_block_at<CO, XB, K>(in, gi, w, b, out, go, ref, mode, cos, cis, nci, Cin, W, y0, y1, x0);
  for (; x0 < W; x0 += 16)
    stream_block_at<CO, 1, K>(in, gi, w, b, out, go, ref, mode, cos, cis, nci, Cin, W, y0, y1, x0);
}
typedef void (*fwd_stream_fn)(const float*, Geo, const float*, const float*, float*, Geo,
                              const float*, int, const int*, const int*, int, int, int, int, int);

typedef void (*fwd_fn)(const float*, Geo, const float*, const float*, float*, Geo, const float*,
                       int, const int*, const int*, int, int, int, int, int, int);
static const fwd_fn FWD[9] = {nullptr, fwd_row<1>, fwd_row<2>, fwd_row<3>, fwd_row<4>,
                              fwd_row<5>, fwd_row<6>, fwd_row<7>, fwd_row<8>};

// `transposed`: w is (Cin, Cout, K, K), a layer whose outputs are this convolution's inputs, and
// the convolution uses it flipped: w'[co, ci, t] = w[ci, co, K*K-1-t] (the input gradient).
// Zero the padding of row r of the planes `cos` of one image of a padded buffer (border p):
// its left and right margins, and above the first row and below the last one.
// Row r's right margin and row r + 1's left margin are one run of row - W floats, zeroed in one
// call; row 0's call also zeroes the rows above and its own left margin, row H - 1's the rows
// below (its run goes on to the plane's end).
static void zero_border(float* img, long plane, long row, int p, int H, int W, const int* cos,
                        int nco, int r) {
  for (int c = 0; c < nco; c++) {
    float* pl = img + (long)cos[c] * plane;
    const long from = (long)(p + r) * row + p + W;
    if (r == 0) std::memset(pl, 0, sizeof(float) * ((long)p * row + p));
    std::memset(pl + from, 0, sizeof(float) * (r == H - 1 ? plane - from : row - W));
  }
}

// `pad` >= 0: `out` is a padded buffer with border `pad`, whose padding (the right margin up
// to the row's end included) is zeroed here too; the planes not in `cos` are left alone.
// `pad` < 0: the padding is left as it is (`out` is dense, or a padded buffer whose padding is
// already zero).
extern "C" void ss_conv(const float* in, long in_plane, long in_row, const float* w,
                        int transposed, const float* b, float* out, long out_plane, long out_row,
                        long out_off, int pad, const float* ref, int mode, const int* cos,
                        int nco, const int* cis, int nci, int N, int Cin, int Cout, int H, int W,
                        int K, int threads) {
  const Geo gi{in_plane, in_row, 0}, go{out_plane, out_row, out_off};
  std::vector<float> flipped;
  if (transposed) {
    const long KK = (long)K * K;
    flipped.resize((size_t)Cout * Cin * KK);
    for (long co = 0; co < Cout; co++)
      for (long ci = 0; ci < Cin; ci++)
        for (long t = 0; t < KK; t++)
          flipped[(co * Cin + ci) * KK + t] = w[(ci * Cout + co) * KK + KK - 1 - t];
    w = flipped.data();
  }
  // Streaming pays on narrow images, where a column block's rows stay in the first-level cache
  // (one input plane up to 256 wide, more up to 96; measured on an AVX-512 Xeon, 2026: 1.2-2.1x
  // for 1-2 channels at 64-96 wide, 0.4-0.9x at 512, with shuffled strips); wider images take
  // two rows a pass. K = 5's ring (stream_ring5) streams wider: up to 256 for any input
  // channels, up to 512 for one output channel or one input plane, and in calls of at most
  // 128 rows (inference's bands) while input planes x output channels x width <= 4096.
  // Against the row passes on one thread (alternating, same bits): 1.03-1.24x at 256 wide,
  // 1.05-1.25x for those at 512 on whole images; in 64-row bands 1.12-1.44x at 512 and
  // 1.07-1.54x for the shapes within the product up to 2048. Outside these, two output
  // channels from 2-5 planes at 512 ran 0.94-0.98x on whole images, and most shapes lost at
  // 1024 (0.63-0.98x; in bands 0.59-0.91x beyond the product).
  const int Wr = (W + 15) / 16 * 16;
  const bool ring = K == 5 && (Wr <= 256 || (Wr <= 512 && (nco == 1 || nci == 1)) ||
                               (H <= 128 && (long)nci * nco * Wr <= 4096));
  const bool stream = (K == 5 || K == 3) && nco >= 1 && nco <= 2 && nci >= 1 &&
                      (Wr <= 96 || (nci == 1 && Wr <= 256) || ring);
  const fwd_stream_fn f = !stream   ? nullptr
                          : nco == 1 ? (K == 5 ? fwd_stream<1, 5> : fwd_stream<1, 3>)
                                     : (K == 5 ? fwd_stream<2, 5> : fwd_stream<2, 3>);
  // work items: rows [y0, y1) of one image; streamed in bands (at least two per thread), or
  // two rows at a time
  const long items = stream ? std::max(1, std::min(H / 8, (2 * threads + N - 1) / N)) : (H + 1) / 2;
  #pragma omp parallel for schedule(static) num_threads(threads)
  for (long ni = 0; ni < (long)N * items; ni++) {
    const long n = ni / items, it = ni % items;
    const int y0 = (int)(stream ? it * H / items : 2 * it);
    const int y1 = (int)(stream ? (it + 1) * H / items : std::min<long>(H, 2 * it + 2));
    const float* nin = in + n * Cin * in_plane;
    float* no = out + n * Cout * out_plane;
    const float* nref = ref ? ref + n * Cout * out_plane : nullptr;
    if (stream)
      f(nin, gi, w, b, no, go, nref, mode, cos, cis, nci, Cin, W, y0, y1);
    else
      for (int c0 = 0; c0 < nco; c0 += 8)
        FWD[std::min(8, nco - c0)](nin, gi, w, b, no, go, nref, mode, cos + c0, cis, nci, Cin, K,
                                   W, y0, y1 - y0);
    if (pad >= 0)
      for (int r = y0; r < y1; r++) zero_border(no, out_plane, out_row, pad, H, W, cos, nco, r);
  }
}

// gw[co, ci, ky, kx] = sum_{n, r, x} g[n, co, r, x] in[n, ci, r + ky, x + kx];
// gb[co] = sum g[n, co, r, x]. `g` is padded (interior at off), zero beyond column W up to
// ceil16(W). Rows are split into `threads` contiguous ranges; partial sums are added in range
// order, so a thread count gives one result.
template <int CB>
static void wgrad_row(const float* in, Geo gi, const float* g, Geo gg, v16* acc, v16* bacc,
                      const int* cos, const int* cis, int nci, int K, int Wr, int r) {
  for (int x0 = 0; x0 < Wr; x0 += 16)
    for (int c = 0; c < CB; c++) bacc[c] += ld(g + gg.at(cos[c], r) + x0);
  for (int i = 0; i < nci; i++) {
    for (int ky = 0; ky < K; ky++) {
      const float* xrow = in + gi.at(cis[i], r + ky);
      for (int kx = 0; kx < K; kx++) {
        v16 a[CB];
        for (int c = 0; c < CB; c++) a[c] = (v16){};
        for (int x0 = 0; x0 < Wr; x0 += 16) {
          const v16 v = ld(xrow + x0 + kx);
          for (int c = 0; c < CB; c++) a[c] += v * ld(g + gg.at(cos[c], r) + x0);
        }
        for (int c = 0; c < CB; c++) acc[((long)c * nci + i) * K * K + ky * K + kx] += a[c];
      }
    }
  }
}

// The same for a kernel size known at compile time: the K x CB accumulators of one (ci, ky)
// stay in registers over the whole row, each strip of g loaded once for all K shifts.
template <int K, int CB>
static void wgrad_row_k(const float* in, Geo gi, const float* g, Geo gg, v16* acc, v16* bacc,
                        const int* cos, const int* cis, int nci, int, int Wr, int r) {
  const float* gr[CB];
  for (int c = 0; c < CB; c++) gr[c] = g + gg.at(cos[c], r);
  for (int x0 = 0; x0 < Wr; x0 += 16)
    for (int c = 0; c < CB; c++) bacc[c] += ld(gr[c] + x0);
  for (int i = 0; i < nci; i++) {
    for (int ky = 0; ky < K; ky++) {
      const float* xrow = in + gi.at(cis[i], r + ky);
      v16 a[K][CB];
      for (int kx = 0; kx < K; kx++)
        for (int c = 0; c < CB; c++) a[kx][c] = (v16){};
      // every strip but the last: its K shifts from this strip and the next
      static_assert(K <= 7, "shifted() covers shifts up to 6");
      v16 next = ld(xrow);
      int x0 = 0;
      for (; x0 + 16 < Wr; x0 += 16) {
        v16 gv[CB];
        for (int c = 0; c < CB; c++) gv[c] = ld(gr[c] + x0);
        const v16 here = next;
        next = ld(xrow + x0 + 16);
        for (int kx = 0; kx < K; kx++) {
          const v16 v = shifted(here, next, kx);
          for (int c = 0; c < CB; c++) a[kx][c] += v * gv[c];
        }
      }
      {   // the last strip: the row (Wr + K - 1 floats) ends K - 1 floats after it
        v16 gv[CB];
        for (int c = 0; c < CB; c++) gv[c] = ld(gr[c] + x0);
        const v16 end = ld(xrow + Wr + K - 17);
        for (int kx = 0; kx < K; kx++) {
          const v16 v = shifted_end<K>(next, end, kx);
          for (int c = 0; c < CB; c++) a[kx][c] += v * gv[c];
        }
      }
      for (int c = 0; c < CB; c++)
        for (int kx = 0; kx < K; kx++)
          acc[((long)c * nci + i) * K * K + ky * K + kx] += a[kx][c];
    }
  }
}

// Streaming, for one output channel and K 3 or 5: rows ra .. rb - 1 of one image and one input
// plane, input row after input row. Input row i meets the gradient rows r = i - ky of every tap
// row ky at once (K x K partial sums in registers), its strips shifted by kx loaded across cache
// lines: the loads have ports to spare here, the shuffles and multiply-adds share theirs
// (1.2-1.5x wgrad_row_k<K, 1>, AVX-512 Xeon, 2026). Each row r's partial sum of a tap still runs
// over the strips in order from zero and is added to acc in row order: the same bits.
template <int K, bool CHECK>
static inline void wgrad_stream_row(const float* xrow, const float* grow0, long grow_step,
                                    v16* acc, int Wr, int klo, int khi) {
  v16 part[K][K];
  for (int ky = 0; ky < K; ky++)
    for (int kx = 0; kx < K; kx++) part[ky][kx] = (v16){};
  for (int x0 = 0; x0 < Wr; x0 += 16) {
#pragma GCC unroll 8
    for (int kx = 0; kx < K; kx++) {
      const v16 v = ld(xrow + x0 + kx);
#pragma GCC unroll 8
      for (int ky = 0; ky < K; ky++) {
        if (CHECK && (ky < klo || ky > khi)) continue;
        part[ky][kx] += v * ld(grow0 - ky * grow_step + x0);
      }
    }
  }
  for (int ky = klo; ky <= khi; ky++)
    for (int kx = 0; kx < K; kx++) acc[ky * K + kx] += part[ky][kx];
}

template <int K>
static void wgrad_stream(const float* in, Geo gi, const float* g, Geo gg, v16* acc, int c,
                         int ci, int Wr, int ra, int rb) {
  for (int i = ra; i < rb + K - 1; i++) {   // input row i (padded): output rows i - ky
    const int klo = std::max(0, i - (rb - 1)), khi = std::min(K - 1, i - ra);
    const float* xrow = in + gi.at(ci, i);
    const float* grow0 = g + gg.at(c, 0) + (long)i * gg.row;   // g row i - ky: grow0 - ky rows
    if (klo == 0 && khi == K - 1)
      wgrad_stream_row<K, false>(xrow, grow0, gg.row, acc, Wr, 0, K - 1);
    else
      wgrad_stream_row<K, true>(xrow, grow0, gg.row, acc, Wr, klo, khi);
  }
}

typedef void (*wg_fn)(const float*, Geo, const float*, Geo, v16*, v16*, const int*, const int*,
                      int, int, int, int);
static const wg_fn WG[5] = {nullptr, wgrad_row<1>, wgrad_row<2>, wgrad_row<3>, wgrad_row<4>};
static const wg_fn WG3[5] = {nullptr, wgrad_row_k<3, 1>, wgrad_row_k<3, 2>, wgrad_row_k<3, 3>,
                             wgrad_row_k<3, 4>};
static const wg_fn WG5[5] = {nullptr, wgrad_row_k<5, 1>, wgrad_row_k<5, 2>, wgrad_row_k<5, 3>,
                             wgrad_row_k<5, 4>};
static const wg_fn WG7[4] = {nullptr, wgrad_row_k<7, 1>, wgrad_row_k<7, 2>, wgrad_row_k<7, 3>};

static inline float hsum(v16 v) {   // fixed order
  float s = 0.f;
  for (int j = 0; j < 16; j++) s += v[j];
  return s;
}

extern "C" void ss_wgrad(const float* in, long in_plane, long in_row, const float* g,
                         long g_plane, long g_row, long g_off, float* gw, float* gb,
                         const int* cos, int nco, const int* cis, int nci, int N, int Cin,
                         int Cout, int H, int W, int K, int threads) {
  const Geo gi{in_plane, in_row, 0}, gg{g_plane, g_row, g_off};
  const int Wr = (W + 15) / 16 * 16;
  const long per = (long)nco * nci * K * K + nco;   // v16 accumulators per thread
  std::vector<v16> part((size_t)threads * per);
  const long rows = (long)N * H;
  // One range of rows per part, however many threads OpenMP actually runs: the sums depend on
  // `threads` alone.
  #pragma omp parallel for schedule(static, 1) num_threads(threads)
  for (int t = 0; t < threads; t++) {
    v16* acc = part.data() + (size_t)t * per;
    for (long j = 0; j < per; j++) acc[j] = (v16){};
    const long lo = rows * t / threads, hi = rows * (t + 1) / threads;
    if (nco == 1 && (K == 5 || K == 3)) {   // streaming: the thread's rows image by image
      for (long n = lo / H; n * H < hi; n++) {
        const int ra = (int)(std::max(lo, n * H) - n * H),
                  rb = (int)(std::min(hi, (n + 1) * H) - n * H);
        if (ra >= rb) continue;
        const float* ni = in + n * Cin * in_plane;
        const float* ng = g + n * Cout * g_plane;
        v16* bacc = acc + (long)nci * K * K;
        for (int r = ra; r < rb; r++)
          for (int x0 = 0; x0 < Wr; x0 += 16) bacc[0] += ld(ng + gg.at(cos[0], r) + x0);
        for (int i = 0; i < nci; i++) {
          v16* a = acc + (long)i * K * K;
          if (K == 5) wgrad_stream<5>(ni, gi, ng, gg, a, cos[0], cis[i], Wr, ra, rb);
          else wgrad_stream<3>(ni, gi, ng, gg, a, cos[0], cis[i], Wr, ra, rb);
        }
      }
      continue;
    }
    for (long nr = lo; nr < hi; nr++) {
      const long n = nr / H; const int r = (int)(nr % H);
      const float* ni = in + n * Cin * in_plane;
      const float* ng = g + n * Cout * g_plane;
      const int block = K == 7 ? 3 : 4;
      const wg_fn* table = K == 3 ? WG3 : K == 5 ? WG5 : K == 7 ? WG7 : WG;
      for (int c0 = 0; c0 < nco; c0 += block) {
        const int cb = std::min(block, nco - c0);
        table[cb](ni, gi, ng, gg, acc + (long)c0 * nci * K * K,
                  acc + (long)nco * nci * K * K + c0, cos + c0, cis, nci, K, Wr, r);
      }
    }
  }
  const long KK = (long)K * K;
  for (int c = 0; c < nco; c++) {
    for (int i = 0; i < nci; i++)
      for (long t = 0; t < KK; t++) {
        float s = 0.f;
        for (int th = 0; th < threads; th++) s += hsum(part[(size_t)th * per + ((long)c * nci + i) * KK + t]);
        gw[((long)cos[c] * Cin + cis[i]) * KK + t] = s;
      }
    float s = 0.f;
    for (int th = 0; th < threads; th++) s += hsum(part[(size_t)th * per + (long)nco * nci * KK + c]);
    gb[cos[c]] = s;
  }
}

// dst[n, c] (a padded buffer, border p, every element written) = src in the interior, 0 in the
// padding; with `gate`: 0 where gate <= 0 instead (ReLU's gradient; NaN passes as in torch).
// src has any strides (an expanded gradient has stride 0); gate is dense (N, C, H, W).
extern "C" void ss_pad_copy(const float* src, long sn, long sc, long sh, long sw,
                            const float* gate, float* dst, long plane, long row, int p, int N,
                            int C, int H, int W, int threads) {
  #pragma omp parallel for schedule(static) num_threads(threads)
  for (long ncr = 0; ncr < (long)N * C * H; ncr++) {
    const long r = ncr % H, nc = ncr / H, c = nc % C, n = nc / C;
    const float* in = src + n * sn + c * sc + r * sh;
    float* pl = dst + nc * plane;
    float* out = pl + (p + r) * row;
    std::memset(out, 0, sizeof(float) * p);
    if (gate) {
      const float* gt = gate + ncr * W;
      for (int x = 0; x < W; x++) out[p + x] = gt[x] <= 0.f ? 0.f : in[x * sw];
    } else {
      for (int x = 0; x < W; x++) out[p + x] = in[x * sw];
    }
    std::memset(out + p + W, 0, sizeof(float) * (row - p - W));
    if (r == 0) std::memset(pl, 0, sizeof(float) * p * row);
    if (r == H - 1) std::memset(pl + (p + H) * row, 0, sizeof(float) * (plane - (p + H) * row));
  }
}

// ---------------------------------------------------------------------------------------------
// Inference through a whole stack (every layer ReLU), one image and one band of `band` output
// rows at a time, so that what a band's layers write and read stays in the caches: a layer-by-
// layer pass over several large images streams every activation through memory. Layer i of
// L computes rows [a, b) = the band widened by p (L - 1 - i) rows each way (clipped to the
// image), into a padded band buffer whose border rows are zero where the image ends and never
// read elsewhere; the rows the next band needs again are computed again. The band's input rows
// are copied from x (any strides) into a padded band buffer too. Each output is the same
// kernel's same fixed-order sum as in a layer-by-layer pass: the same bits. `out` is dense
// (N, chans[L], H, W); weights are contiguous (co, ci, ky, kx). forward_band: the output rows
// [y0, y0 + band) of image n.
static void forward_band(const float* x, const long* xs, int H, int W, int K, int L,
                         const int* chans, const float* const* ws, const float* const* bs,
                         const int* const* actives, const int* nact, float* out, int band,
                         long n, int y0, int threads) {
  const int p = K / 2, y1 = std::min(H, y0 + band);
  const long row = padded_row(W, K);
  std::vector<long> at(L), plane(L);                  // [0]: the input, [i + 1]: layer i's
  long total = 0;
  for (int i = 0; i < L; i++) {
    plane[i] = (long)(std::min(H, band + 2 * p * (L - std::max(i, 1))) + 2 * p) * row;
    at[i] = total;
    total += chans[i] * plane[i];
  }
  static thread_local std::vector<float> buf;   // every element read is written first
  buf.resize((size_t)total);
  std::vector<int> all(chans[0]);
  for (int c = 0; c < chans[0]; c++) all[c] = c;
  // input rows a - p .. b + p - 1 of layer 0's [a, b), zero outside the image
  const int a0 = std::max(0, y0 - p * (L - 1)), b0 = std::min(H, y1 + p * (L - 1));
  float* src = buf.data();
  for (int c = 0; c < chans[0]; c++)
    for (int r = a0 - p; r < b0 + p; r++) {
      float* d = src + c * plane[0] + (long)(r - a0 + p) * row;
      std::memset(d, 0, sizeof(float) * row);
      if (r < 0 || r >= H) continue;
      const float* s = x + n * xs[0] + c * xs[1] + r * xs[2];
      if (xs[3] == 1) std::memcpy(d + p, s, sizeof(float) * W);
      else for (int q = 0; q < W; q++) d[p + q] = s[q * xs[3]];
    }
  long src_plane = plane[0];
  int above = a0;                         // the image row at row p of src
  const int* ins = all.data();
  int nin = chans[0];
  for (int i = 0; i < L; i++) {
    const int a = std::max(0, y0 - p * (L - 1 - i)), b = std::min(H, y1 + p * (L - 1 - i));
    const float* s = src + (long)(a - above) * row;   // input rows a - p .. b + p - 1
    if (i == L - 1) {
      ss_conv(s, src_plane, row, ws[i], 0, bs[i], out + (n * chans[L] * H + a) * W, (long)H * W,
              W, 0, -1, nullptr, 1, actives[i], nact[i], ins, nin, 1, chans[i], chans[L], b - a,
              W, K, threads);
    } else {
      float* dst = buf.data() + at[i + 1];
      ss_conv(s, src_plane, row, ws[i], 0, bs[i], dst, plane[i + 1], row, p * row + p, p,
              nullptr, 1, actives[i], nact[i], ins, nin, 1, chans[i], chans[i + 1], b - a, W, K,
              threads);
      src = dst; src_plane = plane[i + 1]; above = a; ins = actives[i]; nin = nact[i];
    }
  }
}

// Bands are shared among the threads (each band one thread's, with its own buffers), or, with
// fewer bands than threads, each band's rows are.
extern "C" void ss_forward(const float* x, const long* xs, int N, int H, int W, int K, int L,
                           const int* chans, const float* const* ws, const float* const* bs,
                           const int* const* actives, const int* nact, float* out, int band,
                           int threads) {
  const int bands = (H + band - 1) / band;
  const long items = (long)N * bands;
  if (threads > 1 && items >= threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long it = 0; it < items; it++)
      forward_band(x, xs, H, W, K, L, chans, ws, bs, actives, nact, out, band, it / bands,
                   (int)(it % bands) * band, 1);
  } else {
    for (long it = 0; it < items; it++)
      forward_band(x, xs, H, W, K, L, chans, ws, bs, actives, nact, out, band, it / bands,
                   (int)(it % bands) * band, threads);
  }
}

// ---------------------------------------------------------------------------------------------
// One whole training step in one call (selfscale.direct_step): forward through every layer,
// the loss and its gradient, backward, frozen masks, gradient clipping and Adam. The same
// kernels as above, called without Python, buffers or autograd between them.
//
// Parameters are strided float32 tensors (a channels_last weight is read and updated in place
// through its strides); Adam's moments have their parameter's strides. x is (N, C0, H, W) and
// y (N, CL, H, W), both strided (y's rows contiguous). Returns the loss (batch mean), computed in double.
namespace {
thread_local std::vector<float> workspace;

long padded_plane(int H, int W, int K) { return (long)(H + K - 1) * padded_row(W, K); }

// The loss of one image from its output o (padded, interior at off, zero right of it) and its
// target t (rows contiguous), and the gradient coefficients:
// d loss / d o = a * sgn(o - t) + b * t + c * (o - t). Sums: 16 float lanes per row, each lane
// added over the rows in double, then the 16 lanes in order: a fixed order, and no horizontal
// sum per row (which cost a 1-channel network's step as much as a convolution).
struct LossTerms { double loss, a, b, c; };

typedef double v8d __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
struct Sum16 {                 // 16 double lanes
  v8d lo = {}, hi = {};
  inline void add(v16 v) {   // halves by shuffles (a copy through memory would pin v there)
#if defined(__clang__) || __GNUC__ >= 12
    const v8f l = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7),
              h = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#else
    v8f l, h;
    for (int j = 0; j < 8; j++) { l[j] = v[j]; h[j] = v[8 + j]; }
#endif
    lo += __builtin_convertvector(l, v8d); hi += __builtin_convertvector(h, v8d);
  }
  double total() const {
    double s = 0;
    for (int j = 0; j < 8; j++) s += lo[j];
    for (int j = 0; j < 8; j++) s += hi[j];
    return s;
  }
};

LossTerms loss_terms(int kind, const float* o, Geo go, const float* t, long tc, long th, int C,
                     int H, int W) {
  const bool f1 = kind == 2, need_abs = kind == 0 || f1;   // mse needs only the squares
  Sum16 s_abs, s_sq, s_tp;
  for (int c = 0; c < C; c++)
    for (int r = 0; r < H; r++) {
      const float* orow = o + go.at(c, r);
      const float* trow = t + c * tc + r * th;
      v16 a = {}, q = {}, tp = {};
      for (int x0 = 0; x0 < W; x0 += 16) {
        const v16 ov = ld(orow + x0), tv = ld_n(trow + x0, std::min(16, W - x0));
        const v16 d = ov - tv;
        if (need_abs) a += d < 0 ? -d : d;
        if (kind == 1) q += d * d;
        if (f1) tp += ov * tv;
      }
      if (need_abs) s_abs.add(a);
      if (kind == 1) s_sq.add(q);
      if (f1) s_tp.add(tp);
    }
  const double m = (double)C * H * W;
  if (kind == 0) return {s_abs.total() / m, 1.0 / m, 0, 0};         // mae
  if (kind == 1) return {s_sq.total() / m, 0, 0, 2.0 / m};          // mse
  const double sa = s_abs.total(), den = 2 * s_tp.total() + sa;     // f1: E / (2 TP + E)
  if (den == 0) return {0, 0, 0, 0};
  return {sa / den, 1.0 / den - sa / (den * den), -2.0 * sa / (den * den), 0};
}
}  // namespace

// `xpad`: the input already in a padded buffer of this step's layout (zero outside each plane's
// interior), read in place instead of copying x.
static double step_on(const float* x, const long* xs, const float* xpad, const float* y,
                      const long* ys, int N, int H, int W, int K, int L, const int* chans,
                      float* const* params, const long* wstrides, float* const* exp_avg,
                      float* const* exp_avg_sq, float* const* steps, const int* const* actives,
                      const int* nact, const unsigned char* const* frozen, int loss, double lr,
                      double beta1, double beta2, double eps, double clip, int threads) {
  const int p = K / 2;
  const long plane = padded_plane(H, W, K), row = padded_row(W, K), off = p * row + p;
  const long KK = (long)K * K;
  int widest = 0;
  std::vector<long> at(L + 1), wat(L), gat(2 * L);   // activation, weight copy, gradient offsets
  long total = 0, wtotal = 0, gtotal = 0;
  for (int i = 0; i <= L; i++) { at[i] = total; total += (long)N * chans[i] * plane;
                                 widest = std::max(widest, chans[i]); }
  for (int i = 0; i < L; i++) {
    wat[i] = wtotal; wtotal += (long)chans[i + 1] * chans[i] * KK;
    gat[2 * i] = gtotal; gtotal += (long)chans[i + 1] * chans[i] * KK;
    gat[2 * i + 1] = gtotal; gtotal += chans[i + 1];
  }
  const long gbuf = (long)N * widest * plane;
  // the planes' padding is zeroed once per layout (N, H, W, K, chans) and stays zero: the
  // kernels write interiors only, and the loss gradient writes zeros right of W
  static thread_local std::vector<long> layout;
  std::vector<long> key = {N, H, W, K, L};
  key.insert(key.end(), chans, chans + L + 1);
  if (key != layout) {
    workspace.assign((size_t)(total + 2 * gbuf + wtotal + gtotal), 0.f);
    layout = key;
  }
  float* act = workspace.data();
  float* g0 = act + total; float* g1 = g0 + gbuf;
  float* wc = g1 + gbuf; float* grad = wc + wtotal;
  std::vector<int> all(widest);
  for (int c = 0; c < widest; c++) all[c] = c;

  // weights in (co, ci, ky, kx) order, read through their strides
  for (int i = 0; i < L; i++) {
    const long* s = wstrides + 4 * i;
    for (long co = 0; co < chans[i + 1]; co++)
      for (long ci = 0; ci < chans[i]; ci++)
        for (long ky = 0; ky < K; ky++)
          for (long kx = 0; kx < K; kx++)
            wc[wat[i] + ((co * chans[i] + ci) * K + ky) * K + kx] =
                params[2 * i][co * s[0] + ci * s[1] + ky * s[2] + kx * s[3]];
  }
  // the kernels read only the planes of enabled masks, except the loss, which reads every
  // output plane: a disabled output mask's plane is zero (the workspace is reused)
  if (nact[L - 1] != chans[L]) {
    std::vector<char> on(chans[L], 0);
    for (int j = 0; j < nact[L - 1]; j++) on[actives[L - 1][j]] = 1;
    for (long n = 0; n < N; n++)
      for (int c = 0; c < chans[L]; c++)
        if (!on[c]) std::memset(act + at[L] + (n * chans[L] + c) * plane, 0, sizeof(float) * plane);
  }
  // forward
  auto input = [&](int i) -> const float* { return i == 0 && xpad ? xpad : act + at[i]; };
  if (!xpad)
    ss_pad_copy(x, xs[0], xs[1], xs[2], xs[3], nullptr, act, plane, row, p, N, chans[0], H, W,
                threads);
  for (int i = 0; i < L; i++)
    ss_conv(input(i), plane, row, wc + wat[i], 0, params[2 * i + 1], act + at[i + 1], plane,
            row, off, -1, nullptr, 1, actives[i], nact[i], i ? actives[i - 1] : all.data(),
            i ? nact[i - 1] : chans[0], N, chans[i], chans[i + 1], H, W, K, threads);
  // loss, and its gradient times ReLU's (zero where the output is <= 0) into g0, padded
  const int CL = chans[L];
  const float* out = act + at[L];
  double total_loss = 0;
  for (long n = 0; n < N; n++) {
    const Geo go{plane, row, off};
    const float* on = out + n * CL * plane;
    const float* tn = y + n * ys[0];
    const LossTerms lt = loss_terms(loss, on, go, tn, ys[1], ys[2], CL, H, W);
    total_loss += lt.loss;
    const v16 fa = (v16){} + (float)(lt.a / N), fb = (v16){} + (float)(lt.b / N),
              fc = (v16){} + (float)(lt.c / N), one = (v16){} + 1.f, zero = {};
    for (int c = 0; c < CL; c++) {
      float* gp = g0 + (n * CL + c) * plane;
      for (int r = 0; r < H; r++) {
        const float* orow = on + go.at(c, r);
        const float* trow = tn + c * ys[1] + r * ys[2];
        float* grow = gp + (p + r) * row + p;
        for (int x0 = 0; x0 < W; x0 += 16) {   // 0 right of W: o and t are (so sgn, v are)
          const v16 o = ld(orow + x0), t = ld_n(trow + x0, std::min(16, W - x0)), d = o - t;
          const v16 sgn = (d > zero ? one : zero) - (d < zero ? one : zero);
          v16 v = fa * sgn + fb * t + fc * d;
          st(grow + x0, o <= zero ? zero : v);               // NaN passes, as in torch
        }
      }
    }
  }
  // backward: weight and bias gradients, then the previous layer's (gated) output gradient
  std::fill(grad, grad + gtotal, 0.f);
  float* g = g0; float* gn = g1;
  for (int i = L - 1; i >= 0; i--) {
    const int* ins = i ? actives[i - 1] : all.data();
    const int nin = i ? nact[i - 1] : chans[0];
    ss_wgrad(input(i), plane, row, g, plane, row, off, grad + gat[2 * i],
             grad + gat[2 * i + 1], actives[i], nact[i], ins, nin, N, chans[i], chans[i + 1],
             H, W, K, threads);
    if (i > 0) {
      ss_conv(g, plane, row, wc + wat[i], 1, nullptr, gn, plane, row, off, -1, act + at[i], 2,
              ins, nin, actives[i], nact[i], N, chans[i + 1], chans[i], H, W, K, threads);
      std::swap(g, gn);
    }
  }
  // frozen masks get no gradient
  for (int i = 0; i < L; i++) {
    if (!frozen[i]) continue;
    const long per = (long)chans[i] * KK;
    for (int co = 0; co < chans[i + 1]; co++)
      if (frozen[i][co]) {
        std::fill(grad + gat[2 * i] + co * per, grad + gat[2 * i] + (co + 1) * per, 0.f);
        grad[gat[2 * i + 1] + co] = 0.f;
      }
  }
  // clip the total gradient norm as torch.nn.utils.clip_grad_norm_ does
  if (clip > 0) {
    double sq = 0;
    for (long j = 0; j < gtotal; j++) sq += (double)grad[j] * grad[j];
    const float coef = (float)std::min(clip / (std::sqrt(sq) + 1e-6), 1.0);
    for (long j = 0; j < gtotal; j++) grad[j] *= coef;
  }
  // Adam (no weight decay, no amsgrad), each parameter with its own step count
  for (int j = 0; j < 2 * L; j++) {
    const int i = j / 2;
    const float step = (*steps[j] += 1.f);
    const double bc1 = 1 - std::pow(beta1, (double)step), bc2 = 1 - std::pow(beta2, (double)step);
    const float step_size = (float)(lr / bc1), bc2_sqrt = (float)std::sqrt(bc2);
    const float b1 = (float)(1 - beta1), b2 = (float)beta2, nb2 = (float)(1 - beta2);
    const float fe = (float)eps;
    const float* gj = grad + gat[j];
    auto update = [&](long e, long k) {
      const float gv = gj[k];
      float& m = exp_avg[j][e]; float& v = exp_avg_sq[j][e];
      m = m + b1 * (gv - m);
      v = v * b2 + nb2 * gv * gv;
      params[j][e] -= step_size * (m / (std::sqrt(v) / bc2_sqrt + fe));
    };
    if (j % 2) {
      for (long k = 0; k < chans[i + 1]; k++) update(k, k);
    } else {
      const long* s = wstrides + 4 * i;
      long k = 0;
      for (long co = 0; co < chans[i + 1]; co++)
        for (long ci = 0; ci < chans[i]; ci++)
          for (long ky = 0; ky < K; ky++)
            for (long kx = 0; kx < K; kx++, k++)
              update(co * s[0] + ci * s[1] + ky * s[2] + kx * s[3], k);
    }
  }
  return total_loss / N;
}

extern "C" double ss_step(const float* x, const long* xs, const float* y, const long* ys, int N,
                          int H, int W, int K, int L, const int* chans, float* const* params,
                          const long* wstrides, float* const* exp_avg, float* const* exp_avg_sq,
                          float* const* steps, const int* const* actives, const int* nact,
                          const unsigned char* const* frozen, int loss, double lr, double beta1,
                          double beta2, double eps, double clip, int threads) {
  return step_on(x, xs, nullptr, y, ys, N, H, W, K, L, chans, params, wstrides, exp_avg,
                 exp_avg_sq, steps, actives, nact, frozen, loss, lr, beta1, beta2, eps, clip,
                 threads);
}

// ---------------------------------------------------------------------------------------------
// The UIQI map (selfscale.metrics.uiqi_map) of N image pairs: float32 in, float64 out, the same
// operations in the same order as the PyTorch version and so the same bits: 8-wide sums along
// each row (left to right), 8-tall sums of those (top to bottom), then the formula term by term.
// The sums' products are of float32 values, exact in double, so a fused multiply-add gives
// the same bits there; the formula's would not, so contraction is off for it.
#if defined(__clang__)
#define SS_NO_CONTRACT
#else
#define SS_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#endif

// One window row of the map: each window's five sums add its eight row sums top to bottom
// (rows[k] is the window's k-th row), then the formula term by term. Each sum stays in a
// register until its formula has used it: the row sums are read once, nothing is written back.
static SS_NO_CONTRACT void uiqi_window_row(const double* const* rows, int OW, double* __restrict o) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  const double n = 64.0;
  const double *r0 = rows[0], *r1 = rows[1], *r2 = rows[2], *r3 = rows[3], *r4 = rows[4],
               *r5 = rows[5], *r6 = rows[6], *r7 = rows[7];
  for (int x = 0; x < OW; x++) {
    double q[5];
    for (int c = 0; c < 5; c++) {
      const long i = (long)c * OW + x;
      q[c] = ((((((r0[i] + r1[i]) + r2[i]) + r3[i]) + r4[i]) + r5[i]) + r6[i]) + r7[i];
    }
    const double sx = q[0], sy = q[1], sxx = q[2], syy = q[3], sxy = q[4];
    const double sx_sy = sx * sy;
    const double d2 = sx * sx + sy * sy;
    const double numerator = 4 * (n * sxy - sx_sy) * sx_sy;
    const double d1 = n * (sxx + syy) - d2;
    const double denominator = d1 * d2;
    // one division: num / den, (2 sx sy) / d2 where both windows are constant, else 1 / 1
    const bool constant = d1 == 0 && d2 != 0, regular = denominator != 0;
    const double top = regular ? numerator : constant ? 2 * sx_sy : 1.0;
    const double bottom = regular ? denominator : constant ? d2 : 1.0;
    o[x] = top / bottom;
  }
}

// Row sums of image row r of map m go to ring[(r % 8)][m]: the eight rows a window row needs
// stay in cache. Each window's five sums add its eight pixels left to right in registers.
static void uiqi_row_sums(const float* xr, long xs, const float* yr, long ys, int W, int OW,
                          double* __restrict a, double* __restrict b, double* __restrict s) {
  if (xs == 1 && ys == 1)
    for (int x = 0; x < W; x++) { a[x] = xr[x]; b[x] = yr[x]; }
  else
    for (int x = 0; x < W; x++) { a[x] = xr[(long)x * xs]; b[x] = yr[(long)x * ys]; }
  double* __restrict s0 = s; double* __restrict s1 = s + OW; double* __restrict s2 = s + 2 * OW;
  double* __restrict s3 = s + 3 * OW; double* __restrict s4 = s + 4 * OW;
  for (int x = 0; x < OW; x++) {
    double u = a[x], v = b[x];
    double t0 = u, t1 = v, t2 = u * u, t3 = v * v, t4 = u * v;
    for (int j = 1; j < 8; j++) {
      u = a[x + j]; v = b[x + j];
      t0 += u; t1 += v; t2 += u * u; t3 += v * v; t4 += u * v;
    }
    s0[x] = t0; s1[x] = t1; s2[x] = t2; s3[x] = t3; s4[x] = t4;
  }
}

extern "C" void ss_uiqi_map(const float* px, const long* ps, const float* py, const long* ys,
                            int N, int H, int W, double* out, int threads) {
  const int B = 8, OH = H - B + 1, OW = W - B + 1;
  #pragma omp parallel for schedule(static, 1) num_threads(threads)
  for (int i = 0; i < N; i++) {
    std::vector<double> a(W), b(W), ring((size_t)B * 5 * OW);
    const float* xi = px + i * ps[0];
    const float* yi = py + i * ys[0];
    for (int r = 0; r < H; r++) {
      uiqi_row_sums(xi + r * ps[1], ps[2], yi + r * ys[1], ys[2], W, OW, a.data(), b.data(),
                    ring.data() + (size_t)(r % B) * 5 * OW);
      const int top = r - B + 1;                       // the window row that is complete now
      if (top < 0) continue;
      const double* rows[8];
      for (int k = 0; k < B; k++) rows[k] = ring.data() + (size_t)((top + k) % B) * 5 * OW;
      uiqi_window_row(rows, OW, out + ((long)i * OH + top) * OW);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// A training batch (selfscale.crops.sample_batch) drawn from numpy's bit generator: the same
// draws in the same order as the Python loop, so the same crops and the same generator state
// after it. Per crop: the image, rng.integers(count); its top, rng.integers(H - crop + 1); its
// left, rng.integers(W - crop + 1); with flips, rng.random() < 0.5 twice (columns reversed,
// then rows reversed). Generator.integers(n) for n <= 2^32 is Lemire's bounded draw on the bit
// generator's 32-bit output (numpy's buffered_bounded_lemire_uint32), none for n = 1;
// Generator.random() is its next_double.
struct ss_bitgen {                // numpy/random/bitgen.h
  void* state;
  uint64_t (*next_uint64)(void*);
  uint32_t (*next_uint32)(void*);
  double (*next_double)(void*);
  uint64_t (*next_raw)(void*);
};

static uint64_t ss_integers(ss_bitgen* g, uint64_t n) {   // rng.integers(n), 1 <= n <= 2^32
  const uint64_t rng = n - 1;
  if (rng == 0) return 0;
  if (rng == 0xFFFFFFFFull) return g->next_uint32(g->state);
  const uint32_t excl = (uint32_t)rng + 1;
  uint64_t m = (uint64_t)g->next_uint32(g->state) * excl;
  uint32_t left = (uint32_t)m;
  if (left < excl) {
    const uint32_t threshold = (0xFFFFFFFFu - (uint32_t)rng) % excl;
    while (left < threshold) {
      m = (uint64_t)g->next_uint32(g->state) * excl;
      left = (uint32_t)m;
    }
  }
  return m >> 32;
}

// rng.integers(n) alone (the tests hold it to numpy's own, rejections included).
extern "C" uint64_t ss_integers_draw(void* bitgen, uint64_t n) {
  return ss_integers((ss_bitgen*)bitgen, n);
}

// images[k] and targets[k]: H[k] x W[k] float32 with row strides ri[k] and rt[k] (floats;
// columns contiguous), every one at least crop x crop. xs, ys: (batch, 1, crop, crop), dense.
struct ss_cut { int k; long top, left; bool hflip, vflip; };

static void ss_draw_cuts(ss_bitgen* g, int count, const long* H, const long* W, int batch,
                         int crop, int flips, ss_cut* cuts) {
  for (int i = 0; i < batch; i++) {   // every draw first, in the documented order
    ss_cut& c = cuts[i];
    c.k = (int)ss_integers(g, (uint64_t)count);
    c.top = (long)ss_integers(g, (uint64_t)(H[c.k] - crop + 1));
    c.left = (long)ss_integers(g, (uint64_t)(W[c.k] - crop + 1));
    c.hflip = c.vflip = false;
    if (flips) {
      c.hflip = g->next_double(g->state) < 0.5;
      c.vflip = g->next_double(g->state) < 0.5;
    }
  }
}

// Crop i's row r goes to xs + i * xplane + r * xrow (dense: crop², crop; or the interior of a
// padded buffer) and to ys + (i * crop + r) * crop.
static void ss_copy_cuts(const float* const* images, const float* const* targets,
                         const long* ri, const long* rt, int batch, int crop,
                         const ss_cut* cuts, float* xs, long xplane, long xrow, float* ys) {
  // the rows of the next crop are fetched while this one is copied (the images are large and
  // mostly not in cache: the copy waits on memory)
  auto fetch = [&](const ss_cut& c) {
    for (int r = 0; r < crop; r++)
      for (long x = 0; x < crop; x += 16) {
        __builtin_prefetch(images[c.k] + (c.top + r) * ri[c.k] + c.left + x);
        __builtin_prefetch(targets[c.k] + (c.top + r) * rt[c.k] + c.left + x);
      }
  };
  const long cc = (long)crop * crop;
  if (batch) fetch(cuts[0]);
  for (int i = 0; i < batch; i++) {
    const ss_cut& c = cuts[i];
    if (i + 1 < batch) fetch(cuts[i + 1]);
    for (int r = 0; r < crop; r++) {
      const long row = c.top + (c.vflip ? crop - 1 - r : r);
      const float* a = images[c.k] + row * ri[c.k] + c.left;
      const float* b = targets[c.k] + row * rt[c.k] + c.left;
      float* xo = xs + i * xplane + (long)r * xrow;
      float* yo = ys + i * cc + (long)r * crop;
      if (c.hflip) {
        for (int x = 0; x < crop; x++) { xo[x] = a[crop - 1 - x]; yo[x] = b[crop - 1 - x]; }
      } else {
        std::memcpy(xo, a, sizeof(float) * crop);
        std::memcpy(yo, b, sizeof(float) * crop);
      }
    }
  }
}

extern "C" void ss_sample(void* bitgen, int count, const float* const* images,
                          const float* const* targets, const long* H, const long* W,
                          const long* ri, const long* rt, int batch, int crop, int flips,
                          float* xs, float* ys) {
  std::vector<ss_cut> cuts(batch);
  ss_draw_cuts((ss_bitgen*)bitgen, count, H, W, batch, crop, flips, cuts.data());
  ss_copy_cuts(images, targets, ri, rt, batch, crop, cuts.data(), xs, (long)crop * crop, crop,
               ys);
}

// A batch stream (selfscale.crops.BatchStream): ss_sample split in two, the draws made on the
// caller's thread (so the generator is consumed in the same order as ever) and the copy handed
// to the stream's own helper thread, which fills the next batch while the caller trains on this
// one. One copy at a time; ss_stream_wait returns when it is done.
struct ss_stream {
  std::mutex m;
  std::condition_variable cv;
  bool pending = false, quit = false;
  std::vector<ss_cut> cuts;
  const float* const* images; const float* const* targets; const long* ri; const long* rt;
  int batch, crop; float* xs; long xplane, xrow; float* ys;
  std::thread worker;   // last: it starts once every member above is constructed

  ss_stream() { worker = std::thread([this] { run(); }); }
  void run() {
    std::unique_lock<std::mutex> lock(m);
    for (;;) {
      cv.wait(lock, [this] { return pending || quit; });
      if (quit) return;
      lock.unlock();
      ss_copy_cuts(images, targets, ri, rt, batch, crop, cuts.data(), xs, xplane, xrow, ys);
      lock.lock();
      pending = false;
      cv.notify_all();
    }
  }
  void wait() {
    std::unique_lock<std::mutex> lock(m);
    cv.wait(lock, [this] { return !pending; });
  }
};

extern "C" void* ss_stream_new() {
  try { return new ss_stream(); } catch (...) { return nullptr; }   // no thread: no stream
}

extern "C" void ss_stream_wait(void* stream) { ((ss_stream*)stream)->wait(); }

extern "C" void ss_stream_free(void* stream) {
  ss_stream* s = (ss_stream*)stream;
  s->wait();
  { std::lock_guard<std::mutex> lock(s->m); s->quit = true; }
  s->cv.notify_all();
  s->worker.join();
  delete s;
}

// The draws of ss_sample now; its copy on the stream's thread (the arrays must stay alive and
// untouched until ss_stream_wait).
static void stream_sample(void* stream, void* bitgen, int count, const float* const* images,
                          const float* const* targets, const long* H, const long* W,
                          const long* ri, const long* rt, int batch, int crop, int flips,
                          float* xs, long xplane, long xrow, float* ys) {
  ss_stream* s = (ss_stream*)stream;
  s->wait();
  s->cuts.resize(batch);
  ss_draw_cuts((ss_bitgen*)bitgen, count, H, W, batch, crop, flips, s->cuts.data());
  std::lock_guard<std::mutex> lock(s->m);
  s->images = images; s->targets = targets; s->ri = ri; s->rt = rt;
  s->batch = batch; s->crop = crop; s->xs = xs; s->xplane = xplane; s->xrow = xrow; s->ys = ys;
  s->pending = true;
  s->cv.notify_all();
}

extern "C" void ss_stream_sample(void* stream, void* bitgen, int count,
                                 const float* const* images, const float* const* targets,
                                 const long* H, const long* W, const long* ri, const long* rt,
                                 int batch, int crop, int flips, float* xs, float* ys) {
  stream_sample(stream, bitgen, count, images, targets, H, W, ri, rt, batch, crop, flips, xs,
                (long)crop * crop, crop, ys);
}

// `count` training steps in one call: selfscale.train's loop between two pauses, when nothing
// runs between its steps. Step i trains (ss_step) on the batch ss_sample would draw next, at
// learning rate lrs[i], and writes its loss to losses[i]. The draws of batch i + 1 are made
// before step i; its copy runs meanwhile on the stream's thread (stream null: after step i) into
// the other of two padded input buffers (kept here) and target buffers y0, y1, dense
// (batch, 1, crop, crop). Returns
// the steps done: count, or fewer when a loss is not finite (that step included; the batch
// after it was drawn).
extern "C" int ss_steps(int count, const double* lrs, double* losses, void* stream, void* bitgen,
                        int n_images, const float* const* images, const float* const* targets,
                        const long* H, const long* W, const long* ri, const long* rt, int batch,
                        int crop, int flips, float* y0, float* y1, int K,
                        int L, const int* chans, float* const* params, const long* wstrides,
                        float* const* exp_avg, float* const* exp_avg_sq, float* const* steps,
                        const int* const* actives, const int* nact,
                        const unsigned char* const* frozen, int loss, double beta1,
                        double beta2, double eps, double clip, int threads) {
  ss_bitgen* g = (ss_bitgen*)bitgen;
  float* yb[2] = {y0, y1};
  const long cc = (long)crop * crop, strides[4] = {cc, cc, crop, 1};
  // the crops go straight into two padded input buffers of the step's layout (one input plane):
  // their borders are zeroed once and never written, so the step reads them in place
  const int p = K / 2;
  const long plane = padded_plane(crop, crop, K), row = padded_row(crop, K);
  static thread_local std::vector<float> padded;
  static thread_local long layout[3] = {0, 0, 0};                // batch, crop, K
  if (layout[0] != batch || layout[1] != crop || layout[2] != K) {
    padded.assign((size_t)(2 * batch * plane), 0.f);
    layout[0] = batch; layout[1] = crop; layout[2] = K;
  }
  float* xb[2] = {padded.data(), padded.data() + batch * plane};
  float* xin[2] = {xb[0] + p * row + p, xb[1] + p * row + p};   // the interiors
  std::vector<ss_cut> cuts(batch);
  ss_draw_cuts(g, n_images, H, W, batch, crop, flips, cuts.data());
  ss_copy_cuts(images, targets, ri, rt, batch, crop, cuts.data(), xin[0], plane, row, y0);
  for (int i = 0; i < count; i++) {
    const int b = i % 2;
    const bool next = i + 1 < count;
    if (next && stream)
      stream_sample(stream, bitgen, n_images, images, targets, H, W, ri, rt, batch, crop, flips,
                    xin[1 - b], plane, row, yb[1 - b]);
    else if (next)
      ss_draw_cuts(g, n_images, H, W, batch, crop, flips, cuts.data());
    losses[i] = step_on(nullptr, strides, xb[b], yb[b], strides, batch, crop, crop, K, L, chans,
                        params, wstrides, exp_avg, exp_avg_sq, steps, actives, nact, frozen,
                        loss, lrs[i], beta1, beta2, eps, clip, threads);
    if (next && stream)
      ss_stream_wait(stream);
    else if (next)
      ss_copy_cuts(images, targets, ri, rt, batch, crop, cuts.data(), xin[1 - b], plane, row,
                   yb[1 - b]);
    if (!std::isfinite(losses[i])) return i + 1;
  }
  return count;
}

// The draws of `batches` batches of ss_sample, without their copies.
extern "C" void ss_sample_draws(void* bitgen, int n_images, const long* H, const long* W,
                                int batches, int batch, int crop, int flips) {
  std::vector<ss_cut> cuts(batch);
  for (int i = 0; i < batches; i++)
    ss_draw_cuts((ss_bitgen*)bitgen, n_images, H, W, batch, crop, flips, cuts.data());
}
