// One coding round of y on the CPU: one checkerboard half of one channel slice, in one call.
//
// The same arithmetic as the tensor code in runtime/latent_codec.py (`_code`, `_decode`) and the
// layout of export/models/lfgcm.py (`squeeze_anchor`, `unsqueeze_nonanchor`, ...), element by
// element, so the two give the same symbols, indexes and y_hat bit for bit (tests compare them,
// signed zeros included). Why native: on the CPU the tensor version is a dozen small operations
// per round (strided squeezes, rounding, casts, zero-filled unsqueezes), and for the 20 rounds
// of a 512x768 image their overhead and memory passes cost more than the rANS coding itself.
//
// Layout. y_hat and y are (C, H, W) in the full layout; means and scales (C, H, W/2) squeezed:
// squeezed (c, r, j) is full column 2j + 1 (anchor half) or 2j (non-anchor half) on even rows
// r, and 2j or 2j + 1 on odd rows. Symbols are coded in the squeezed order (c, r, j).
#pragma once

#include <cmath>
#include <cstdint>

#include "rans.hpp"
#include "scale_index.hpp"

namespace rans {

// To nearest, ties to even, keeping the sign of zero: torch.round. std::nearbyint is a libm call
// that saves and restores the floating-point environment where the build cannot assume SSE4.1
// (x86-64's baseline). Adding and subtracting 2^23 rounds the same way in the default rounding
// mode: from 2^23 on, floats are integers. Written without branches so that the row loops
// vectorize (CMakeLists.txt's -fno-trapping-math lets the compiler if-convert the selects;
// every value stays IEEE-exact).
inline float round_half_even(float x) {
    constexpr float kInteger = 8388608.0f;  // 2^23
    const float a = std::fabs(x);
    const float r = std::copysign((a + kInteger) - kInteger, x);
    return a < kInteger ? r : x;  // from 2^23 on (and inf, NaN) x itself
}

constexpr int64_t kMaxAbsLimit = int64_t(1) << 30;

struct Half {
    size_t channels, height, width;  // the full layout's; width even
    bool anchor;

    size_t size() const { return channels * height * (width / 2); }
    // the full-layout column of this half's first entry on row r (0 or 1)
    size_t first(size_t r) const { return ((r & 1) == (anchor ? 0u : 1u)) ? 1 : 0; }
};

// One row of y_hat: this half's entries (mine[2j]) get values[j]; the other half's (other[2j])
// get +0.0 after the anchor round (the zeros of unsqueeze_anchor), their anchor value + 0.0
// after the non-anchor round (the sum anchor_hat + unsqueeze_nonanchor(values)). Adding +0.0
// is kept for what it does to -0.0.
template <bool Anchor>
inline void write_entry(float value, float& mine, float& other) {
    mine = Anchor ? value : 0.0f + value;
    other = Anchor ? 0.0f : other + 0.0f;
}

// One row of the encoder's round: q = round(y - means), its symbols, and q + means into y_hat's
// row (mine, other as in write_entry). Returns whether a |q| exceeded the limit or was not
// finite (its symbol is then 0).
template <bool Anchor>
inline bool quantize_row(const float* __restrict y, const float* __restrict means, float limit,
                         int32_t* __restrict symbols, float* __restrict mine, float* __restrict other, size_t n) {
    int bad = 0;
    for (size_t j = 0; j < n; ++j) {
        const float q = round_half_even(y[2 * j] - means[j]);
        const int out = !(std::fabs(q) <= limit);  // NaN too
        bad |= out;
        symbols[j] = int32_t(out ? 0.0f : q);
        write_entry<Anchor>(q + means[j], mine[2 * j], other[2 * j]);
    }
    return bad != 0;
}

template <bool Anchor>
inline bool quantize_half(const Half& h, const float* y, const float* means, float limit, int32_t* symbols,
                          float* y_hat) {
    const size_t half_width = h.width / 2;
    bool bad = false;
    for (size_t cr = 0; cr < h.channels * h.height; ++cr) {
        const size_t i = cr * half_width, f = h.first(cr % h.height);
        float* row = y_hat + cr * h.width;
        bad |= quantize_row<Anchor>(y + cr * h.width + f, means + i, limit, symbols + i, row + f, row + (1 - f),
                                    half_width);
    }
    return bad;
}

// Encoder side: symbols = round(y - means) (to nearest, ties to even, as torch.round), indexes
// = the scales' CDF rows, and y_hat's half = symbols + means. Throws ArgumentError if a symbol
// is not finite or |symbol| > max_abs (a broken model or latent); y_hat's half is then partly
// written (the encoder gives up on the image). The rows are mapped here, while the scales that
// the network just wrote are still in the cache, not when the string is written.
inline void quantize_half(const Half& h, const float* y, const float* means, const float* scales,
                          const ScaleIndex& scale_index, int64_t max_abs, int32_t* symbols, uint8_t* indexes,
                          float* y_hat) {
    if (max_abs < 0 || max_abs > kMaxAbsLimit)  // so that every |q| <= max_abs converts to int32 exactly
        throw ArgumentError("max_abs must lie in [0, 2**30]");
    const bool bad = h.anchor ? quantize_half<true>(h, y, means, float(max_abs), symbols, y_hat)
                              : quantize_half<false>(h, y, means, float(max_abs), symbols, y_hat);
    if (bad) throw ArgumentError("latent value out of range (not finite, or the model is broken)");
    scale_index.map(scales, h.size(), indexes);
}

template <bool Anchor>
inline void dequantize_half(const Half& h, const int32_t* symbols, const float* means, float* y_hat) {
    const size_t half_width = h.width / 2;
    for (size_t cr = 0; cr < h.channels * h.height; ++cr) {
        const size_t i = cr * half_width, f = h.first(cr % h.height);
        float* row = y_hat + cr * h.width;
        for (size_t j = 0; j < half_width; ++j)
            write_entry<Anchor>(float(symbols[i + j]) + means[i + j], row[f + 2 * j], row[1 - f + 2 * j]);
    }
}

// Decoder side: indexes from the scales, the next symbols from the decoder, y_hat's half =
// symbols + means. Errors as Decoder::decode (y_hat is then not written).
inline void dequantize_half(const Half& h, Decoder& decoder, const Tables& tables, const float* means,
                            const float* scales, const ScaleIndex& scale_index, int32_t* symbols, float* y_hat) {
    decoder.decode(scales, h.size(), tables, symbols,
                   [&](const float* block, size_t n, int32_t* rows) { scale_index.map(block, n, rows); });
    h.anchor ? dequantize_half<true>(h, symbols, means, y_hat) : dequantize_half<false>(h, symbols, means, y_hat);
}

}  // namespace rans
