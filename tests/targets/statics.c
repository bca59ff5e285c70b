/* statics.c - a function that uses a static counter and a static helper, for patches that use them too.
 *
 * Each number n on stdin prints "<compute(n)> <calls>": compute(n) = scale(n) + 1 = 3n + 1, and counts
 * its calls in the static `calls`. noclone keeps scale() whole, with its own symbol and calling convention.
 */
#include <stdio.h>
#include <stdlib.h>

static long calls;

__attribute__((noinline, noclone, used)) static long scale(long x) { return x * 3; }

__attribute__((noinline)) long compute(long x) {
    calls++;
    return scale(x) + 1;
}

int main(void) {
    char line[64];
    printf("ready\n");
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        long v = compute(strtol(line, NULL, 10));
        printf("%ld %ld\n", v, calls);
        fflush(stdout);
    }
    return 0;
}
