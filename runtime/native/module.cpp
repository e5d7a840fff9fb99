// osdiff.runtime._rans: the rANS coder of rans.hpp over numpy arrays. No symbol or index
// passes through a Python list: they come in as arrays (the encoder takes a list of arrays,
// one per group), decoded symbols go out as one, and the coding loops run with the GIL
// released. runtime/coder.py and runtime/latent_codec.py are the only callers.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/vector.h>

#include <cstring>
#include <memory>

#include "checkerboard.hpp"
#include "rans.hpp"
#include "scale_index.hpp"

namespace nb = nanobind;
using namespace nb::literals;

template <class T>
using Vector = nb::ndarray<const T, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using Symbols = nb::ndarray<nb::numpy, int32_t, nb::ndim<1>>;

// A numpy array that owns `data` (allocated with new[]), of the given shape.
template <class T>
static nb::ndarray<nb::numpy, T> owned(std::unique_ptr<T[]> data, size_t ndim, const size_t* shape) {
    T* p = data.release();
    nb::capsule owner(p, [](void* q) noexcept { delete[] static_cast<T*>(q); });
    return nb::ndarray<nb::numpy, T>(p, ndim, shape, owner);
}

// The groups of symbols and table rows as rans::encode takes them.
template <class I>
static std::vector<rans::Group<I>> groups_of(const std::vector<Vector<int32_t>>& symbols,
                                             const std::vector<Vector<I>>& indexes) {
    if (symbols.size() != indexes.size()) throw rans::ArgumentError("need one index array per symbol array");
    std::vector<rans::Group<I>> groups;
    for (size_t g = 0; g < symbols.size(); ++g) {
        if (symbols[g].shape(0) != indexes[g].shape(0)) throw rans::ArgumentError("symbols and indexes differ in size");
        groups.push_back({symbols[g].data(), indexes[g].data(), symbols[g].shape(0)});
    }
    return groups;
}

template <class I>
static nb::bytes encode(const std::vector<Vector<int32_t>>& symbols, const std::vector<Vector<I>>& indexes,
                        const rans::Tables& tables, int64_t max_abs) {
    const std::vector<rans::Group<I>> groups = groups_of(symbols, indexes);
    std::vector<uint8_t> string;
    {
        nb::gil_scoped_release release;
        string = rans::encode(groups, tables, max_abs);
    }
    return nb::bytes(reinterpret_cast<const char*>(string.data()), string.size());
}

template <class I>
static Symbols decode(rans::Decoder& decoder, Vector<I> indexes, const rans::Tables& tables) {
    const size_t n = indexes.shape(0);
    std::unique_ptr<int32_t[]> out(new int32_t[n ? n : 1]);
    {
        nb::gil_scoped_release release;
        decoder.decode(indexes.data(), n, tables, out.get());
    }
    return Symbols(owned(std::move(out), 1, &n));
}

static nb::ndarray<nb::numpy, uint8_t> scale_indexes(const rans::ScaleIndex& index,
                                                     nb::ndarray<const float, nb::c_contig, nb::device::cpu> scales) {
    const size_t n = scales.size();
    std::unique_ptr<uint8_t[]> out(new uint8_t[n ? n : 1]);
    {
        nb::gil_scoped_release release;
        index.map(scales.data(), n, out.get());
    }
    std::vector<size_t> shape(scales.ndim());
    for (size_t d = 0; d < shape.size(); ++d) shape[d] = scales.shape(d);
    return owned(std::move(out), shape.size(), shape.data());
}

using Latent = nb::ndarray<const float, nb::ndim<3>, nb::c_contig, nb::device::cpu>;
using LatentOut = nb::ndarray<float, nb::ndim<3>, nb::c_contig, nb::device::cpu>;

