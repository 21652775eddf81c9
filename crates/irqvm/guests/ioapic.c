/* ioapic: not written yet. */
#include "guest.h"

void guest_main(void) { skip("ioapic", "not written yet"); }
