// The rANS range coder of CompressAI's `compressai.ans`, written from its stream format, with
// every read of the string bounds-checked.
//
// Format (what the bytes mean; every constant below is part of it):
// - The coder state x is 64 bits and lives in [L, 2^63), L = 2^31. Renormalization moves
//   32-bit words: the encoder emits the low word when a symbol would push x past 2^63, the
//   decoder reads one when x falls below L.
// - A symbol s of a table with quantized CDF c (16-bit precision, c[0] = 0, c[n-1] = 2^16)
//   codes as start c[s], frequency c[s+1] - c[s]. The last symbol, n - 2, is the escape: a
//   value v outside [0, n - 2) codes the escape, then its raw value in 4-bit bypass chunks:
//   raw = -2v - 1 below the table, 2(v - (n - 2)) above it; the number of chunks k (the
//   fewest that hold raw, 0 for raw = 0) as chunks of 15 + a last chunk < 15, then raw's
//   chunks, least significant first. A bypass chunk is x -> (x << 4) | chunk.
// - Symbols are coded in reverse so that they decode forwards. The string is the final
//   state (8 bytes, little-endian) followed by the emitted words in decoding order, each
//   little-endian.
//
// Why our own coder rather than CompressAI's: CompressAI's decoder reads past the end of its
// string on corrupt input (an escape chain's length is driven by the data), and its Python
// API converts every symbol, index and table row to and from Python lists on every call.
// This one is bounds-checked, takes arrays, and is byte-for-byte the same format (tests
// compare it with compressai.ans both ways).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace rans {

constexpr int kPrecision = 16;               // CDF precision, bits
constexpr uint32_t kTotal = 1u << kPrecision;  // c[n-1]
constexpr int kBypassBits = 4;
constexpr uint32_t kBypassMax = (1u << kBypassBits) - 1;
constexpr uint64_t kLower = 1ull << 31;      // L: the state's lower bound
constexpr uint64_t kUpper = 1ull << 63;      // the state's upper bound (exclusive)
// An escape's raw value comes from a 32-bit integer, so it never needs more than 8 chunks;
// more means the string is corrupt (and an unbounded count is how forged strings make
// CompressAI's decoder run away).
constexpr uint32_t kMaxBypassChunks = 32 / kBypassBits;

// The string cannot be what an encoder wrote.
struct StreamError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// A caller's mistake (bad table, index or symbol).
struct ArgumentError : std::invalid_argument {
    using std::invalid_argument::invalid_argument;
};

// One group of symbols and their table rows, as the encoder is given them.
template <class I>
struct Group {
    const int32_t* symbols;
    const I* indexes;
    size_t size;
};

// What names a decoded symbol's table row, mapped to rows a block at a time: map(entries, n,
// rows). The identity, for callers that give the rows themselves.
struct Rows {
    template <class I>
    void operator()(const I* indexes, size_t n, int32_t* rows) const {
        for (size_t i = 0; i < n; ++i) rows[i] = int32_t(indexes[i]);
    }
};

// A block of rows is mapped just ahead of the decoding loop: in a loop of its own the mapping
// runs at full speed on data in L1, and the decoding loop's chain of loads is one link shorter.
constexpr size_t kRowBlock = 256;

// Quantized CDF tables, validated once: rows flattened into one array, and for each row a
// 256-bucket lookup from the top 8 bits of a 16-bit slot to the first symbol that can own it,
// so that decoding finds a symbol in a few steps whatever the row's length (CompressAI scans
// rows linearly; the Gaussian rows run to 3133 entries).
class Tables {
public:
    static constexpr int kLookupBits = 8;
    static constexpr int kLookupShift = kPrecision - kLookupBits;

