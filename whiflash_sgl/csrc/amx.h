// AMX tile configuration and the OS's permission to use the tiles (invariant_gemm.cpp), shared by the kernels on AMX.

#pragma once

#include <cstdint>

namespace whiflash {

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux hands out AMX state only on request, once per process.
bool amx_permitted();

}  // namespace whiflash
