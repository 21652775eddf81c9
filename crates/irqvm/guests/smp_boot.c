/* smp_boot: not written yet. */
#include "guest.h"

void guest_main(void) { skip("smp_boot", "not written yet"); }