// y_hat (C, H, W) and the squeezed (C, H, W/2) arrays of one round -> the round's Half.
static rans::Half half_of(const LatentOut& y_hat, const Latent& means, const Latent& scales, bool anchor) {
    const size_t c = y_hat.shape(0), h = y_hat.shape(1), w = y_hat.shape(2);
    if (w % 2) throw rans::ArgumentError("checkerboard: the latent's width must be even");
    for (const Latent* a : {&means, &scales})
        if (a->shape(0) != c || a->shape(1) != h || a->shape(2) != w / 2)
            throw rans::ArgumentError("checkerboard: means and scales must be (C, H, W/2) of y_hat's (C, H, W)");
    return rans::Half{c, h, w, anchor};
}

template <class T>
using Out = nb::ndarray<T, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

static void quantize_half(Latent y, Latent means, Latent scales, const rans::ScaleIndex& scale_index, int64_t max_abs,
                          bool anchor, LatentOut y_hat, Out<int32_t> symbols, Out<uint8_t> indexes) {
    const rans::Half h = half_of(y_hat, means, scales, anchor);
    if (y.shape(0) != h.channels || y.shape(1) != h.height || y.shape(2) != h.width)
        throw rans::ArgumentError("checkerboard: y and y_hat differ in shape");
    if (symbols.shape(0) != h.size() || indexes.shape(0) != h.size())
        throw rans::ArgumentError("checkerboard: symbols and indexes must hold the half's C * H * W/2 entries");
    nb::gil_scoped_release release;
    rans::quantize_half(h, y.data(), means.data(), scales.data(), scale_index, max_abs, symbols.data(), indexes.data(),
                        y_hat.data());
}

static Symbols dequantize_half(rans::Decoder& decoder, const rans::Tables& tables, Latent means, Latent scales,
                               const rans::ScaleIndex& scale_index, bool anchor, LatentOut y_hat) {
    const rans::Half h = half_of(y_hat, means, scales, anchor);
    const size_t n = h.size();
    std::unique_ptr<int32_t[]> out(new int32_t[n ? n : 1]);
    {
        nb::gil_scoped_release release;
        rans::dequantize_half(h, decoder, tables, means.data(), scales.data(), scale_index, out.get(), y_hat.data());
    }
    return Symbols(owned(std::move(out), 1, &n));
}

