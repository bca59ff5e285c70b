/* The patch of `hotpatch demo`, in C. A std::string_view argument arrives as two registers (length, then
 * pointer: System V x86-64 psABI, a 16-byte trivially copyable class); the C++ symbols are named with asm
 * labels, as `hotpatch build` matches replacements by symbol. */
#include <stddef.h>
#include <stdio.h>

void say_hello_fun(int n, size_t len, const char *str)
    __asm__("_Z13say_hello_funiSt17basic_string_viewIcSt11char_traitsIcEE");
void say_hello(void *self, int n, size_t len, const char *str)
    __asm__("_ZN9DemoClass9say_helloEiSt17basic_string_viewIcSt11char_traitsIcEE");

void say_hello_fun(int n, size_t len, const char *str) {
    printf("Completely patched! %.*s %d\n", (int)len, str, n);
    fflush(stdout);
}

void say_hello(void *self, int n, size_t len, const char *str) {
    (void)self;
    printf("Completely patched! %.*s %d\n", (int)len, str, n);
    fflush(stdout);
}
