/* hotpatch.h - shipped with hotpatch; `hotpatch build` adds its directory to the include path.
 *
 * HOTPATCH_ORIGINAL(fn)(args...) calls the original version of a replaced function `fn` from its
 * replacement, through the trampoline hotpatch builds at apply time (the overwritten instructions,
 * relocated, plus a jump back into `fn`).
 *
 * How: each use keeps a pointer in the section "hotpatch_original", initialised to &fn. When hotpatch loads
 * the patch, it resolves the relocations of that section to the trampoline of `fn` instead of to its
 * replacement. The pointer is volatile so the compiler cannot fold it to &fn.
 */
#ifndef HOTPATCH_H
#define HOTPATCH_H

#define HOTPATCH_ORIGINAL(fn)                                                                              \
    (*({                                                                                                   \
        static __typeof__(&(fn)) volatile hotpatch_original_slot_                                          \
            __attribute__((section("hotpatch_original"), used)) = &(fn);                                   \
        hotpatch_original_slot_;                                                                           \
    }))

#endif /* HOTPATCH_H */
