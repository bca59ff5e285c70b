/* crosspage_patch.c - replaces crosspage() of sites.c: x + 1234 becomes x - 1234, computed by calling the
 * original (whose first instruction crosses a page boundary) through its trampoline. */
#include <hotpatch.h>

long crosspage(long x);

long crosspage(long x) { return HOTPATCH_ORIGINAL(crosspage)(x) - 2468; }
