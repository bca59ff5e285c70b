/* lib_patch.c - replaces lib_compute() of libsite.so with the negated result of the original, called
 * through HOTPATCH_ORIGINAL (its first bytes load lib_calls's GOT entry RIP-relative): -(x*x + 7). */
#include <hotpatch.h>

long lib_compute(long x);

long lib_compute(long x) { return -HOTPATCH_ORIGINAL(lib_compute)(x); }
