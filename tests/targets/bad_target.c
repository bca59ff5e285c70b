/* bad_target.c - the target of tests/test_bad_input.py: a small idle program with functions of several shapes.
 *
 * At start it prints "addr NAME 0xADDR" for each function below, then "ready". A worker thread calls
 * compute() every millisecond (so the program runs code all the time); the main thread waits on stdin and
 * exits when it closes. Built with -DVARIANT it is "another build of the same program": compute() differs
 * (another build-id), short_fn() is long enough for a jump and branchy_fn() has no branch into its first
 * bytes, so `hotpatch build` accepts patches of those two against the variant.
 *
 *   compute       C: 3*x + 1 (or 3*x + 5 in the variant)
 *   never_called  C: in the binary but never executed, so a test may change its bytes in the running program
 *   short_fn      assembly: returns 0 in 3 bytes, too short for a 5-byte jump (the variant: returns 1 in 9 bytes)
 *   branchy_fn    assembly: a loop jumps back to offset 2, inside the first 5 bytes (the variant: to offset 5)
 *   call_fn       assembly: starts with a call (refused: a return address would point into the jump)
 */
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

#define NOCLONE __attribute__((noinline, noipa, used))

#ifdef VARIANT
NOCLONE int compute(int x) { return 3 * x + 5; }
#else
NOCLONE int compute(int x) { return 3 * x + 1; }
#endif

NOCLONE int never_called(int x) { return (x ^ 0x5a5a) * 7 + 3; }

int short_fn(void);
int branchy_fn(int x);
int call_fn(int x);

__asm__(
    "    .text\n"
    "    .globl short_fn\n"
    "    .type short_fn, @function\n"
    "    .p2align 4\n"
    "short_fn:\n"
#ifdef VARIANT
    "    movl $1, %eax\n" /* b8 01 00 00 00 */
    "    nop\n"
    "    nop\n"
    "    nop\n"
#else
    "    xorl %eax, %eax\n" /* 31 c0: with the ret, 3 bytes */
#endif
    "    ret\n"
    "    .size short_fn, .-short_fn\n"
    "    .globl branchy_fn\n"
    "    .type branchy_fn, @function\n"
    "    .p2align 4\n"
    "branchy_fn:\n"
    "    movl %edi, %eax\n" /* 89 f8: 2 bytes */
#ifdef VARIANT
    "    nop\n"
    "    nop\n"
    "    nop\n"
#endif
    "1:  addl $1, %eax\n"   /* 83 c0 01: at offset 2 (variant: 5) */
    "    cmpl $100, %eax\n"
    "    jl 1b\n"           /* the branch target */
    "    ret\n"
    "    .size branchy_fn, .-branchy_fn\n"
    "    .globl call_fn\n"
    "    .type call_fn, @function\n"
    "    .p2align 4\n"
    "call_fn:\n"
    "    call compute\n"
    "    addl $1, %eax\n"
    "    ret\n"
    "    .size call_fn, .-call_fn\n");

static void *worker(void *arg) {
    (void)arg;
    volatile int sink = 0;
    for (int i = 0;; i++) {
        sink += compute(i & 1023);
        usleep(1000);
    }
    return NULL;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("addr compute %p\n", (void *)compute);
    printf("addr never_called %p\n", (void *)never_called);
    printf("addr short_fn %p\n", (void *)short_fn);
    printf("addr branchy_fn %p\n", (void *)branchy_fn);
    printf("addr call_fn %p\n", (void *)call_fn);
    pthread_t t;
    if (pthread_create(&t, NULL, worker, NULL) != 0)
        return 2;
    printf("ready\n");
    char buf[64];
    while (read(0, buf, sizeof buf) > 0) {
    }
    return 0;
}
