/* Shared helpers of the C tests: fail loudly, print the library's own sentence. */
#ifndef TPLA_FFI_TESTS_CHECK_H
#define TPLA_FFI_TESTS_CHECK_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tpla.h"

/* A call that must succeed; the program stops otherwise. */
#define CHECK_OK(call)                                                                  \
  do {                                                                                  \
    tpla_status check_status_ = (call);                                                 \
    if (check_status_ != TPLA_STATUS_OK) {                                              \
      fprintf(stderr, "%s:%d: %s failed: %s: %s\n", __FILE__, __LINE__, #call,          \
              tpla_status_str(check_status_), tpla_last_error_message());               \
      exit(1);                                                                          \
    }                                                                                   \
  } while (0)

/* A condition that must hold; the program stops otherwise. */
#define CHECK(cond)                                                                     \
  do {                                                                                  \
    if (!(cond)) {                                                                      \
      fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);          \
      exit(1);                                                                          \
    }                                                                                   \
  } while (0)

/* A call that must return `want` with a last error message containing `needle`; a
 * miss is reported and counted, and the program goes on. It counts into the program's
 * own `static int checked, failures;`, which it reports at the end. */
#define EXPECT(want, needle, call)                                                        \
  do {                                                                                    \
    tpla_status expect_status_ = (call);                                                  \
    checked++;                                                                            \
    if (expect_status_ != (want)) {                                                       \
      fprintf(stderr, "%s:%d: %s returned %s (%s), expected %s\n", __FILE__, __LINE__,    \
              #call, tpla_status_str(expect_status_), tpla_last_error_message(),          \
              tpla_status_str(want));                                                     \
      failures++;                                                                         \
    } else if (strstr(tpla_last_error_message(), (needle)) == NULL) {                     \
      fprintf(stderr, "%s:%d: %s: message \"%s\" lacks \"%s\"\n", __FILE__, __LINE__,     \
              #call, tpla_last_error_message(), (needle));                                \
      failures++;                                                                         \
    }                                                                                     \
  } while (0)

/* Small shape used by the tests: every width distinct, so a mixed-up shape shows. */
#define TEST_HEADS 4
#define TEST_DC 64
#define TEST_DR 16
#define TEST_DN 32
#define TEST_DV 24

static inline tpla_dims test_dims(void) {
  tpla_dims d;
  d.heads = TEST_HEADS;
  d.d_c = TEST_DC;
  d.d_r = TEST_DR;
  d.d_n = TEST_DN;
  d.d_v = TEST_DV;
  d.softmax_scale = 0.15;
  return d;
}

static inline tpla_backend_options backend_options(uint32_t kind, uint32_t threads) {
  tpla_backend_options b;
  memset(&b, 0, sizeof b);
  b.struct_size = sizeof b;
  b.kind = kind;
  b.threads = threads;
  return b;
}

static inline void *xcalloc(size_t n, size_t size) {
  void *p = calloc(n, size);
  CHECK(p != NULL);
  return p;
}

#endif
