/* cxx_demo_patch.cc - a patch of cxx_demo.cc (seed 004's patches): the test writes VERSION (1, 2 or 3). */
#include "cxx_demo.h"

#include <cstdio>

#define VERSION @VERSION@

void DemoClass::say_hello(int n, std::string_view what) {
    printf("Completely patched! v%d %.*s %d\n", VERSION, (int)what.size(), what.data(), n);
}

void say_hello_fun(int n, std::string_view what) {
    printf("Completely patched! v%d %.*s %d\n", VERSION, (int)what.size(), what.data(), n);
}

long Greeter::greet(long x) { return x + 1000 * VERSION; }
