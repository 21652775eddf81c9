/*
 * irqvm-exit STATUS: ends the VM through isa-debug-exit (a byte written to port 0xF4; the VMM
 * exits with (STATUS << 1) | 1). Debian's kernel has no /dev/port (CONFIG_DEVPORT is off), so
 * the init script needs this: ioperm(2) grants the port to the process, outb writes it.
 * Built by linux-boot.sh with gcc -static (the initramfs has no C library).
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/io.h>

#define DEBUG_EXIT_PORT 0xf4

int main(int argc, char **argv)
{
	int status = argc > 1 ? atoi(argv[1]) : 1;

	if (ioperm(DEBUG_EXIT_PORT, 1, 1) != 0) {
		perror("irqvm-exit: ioperm");
		return 1;
	}
	outb((unsigned char)status, DEBUG_EXIT_PORT);
	/* Not reached when the VMM has isa-debug-exit. */
	fprintf(stderr, "irqvm-exit: the VM did not end\n");
	return 1;
}
