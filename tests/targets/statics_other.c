/* statics_other.c - a second translation unit with its own static `calls`: linked with statics.c, the name
 * `calls` means two variables, and a patch naming it must be refused. */
static long calls = 5;

long other_calls(void) { return ++calls; }
