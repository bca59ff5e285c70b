/* lib_counter_patch.c - replaces lib_compute() of libsite.so and reads the library's exported variable
 * lib_calls, resolved in the target at apply time: 1000000 * lib_calls + x*x + 7. The program (libmain.c)
 * holds lib_calls through a copy relocation, so the right lib_calls is the executable's copy, the one
 * libsite.so's own code uses; libsite.so's definition of it stays 0. */
#include <hotpatch.h>

extern long lib_calls;
long lib_compute(long x);

long lib_compute(long x) {
    long v = HOTPATCH_ORIGINAL(lib_compute)(x);
    return 1000000 * lib_calls + v;
}
