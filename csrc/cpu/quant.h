// Decoding and encoding blocks of 8-bit state on the CPU (the scheme and the tables:
// csrc/core/quant8.h). A block of at most kQuantBlock values is decoded into floats,
// the update runs on those, and the block is encoded back: its scale (the largest
// magnitude) first, then the codes.
//
// Decoding is a table lookup (a gather where the instruction set has one). Encoding is
// quant_encode's formula on whole vectors: the octave of each value from its exponent
// bits, its slot from lookups in registers (AVX-512: permutes of 16 or 32 entries; AVX2:
// a byte shuffle and permutes of 8 entries, the top slot blended in), then one
// multiply, subtract, minimum and truncation; the instruction sets run the same float
// operations in the same order, so every build writes the same codes as the scalar
// quant_encode (and the CUDA functor).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "../core/quant8.h"

#ifndef FO_ISA_NS
#error "quant.h belongs to the per-instruction-set kernels: define FO_ISA_NS"
#endif

namespace fo::cpu::FO_ISA_NS {

// out[i] = table[codes[i]] * scale for i < n.
inline void decode_block(const q8* codes, float scale, const float* table, float* out,
                         std::int64_t n) {
  const std::uint8_t* c = reinterpret_cast<const std::uint8_t*>(codes);
  std::int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 s = _mm512_set1_ps(scale);
  for (; i + 16 <= n; i += 16) {
    const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + i)));
    _mm512_store_ps(out + i, _mm512_mul_ps(_mm512_i32gather_ps(idx, table, 4), s));
  }
#elif defined(__AVX2__)
  const __m256 s = _mm256_set1_ps(scale);
  for (; i + 8 <= n; i += 8) {
    const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + i)));
    _mm256_store_ps(out + i, _mm256_mul_ps(_mm256_i32gather_ps(table, idx, 4), s));
  }
#endif
  for (; i < n; ++i) out[i] = table[c[i]] * scale;
}

// The largest magnitude's bit pattern among x[0, n) (see quant_scale).
inline std::uint32_t max_abs_bits(const float* x, std::int64_t n) {
  std::uint32_t m = 0;
#pragma omp simd reduction(max : m)
  for (std::int64_t i = 0; i < n; ++i) {
    const std::uint32_t b = float_bits(x[i]) & 0x7fffffffu;
    m = b > m ? b : m;
  }
  return m;
}

#if defined(__AVX512F__)
// The codes of 16 values y (as 32-bit lanes; a signed code may be -1, which the
// packing's unsigned saturation turns into 0, as quant_encode's clamp does).
struct QuantRegs {
  __m512 thr, mul, sub, cap;
  __m512i first_lo, first_hi;
  explicit QuantRegs(const QuantMap& q)
      : thr(_mm512_loadu_ps(q.thr)), mul(_mm512_loadu_ps(q.mul)), sub(_mm512_loadu_ps(q.sub)),
        cap(_mm512_loadu_ps(q.cap)), first_lo(_mm512_loadu_si512(q.first)),
        first_hi(_mm512_loadu_si512(q.first + 16)) {}
};

template <bool Signed>
inline __m512i encode16(__m512 y, const QuantRegs& r) {
  const __m512 floor = _mm512_set1_ps(kQuantFloor);
  // max(|y|, floor) with the sign cleared (signed), max(y, floor) (unsigned)
  const __m512 a = Signed ? _mm512_range_ps(y, floor, 0x0b) : _mm512_max_ps(y, floor);
  const __m512i octave = _mm512_srli_epi32(_mm512_castps_si512(a), 23);  // 96 .. 127: low 5 bits
  __m512i s = _mm512_permutex2var_epi32(r.first_lo, octave, r.first_hi);
  const __mmask16 up = _mm512_cmp_ps_mask(a, _mm512_permutexvar_ps(s, r.thr), _CMP_GE_OQ);
  s = _mm512_mask_add_epi32(s, up, s, _mm512_set1_epi32(1));
  __m512 t = _mm512_sub_ps(_mm512_mul_ps(a, _mm512_permutexvar_ps(s, r.mul)),
                           _mm512_permutexvar_ps(s, r.sub));
  t = _mm512_min_ps(t, _mm512_permutexvar_ps(s, r.cap));
  __m512i code = _mm512_cvttps_epi32(t);
  if (Signed) {
    const __mmask16 neg = _mm512_movepi32_mask(_mm512_castps_si512(y));
    code = _mm512_mask_sub_epi32(code, neg, _mm512_set1_epi32(254), code);
  }
  return code;
}

// 64 bytes from four vectors of 32-bit codes, in order, with unsigned saturation.
inline __m512i pack_codes(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i bytes = _mm512_packus_epi16(_mm512_packus_epi32(a, b), _mm512_packus_epi32(c, d));
  // 128-bit lane k holds a[4k..4k+3], b[4k..], c[4k..], d[4k..]
  return _mm512_permutexvar_epi32(
      _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), bytes);
}
#elif defined(__AVX2__)
// The tables in registers: `first` as bytes for vpshufb (octaves 0-15 and 16-31, each
// in both 128-bit lanes), the slots' tables for vpermps, whose 8 entries hold slots 0-7:
// the top slot 8 (a >= thr[7]) is blended in at the end.
struct QuantRegs {
  __m256i first_lo, first_hi;
  __m256 thr, mul, sub, cap, top_thr;
  explicit QuantRegs(const QuantMap& q)
      : thr(_mm256_loadu_ps(q.thr)), mul(_mm256_loadu_ps(q.mul)), sub(_mm256_loadu_ps(q.sub)),
        cap(_mm256_loadu_ps(q.cap)), top_thr(_mm256_set1_ps(q.thr[7])) {
    alignas(32) std::uint8_t lo[32], hi[32];
    for (int k = 0; k < 32; ++k) {
      lo[k] = std::uint8_t(q.first[k % 16]);
      hi[k] = std::uint8_t(q.first[16 + k % 16]);
    }
    first_lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo));
    first_hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi));
  }
};