    // cdf: rows x width int32, row r's first lengths[r] entries are its CDF.
    Tables(const int32_t* cdf, size_t rows, size_t width, const int32_t* lengths, const int32_t* offsets) {
        if (rows == 0 || rows > (1u << 16))
            throw ArgumentError("CDF tables: need 1..65536 rows");
        rows_.resize(rows);
        lookup_.resize(rows << kLookupBits);
        for (size_t r = 0; r < rows; ++r) {
            const int64_t n = lengths[r];
            if (n < 3 || static_cast<size_t>(n) > width || n > int64_t(kTotal) + 1)
                throw ArgumentError("CDF tables: row " + std::to_string(r) + " has a bad length");
            const int32_t* row = cdf + r * width;
            if (row[0] != 0 || row[n - 1] != int32_t(kTotal))
                throw ArgumentError("CDF tables: row " + std::to_string(r) + " does not run from 0 to 2**16");
            for (int64_t i = 1; i < n; ++i)
                if (row[i] <= row[i - 1])
                    throw ArgumentError("CDF tables: row " + std::to_string(r) + " is not strictly increasing");
            rows_[r] = {static_cast<uint32_t>(cdf_.size()), static_cast<uint32_t>(n), offsets[r]};
            cdf_.insert(cdf_.end(), row, row + n);
            for (int64_t i = 0; i + 1 < n; ++i) encode_.emplace_back(uint32_t(row[i]), uint32_t(row[i + 1] - row[i]));
            encode_.emplace_back();
            uint16_t* lut = &lookup_[r << kLookupBits];
            uint32_t s = 0;
            for (uint32_t b = 0; b < (1u << kLookupBits); ++b) {
                const int32_t slot = int32_t(b << kLookupShift);
                while (row[s + 1] <= slot) ++s;
                lut[b] = static_cast<uint16_t>(s);
            }
        }
    }

    size_t rows() const { return rows_.size(); }

    // What the encoder needs of one symbol: x -> (x / freq) << precision + x % freq + start,
    // computed as x + bias + q * (2^precision - freq) with the quotient q = floor(x / freq) from
    // a multiply and a shift: m = ceil(2^(63 + l) / freq), l = ceil(log2(freq)), is exact for
    // every x < 2^63 (Granlund and Montgomery, "Division by invariant integers using
    // multiplication", 1994, theorem 4.2), and the state never reaches 2^63. A hardware 64-bit
    // division per symbol was most of the encoder's time.
    struct EncodeSymbol {
        uint64_t reciprocal;
        uint32_t bias;
        uint16_t freq;  // 1 .. 2^16 - 1: every row has at least two symbols of frequency >= 1
        uint8_t shift;

        EncodeSymbol() = default;
        EncodeSymbol(uint32_t start, uint32_t f) : bias(start), freq(uint16_t(f)) {
            if (f == 1) {
                // q = mulhi(2^64 - 1, x) = x - 1 for x >= 1; the bias puts back the missing 2^16 - 1
                reciprocal = ~uint64_t(0);
                shift = 0;
                bias = start + kTotal - 1;
                return;
            }
            uint32_t l = 0;
            while ((1u << l) < f) ++l;
            reciprocal = uint64_t((((unsigned __int128)1 << (63 + l)) + f - 1) / f);
            shift = uint8_t(l - 1);
        }

        uint64_t advance(uint64_t x) const {
            const uint64_t q = uint64_t(((unsigned __int128)reciprocal * x) >> 64) >> shift;
            return x + bias + q * (kTotal - freq);
        }
    };

private:
    friend class Decoder;
    template <class I>
    friend std::vector<uint8_t> encode(const std::vector<Group<I>>&, const Tables&, int64_t);

    std::vector<int32_t> cdf_;
    std::vector<EncodeSymbol> encode_;  // parallel to cdf_; a row's last entry is unused
    struct Row {
        uint32_t begin;   // of the row in cdf_ and encode_
        uint32_t length;  // CDF entries: symbols + 1
        int32_t offset;   // the value of symbol 0
    };
    std::vector<Row> rows_;  // one load per symbol for all three
    std::vector<uint16_t> lookup_;
};

namespace detail {

inline void put_le32(uint8_t* p, uint32_t v) {
    p[0] = uint8_t(v);
    p[1] = uint8_t(v >> 8);
    p[2] = uint8_t(v >> 16);
    p[3] = uint8_t(v >> 24);
}

inline uint32_t get_le32(const uint8_t* p) {
    return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}

// The words an encoder emits. The state x itself lives in a local of encode(), passed in by
// reference: a member, or anything whose address reaches push_back's call, would be stored to
// memory and reloaded on every symbol, which doubled the time of the serial chain x -> x'.
class Writer {
public:
    explicit Writer(size_t reserve) { words_.reserve(reserve); }

