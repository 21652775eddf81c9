/* demo: not written yet. */
#include "guest.h"

void guest_main(void) { skip("demo", "not written yet"); }