template <bool Signed>
inline __m256i encode8(__m256 y, const QuantRegs& r) {
  const __m256 floor = _mm256_set1_ps(kQuantFloor);
  __m256 a = Signed ? _mm256_and_ps(y, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))) : y;
  a = _mm256_max_ps(a, floor);
  const __m256i octave = _mm256_srli_epi32(_mm256_castps_si256(a), 23);  // 96 .. 127
  // first[octave - 96]: a byte lookup in the low byte of each lane (the other bytes'
  // controls have their top bit set: zero)
  const __m256i ctrl = _mm256_or_si256(_mm256_and_si256(octave, _mm256_set1_epi32(15)),
                                       _mm256_set1_epi32(int(0x80808000u)));
  __m256i s = _mm256_blendv_epi8(_mm256_shuffle_epi8(r.first_lo, ctrl),
                                 _mm256_shuffle_epi8(r.first_hi, ctrl),
                                 _mm256_cmpgt_epi32(octave, _mm256_set1_epi32(111)));
  const __m256 up = _mm256_cmp_ps(a, _mm256_permutevar8x32_ps(r.thr, s), _CMP_GE_OQ);
  s = _mm256_min_epu32(_mm256_sub_epi32(s, _mm256_castps_si256(up)), _mm256_set1_epi32(7));
  __m256 t = _mm256_sub_ps(_mm256_mul_ps(a, _mm256_permutevar8x32_ps(r.mul, s)),
                           _mm256_permutevar8x32_ps(r.sub, s));
  t = _mm256_min_ps(t, _mm256_permutevar8x32_ps(r.cap, s));
  __m256i code = _mm256_cvttps_epi32(t);
  // the top code (slot 8) where a >= thr[7]: 255 on both maps, as counted here, and
  // above every other code
  const __m256i top = _mm256_castps_si256(_mm256_cmp_ps(a, r.top_thr, _CMP_GE_OQ));
  code = _mm256_max_epi32(code, _mm256_and_si256(top, _mm256_set1_epi32(255)));
  if (Signed) {  // negative: 254 - code = ~code + 255
    const __m256i neg = _mm256_srai_epi32(_mm256_castps_si256(y), 31);
    code = _mm256_add_epi32(_mm256_xor_si256(code, neg),
                            _mm256_and_si256(neg, _mm256_set1_epi32(255)));
  }
  return code;
}

// 32 bytes from four vectors of 32-bit codes, in order, with unsigned saturation.
inline __m256i pack_codes(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_packus_epi32(c, d));
  // 128-bit lane k holds a[4k..4k+3], b[4k..], c[4k..], d[4k..]
  return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}
#endif

// Encodes x[0, n) (n <= kQuantBlock) into codes with a scale of their own, written to
// *scale; the codes of `q` (the signed map when Signed). x is read twice (the scale,
// then the codes) and is not changed.
template <bool Signed>
void encode_block(const float* x, std::int64_t n, q8* codes, float* scale, const QuantMap& q) {
  std::uint8_t* c = reinterpret_cast<std::uint8_t*>(codes);
  const std::uint32_t m = max_abs_bits(x, n);
  *scale = quant_scale(m);
  const int kind = quant_block_kind(m);
  if (kind == 1) {
    for (std::int64_t i = 0; i < n; ++i) c[i] = quant_zero_code<Signed>();
    return;
  }
  const float pre = kind == 2 ? kQuantRescale : 1.0f;
  const float inv = quant_inverse(*scale, kind);
  std::int64_t i = 0;
  if (kind == 0) {
#if defined(__AVX512F__)
    const QuantRegs r(q);
    const __m512 iv = _mm512_set1_ps(inv);
    for (; i + 64 <= n; i += 64) {
      const __m512i c0 = encode16<Signed>(_mm512_mul_ps(_mm512_loadu_ps(x + i), iv), r);
      const __m512i c1 = encode16<Signed>(_mm512_mul_ps(_mm512_loadu_ps(x + i + 16), iv), r);
      const __m512i c2 = encode16<Signed>(_mm512_mul_ps(_mm512_loadu_ps(x + i + 32), iv), r);
      const __m512i c3 = encode16<Signed>(_mm512_mul_ps(_mm512_loadu_ps(x + i + 48), iv), r);
      _mm512_storeu_si512(c + i, pack_codes(c0, c1, c2, c3));
    }
#elif defined(__AVX2__)
    const QuantRegs r(q);
    const __m256 iv = _mm256_set1_ps(inv);
    for (; i + 32 <= n; i += 32) {
      const __m256i c0 = encode8<Signed>(_mm256_mul_ps(_mm256_loadu_ps(x + i), iv), r);
      const __m256i c1 = encode8<Signed>(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8), iv), r);
      const __m256i c2 = encode8<Signed>(_mm256_mul_ps(_mm256_loadu_ps(x + i + 16), iv), r);
      const __m256i c3 = encode8<Signed>(_mm256_mul_ps(_mm256_loadu_ps(x + i + 24), iv), r);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + i), pack_codes(c0, c1, c2, c3));
    }
#endif
  }
  // the rest, and every element of a block with a subnormal scale
  for (; i < n; ++i) c[i] = quant_encode<Signed>(kind == 2 ? (x[i] * pre) * inv : x[i] * inv, q);
}

}  // namespace fo::cpu::FO_ISA_NS
