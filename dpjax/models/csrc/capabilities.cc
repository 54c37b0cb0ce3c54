// What this build of the library runs, for cpu_kernels.py to choose between its paths.

#include "amx_tiles.h"

// Whether DpjaxPackedDenseBf16 was built (the CPU has AVX512-BF16).
extern "C" int DpjaxHasBf16Dense() {
#ifdef __AVX512BF16__
  return 1;
#else
  return 0;
#endif
}

// Whether the bfloat16 kernels run on AMX tiles (the CPU has them and Linux lets us use them).
extern "C" int DpjaxHasAmxTiles() {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  return dpjax::AmxPermitted() ? 1 : 0;
#else
  return 0;
#endif
}
