/* storm: not written yet. */
#include "guest.h"

void guest_main(void) { skip("storm", "not written yet"); }
