/* clones_part_patch.c - replaces scaled() of clones.c and its partial-inlining clone scaled.part.0 (which gcc
 * calls with the same argument once the inlined head found x >= 0): 3x + 100 either way. */
long scaled(long x) { return x < 0 ? -1 : 3 * x + 100; }
long scaled_part(long x) __asm__("scaled.part.0");
long scaled_part(long x) { return 3 * x + 100; }
