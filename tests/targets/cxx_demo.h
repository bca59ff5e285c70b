/* cxx_demo.h - the classes of cxx_demo.cc, as a C++ program's header; its patches include it too (seed 004). */
#ifndef CXX_DEMO_H
#define CXX_DEMO_H
#include <string_view>

#define FORCE_NO_INLINE __attribute__((noinline))

struct Greeter {
    virtual long greet(long x);
    virtual ~Greeter() = default;
};

class DemoClass {
  public:
    void say_hello(int n, std::string_view what);
};

void say_hello_fun(int n, std::string_view what);

#endif
