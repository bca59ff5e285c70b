/* Reads integers from stdin, answers compute(n) for each: a deterministic probe of which version runs. */
#include <stdio.h>

__attribute__((noipa)) long compute(long x) {
    long r = x;
    for (int i = 0; i < 3; i++)
        r += (i == 1);
    return r;
}

int main(void) {
    long n;
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    while (scanf("%ld", &n) == 1)
        printf("%ld\n", compute(n));
    return 0;
}
