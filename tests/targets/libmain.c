/* libmain.c - links libsite.so and calls its lib_compute for each number read from stdin.
 * Prints "addr lib_compute 0xADDR" and "ready", then "X lib_compute=V calls=N" per input line, where N is
 * the library's lib_calls counter. main refers to lib_calls, so (as a PIE) it holds lib_calls through a copy
 * relocation: the live variable is in the executable, and libsite.so's own definition is unused. */
#include <stdio.h>
#include <stdlib.h>

long lib_compute(long x);
extern long lib_calls;

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("addr lib_compute %p\n", (void *)lib_compute);
    printf("ready\n");
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        long x = strtol(line, NULL, 0);
        long v = lib_compute(x);
        printf("%ld lib_compute=%ld calls=%ld\n", x, v, lib_calls);
    }
    return 0;
}
