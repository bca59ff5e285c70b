/* clone_copy.c - compute() and a whole copy of it under a clone's name (compute.clone.0, as gcc names the
 * copies it makes), built with -fno-ipa-icf so gcc keeps both bodies. Each number n on stdin prints
 * "<compute(n)> <the copy's (n)>": 7n + 3 twice. */
#include <stdio.h>
#include <stdlib.h>

__attribute__((noinline)) long compute(long x) { return x * 7 + 3; }

__attribute__((noinline)) long compute_copy(long x) __asm__("compute.clone.0");
long compute_copy(long x) { return x * 7 + 3; }

int main(void) {
    char line[64];
    printf("ready\n");
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        long n = strtol(line, NULL, 10);
        printf("%ld %ld\n", compute(n), compute_copy(n));
        fflush(stdout);
    }
    return 0;
}
