/* riprel_patch.c - replaces riprel() of sites.c and calls the original through HOTPATCH_ORIGINAL. The
 * original's first instruction loads riprel_base RIP-relative, so a result of 2 * (x + riprel_base) + 1
 * proves the trampoline's relocated copy read the right memory. */
#include <hotpatch.h>

long riprel(long x);

long riprel(long x) { return 2 * HOTPATCH_ORIGINAL(riprel)(x) + 1; }
