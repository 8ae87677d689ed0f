// CRC32C (Castagnoli polynomial 0x1EDC6F41, reflected 0x82F63B78) of the teacher cache's records,
// index and manifest: the SSE4.2 crc32 instruction where the CPU has it, else slicing-by-8 tables
// (crc32c.cpp).  Both give the standard CRC32C (check value of "123456789": 0xE3069283).
#pragma once

#include <cstddef>
#include <cstdint>

namespace tbf_cache {

// CRC32C of p[0:n], continuing from `crc` (0 to start).
uint32_t crc32c(uint32_t crc, const uint8_t* p, size_t n);

// Checksums a record in the order it is read, so each byte is checked while it is hot in cache:
// advance(end) folds in the bytes up to `end` (record-relative) not yet folded in.
class CrcCursor {
 public:
  explicit CrcCursor(const uint8_t* base) : base_(base) {}
  void advance(int64_t end) {
    if (end > pos_) {
      crc_ = crc32c(crc_, base_ + pos_, static_cast<size_t>(end - pos_));
      pos_ = end;
    }
  }
  uint32_t value() const { return crc_; }

 private:
  const uint8_t* base_;
  int64_t pos_ = 0;
  uint32_t crc_ = 0;
};

}  // namespace tbf_cache