    // Called in encoding order, the last symbol first (see encode), as rANS requires.
    void put(uint64_t& x, const Tables::EncodeSymbol& s) {
        // emit a word if x would leave [L, 2^63); x_max = ((L >> precision) << 32) * freq
        if (x >= (uint64_t(s.freq) << (31 - kPrecision + 32))) emit(x);
        x = s.advance(x);
    }
    void put_bits(uint64_t& x, uint32_t chunk) {
        if (x >= (kUpper >> kBypassBits)) emit(x);
        x = (x << kBypassBits) | chunk;
    }
    std::vector<uint8_t> finish(uint64_t x) const {
        std::vector<uint8_t> out(8 + 4 * words_.size());
        put_le32(&out[0], uint32_t(x));
        put_le32(&out[4], uint32_t(x >> 32));
        uint8_t* p = &out[8];
        for (size_t i = words_.size(); i-- > 0; p += 4) put_le32(p, words_[i]);
        return out;
    }

private:
    void emit(uint64_t& x) {
        words_.push_back(uint32_t(x));
        x >>= 32;
    }
    std::vector<uint32_t> words_;
};

}  // namespace detail

// The groups' symbols, in order, symbols[i] coded with table row indexes[i]; returns the
// string. Throws ArgumentError for an index outside the tables or a |symbol| > max_abs (checked
// here, on the way, rather than in extra passes over the arrays).
template <class I>
std::vector<uint8_t> encode(const std::vector<Group<I>>& groups, const Tables& t, int64_t max_abs) {
    if (max_abs < 0) throw ArgumentError("max_abs must not be negative");
    size_t total = 0;
    for (const Group<I>& g : groups) total += g.size;
    detail::Writer w(total / 2 + 16);
    uint64_t x = kLower;
    const size_t rows = t.rows();
    // an escape's bypass chunks in decoding order: its count (chunks of 15, then < 15), its raw
    // value's chunks; they are coded before the escape symbol itself, which decodes first
    uint32_t chunk[1 + kMaxBypassChunks / kBypassMax + kMaxBypassChunks];
    for (size_t g = groups.size(); g-- > 0;) {
        const int32_t* symbols = groups[g].symbols;
        const I* indexes = groups[g].indexes;
        for (size_t i = groups[g].size; i-- > 0;) {
            const int64_t index = int64_t(indexes[i]), symbol = symbols[i];
            if (index < 0 || uint64_t(index) >= rows)
                throw ArgumentError("CDF index " + std::to_string(index) + " out of range: the tables have " +
                                    std::to_string(rows) + " rows");
            if (symbol > max_abs || symbol < -max_abs)
                throw ArgumentError("latent value out of range (not finite, or the model is broken)");
            const Tables::Row& row = t.rows_[index];
            const Tables::EncodeSymbol* c = &t.encode_[row.begin];
            const int64_t max_value = int64_t(row.length) - 2;
            const int64_t value = symbol - row.offset;
            if (value >= 0 && value < max_value) {
                w.put(x, c[value]);
                continue;
            }
            const uint64_t raw = value < 0 ? uint64_t(-2 * value - 1) : uint64_t(2 * (value - max_value));
            if (raw >> 32)
                throw ArgumentError("symbol " + std::to_string(symbol) + " is too far outside its table to code");
            size_t k = 0;
            uint32_t chunks = 0;
            while (chunks < kMaxBypassChunks && (raw >> (chunks * kBypassBits)) != 0) ++chunks;
            uint32_t count = chunks;
            while (count >= kBypassMax) {
                chunk[k++] = kBypassMax;
                count -= kBypassMax;
            }
            chunk[k++] = count;
            for (uint32_t j = 0; j < chunks; ++j) chunk[k++] = uint32_t(raw >> (j * kBypassBits)) & kBypassMax;
            while (k-- > 0) w.put_bits(x, chunk[k]);
            w.put(x, c[max_value]);
        }
    }
    return w.finish(x);
}

