/* ipi: not written yet. */
#include "guest.h"

void guest_main(void) { skip("ipi", "not written yet"); }
