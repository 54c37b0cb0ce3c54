// AMX (Intel Sapphire Rapids and later): the permission Linux asks for and the tile
// configuration, for the bfloat16 kernels that run their products on tiles (the dense blocks,
// convolutions of 16 images or more, kernel gradients). Empty where the compiler targets no AMX.

#ifndef DPJAX_MODELS_CSRC_AMX_TILES_H_
#define DPJAX_MODELS_CSRC_AMX_TILES_H_

#include <cstdint>
#include <initializer_list>

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace dpjax {

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
constexpr int64_t kAmxPairs = 16;  // k-pairs per tile step: 64 bytes of each row.

struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};

// Linux lets a process use AMX's tile data only after asking for it (arch_prctl, kernel 5.16+).
inline bool AmxPermitted() {
  constexpr int kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XTILEDATA.
  static const bool permitted = syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  return permitted;
}

// GCC 12's tile intrinsics under-declare what they read (ldtilecfg an 8-byte operand, tileloadd
// none), so stores to a buffer a tile instruction then reads may be dropped as dead or moved past
// it: with the configuration built in a helper the tile loads crashed. Called between the two
// with the buffers, so that their addresses escape to it and its memory clobber covers them.
inline void KeepStoresForTiles(const void* buffer, const void* other = nullptr) {
  asm volatile("" : : "r"(buffer), "r"(other) : "memory");
}

// Loads the tile configuration: tiles 0, 1, ... of rows[0], rows[1], ... rows of 64 bytes.
inline void ConfigureTiles(std::initializer_list<int> rows) {
  TileConfig config{};
  config.palette = 1;
  int tile = 0;
  for (const int count : rows) {
    config.rows[tile] = count;
    config.bytes_per_row[tile++] = 64;
  }
  KeepStoresForTiles(&config);
  _tile_loadconfig(&config);
}

// The 2 x 2 tiles of float32 sums (0-3) and the four operand tiles (4-7): 16 rows of 64 bytes.
inline void ConfigureSquareTiles() {
  ConfigureTiles({kAmxPairs, kAmxPairs, kAmxPairs, kAmxPairs, kAmxPairs, kAmxPairs, kAmxPairs,
                  kAmxPairs});
}

#endif  // __AMX_TILE__ && __AMX_BF16__

}  // namespace dpjax

#endif  // DPJAX_MODELS_CSRC_AMX_TILES_H_
