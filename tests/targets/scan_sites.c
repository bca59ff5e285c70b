/* One function per site class and per refusal of `hotpatch scan` (tests/test_scan.py), built as a shared
 * library without start files, so its exports are exactly these functions. The C functions carry gcc's
 * hotpatch attributes; the others are written in assembly so that their bytes and the padding between them
 * are known exactly (x86-64 only; an i386 build has the C functions). Locals (no .globl) disappear with `strip`; only those with .cfi_startproc keep an FDE. */

__attribute__((ms_hook_prologue, noinline)) int hook_fn(int x) { return x * 3 + 1; }

__attribute__((patchable_function_entry(16, 14), noinline)) int pfe_fn(int x) { return x + 7; }

static int pick_one(int x) { return x + 1; }
static int (*resolve_pick(void))(int) { return pick_one; }
int pick(int x) __attribute__((ifunc("resolve_pick")));

#ifdef __x86_64__
__asm__(
    ".text\n"
    /* opp_fn: opportunistic; the padding before it follows a ret and its previous function has an FDE */
    "  .p2align 4\n"
    "  .type after_ret_prev, @function\n"
    "after_ret_prev:\n"
    "  .cfi_startproc\n"
    "  mov %edi, %eax\n"
    "  ret\n"
    "  .cfi_endproc\n"
    "  .size after_ret_prev, .-after_ret_prev\n"
    "  .p2align 4\n"
    "  .globl opp_fn\n"
    "  .type opp_fn, @function\n"
    "opp_fn:\n"
    "  lea 1(%rdi), %eax\n"
    "  add %esi, %eax\n"
    "  ret\n"
    "  .size opp_fn, .-opp_fn\n"
    /* opp_nocfi_fn: the same, but its previous function is known only from .symtab: ordinary once stripped */
    "  .p2align 4\n"
    "  .type nocfi_prev, @function\n"
    "nocfi_prev:\n"
    "  mov %edi, %eax\n"
    "  ret\n"
    "  .size nocfi_prev, .-nocfi_prev\n"
    "  .p2align 4\n"
    "  .globl opp_nocfi_fn\n"
    "  .type opp_nocfi_fn, @function\n"
    "opp_nocfi_fn:\n"
    "  lea 2(%rdi), %eax\n"
    "  add %esi, %eax\n"
    "  ret\n"
    "  .size opp_nocfi_fn, .-opp_nocfi_fn\n"
    /* after_call_fn: ordinary; the function before it ends with a call, which returns into the padding */
    "  .p2align 4\n"
    "  .type call_prev, @function\n"
    "call_prev:\n"
    "  .cfi_startproc\n"
    "  mov %edi, %eax\n"
    "  call *%rsi\n"
    "  .cfi_endproc\n"
    "  .size call_prev, .-call_prev\n"
    "  .p2align 4\n"
    "  .globl after_call_fn\n"
    "  .type after_call_fn, @function\n"
    "after_call_fn:\n"
    "  lea 3(%rdi), %eax\n"
    "  add %esi, %eax\n"
    "  ret\n"
    "  .size after_call_fn, .-after_call_fn\n"
    /* plain_fn: ordinary; its first instruction (push) is 1 byte, too short for the short jump */
    "  .p2align 4\n"
    "  .globl plain_fn\n"
    "  .type plain_fn, @function\n"
    "plain_fn:\n"
    "  push %rbx\n"
    "  lea 5(%rdi), %eax\n"
    "  pop %rbx\n"
    "  ret\n"
    "  .size plain_fn, .-plain_fn\n"
    /* tiny_fn: too short (1 byte) */
    "  .p2align 4\n"
    "  .globl tiny_fn\n"
    "  .type tiny_fn, @function\n"
    "tiny_fn:\n"
    "  ret\n"
    "  .size tiny_fn, .-tiny_fn\n"
    /* call_first_fn: right after tiny_fn, no padding: a call in its first 5 bytes */
    "  .globl call_first_fn\n"
    "  .type call_first_fn, @function\n"
    "call_first_fn:\n"
    "  call after_ret_prev\n"
    "  add $1, %eax\n"
    "  ret\n"
    "  .size call_first_fn, .-call_first_fn\n"
    /* branchy_fn: a loop back to entry+1, inside the 5 bytes a jump would overwrite */
    "  .p2align 4\n"
    "  .globl branchy_fn\n"
    "  .type branchy_fn, @function\n"
    "branchy_fn:\n"
    "  push %rbx\n"
    "1:\n"
    "  add $1, %edi\n"
    "  cmp $10, %edi\n"
    "  jl 1b\n"
    "  mov %edi, %eax\n"
    "  pop %rbx\n"
    "  ret\n"
    "  .size branchy_fn, .-branchy_fn\n"
    /* invalid_fn: starts with 06 (push %es), invalid in 64-bit mode */
    "  .p2align 4\n"
    "  .globl invalid_fn\n"
    "  .type invalid_fn, @function\n"
    "invalid_fn:\n"
    "  .byte 0x06, 0x90, 0x90, 0x90, 0x90, 0xc3\n"
    "  .size invalid_fn, .-invalid_fn\n"
    /* xbegin_fn: right after invalid_fn, no padding: xbegin in the first bytes (refused: "other") */
    "  .globl xbegin_fn\n"
    "  .type xbegin_fn, @function\n"
    "xbegin_fn:\n"
    "  xbegin 2f\n"
    "  xend\n"
    "2:\n"
    "  ret\n"
    "  .size xbegin_fn, .-xbegin_fn\n");
#endif
