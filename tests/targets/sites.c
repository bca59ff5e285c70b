/* sites.c - a target with one function of each site kind that tests/test_sites.py patches.
 *
 * At start it prints "addr NAME 0xADDR" for each function, then "ready". Then for every line "X" read from
 * stdin it prints "X plain=.. riprel=.. crosspage=.. pair_a=.. pair_b=..", the results of calling each
 * function with X. A line "base N" sets the value riprel reads through its RIP-relative operand.
 *
 *   plain      an ordinary C function (with -fcf-protection it starts with endbr64): 3*x + 1
 *   riprel     assembly: its first instruction is `mov rax, [rip + riprel_base]`: x + riprel_base
 *   crosspage  assembly placed 2 bytes before a page boundary, so its first instruction crosses it: x + 1234
 *   pair_a/b   two C functions a single patch replaces together: x + 10, x + 20
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NOCLONE __attribute__((noinline, noipa))

long riprel_base = 0x5eed;

NOCLONE long plain(long x) { return 3 * x + 1; }
NOCLONE long pair_a(long x) { return x + 10; }
NOCLONE long pair_b(long x) { return x + 20; }

long riprel(long x);
long crosspage(long x);

__asm__(
    "    .text\n"
    "    .globl riprel\n"
    "    .type riprel, @function\n"
    "riprel:\n"
    "    movq riprel_base(%rip), %rax\n" /* 48 8b 05 rel32: 7 bytes, RIP-relative */
    "    addq %rdi, %rax\n"
    "    ret\n"
    "    .size riprel, .-riprel\n"
    /* crosspage: entry at page end - 2; `lea 1234(%rdi), %rax` (7 bytes) spans the page boundary */
    "    .p2align 12\n"
    "    .skip 4094, 0xcc\n"
    "    .globl crosspage\n"
    "    .type crosspage, @function\n"
    "crosspage:\n"
    "    leaq 1234(%rdi), %rax\n"
    "    ret\n"
    "    .size crosspage, .-crosspage\n");

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("addr plain %p\n", (void *)plain);
    printf("addr riprel %p\n", (void *)riprel);
    printf("addr crosspage %p\n", (void *)crosspage);
    printf("addr pair_a %p\n", (void *)pair_a);
    printf("addr pair_b %p\n", (void *)pair_b);
    printf("ready\n");
    char line[128];
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "base ", 5) == 0) {
            riprel_base = strtol(line + 5, NULL, 0);
            printf("base %ld\n", riprel_base);
            continue;
        }
        long x = strtol(line, NULL, 0);
        printf("%ld plain=%ld riprel=%ld crosspage=%ld pair_a=%ld pair_b=%ld\n", x, plain(x), riprel(x),
               crosspage(x), pair_a(x), pair_b(x));
    }
    return 0;
}