// Decodes one string round by round. Every read is checked against the string's end, so any
// bytes give symbols or a StreamError, in time linear in (string length + symbols).
class Decoder {
public:
    // max_abs: a decoded |symbol| above it raises StreamError (the caller's plausibility bound).
    Decoder(const uint8_t* data, size_t size, int64_t max_abs) : data_(data, data + size), max_abs_(max_abs) {
        if (size < 8 || size % 4)
            throw StreamError("entropy-coded string of " + std::to_string(size) +
                              " bytes is truncated or corrupt: a coded string is a whole number of"
                              " 32-bit words, at least two");
        x_ = uint64_t(detail::get_le32(&data_[0])) | uint64_t(detail::get_le32(&data_[4])) << 32;
        if (x_ < kLower || x_ >= kUpper)
            throw StreamError("entropy-coded string does not start with a valid coder state");
        pos_ = 8;
    }

    // Decodes n symbols into out, symbol i with the table row that `map` gives for indexes[i]
    // (see encode). Throws ArgumentError for a row outside the tables, StreamError for a corrupt
    // string; the decoder is then unusable.
    template <class I, class Map = Rows>
    void decode(const I* indexes, size_t n, const Tables& t, int32_t* out, Map map = Map()) {
        // Callers release the GIL: two threads in one decoder take turns instead of racing on
        // its position.
        std::lock_guard<std::mutex> lock(mutex_);
        if (failed_) throw StreamError("the decoder stopped at an error in an earlier round");
        failed_ = true;  // until this round succeeds
        // The state in locals for the loop (see Writer); written back when the round succeeds.
        Reader in{x_, pos_, data_.data(), data_.size()};
        const size_t rows = t.rows();
        int32_t block[kRowBlock];
        for (size_t begin = 0; begin < n; begin += kRowBlock) {
            const size_t end = std::min(n, begin + kRowBlock);
            map(indexes + begin, end - begin, block);
            for (size_t i = begin; i < end; ++i) {
                const int64_t index = block[i - begin];
                if (index < 0 || uint64_t(index) >= rows)
                    throw ArgumentError("CDF index " + std::to_string(index) + " is outside the tables");
                const Tables::Row& row = t.rows_[index];
                const int32_t* c = &t.cdf_[row.begin];
                const uint32_t max_value = row.length - 2;
                const uint32_t slot = uint32_t(in.x) & (kTotal - 1);
                uint32_t s = t.lookup_[(size_t(index) << Tables::kLookupBits) + (slot >> Tables::kLookupShift)];
                while (uint32_t(c[s + 1]) <= slot) ++s;  // ends: c[max_value + 1] = 2^16 > slot
                const uint32_t start = uint32_t(c[s]), freq = uint32_t(c[s + 1]) - start;
                in.x = freq * (in.x >> kPrecision) + slot - start;
                if (in.x < kLower) in.refill();
                int64_t value = s;
                if (s == max_value) value = in.escape(max_value);
                value += row.offset;
                if (value > max_abs_ || value < -max_abs_)
                    throw StreamError("entropy-coded string is corrupt (decoded an impossible value)");
                out[i] = int32_t(value);
            }
        }
        x_ = in.x;
        pos_ = in.pos;
        failed_ = false;
    }

    size_t bytes_read() const { return pos_; }
    size_t size() const { return data_.size(); }

private:
    struct Reader {
        uint64_t x;
        size_t pos;
        const uint8_t* data;
        size_t size;

        void refill() {
            if (pos + 4 > size) throw StreamError("entropy-coded string is truncated or corrupt");
            x = (x << 32) | detail::get_le32(data + pos);
            pos += 4;
        }

        uint32_t bits() {
            const uint32_t chunk = uint32_t(x) & kBypassMax;
            x >>= kBypassBits;
            if (x < kLower) refill();
            return chunk;
        }

        int64_t escape(uint32_t max_value) {
            uint32_t chunk = bits(), chunks = chunk;
            while (chunk == kBypassMax) {
                chunk = bits();
                chunks += chunk;
                if (chunks > kMaxBypassChunks) break;
            }
            if (chunks > kMaxBypassChunks)
                throw StreamError("entropy-coded string is corrupt (an escape code longer than 32 bits)");
            uint64_t raw = 0;
            for (uint32_t j = 0; j < chunks; ++j) raw |= uint64_t(bits()) << (j * kBypassBits);
            const int64_t half = int64_t(raw >> 1);
            return (raw & 1) ? -half - 1 : half + max_value;
        }
    };

    std::vector<uint8_t> data_;
    size_t pos_ = 0;
    uint64_t x_ = 0;
    int64_t max_abs_;
    bool failed_ = false;
    std::mutex mutex_;
};

}  // namespace rans
