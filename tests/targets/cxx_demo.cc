/* cxx_demo.cc - seed 004's demonstration as a target: a C function, a member function and a virtual function.
 *
 * Each line on stdin makes the main thread print
 *     <DemoClass::say_hello's line>   ("Hello, from C++ member function! 42")
 *     <say_hello_fun's line>          ("Hello, from C function! 42")
 *     greet <through a base pointer> <direct call>      ("greet 42 42")
 * Two more threads call Greeter::greet(41) through a base pointer in a tight loop; a result other than
 * 42 + 1000 * k (k = 0..3, the test's patch versions) prints "BAD <value>" and aborts.
 */
#include "cxx_demo.h"

#include <cstdio>
#include <cstdlib>
#include <pthread.h>

FORCE_NO_INLINE long Greeter::greet(long x) { return x + 1; }

FORCE_NO_INLINE void DemoClass::say_hello(int n, std::string_view what) {
    printf("Hello, %.*s %d\n", (int)what.size(), what.data(), n);
}

FORCE_NO_INLINE void say_hello_fun(int n, std::string_view what) {
    printf("Hello, %.*s %d\n", (int)what.size(), what.data(), n);
}

FORCE_NO_INLINE Greeter *make_greeter() { return new Greeter(); }

static void *spin(void *arg) {
    Greeter *g = static_cast<Greeter *>(arg);
    for (;;) {
        long v = g->greet(41);
        if (v != 42 && v != 1041 && v != 2041 && v != 3041) {
            printf("BAD %ld\n", v);
            fflush(stdout);
            abort();
        }
    }
    return nullptr;
}

int main() {
    Greeter *base = make_greeter();
    Greeter local;  // its type is known here: g++ calls Greeter::greet directly (devirtualised)
    pthread_t t[2];
    for (auto &th : t) pthread_create(&th, nullptr, spin, make_greeter());
    printf("ready\n");
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        DemoClass demo;
        demo.say_hello(42, "from C++ member function!");
        say_hello_fun(42, "from C function!");
        printf("greet %ld %ld\n", base->greet(41), local.greet(41));
        fflush(stdout);
    }
    return 0;
}
