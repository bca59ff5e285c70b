/* compute_short_insns.h - compute(x) = 3x+1 in assembly whose first 5 bytes hold three short instructions,
 * so a thread stopped by hotpatch is often inside the bytes the jump overwrites (and must be moved into the
 * trampoline):
 *     mov %edi,%eax (2) ; add %eax,%eax (2) ; add %edi,%eax (2) ; add $1,%eax (3) ; ret
 * Shared by kill_target.c, churn.c and sleepers.c. COMPUTE_PRELUDE (assembly) comes right before compute's
 * label; by default it aligns it, and a file that wants no padding before compute defines its own. */
int compute(int x);

#ifndef COMPUTE_PRELUDE
#define COMPUTE_PRELUDE "    .p2align 4\n"
#endif

__asm__(
    "    .text\n"
    COMPUTE_PRELUDE
    "    .globl compute\n"
    "    .type compute, @function\n"
    "compute:\n"
    "    movl %edi, %eax\n"
    "    addl %eax, %eax\n"
    "    addl %edi, %eax\n"
    "    addl $1, %eax\n"
    "    ret\n"
    "    .size compute, .-compute\n");
