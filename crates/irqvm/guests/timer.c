/* timer: not written yet. */
#include "guest.h"

void guest_main(void) { skip("timer", "not written yet"); }
