// Scale -> CDF index of the Gaussian conditional: the same index for every float as compressai
// 1.2.4's GaussianConditional.build_indexes (lower-bound the scale to table[0], then count
// down one per table entry >= the scale), i.e. the number of entries of table[:-1] that are
// < scale, and the last index for NaN.
//
// Why native: a branchy binary search per float (torch.bucketize) mispredicts on scales that
// vary, and cost more than the rANS decoding of the same symbols. Here the top 16 bits of a
// float (sign, exponent, 7 mantissa bits) pick a precomputed count, and exact float compares
// finish it: the lookup only saves compares, so the result is the comparison's, bit for bit.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <stdexcept>
#include <vector>

namespace rans {

class ScaleIndex {
public:
    // table: the scale table (2..256 finite, strictly increasing floats).
    ScaleIndex(const float* table, size_t n) : bounds_(table, table + (n ? n - 1 : 0)), last_(uint8_t(n ? n - 1 : 0)) {
        if (n < 2 || n > 256) throw std::invalid_argument("scale table: need 2..256 entries");
        for (size_t i = 0; i < n; ++i)
            if (!std::isfinite(table[i]) || (i && !(table[i] > table[i - 1])))
                throw std::invalid_argument("scale table: entries must be finite and strictly increasing");
        // lookup_[b]: how many bounds are below the smallest non-negative float whose top 16 bits are b
        lookup_.resize(kPositiveBuckets);
        size_t count = 0;
        for (uint32_t b = 0; b < kPositiveBuckets; ++b) {
            const float lo = from_bits(b << 16);
            while (count < bounds_.size() && bounds_[count] < lo) ++count;
            lookup_[b] = uint8_t(count);
            if (b) steps_ = std::max<size_t>(steps_, lookup_[b] - lookup_[b - 1]);
        }
        // a bucket holds at most steps_ bounds (+inf's bucket none); +inf behind them stops every walk
        bounds_.resize(bounds_.size() + steps_ + 1, INFINITY);
    }

    uint8_t operator()(float scale) const {
        uint32_t bits;
        std::memcpy(&bits, &scale, 4);
        const uint32_t magnitude = bits & 0x7FFFFFFFu;
        if (magnitude > 0x7F800000u) return last_;  // NaN, either sign
        if (bits >> 31) return 0;                   // negative or -0: below every bound
        size_t i = lookup_[bits >> 16];             // +inf has bucket 0x7F80, in range
        // the bounds below the scale in its bucket, counted without a branch to mispredict
        // (a scale table's entries are far apart: steps_ is 1 for any model's)
        for (size_t k = 0; k < steps_; ++k) i += bounds_[i] < scale;
        return uint8_t(i);
    }

    void map(const float* scales, size_t n, uint8_t* out) const {
        for (size_t i = 0; i < n; ++i) out[i] = (*this)(scales[i]);
    }

private:
    static constexpr uint32_t kPositiveBuckets = (0x7F800000u >> 16) + 1;  // 0.0 .. +inf

    static float from_bits(uint32_t bits) {
        float f;
        std::memcpy(&f, &bits, 4);
        return f;
    }

    std::vector<float> bounds_;  // table[:-1], then steps_ + 1 times +inf
    uint8_t last_;
    size_t steps_ = 1;  // the most bounds in one bucket
    std::vector<uint8_t> lookup_;
};

}  // namespace rans