NB_MODULE(_rans, m) {
    m.doc() = "CompressAI's rANS stream format, bounds-checked, over numpy arrays (runtime/native/rans.hpp)";
    nb::exception<rans::StreamError>(m, "StreamError", PyExc_ValueError);
#ifndef OSDIFF_SANITIZE
    // Tables registered once per model live in module-level caches that CPython does not free at
    // exit; nanobind would report them as leaks on every run. The sanitizer build keeps the check.
    nb::set_leak_warnings(false);
#endif
    m.attr("PRECISION") = rans::kPrecision;
#ifdef OSDIFF_SANITIZE
    m.attr("sanitized") = true;
#else
    m.attr("sanitized") = false;
#endif

    nb::class_<rans::Tables>(m, "Tables", "Quantized CDF tables, validated once and kept for a model's lifetime.")
        .def(
            "__init__",
            [](rans::Tables* self, nb::ndarray<const int32_t, nb::ndim<2>, nb::c_contig, nb::device::cpu> cdf,
               Vector<int32_t> lengths, Vector<int32_t> offsets) {
                if (lengths.shape(0) != cdf.shape(0) || offsets.shape(0) != cdf.shape(0))
                    throw rans::ArgumentError("CDF tables: need one length and one offset per row");
                new (self) rans::Tables(cdf.data(), cdf.shape(0), cdf.shape(1), lengths.data(), offsets.data());
            },
            "cdf"_a.noconvert(), "lengths"_a.noconvert(), "offsets"_a.noconvert(),
            "cdf: (rows, width) int32, row r's first lengths[r] entries its CDF; lengths, offsets: (rows,) int32.")
        .def_prop_ro("rows", &rans::Tables::rows);

    // Arrays are taken as they are (noconvert): an implicit cast would wrap an int64 index or
    // symbol into range without a word.
    const char* encode_doc =
        "encode(symbols, indexes, tables, max_abs) -> bytes: lists of groups, symbols[g] (n_g,) int32 coded with "
        "the table rows indexes[g] (n_g,) (uint8, uint16 or int32, one type for all groups), group after group. "
        "Arrays must be C-contiguous and of exactly these types. An index outside the tables or a |symbol| "
        "over max_abs raises ValueError.";
    m.def("encode", &encode<uint8_t>, "symbols"_a.noconvert(), "indexes"_a.noconvert(), "tables"_a, "max_abs"_a,
          encode_doc);
    m.def("encode", &encode<uint16_t>, "symbols"_a.noconvert(), "indexes"_a.noconvert(), "tables"_a, "max_abs"_a);
    m.def("encode", &encode<int32_t>, "symbols"_a.noconvert(), "indexes"_a.noconvert(), "tables"_a, "max_abs"_a);

    nb::class_<rans::Decoder>(m, "Decoder", "Decodes one string round by round (not thread-safe).")
        .def(
            "__init__",
            [](rans::Decoder* self, nb::bytes string, int64_t max_abs) {
                new (self) rans::Decoder(reinterpret_cast<const uint8_t*>(string.c_str()), string.size(), max_abs);
            },
            "string"_a, "max_abs"_a,
            "Copies the string; raises StreamError if it cannot be a coded string. A decoded |symbol| over "
            "max_abs raises StreamError.")
        .def("decode", &decode<uint8_t>, "indexes"_a.noconvert(), "tables"_a,
             "decode(indexes, tables) -> (n,) int32: the next n symbols, with the table rows indexes (n,) "
             "(uint8, uint16 or int32, C-contiguous).")
        .def("decode", &decode<uint16_t>, "indexes"_a.noconvert(), "tables"_a)
        .def("decode", &decode<int32_t>, "indexes"_a.noconvert(), "tables"_a)
        .def("dequantize_half", &dequantize_half, "tables"_a, "means"_a.noconvert(), "scales"_a.noconvert(),
             "scale_index"_a, "anchor"_a, "y_hat"_a.noconvert(),
             "dequantize_half(tables, means, scales, scale_index, anchor, y_hat) -> (n,) int32: one checkerboard "
             "round (runtime/native/checkerboard.hpp): decodes the half's symbols with the scales' CDF rows and "
             "writes symbols + means into y_hat. means, scales: (C, H, W/2) float32; y_hat: (C, H, W) float32, "
             "written in place; all C-contiguous.")
        .def_prop_ro("bytes_read", &rans::Decoder::bytes_read);

    nb::class_<rans::ScaleIndex>(m, "ScaleIndex", "Gaussian scale -> CDF index, as compressai's build_indexes.")
        .def(
            "__init__",
            [](rans::ScaleIndex* self, Vector<float> table) { new (self) rans::ScaleIndex(table.data(), table.shape(0)); },
            "table"_a.noconvert(), "table: the scale table, (n,) float32, 2 <= n <= 256, strictly increasing.")
        .def("__call__", &scale_indexes, "scales"_a.noconvert(),
             "scales: float32 array, any shape, C-contiguous -> uint8 indexes of the same shape.");

    m.def("quantize_half", &quantize_half, "y"_a.noconvert(), "means"_a.noconvert(), "scales"_a.noconvert(),
          "scale_index"_a, "max_abs"_a, "anchor"_a, "y_hat"_a.noconvert(), "symbols"_a.noconvert(),
          "indexes"_a.noconvert(),
          "quantize_half(y, means, scales, scale_index, max_abs, anchor, y_hat, symbols, indexes): one "
          "checkerboard round (runtime/native/checkerboard.hpp): symbols = round(y - means) in the half's "
          "squeezed order, their CDF rows into indexes, and symbols + means into y_hat. y, y_hat: (C, H, W) "
          "float32; means, scales: (C, H, W/2) float32; symbols (n,) int32 and indexes (n,) uint8, n = C * H * "
          "W/2; all C-contiguous, the last three written in place. A |symbol| over max_abs, or not finite, "
          "raises ValueError.");
}
