/* pic: not written yet. */
#include "guest.h"

void guest_main(void) { skip("pic", "not written yet"); }
