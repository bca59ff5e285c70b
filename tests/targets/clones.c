/* clones.c - gcc -O2 splits scaled() by partial inlining: main runs its head (x < 0) inline and calls
 * scaled.part.0 for the rest, never scaled's entry. Each number n on stdin prints "<scaled(n)>" (-1 for a
 * negative n, else 3n + 1; the loop over the zeroed table and the line "sum 0" on stderr make the body big
 * enough to split). */
#include <stdio.h>
#include <stdlib.h>

long table[64];  /* all 0: the sum is 0 */

long scaled(long x) {
    if (x < 0) return -1;
    long s = 0;
    for (long i = 0; i < 64; i++) {
        s += table[(x + i) & 63] * (i + 3);
        if (s > 1000000) s /= 3;
    }
    fprintf(stderr, "sum %ld\n", s);
    return s + 3 * x + 1;
}

int main(void) {
    char line[64];
    printf("ready\n");
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        printf("%ld\n", scaled(strtol(line, NULL, 10)));
        fflush(stdout);
    }
    return 0;
}
