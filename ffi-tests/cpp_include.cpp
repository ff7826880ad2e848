// tpla.h from C++: the header compiles with C++ warnings as errors and links with C
// linkage (extern "C").
#include "tpla.h"

#include <cstdio>
#include <cstring>

int main() {
  tpla_dims d;
  if (tpla_dims_preset("kimi-k2", &d) != TPLA_STATUS_OK || d.heads != 64) return 1;
  tpla_status s = tpla_dims_preset(nullptr, &d);
  if (s != TPLA_STATUS_NULL_ARGUMENT || std::strlen(tpla_last_error_message()) == 0) return 1;
  if (tpla_abi_version() != TPLA_ABI_VERSION) return 1;
  std::printf("cpp: libtpla %s\n", tpla_version());
  return 0;
}
