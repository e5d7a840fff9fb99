// Scale -> CDF index of the Gaussian conditional: the same index for every float as compressai
// 1.2.4's GaussianConditional.build_indexes (lower-bound the scale to table[0], then count
// down one per table entry >= the scale), i.e. the number of entries of table[:-1] that are
// < scale, and the last index for NaN.
//
// Why native: a branchy binary search per float (torch.bucketize) mispredicts on scales that
// vary, and cost more than the rANS decoding of the same symbols. Here the top 16 bits of a
// float (sign, exponent, 7 mantissa bits) pick a precomputed count, and exact float compares
// finish it: the lookup only saves compares, so the result is the comparison's, bit for bit.
// The lookup covers all 2^16 prefixes (negative floats count 0) and NaN is a select, so no
// value takes a branch of its own.
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
    // table: the scale table (2..256 finite, positive, strictly increasing floats; the lookup
    // counts no bound below a negative scale, which holds only for positive bounds).
    ScaleIndex(const float* table, size_t n) : bounds_(table, table + (n ? n - 1 : 0)), last_(uint8_t(n ? n - 1 : 0)) {
        if (n < 2 || n > 256) throw std::invalid_argument("scale table: need 2..256 entries");
        for (size_t i = 0; i < n; ++i)
            if (!std::isfinite(table[i]) || !(table[i] > 0.0f) || (i && !(table[i] > table[i - 1])))
                throw std::invalid_argument("scale table: entries must be finite, positive and strictly increasing");
        // lookup_[b]: how many bounds are below the smallest float of prefix b; none below a
        // negative float (b >= 0x8000); NaNs (b > +inf's prefix, and some of +-inf's) are
        // selected apart
        lookup_.assign(kPrefixes, 0);
        size_t count = 0;
        for (uint32_t b = 0; b <= kInfinity; ++b) {
            const float lo = from_bits(b << 16);
            while (count < bounds_.size() && bounds_[count] < lo) ++count;
            lookup_[b] = uint8_t(count);
            if (b) steps_ = std::max<size_t>(steps_, lookup_[b] - lookup_[b - 1]);
        }
        // A bucket holds at most steps_ bounds (+inf's none), and +inf behind them stops every
        // walk: a compare with +inf, or any compare with a negative float, is false.
        bounds_.resize(bounds_.size() + steps_ + 1, INFINITY);
    }

    uint8_t operator()(float scale) const {
        uint32_t bits;
        std::memcpy(&bits, &scale, 4);
        size_t i = lookup_[bits >> 16];
        // the bounds below the scale in its bucket, counted without a branch to mispredict
        // (a scale table's entries are far apart: steps_ is 1 for any model's)
        for (size_t k = 0; k < steps_; ++k) i += bounds_[i] < scale;
        return scale == scale ? uint8_t(i) : last_;
    }

    // scales (n,) -> out (n,): the rows, as uint8 or any wider integer type
    template <class Out>
    void map(const float* __restrict scales, size_t n, Out* __restrict out) const {
        if (steps_ == 1) {  // every model's table: one compare, which the compiler can unroll
            const uint8_t* lookup = lookup_.data();
            const float* bounds = bounds_.data();
            for (size_t i = 0; i < n; ++i) {
                uint32_t bits;
                std::memcpy(&bits, &scales[i], 4);
                const uint8_t j = lookup[bits >> 16];
                const auto r = uint8_t(j + (bounds[j] < scales[i]));
                out[i] = Out(scales[i] == scales[i] ? r : last_);
            }
            return;
        }
        for (size_t i = 0; i < n; ++i) out[i] = Out((*this)(scales[i]));
    }

private:
    static constexpr uint32_t kPrefixes = 1u << 16;
    static constexpr uint32_t kInfinity = 0x7F800000u >> 16;  // +inf's prefix (its own bucket)

    static float from_bits(uint32_t bits) {
        float f;
        std::memcpy(&f, &bits, 4);
        return f;
    }

    std::vector<float> bounds_;  // table[:-1], then steps_ + 1 times +inf
    uint8_t last_;               // NaN's index
    size_t steps_ = 1;  // the most bounds in one bucket
    std::vector<uint8_t> lookup_;
};

}  // namespace rans
