/* libsite.c - a shared library (libsite.so) whose function tests/test_sites.py patches with
 * `hotpatch build --target libsite.so`. lib_compute reads a counter through the GOT (RIP-relative). */
long lib_calls;

__attribute__((noinline, noipa)) long lib_compute(long x) {
    lib_calls++;
    return x * x + 7;
}
