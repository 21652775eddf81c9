/* tpr: not written yet. */
#include "guest.h"

void guest_main(void) { skip("tpr", "not written yet"); }
